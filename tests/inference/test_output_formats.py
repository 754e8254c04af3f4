"""Predictions of NRRD, MetaImage and DICOM series inputs: on the input's exact grid, in its format or the one asked
for, the same labels as for the same voxels in NIfTI; DICOM SEG read back with highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from conftest import OBLIQUE, SAGITTAL, itk_volume, save, synthetic_case, write_dicom_series
from sparseseg.checkpoint import save_checkpoint
from sparseseg.data.formats import file_format, prediction_path
from sparseseg.data.io import read_grid, read_header_shape
from sparseseg.data.transforms import DataConfig
from sparseseg.errors import InputError
from sparseseg.evaluation.metrics import evaluate
from sparseseg.inference.predictor import collect_cases, predict
from sparseseg.models.common.registry import create_model

SHAPE = (12, 10, 8)
SOURCE_SERIES = "1.2.826.0.1.3680043.8.498.1"


def _checkpoint(path: Path, class_names: list[str], regions: list[list[int]] | None = None) -> Path:
    """An untrained ``tiny_seg`` (seeded, head bias 0, CT window) whose labels vary over the synthetic image."""
    torch.manual_seed(0)
    model = create_model("tiny_seg", in_channels=1, out_channels=len(class_names), feature_size=4)
    with torch.no_grad():
        model.head.bias.zero_()
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=class_names, roi_size=[8, 8, 8],
                      intensity="ct", regions=regions)
    return save_checkpoint(path, model, data.to_dict())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", ["bg", "a", "b"])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.rint(synthetic_case(SHAPE, seed=4)[0]).astype(np.int16)  # [X, Y, Z]: exact in every format


@pytest.fixture(scope="module")
def nifti_labels(checkpoint, image, tmp_path_factory) -> np.ndarray:
    """The labels predicted for ``image`` stored as NIfTI: what every other format must give for the same voxels."""
    tmp = tmp_path_factory.mktemp("nifti")
    (out,) = predict(checkpoint, save(image, tmp / "in" / "x.nii.gz"), tmp / "out")
    labels = np.asarray(nib.load(out).dataobj)
    assert np.unique(labels).tolist() == [0, 1, 2]  # every class somewhere
    return labels


def _write_input(image: np.ndarray, folder: Path, fmt: str, direction=SAGITTAL) -> Path:
    if fmt == "dicom":
        return write_dicom_series(image, folder / "x", direction)
    path = folder / f"x.{fmt}"
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(itk_volume(image, direction), str(path))
    return path


def _itk_geometry(image: sitk.Image) -> tuple:
    return image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def _source_geometry(src: Path) -> tuple:
    if src.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(src)))
        return _itk_geometry(reader.Execute())
    return _itk_geometry(sitk.ReadImage(str(src)))


@pytest.mark.parametrize("fmt, written", [("nrrd", "x.seg.nrrd"), ("mha", "x.mha"), ("mhd", "x.mha")])
def test_prediction_in_the_input_format_on_its_grid(tmp_path, checkpoint, image, nifti_labels, fmt, written):
    src = _write_input(image, tmp_path / "in", fmt)
    (out,) = predict(checkpoint, src, tmp_path / "out")
    assert out.name == written and sorted(p.name for p in out.parent.iterdir()) == [written]
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(np.concatenate(_itk_geometry(back)), np.concatenate(_source_geometry(src)), rtol=0,
                               atol=1e-12)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), nifti_labels)


def test_dicom_series_prediction_defaults_to_nifti_on_its_grid(tmp_path, checkpoint, image, nifti_labels):
    src = _write_input(image, tmp_path / "in", "dicom", OBLIQUE)
    (out,) = predict(checkpoint, tmp_path / "in", tmp_path / "out", save_probabilities=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.nii.gz", "x_probabilities.nii.gz"]
    nii = nib.load(out)
    np.testing.assert_array_equal(np.asarray(nii.dataobj), nifti_labels)
    origin, spacing, direction = (np.asarray(v) for v in _source_geometry(src))
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = direction.reshape(3, 3) @ np.diag(spacing), origin
    np.testing.assert_allclose(nii.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-5)  # RAS of the series
    assert int(nii.header["qform_code"]) == int(nii.header["sform_code"]) == 1  # scanner coordinates
    probs = nib.load(tmp_path / "out" / "x_probabilities.nii.gz")
    assert probs.shape == (*SHAPE, 3) and np.allclose(probs.affine, nii.affine)


@pytest.mark.parametrize("output_format, written", [("nrrd", "x.seg.nrrd"), ("mha", "x.mha"), ("nifti", "x.nii.gz")])
def test_chosen_output_format(tmp_path, checkpoint, image, nifti_labels, output_format, written):
    """A NIfTI input written as NRRD / MetaImage (and a NRRD one as NIfTI): the same labels at the same points."""
    if output_format == "nifti":
        src = _write_input(image, tmp_path / "in", "nrrd", OBLIQUE)
    else:
        src = save(image, tmp_path / "in" / "x.nii.gz")
    (out,) = predict(checkpoint, src, tmp_path / "out", output_format=output_format, save_probabilities=True)
    assert out.name == written
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), nifti_labels)
    reference = sitk.ReadImage(str(src))
    for index in [(0, 0, 0), (11, 9, 7), (5, 2, 6)]:
        np.testing.assert_allclose(back.TransformIndexToPhysicalPoint(index),
                                   reference.TransformIndexToPhysicalPoint(index), atol=1e-4)
    probs = prediction_path(out.parent, "x", output_format, probabilities=True)
    assert read_header_shape(probs) == (*SHAPE, 3) and read_grid(probs).format == file_format(out)


def _seg_pixels(seg: hd.seg.Segmentation, folder: Path, combine: bool) -> np.ndarray:
    """The SEG's frames in the source series' slice order: ``[Z, Y, X]`` (or ``[Z, Y, X, S]``)."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=combine)


