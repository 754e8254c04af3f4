"""Datasets (MSD / nnU-Net v2 ``dataset.json``), NIfTI input/output and MONAI preprocessing presets."""

from __future__ import annotations

from sparseseg.data.datasets import BRATS_REGIONS, Case, Dataset, load_dataset, split_cases
from sparseseg.data.io import Volume, load_image, load_label, save_nifti
from sparseseg.data.transforms import DataConfig, build_transforms, invert_to_input, regions_to_labels

__all__ = [
    "BRATS_REGIONS",
    "Case",
    "DataConfig",
    "Dataset",
    "Volume",
    "build_transforms",
    "invert_to_input",
    "load_dataset",
    "load_image",
    "load_label",
    "regions_to_labels",
    "save_nifti",
    "split_cases",
]
