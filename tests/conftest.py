"""Shared fixtures: synthetic MSD / nnU-Net datasets on disk and a tiny registered segmentation model."""

from __future__ import annotations

import json
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import _MODELS, create_model, list_models, register_model

# A non-axis-aligned, anisotropic affine (LPS-like flips + 1.5 mm slices) so geometry bugs show up.
TEST_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 10.0], [0.0, -1.2, 0.0, 20.0], [0.0, 0.0, 1.5, -5.0], [0.0, 0.0, 0.0, 1.0]]
)


# ITK (LPS) direction matrices, columns = voxel axes: an oblique rotation, and a sagittal order (voxel axes along
# anterior, inferior, left: far from RAS) as scanners and 3D Slicer write them.
OBLIQUE = sitk.VersorRigid3DTransform((1.0, 1.0, 1.0), 0.3).GetMatrix()
SAGITTAL = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
ITK_SPACING = (0.8, 0.9, 2.0)
ITK_ORIGIN = (10.0, -20.0, 5.0)


def itk_volume(array: np.ndarray, direction=OBLIQUE, spacing=ITK_SPACING, origin=ITK_ORIGIN) -> sitk.Image:
    """A SimpleITK image of ``array`` ``[X, Y, Z]`` (or ``[X, Y, Z, C]`` components) with the given geometry."""
    if array.ndim == 4:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0, 3)), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))  # [X, Y, Z] -> [Z, Y, X]
    image.SetDirection(direction)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def write_dicom_series(array: np.ndarray, folder: Path, direction=OBLIQUE, spacing=ITK_SPACING, origin=ITK_ORIGIN,
                       series: int = 1, skip: tuple[int, ...] = (), shift: dict[int, float] | None = None) -> Path:
    """One CT series of ``array`` ``[X, Y, Z]`` (int16), one file per slice, written by SimpleITK (GDCM).

    ``skip`` leaves slices out (a missing slice); ``shift`` moves slice ``k`` by that many mm along the normal
    (uneven spacing)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = itk_volume(array.astype(np.int16), direction, spacing, origin)
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the C locale (ASCII text I/O) for good
    try:
        _write_slices(image, folder, series, skip, shift or {})
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return folder


def _write_slices(image: sitk.Image, folder: Path, series: int, skip: tuple[int, ...], shift: dict[int, float]) -> None:
    d = image.GetDirection()
    normal = np.asarray(d).reshape(3, 3)[:, 2]
    root = "1.2.826.0.1.3680043.8.498"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        if k in skip:
            continue
        position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k))) + shift.get(k, 0.0) * normal
        tags = {"0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{root}.{series}.{k + 1}", "0008|0060": "CT",
                "0010|0010": "Test^Patient", "0010|0020": "P001", "0020|000d": f"{root}.100",
                "0020|000e": f"{root}.{series}", "0020|0011": str(series), "0020|0013": str(k + 1),
                "0020|0052": f"{root}.200", "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                "0020|0037": "\\".join(f"{v:.9f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0018|0050": str(image.GetSpacing()[2])}
        slice_ = image[:, :, k]
        slice_.SetOrigin(tuple(float(v) for v in position))
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{series}_{k:03d}.dcm"))
        writer.Execute(slice_)


def synthetic_case(shape=(24, 24, 24), seed: int = 0, channels: int = 1, ct: bool = True):
    """An image ``[X, Y, Z, C]`` (or ``[X, Y, Z]`` for one channel) and a label ``[X, Y, Z]`` with classes 0/1/2:
    a ball (1) holding a smaller bright cube (2), at a seeded random position."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    centre = np.array([s / 2 for s in shape]) + rng.uniform(-3, 3, size=3)
    radius = min(shape) / 4
    ball = np.linalg.norm(grid - centre, axis=-1) < radius
    cube = (np.abs(grid - centre) < radius / 2.5).all(-1)
    label = np.where(cube, 2, np.where(ball, 1, 0)).astype(np.uint8)
    base = np.array([-600.0, 60.0, 250.0]) if ct else np.array([0.0, 300.0, 700.0])
    chans = []
    for c in range(channels):
        img = base[label] * (1 + 0.2 * c) + rng.normal(0, 20, size=shape)
        if not ct:
            img = np.where(np.linalg.norm(grid - np.array(shape) / 2, axis=-1) < min(shape) * 0.48, img + 100, 0)
        chans.append(img.astype(np.float32))
    image = chans[0] if channels == 1 else np.stack(chans, -1)
    return image, label


