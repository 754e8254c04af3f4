"""The commands on the formats hospitals hand over: DICOM series, NRRD (3D Slicer), MetaImage. A broken file gives
one line naming it (docs/robustness.md), and train -> predict -> evaluate runs on a dataset of such files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import OBLIQUE, itk_volume, save, synthetic_case, tiny_checkpoint, write_dicom_series
from sparseseg.cli import main


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return tiny_checkpoint(tmp_path / "ckpt" / "best.pt")


def _image(shape=(12, 12, 12), seed=0) -> np.ndarray:
    return np.rint(synthetic_case(shape, seed=seed)[0]).astype(np.int16)


def _broken_nrrd(folder: Path) -> Path:
    path = folder / "scan.nrrd"
    sitk.WriteImage(itk_volume(_image()), str(path))
    path.write_bytes(path.read_bytes().replace(b"sizes: 12 12 12", b"sizes: 12 12"))
    return path


def _two_series(folder: Path) -> Path:
    write_dicom_series(_image(), folder / "scan")
    return write_dicom_series(_image(), folder / "scan", series=2)


BROKEN = {
    "NRRD broken header": (_broken_nrrd, "in/scan.nrrd: cannot read NRRD header (_nrrdReadNrrdParse_sizes: parsed 2 "
                                         "values, but dimension is 3)"),
    "two series": (_two_series, "in/scan: folder holds 2 DICOM series (1.2.826.0.1.3680043.8.498.1, "
                                "1.2.826.0.1.3680043.8.498.2); give each series its own folder"),
    "missing slice": (lambda f: write_dicom_series(_image(), f / "scan", skip=(5,)),
                      "in/scan: DICOM series misses 1 slice(s) between s1_004.dcm and s1_006.dcm"),
    "uneven spacing": (lambda f: write_dicom_series(_image(), f / "scan", shift={5: 0.6}),
                       "in/scan: DICOM series has uneven slice spacing: 2.6 mm between s1_004.dcm and s1_005.dcm, "
                       "2 mm elsewhere"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_clinical_input_at_predict(capsys, checkpoint, tmp_path, kind):
    make, message = BROKEN[kind]
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"), "--output",
                    str(tmp_path / "out")], message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_broken_clinical_input_at_train(capsys, tmp_path):
    root = tmp_path / "data"
    (root / "labelsTr").mkdir(parents=True)
    labels = [{"image": f"./imagesTr/case{i}", "label": f"./labelsTr/case{i}.seg.nrrd"} for i in range(2)]
    for i in range(2):
        image, label = synthetic_case((12, 12, 12), seed=i)
        write_dicom_series(np.rint(image).astype(np.int16), root / "imagesTr" / f"case{i}", skip=(3,) if i else ())
        sitk.WriteImage(itk_volume(label), str(root / "labelsTr" / f"case{i}.seg.nrrd"))
    meta = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "ball", "2": "core"}, "training": labels}
    (root / "dataset.json").write_text(json.dumps(meta))
    _fails(capsys, ["train", "--dataset", str(root), "--model", "tiny_seg", "--output", str(tmp_path / "run"),
                    "--epochs", "1", "--roi-size", "8", "--model-arg", "feature_size=4"],
           "imagesTr/case1: DICOM series misses 1 slice(s) between s1_002.dcm and s1_004.dcm")
    assert not (tmp_path / "run").exists()


def test_dicom_seg_needs_a_dicom_input(capsys, checkpoint, tmp_path):
    src = save(_image().astype(np.float32), tmp_path / "in" / "scan.nii.gz")
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(tmp_path / "out"),
                    "--output-format", "dicom-seg"],
           "in/scan.nii.gz: a DICOM SEG references a DICOM series; this input is NIfTI")
    assert not (tmp_path / "out").exists()


def test_broken_prediction_at_evaluate(capsys, tmp_path):
    (tmp_path / "pred").mkdir()
    sitk.WriteImage(itk_volume(np.zeros((6, 6, 6), np.uint8)), str(tmp_path / "pred" / "x.mha"))
    path = tmp_path / "pred" / "x.mha"
    path.write_bytes(path.read_bytes()[:-50])
    save(np.zeros((6, 6, 6), np.uint8), tmp_path / "label" / "x.nii.gz")
    _fails(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label")],
           "pred/x.mha: cannot read MetaImage (")


@pytest.mark.slow
def test_train_predict_evaluate_on_dicom_nrrd_and_metaimage(tmp_path, capsys):
    """MSD dataset of DICOM series, NRRD and MetaImage images with 3D Slicer / MetaImage labels: train, predict a
    DICOM series (NIfTI and DICOM SEG), score the NIfTI against the ``.seg.nrrd`` reference."""
    root = tmp_path / "data"
    (root / "labelsTr").mkdir(parents=True)
    training = []
    for i, kind in enumerate(["dicom", "dicom", "nrrd", "mha"]):
        image, label = synthetic_case((12, 12, 10), seed=i)
        name = f"case{i}" + {"dicom": "", "nrrd": ".nrrd", "mha": ".mha"}[kind]
        if kind == "dicom":
            write_dicom_series(np.rint(image).astype(np.int16), root / "imagesTr" / name, OBLIQUE)
        else:
            sitk.WriteImage(itk_volume(image, OBLIQUE), str(root / "imagesTr" / name))
        label_name = f"case{i}" + (".mha" if kind == "mha" else ".seg.nrrd")
        sitk.WriteImage(itk_volume(label, OBLIQUE), str(root / "labelsTr" / label_name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{label_name}"})
    meta = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "ball", "2": "core"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(root), "--model", "tiny_seg", "--output", str(run), "--epochs", "1",
                 "--roi-size", "8", "--batch-size", "2", "--model-arg", "feature_size=4"]) == 0
    series = root / "imagesTr" / "case0"
    for fmt, written in ((None, "case0.nii.gz"), ("dicom-seg", "case0.dcm")):
        argv = ["predict", "--checkpoint", str(run / "last.pt"), "--input", str(series), "--output",
                str(tmp_path / f"pred_{fmt}"), "--overlap", "0"] + (["--output-format", fmt] if fmt else [])
        assert main(argv) == 0
        assert [p.name for p in (tmp_path / f"pred_{fmt}").iterdir()] == [written]
    nii = nib.load(tmp_path / "pred_None" / "case0.nii.gz")
    seg = hd.seg.segread(tmp_path / "pred_dicom-seg" / "case0.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["ball", "core"]
    assert (root / "labelsTr" / "case0.seg.nrrd").is_file()
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "case0.seg.nrrd").write_bytes((root / "labelsTr" / "case0.seg.nrrd").read_bytes())
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred_None"), "--label", str(tmp_path / "ref"), "--dataset",
                 str(root), "--output", str(tmp_path / "metrics.json")]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["num_cases"] == 1 and result["classes"] == ["ball", "core"] and nii.shape == (12, 12, 10)


def test_dicom_seg_needs_highdicom(capsys, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # `import highdicom` now fails as if it were not installed
    series = write_dicom_series(_image(), tmp_path / "in" / "scan")
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(series), "--output",
                    str(tmp_path / "out"), "--output-format", "dicom-seg"],
           "sparseseg predict: error: DICOM SEG output needs highdicom and pydicom: pip install 'sparseseg[dicom]'")
    assert not (tmp_path / "out").exists()
