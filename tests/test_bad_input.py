"""Every bad input of the pipeline: one line on stderr naming the file and the problem, exit code 2, nothing
written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_AFFINE, save, synthetic_case, tiny_checkpoint, write_msd_dataset
from sparseseg.cli import main


def _fails(capsys, argv: list[str], *needles: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sparseseg {argv[0]}: error: ")
    for needle in needles:
        assert needle in err, err


def _nothing_written(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_msd_dataset(tmp_path / "data", num_cases=2, shape=(12, 12, 12), num_test=0)


def _train(capsys, dataset: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "run"
    _fails(capsys, ["train", "--dataset", str(dataset), "--model", "tiny_seg", "--output", str(out), "--epochs", "1",
                    "--roi-size", "8"], *needles)
    assert _nothing_written(out)


def test_missing_nifti(capsys, dataset, tmp_path):
    (dataset.parent / "labelsTr" / "case_001.nii.gz").unlink()
    _train(capsys, dataset, tmp_path, "labelsTr/case_001.nii.gz", "not found")


def test_corrupt_nifti(capsys, dataset, tmp_path):
    (dataset.parent / "imagesTr" / "case_001.nii.gz").write_bytes(gzip.compress(b"\x01" * 500))
    _train(capsys, dataset, tmp_path, "imagesTr/case_001.nii.gz", "cannot read NIfTI")


def test_label_shape_differs(capsys, dataset, tmp_path):
    save(np.zeros((12, 12, 11), np.uint8), dataset.parent / "labelsTr" / "case_000.nii.gz")
    _train(capsys, dataset, tmp_path, "labelsTr/case_000.nii.gz", "label shape (12, 12, 11) differs")


def test_nan_voxels(capsys, dataset, tmp_path):
    image, _ = synthetic_case((12, 12, 12))
    image[3, 3, 3] = np.nan
    save(image, dataset.parent / "imagesTr" / "case_000.nii.gz")
    _train(capsys, dataset, tmp_path, "imagesTr/case_000.nii.gz", "NaN/Inf")


def test_label_values_not_in_labels(capsys, dataset, tmp_path):
    _, label = synthetic_case((12, 12, 12))
    label[0, 0, 0] = 7
    save(label, dataset.parent / "labelsTr" / "case_001.nii.gz")
    _train(capsys, dataset, tmp_path, "labelsTr/case_001.nii.gz", "label value(s) [7] not in the dataset labels")


def test_empty_training_list(capsys, dataset, tmp_path):
    meta = json.loads(dataset.read_text())
    meta["training"] = []
    dataset.write_text(json.dumps(meta))
    _train(capsys, dataset, tmp_path, "dataset.json", "the training list is empty")


def test_unknown_model_and_bad_config(capsys, dataset, tmp_path):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--dataset", str(dataset), "--model", "no_such_model", "--output", str(out)],
           "unknown model 'no_such_model'")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: [\n")
    _fails(capsys, ["train", "--config", str(cfg)], "cfg.yaml", "not a valid YAML")
    assert _nothing_written(out)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A two-channel checkpoint (untrained weights: only the input checks run)."""
    return tiny_checkpoint(tmp_path / "ckpt" / "best.pt", in_channels=2)


def _images(folder: Path, channels: int) -> Path:
    image, _ = synthetic_case((10, 10, 10), channels=channels, ct=False)
    save(image, folder / "scan.nii.gz")
    return folder


def test_wrong_channel_count_for_checkpoint(capsys, checkpoint, tmp_path):
    inputs = _images(tmp_path / "in", channels=1)
    out = tmp_path / "out"
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out)],
           "scan.nii.gz", "has 1 channel(s), the checkpoint expects 2")
    assert _nothing_written(out)


def test_output_equals_or_contains_input(capsys, checkpoint, tmp_path):
    inputs = _images(tmp_path / "in", channels=2)
    before = sorted(p.name for p in inputs.iterdir())
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(inputs)],
           "output folder equals or contains the input")
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(inputs / "scan.nii.gz"),
                    "--output", str(tmp_path)], "output folder equals or contains the input")
    assert sorted(p.name for p in inputs.iterdir()) == before


def test_not_a_sparseseg_checkpoint(capsys, tmp_path):
    inputs = _images(tmp_path / "in", channels=2)
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    out = tmp_path / "out"
    _fails(capsys, ["predict", "--checkpoint", str(fake), "--input", str(inputs), "--output", str(out)],
           "fake.pt", "not a sparseseg checkpoint")
    assert _nothing_written(out)


def test_corrupt_and_nan_inputs_at_predict(capsys, checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    out = tmp_path / "out"
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out)],
           "broken.nii.gz", "cannot read NIfTI header")
    (inputs / "broken.nii.gz").unlink()
    image = np.zeros((10, 10, 10, 2), np.float32)
    image[1, 1, 1, 1] = np.inf
    save(image, inputs / "inf.nii.gz", TEST_AFFINE)
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out)],
           "inf.nii.gz", "NaN/Inf")
    assert _nothing_written(out)


def test_evaluate_shape_mismatch(capsys, tmp_path):
    save(np.zeros((6, 6, 6), np.uint8), tmp_path / "pred" / "a.nii.gz")
    save(np.zeros((6, 6, 5), np.uint8), tmp_path / "ref" / "a.nii.gz")
    out = tmp_path / "metrics.json"
    _fails(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "ref"),
                    "--output", str(out)], "pred/a.nii.gz", "differs")
    assert not out.exists()
