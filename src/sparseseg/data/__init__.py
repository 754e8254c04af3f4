"""Datasets (MSD / nnU-Net v2 ``dataset.json``), image input/output (NIfTI, NRRD, MetaImage, DICOM series, DICOM SEG)
and MONAI preprocessing presets."""

from __future__ import annotations

from sparseseg.data.cases import collect_cases
from sparseseg.data.datasets import BRATS_REGIONS, Case, Dataset, load_dataset, split_cases
from sparseseg.data.geometry import ImageGrid
from sparseseg.data.io import Volume, load_image, load_label, read_grid, save_nifti
from sparseseg.data.outputs import write_prediction
from sparseseg.data.transforms import DataConfig, build_transforms, invert_to_input, regions_to_labels

__all__ = [
    "BRATS_REGIONS",
    "Case",
    "DataConfig",
    "Dataset",
    "ImageGrid",
    "Volume",
    "build_transforms",
    "collect_cases",
    "invert_to_input",
    "load_dataset",
    "load_image",
    "load_label",
    "read_grid",
    "regions_to_labels",
    "save_nifti",
    "split_cases",
    "write_prediction",
]
