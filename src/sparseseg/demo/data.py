"""The demo's dataset: the ICBM152 2009 brain template that the ``nilearn`` wheel ships, as an MSD dataset folder.

nilearn keeps the MNI ICBM152 2009 (nonlinear symmetric, "09a") T1 template and its grey- and white-matter
probability maps inside its own package (``nilearn/datasets/data``); ``load_mni152_*`` read those files and
resample them locally, with no network access. From them:

* image: the T1 template at the chosen resolution (2 mm: 99 x 117 x 95 voxels), intensities already in [0, 1];
* label: 0 background outside the brain mask (T1 > 0.2, nilearn's own mask), and inside it the argmax of
  (1 - GM - WM, GM, WM): 1 = CSF and the rest of the brain, 2 = grey matter, 3 = white matter;
* both cropped to the brain's bounding box plus a small margin (fewer empty voxels to train and predict on);
* a split along the anterior-posterior axis (voxel axis 1, RAS): the anterior ``test_fraction`` of the brain is
  the held-out test block, everything behind it is the training case. The template is left-right symmetric, so a
  hemisphere split would test on the mirror image of the training data; an anterior block is unseen anatomy
  (frontal lobe), while the training part keeps every kind of tissue, the cerebellum included.

The folder follows the Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr``, ``labelsTr``,
``imagesTs``) plus ``labelsTs`` with the reference of the test block, so the ordinary pipeline reads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparseseg.data.io import atomic_write, save_nifti

log = logging.getLogger(__name__)

CLASS_NAMES = ("background", "csf_and_other", "grey_matter", "white_matter")
AP_AXIS = 1  # voxel axis 1 runs posterior -> anterior in the template (RAS)
TRAIN_CASE = "icbm152_posterior"
TEST_CASE = "icbm152_anterior"


@dataclass
class Template:
    """The template on its voxel grid: ``image`` ``[X, Y, Z]`` float32, ``label`` ``[X, Y, Z]`` uint8, ``affine``."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def load_template(resolution: int = 2) -> Template:
    """T1 image and tissue labels of the ICBM152 2009 template from the files inside the nilearn package."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).get_fdata()) > 0
    image = np.clip(np.asarray(t1.get_fdata(), dtype=np.float32), 0.0, None)
    rest = np.clip(1.0 - gm - wm, 0.0, None)
    tissue = np.stack([rest, gm, wm]).argmax(0) + 1  # [3, X, Y, Z] -> [X, Y, Z] in {1, 2, 3}
    label = np.where(mask, tissue, 0).astype(np.uint8)
    return Template(image=image, label=label, affine=np.asarray(t1.affine, dtype=np.float64))


def crop(t: Template, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> Template:
    """The sub-volume ``[lo, hi)`` with its affine moved to the new first voxel."""
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    affine = t.affine.copy()
    affine[:3, 3] = t.affine[:3, :3] @ np.asarray(lo, dtype=np.float64) + t.affine[:3, 3]
    return Template(image=t.image[box].copy(), label=t.label[box].copy(), affine=affine)


def brain_box(label: np.ndarray, margin: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Bounding box ``(lo, hi)`` of the non-zero labels grown by ``margin`` voxels, clipped to the volume."""
    idx = np.argwhere(label > 0)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, label.shape)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)  # type: ignore[return-value]


def split_anterior(t: Template, test_fraction: float) -> tuple[Template, Template, int]:
    """Split at the A-P slice that leaves the anterior ``test_fraction`` of the brain's extent in the test block.

    Returns ``(train, test, cut)``; ``cut`` is the first test slice along :data:`AP_AXIS` of ``t``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    slices = np.flatnonzero(t.label.any(axis=(0, 2)))
    first, last = int(slices[0]), int(slices[-1])
    cut = last + 1 - max(1, round(test_fraction * (last + 1 - first)))
    shape = t.label.shape
    train = crop(t, (0, 0, 0), (shape[0], cut, shape[2]))
    test = crop(t, (0, cut, 0), shape)
    return train, test, cut


def replicate_pad(array: np.ndarray, affine: np.ndarray, before: int, axis: int = AP_AXIS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``before`` copies of the first slice along ``axis`` in front of ``array`` ``[X, Y, Z]``.

    Used at the cut face of the test block before sliding-window inference: zero padding there looks like the
    dark rim of the brain and makes the models paint a false CSF line along the cut. Returns the padded array and
    its affine (same world positions for the original voxels)."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (before, 0)
    padded = np.pad(array, widths, mode="edge")
    shift = np.zeros(3)
    shift[axis] = -before
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ shift + affine[:3, 3]
    return padded, out


def build_dataset(output_dir: str | Path, resolution: int = 2, test_fraction: float = 0.3, margin: int = 4) -> Path:
    """Write the MSD-style demo dataset under ``output_dir``; returns the ``dataset.json`` path.

    Args:
        output_dir: dataset folder (created; existing files of the same names are replaced).
        resolution: voxel size in mm handed to nilearn (2 for the demo, 4 for the quick run).
        test_fraction: share of the brain's anterior-posterior extent held out, at the anterior end.
        margin: voxels kept around the brain's bounding box.
    """
    root = Path(output_dir)
    full = load_template(resolution)
    t = crop(full, *brain_box(full.label, margin))
    train, test, cut = split_anterior(t, test_fraction)
    files = {}
    for case, part, split in ((TRAIN_CASE, train, "Tr"), (TEST_CASE, test, "Ts")):
        img = save_nifti(part.image, root / f"images{split}" / f"{case}.nii.gz", part.affine, dtype=np.float32)
        lab = save_nifti(part.label, root / f"labels{split}" / f"{case}.nii.gz", part.affine, dtype=np.uint8)
        files[case] = (img, lab)
        counts = np.bincount(part.label.ravel(), minlength=len(CLASS_NAMES))
        log.info("%s: %s voxels, class counts %s", case, "x".join(map(str, part.label.shape)), counts.tolist())
    meta = {
        "name": f"ICBM152_{resolution}mm",
        "description": "ICBM152 2009 (nonlinear symmetric) T1 template with tissue classes from its GM/WM maps, "
                       "split along the anterior-posterior axis: the anterior block is the test case",
        "reference": "Fonov et al., NeuroImage 2011 (via the nilearn package data)",
        "licence": "see the ICBM152 2009 copyright notice (free use with acknowledgement)",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "numTraining": 1,
        "numTest": 1,
        "training": [{"image": f"./imagesTr/{TRAIN_CASE}.nii.gz", "label": f"./labelsTr/{TRAIN_CASE}.nii.gz"}],
        "test": [f"./imagesTs/{TEST_CASE}.nii.gz"],
        "split": {"axis": "anterior-posterior (voxel axis 1)", "test_fraction": test_fraction,
                  "first_test_slice_in_crop": cut, "resolution_mm": resolution,
                  "train_shape": list(train.label.shape), "test_shape": list(test.label.shape)},
    }
    path = root / "dataset.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return path
