"""Preprocessing presets and training augmentation, built from MONAI transforms.

A :class:`DataConfig` (stored in every checkpoint) fully describes the preprocessing, so inference rebuilds it
from the checkpoint alone. Pipeline, in order (spatial steps are invertible, see :func:`invert_to_input`):

1. load the case (:class:`LoadCased`: one 4-D file or one file per channel; label values checked);
2. optional reorientation (``orientation``, e.g. ``"RAS"``) and resampling (``target_spacing`` in mm);
3. intensity: ``ct`` clips to a HU window and rescales (default [-958, 326] -> [-1, 1]); ``mri`` z-scores
   each channel over its non-zero voxels; ``none`` leaves values alone;
4. labels: class indices ``[1, D, H, W]``, or multi-hot regions ``[R, D, H, W]`` (e.g. BraTS TC/WT/ET);
5. optional crop to the non-zero foreground of the image;
6. training only: pad to the ROI, ``num_samples`` random ROI crops per case centred on foreground/background with
   probability 1:1, random flips, rot90, intensity scale and shift (the UNETR recipe).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from sparseseg.data.io import load_image, load_label
from sparseseg.errors import InputError

INTENSITY_PRESETS = ("ct", "mri", "none")
DEFAULT_CT_WINDOW = (-958.0, 326.0, -1.0, 1.0)


@dataclass
class DataConfig:
    """Everything the preprocessing needs; plain values only (saved in checkpoints as a dict).

    ``label_values`` are the raw values a label map may hold; ``class_names`` name the model's output channels;
    ``regions`` (one list of label values per output channel) switches to sigmoid multi-hot outputs.
    """

    in_channels: int
    label_values: list[int]
    class_names: list[str]
    roi_size: list[int]
    intensity: str = "mri"
    ct_window: list[float] = field(default_factory=lambda: list(DEFAULT_CT_WINDOW))
    target_spacing: list[float] | None = None
    orientation: str | None = None
    crop_foreground: bool = False
    regions: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_PRESETS:
            raise ValueError(f"intensity must be one of {INTENSITY_PRESETS}, got {self.intensity!r}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be 3 positive integers, got {self.roi_size}")
        if len(self.ct_window) != 4:
            raise ValueError(f"ct_window must be [a_min, a_max, b_min, b_max], got {self.ct_window}")
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise ValueError(f"target_spacing must be 3 positive numbers in mm, got {self.target_spacing}")

    @property
    def out_channels(self) -> int:
        return len(self.regions) if self.regions else len(self.class_names)

    @property
    def sigmoid(self) -> bool:
        return bool(self.regions)

    @property
    def segments(self) -> dict[str, list[int]]:
        """Each output's name -> the label values it covers: the regions, or one class per foreground value."""
        if self.regions:
            return {name: list(r) for name, r in zip(self.class_names, self.regions, strict=True)}
        return {name: [v] for v, name in zip(self.label_values, self.class_names, strict=False) if v != 0}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()})


class LoadCased(MapTransform):
    """Load ``data["image"]`` (list of paths) as a MetaTensor ``[C, D, H, W]`` with its affine, and
    ``data["label"]`` (path, optional) as ``[1, D, H, W]``; bad files raise :class:`InputError`."""

    def __init__(self, label_values: Sequence[int] | None = None, in_channels: int | None = None):
        super().__init__(keys=("image", "label"), allow_missing_keys=True)
        self.label_values = None if label_values is None else list(label_values)
        self.in_channels = in_channels

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        paths = d["image"] if isinstance(d["image"], (list, tuple)) else [d["image"]]
        vol = load_image(paths)
        if self.in_channels is not None and vol.array.shape[0] != self.in_channels:
            raise InputError(f"has {vol.array.shape[0]} channel(s), expected {self.in_channels}", paths[0])
        meta = {"filename_or_obj": str(paths[0]), "spatial_shape": np.asarray(vol.spatial_shape)}
        affine = torch.as_tensor(vol.affine, dtype=torch.float64)
        d["image"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(vol.array)), affine=affine, meta=meta)
        if d.get("label") is not None:
            lab = load_label(d["label"], vol.spatial_shape, self.label_values, reference=vol.grid)
            d["label"] = MetaTensor(torch.from_numpy(lab.array), affine=affine.clone(),
                                    meta={"filename_or_obj": str(lab.path)})
        return d


class LabelToRegionsd(MapTransform):
    """Class-index label ``[1, D, H, W]`` -> multi-hot regions ``[R, D, H, W]`` (float), one per label set."""

    def __init__(self, regions: Sequence[Sequence[int]], keys: str = "label"):
        super().__init__(keys=(keys,), allow_missing_keys=True)
        self.regions = [list(r) for r in regions]

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            chans = [torch.isin(lab[0], torch.as_tensor(r, device=lab.device)) for r in self.regions]
            out = torch.stack(chans).to(torch.float32)  # R x [D, H, W] -> [R, D, H, W]
            if isinstance(lab, MetaTensor):
                out = MetaTensor(out, meta=dict(lab.meta), applied_operations=list(lab.applied_operations))
            d[key] = out
        return d