def save(array: np.ndarray, path: Path, affine: np.ndarray = TEST_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_msd_dataset(root: Path, num_cases: int = 4, shape=(24, 24, 24), channels: int = 1, ct: bool = True,
                      num_test: int = 1) -> Path:
    """An MSD-style dataset (4-D images when ``channels > 1``) under ``root``; returns the dataset.json path."""
    training, test = [], []
    for i in range(num_cases + num_test):
        image, label = synthetic_case(shape, seed=i, channels=channels, ct=ct)
        name = f"case_{i:03d}.nii.gz"
        if i < num_cases:
            save(image, root / "imagesTr" / name)
            save(label, root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:  # MSD ships no test labels; labelsTs lets tests score predictions of the test cases
            save(image, root / "imagesTs" / name)
            save(label, root / "labelsTs" / name)
            test.append(f"./imagesTs/{name}")
    modality = {str(c): ("CT" if ct else f"MR{c}") for c in range(channels)}
    meta = {"name": "Synthetic", "modality": modality, "labels": {"0": "background", "1": "ball", "2": "core"},
            "numTraining": num_cases, "training": training, "test": test}
    path = root / "dataset.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def write_nnunet_dataset(root: Path, num_cases: int = 3, shape=(20, 20, 20), channels: int = 2,
                         ct: bool = False) -> Path:
    """An nnU-Net v2 raw dataset (one file per channel) under ``root``; returns the dataset.json path."""
    for i in range(num_cases):
        image, label = synthetic_case(shape, seed=i, channels=channels, ct=ct)
        image = image if channels > 1 else image[..., None]
        for c in range(channels):
            save(image[..., c], root / "imagesTr" / f"case{i}_{c:04d}.nii.gz")
        save(label, root / "labelsTr" / f"case{i}.nii.gz")
    meta = {"channel_names": {str(c): ("CT" if ct else f"T{c + 1}") for c in range(channels)},
            "labels": {"background": 0, "ball": 1, "core": 2}, "numTraining": num_cases,
            "file_ending": ".nii.gz", "name": "SyntheticNN"}
    path = root / "dataset.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


class TinySeg(nn.Module):
    """Two 3^3 convolutions and a 1^3 head; follows the model output contract (deep supervision included)."""

    def __init__(self, *, in_channels: int = 1, out_channels: int = 3, img_size=24, feature_size: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, feature_size, 3, padding=1), nn.InstanceNorm3d(feature_size, affine=True),
            nn.GELU(), nn.Conv3d(feature_size, feature_size, 3, padding=1), nn.GELU(),
        )
        self.head = nn.Conv3d(feature_size, out_channels, 1)
        self.head_low = nn.Conv3d(feature_size, out_channels, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None):
        f = self.body(x)
        logits = self.head(f)
        if not self.training:
            return logits
        low = self.head_low(nn.functional.avg_pool3d(f, 2))  # [B, F, D, H, W] -> [B, K, D/2, H/2, W/2]
        return SegmentationOutput(logits, {"tiny_l2": 1e-4 * logits.pow(2).mean()}, [low])


if "tiny_seg" not in list_models():
    register_model("tiny_seg", presets={})(TinySeg)


# Tiny arguments for every model the library registers: tests that must hold for all of them iterate over these.
_VIT = {"img_size": 32, "hidden_size": 48, "mlp_dim": 96, "num_layers": 3, "num_heads": 3, "feature_size": 4,
        "patch_size": 8, "decoder": "v2"}
TINY_MODELS: dict[str, dict] = {
    "unetr": {**_VIT, "in_channels": 1, "out_channels": 3, "skip_layers": (1, 2, 3)},
    "stp_mta_unetr": {**_VIT, "in_channels": 1, "out_channels": 3, "prune_after": (1, 2), "prune_ratio": 0.5,
                      "completion_size": 48, "completion_heads": 3},
    "tokenseg": {"in_channels": 2, "out_channels": 3, "img_size": 32, "feature_size": 4, "token_size": 24,
                 "num_heads": 2, "tokens_per_level": (40, 30, 20, 8), "num_candidates": 98, "num_keep": 24,
                 "codebook_size": 64, "mixer_depth": 1},
    "veloxseg": {"in_channels": 2, "out_channels": 3, "img_size": 24, "modalities": (1, 1), "channels": (8, 16),
                 "num_heads": (1, 2), "head_dim": (4, 8), "group_channels": (4, 8), "window_size": (3, 3)},
    "dynunet": {"in_channels": 2, "out_channels": 3, "img_size": 16, "min_feature_map_size": 2, "base_features": 4,
                "max_features": 16},
}
LIBRARY_MODELS = [name for name in list_models() if _MODELS[name].__module__.startswith("sparseseg.")]


def tiny_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """The library model ``name`` at its tiny size, in eval mode, and the shape of one input ``[1, C, D, H, W]``."""
    torch.manual_seed(seed)
    args = TINY_MODELS[name]
    return create_model(name, **args).eval(), (1, args["in_channels"], *(args["img_size"],) * 3)


def tiny_checkpoint(path: Path, in_channels: int = 1) -> Path:
    """An untrained ``tiny_seg`` checkpoint with 3 classes and 8^3 crops, written to ``path`` (for input checks)."""
    from sparseseg.checkpoint import save_checkpoint
    from sparseseg.data.transforms import DataConfig
    from sparseseg.models.common.registry import create_model

    model = create_model("tiny_seg", in_channels=in_channels, out_channels=3, feature_size=4)
    data = DataConfig(in_channels=in_channels, label_values=[0, 1, 2], class_names=["bg", "a", "b"],
                      roi_size=[8, 8, 8])
    return save_checkpoint(path, model, data.to_dict())


@pytest.fixture
def msd_dataset(tmp_path: Path) -> Path:
    return write_msd_dataset(tmp_path / "Task00_Synthetic")


@pytest.fixture
def nnunet_dataset(tmp_path: Path) -> Path:
    return write_nnunet_dataset(tmp_path / "Dataset001_Synthetic")
