"""A label map on a DICOM series' grid as a DICOM Segmentation (SEG) object, through highdicom.

The SEG references the source series (its study, frame of reference and every slice's SOP instance, one frame per
slice), so PACS viewers show it on top of the images. Each output of the model is one segment: its label is the
dataset's class name (or region name, e.g. BraTS ``TC``/``WT``/``ET``, whose segments overlap), its category and
type the generic SNOMED CT code *Tissue* (the class name is not mapped to anatomy codes), its algorithm
``sparseseg`` (automatic, artificial intelligence). Needs the ``dicom`` extra: ``pip install 'sparseseg[dicom]'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sparseseg.data.geometry import ImageGrid
from sparseseg.errors import InputError

SERIES_NUMBER_OFFSET = 1000  # the SEG series number: the source's plus this
TISSUE = ("85756007", "SCT", "Tissue")


def _require_highdicom() -> Any:
    try:
        import highdicom
    except ImportError as err:
        raise InputError("DICOM SEG output needs highdicom and pydicom: pip install 'sparseseg[dicom]'") from err
    return highdicom


def check_dicom_seg_available() -> None:
    """Raise :class:`InputError` before any work when highdicom is missing."""
    _require_highdicom()


def segment_masks(labels: np.ndarray, segments: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Label map ``[F, R, C]`` -> what highdicom takes: segment numbers ``[F, R, C]`` (1, 2, ...; 0 outside) when no
    label value is in two segments, else one boolean mask per segment ``[F, R, C, S]`` (overlapping regions)."""
    values = [list(v) for v in segments.values()]
    flat = [v for vs in values for v in vs]
    if len(flat) == len(set(flat)):
        lut = np.zeros(max([int(labels.max()), *flat]) + 1, dtype=np.uint8)
        for number, vs in enumerate(values, start=1):
            lut[vs] = number
        return lut[labels]  # label values -> segment numbers
    return np.stack([np.isin(labels, vs) for vs in values], axis=-1)  # S x [F, R, C] -> [F, R, C, S]


def build_dicom_seg(labels: np.ndarray, grid: ImageGrid, segments: Mapping[str, Sequence[int]], version: str) -> Any:
    """A ``highdicom.seg.Segmentation`` of ``labels`` ``[X, Y, Z]`` on the DICOM series ``grid``.

    ``segments`` maps each segment label to the label values it covers (``{"spleen": [1]}``, or regions such as
    ``{"WT": [1, 2, 3], "TC": [2, 3]}``). Frame ``k`` is slice ``k`` of the series (``grid.files[k]``).
    """
    hd = _require_highdicom()
    from pydicom import dcmread
    from pydicom.sr.coding import Code

    if grid.format != "dicom" or not grid.files:
        raise InputError("a DICOM SEG needs a DICOM series as input", grid.path)
    if not segments:
        raise InputError("a DICOM SEG needs at least one segment (the checkpoint has no foreground class)", grid.path)
    sources = [dcmread(str(f), stop_before_pixels=True) for f in grid.files]
    frames = np.transpose(np.asarray(labels), (2, 1, 0))  # [X, Y, Z] -> [Z, Y, X]: slices of rows x columns
    tissue = Code(*TISSUE)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="sparseseg", version=version, family=Code("123109", "DCM", "Artificial Intelligence"))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=tissue,
            segmented_property_type=tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for number, name in enumerate(segments, start=1)
    ]
    series_number = int(getattr(sources[0], "SeriesNumber", None) or 0) + SERIES_NUMBER_OFFSET
    try:
        return hd.seg.Segmentation(
            source_images=sources, pixel_array=segment_masks(frames, segments),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="sparseseg", manufacturer_model_name="sparseseg",
            software_versions=version, device_serial_number="0", series_description="sparseseg segmentation")
    except (ValueError, TypeError, AttributeError) as err:
        message = f"{type(err).__name__}: {err}".replace("\n", " ")
        raise InputError(f"cannot make a DICOM SEG of this series ({message})", grid.path) from err