def _spatial(cfg: DataConfig, keys: list[str]) -> list:
    ts: list = []
    if cfg.orientation:
        ts.append(Orientationd(keys=keys, axcodes=cfg.orientation, labels=None))
    if cfg.target_spacing:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        # Resampled in float32, the images' own type: MONAI's float64 default holds the volume and its sampling
        # grid twice over (an abdominal CT of 512 x 512 x 300: 2.3 GB peak against 1.3 GB).
        ts.append(Spacingd(keys=keys, pixdim=cfg.target_spacing, mode=modes, dtype=np.float32))
    return ts


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return x != 0


def _positive(x: torch.Tensor) -> torch.Tensor:
    return x > 0


def _foreground_rule(cfg: DataConfig):
    """What ``crop_foreground`` keeps: for ``mri`` the non-zero voxels (the z-score of the non-zero voxels leaves the
    zeros around a skull-stripped head at 0, so this is nnU-Net's crop to the non-zero region); otherwise MONAI's
    default, voxels > 0 after the intensity preset (the STP + MTA authors' BTCV crop on the [-1, 1] CT window)."""
    return _nonzero if cfg.intensity == "mri" else _positive


def _intensity(cfg: DataConfig) -> list:
    if cfg.intensity == "ct":
        a_min, a_max, b_min, b_max = cfg.ct_window
        return [ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True)]
    if cfg.intensity == "mri":
        return [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]
    return []


def _augment(cfg: DataConfig, num_samples: int = 1) -> list:
    roi = list(cfg.roi_size)
    ts: list = [
        SpatialPadd(keys=["image", "label"], spatial_size=roi),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=roi, pos=1, neg=1,
                               num_samples=num_samples, allow_smaller=True),
        RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=0),
        RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=1),
        RandFlipd(keys=["image", "label"], prob=0.1, spatial_axis=2),
    ]
    # rot90 only in a plane where the ROI is square, so every crop keeps the ROI shape.
    planes = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if roi[a] == roi[b]]
    if planes:
        ts.append(RandRotate90d(keys=["image", "label"], prob=0.1, max_k=3, spatial_axes=planes[0]))
    ts += [RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
           RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)]
    return ts


def build_transforms(cfg: DataConfig, mode: str = "train", num_samples: int = 1) -> Compose:
    """The MONAI pipeline for ``mode`` in ``{"train", "val", "infer"}`` (``infer``: image only).

    Input dicts hold ``"image"`` (a list of paths) and, for train/val, ``"label"`` (a path). In training each case
    gives a list of ``num_samples`` random crops, which MONAI's ``DataLoader`` flattens into the batch.
    """
    if mode not in ("train", "val", "infer"):
        raise ValueError(f"mode must be train, val or infer, got {mode!r}")
    keys = ["image"] if mode == "infer" else ["image", "label"]
    label_values = None if mode == "infer" else cfg.label_values
    ts: list = [LoadCased(label_values=label_values, in_channels=cfg.in_channels)]
    ts += _spatial(cfg, keys)
    ts += _intensity(cfg)
    if mode != "infer" and cfg.regions:
        ts.append(LabelToRegionsd(cfg.regions))
    if cfg.crop_foreground:
        ts.append(CropForegroundd(keys=keys, source_key="image", select_fn=_foreground_rule(cfg), allow_smaller=True))
    if mode == "train":
        ts += _augment(cfg, num_samples)
    ts.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return Compose(ts)


def invert_to_input(probs: torch.Tensor, image: MetaTensor, pipeline: Compose) -> torch.Tensor:
    """Map per-channel probabilities ``[K, d, h, w]`` on the preprocessed grid of ``image`` back onto the grid of
    the input file ``[K, D, H, W]`` by inverting the pipeline's spatial transforms (crop, spacing, orientation).

    Probabilities are resampled with (tri)linear interpolation and the cropped-away border is filled with 0.
    """
    if not image.applied_operations:  # no spatial preprocessing: already on the input grid
        return probs.detach().cpu().float()
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    pred = MetaTensor(probs.detach().cpu().float(), affine=image.affine, meta=meta,
                      applied_operations=copy.deepcopy(list(image.applied_operations)))  # the inverse pops from them
    out = pipeline.inverse({"image": pred})["image"]
    return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)


def region_paint_order(regions: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``(region index, label value)`` in the order :func:`regions_to_labels` paints them: larger regions first,
    each painting the smallest label value it has beyond the regions nested in it."""
    sets = [set(r) for r in regions]
    order = []
    for i in sorted(range(len(sets)), key=lambda j: -len(sets[j])):
        nested = set().union(*[s for s in sets if s < sets[i]])
        order.append((i, min(sets[i] - nested or sets[i])))
    return order


def regions_to_labels(masks: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Binary region masks ``[R, D, H, W]`` -> a label map ``[D, H, W]`` in the dataset's label values.

    Larger regions are painted first; each region paints the label values it has beyond the regions nested in
    it (BraTS: WT -> 1, TC -> 2, ET -> 3, which recovers the MSD Task01 labels).
    """
    out = torch.zeros(masks.shape[1:], dtype=torch.uint8, device=masks.device)
    for i, value in region_paint_order(regions):
        out[masks[i].bool()] = value
    return out


@contextmanager
def unwrap_input_errors() -> Iterator[None]:
    """Re-raise an :class:`InputError` that MONAI wrapped (``Compose`` turns errors into ``RuntimeError``)."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:
        cause: BaseException | None = err
        seen = set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, InputError):
                raise cause from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        raise