def test_dicom_seg_frames_equal_the_label_map(tmp_path, checkpoint, image, nifti_labels):
    src = _write_input(image, tmp_path / "in", "dicom", OBLIQUE)
    (out,) = predict(checkpoint, src, tmp_path / "out", output_format="dicom-seg")
    assert out.name == "x.dcm"
    seg = hd.seg.segread(out)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SOURCE_SERIES
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == SHAPE[2]  # every slice
    assert seg.StudyInstanceUID == pydicom.dcmread(next(src.iterdir())).StudyInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["a", "b"]  # the checkpoint's class names
    frames = _seg_pixels(seg, src, combine=True)
    np.testing.assert_array_equal(frames, nifti_labels.transpose(2, 1, 0))  # [X, Y, Z] -> [Z, Y, X]


def test_dicom_seg_of_regions_has_overlapping_segments(tmp_path, image):
    ckpt = _checkpoint(tmp_path / "regions.pt", ["whole", "core"], regions=[[1, 2], [2]])
    src = _write_input(image, tmp_path / "in", "dicom")
    (nii,) = predict(ckpt, src, tmp_path / "nii")
    (out,) = predict(ckpt, src, tmp_path / "seg", output_format="dicom-seg")
    labels = np.asarray(nib.load(nii).dataobj).transpose(2, 1, 0)  # [X, Y, Z] -> [Z, Y, X]
    assert np.unique(labels).tolist() == [0, 1, 2]
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["whole", "core"]
    masks = _seg_pixels(seg, src, combine=False)  # [Z, Y, X, S]
    np.testing.assert_array_equal(masks[..., 0], np.isin(labels, [1, 2]))
    np.testing.assert_array_equal(masks[..., 1], labels == 2)


def test_evaluate_reads_every_format(tmp_path, checkpoint, image, nifti_labels):
    """A ``.seg.nrrd`` prediction scored against a NIfTI and a MetaImage reference on the same grid."""
    src = _write_input(image, tmp_path / "in", "nrrd", OBLIQUE)
    predict(checkpoint, src, tmp_path / "pred")
    ref = sitk.ReadImage(str(src))
    label = sitk.Cast(itk_volume(nifti_labels.astype(np.uint8), OBLIQUE), sitk.sitkUInt8)
    label.CopyInformation(ref)
    for ending in (".nii.gz", ".mha"):
        folder = tmp_path / f"labels{ending}"
        folder.mkdir()
        sitk.WriteImage(label, str(folder / f"x{ending}"))
        result = evaluate(tmp_path / "pred", folder)
        assert result["num_cases"] == 1
        assert all(m["dice"] == 1.0 for m in result["cases"][0]["metrics"].values() if m["status"] == "ok")


def test_collect_cases_of_mixed_inputs(tmp_path):
    vol = np.zeros((4, 4, 4), np.int16)
    write_dicom_series(vol, tmp_path / "in" / "patient1")
    write_dicom_series(vol, tmp_path / "in" / "brain_0000")
    sitk.WriteImage(itk_volume(vol), str(tmp_path / "in" / "brain_0001.nrrd"))
    sitk.WriteImage(itk_volume(vol), str(tmp_path / "in" / "knee.mhd"))  # its .raw is not a case
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    failures: list[InputError] = []
    cases = collect_cases(tmp_path / "in", in_channels=1, failures=failures)
    assert {k: [p.name for p in v] for k, v in cases.items()} == {"knee": ["knee.mhd"], "patient1": ["patient1"]}
    assert [str(e).split(": ", 1)[1] for e in failures] == ["case 'brain' has 2 channel(s), the checkpoint expects 1"]
    assert list(collect_cases(tmp_path / "in" / "patient1", 1)) == ["patient1"]  # the series folder itself
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: folder holds no images \(.nii.gz, .nii, .seg.nrrd"):
        collect_cases(tmp_path / "empty", 1)
