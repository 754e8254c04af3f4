"""Hardened input (docs/robustness.md): each broken input gives one line naming the file and the problem, exit
code 2, no traceback and nothing written; volumes smaller than the ROI come back on their own grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import TEST_AFFINE, save, synthetic_case, tiny_checkpoint, write_msd_dataset
from sparseseg.cli import main
from sparseseg.inference.predictor import _stitch_device


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"sparseseg {argv[0]}: error: ")
    for needle in needles:
        assert needle in err, err
    return err


def _empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_msd_dataset(tmp_path / "data", num_cases=2, shape=(12, 12, 12), num_test=0)


def _train_fails(capsys, dataset: Path, tmp_path: Path, *needles: str, output: Path | None = None) -> None:
    out = output or tmp_path / "run"
    _fails(capsys, ["train", "--dataset", str(dataset), "--model", "tiny_seg", "--output", str(out), "--epochs", "1",
                    "--roi-size", "8", "--model-arg", "feature_size=4"], *needles)
    assert _empty(out)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return tiny_checkpoint(tmp_path / "ckpt" / "best.pt")


def _predict_fails(capsys, checkpoint: Path, inputs: Path, tmp_path: Path, *needles: str) -> None:
    out = tmp_path / "out"
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out)],
           *needles)
    assert _empty(out)


def _image_path(dataset: Path) -> Path:
    return dataset.parent / "imagesTr" / "case_001.nii.gz"


# -- broken image files: the same message at training and at prediction ----------------------------------------


def _gzip_truncated(path: Path) -> None:
    save(synthetic_case((12, 12, 12))[0], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _text_file(path: Path) -> None:
    path.write_text("patient,age\nA,42\n")


def _two_d(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((12, 12), np.float32), np.eye(4)), str(path))


def _five_d(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12, 1, 2), np.float32), np.eye(4)), str(path))


def _nan_spacing(path: Path) -> None:
    img = nib.Nifti1Image(synthetic_case((12, 12, 12))[0], TEST_AFFINE)
    img.header["pixdim"][1:4] = [1.0, np.nan, 1.5]
    nib.save(img, str(path))


def _zero_spacing(path: Path) -> None:
    img = nib.Nifti1Image(synthetic_case((12, 12, 12))[0], TEST_AFFINE)
    img.header["pixdim"][1:4] = [1.0, 0.0, 1.5]  # nibabel would quietly read it as 1 mm
    nib.save(img, str(path))


def _singular_affine(path: Path) -> None:
    header = nib.Nifti1Image(np.zeros((12, 12, 12), np.float32), TEST_AFFINE).header
    flat = TEST_AFFINE.copy()
    flat[:3, 1] = 0.0  # the second voxel axis has no extent in space
    header.set_sform(flat, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(synthetic_case((12, 12, 12))[0], None, header=header), str(path))


def _huge_integers(path: Path) -> None:
    image = synthetic_case((12, 12, 12))[0].astype(np.int32)
    image[5, 5, 5] = 2**30
    nib.save(nib.Nifti1Image(image, TEST_AFFINE), str(path))


BROKEN = {
    "gzip-truncated": (_gzip_truncated, "cannot read NIfTI"),
    "text named .nii.gz": (_text_file, "cannot read NIfTI"),
    "2-D": (_two_d, "expected a 3-D or 4-D volume, got 2-D shape (12, 12)"),
    "5-D": (_five_d, "expected a 3-D or 4-D volume, got 5-D shape (12, 12, 12, 1, 2)"),
    "NaN spacing": (_nan_spacing, "invalid voxel spacing (1.0, nan, 1.5)"),
    "zero spacing": (_zero_spacing, "invalid voxel spacing (zero in the header's pixdim)"),
    "singular affine": (_singular_affine, "invalid voxel spacing (1.0, 0.0, 1.5) in the affine"),
    "huge integers": (_huge_integers, "integer intensities up to 1073741824 exceed 2^24"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_image_at_train(capsys, dataset, tmp_path, kind):
    make, message = BROKEN[kind]
    make(_image_path(dataset))
    _train_fails(capsys, dataset, tmp_path, "imagesTr/case_001.nii.gz: " + message)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_image_at_predict(capsys, checkpoint, tmp_path, kind):
    make, message = BROKEN[kind]
    (tmp_path / "in").mkdir()
    make(tmp_path / "in" / "scan.nii.gz")
    _predict_fails(capsys, checkpoint, tmp_path / "in", tmp_path, "in/scan.nii.gz: " + message)


# -- dataset.json and labels -----------------------------------------------------------------------------------


def test_dataset_json_not_json(capsys, dataset, tmp_path):
    dataset.write_text('{"training": [\n')
    _train_fails(capsys, dataset, tmp_path, "dataset.json: not a valid JSON file")


@pytest.mark.parametrize("key, message", [("labels", "'labels' is missing or empty"),
                                          ("training", "the training list is empty")])
def test_dataset_json_lacks_a_key(capsys, dataset, tmp_path, key, message):
    meta = json.loads(dataset.read_text())
    del meta[key]
    dataset.write_text(json.dumps(meta))
    _train_fails(capsys, dataset, tmp_path, "dataset.json: " + message)


def test_case_listed_twice(capsys, dataset, tmp_path):
    meta = json.loads(dataset.read_text())
    meta["training"].append(dict(meta["training"][0]))
    dataset.write_text(json.dumps(meta))
    _train_fails(capsys, dataset, tmp_path, "dataset.json: case 'case_000' is listed twice")


def test_label_of_non_integer_floats(capsys, dataset, tmp_path):
    label = synthetic_case((12, 12, 12))[1].astype(np.float32)
    label[2, 2, 2] = 0.5
    save(label, dataset.parent / "labelsTr" / "case_000.nii.gz")
    _train_fails(capsys, dataset, tmp_path, "labelsTr/case_000.nii.gz: label map holds non-integer values")


# -- checkpoints -----------------------------------------------------------------------------------------------


def _inputs(tmp_path: Path, channels: int = 1) -> Path:
    save(synthetic_case((10, 10, 10), channels=channels)[0], tmp_path / "in" / "scan.nii.gz")
    return tmp_path / "in"


def test_checkpoint_of_another_model(capsys, checkpoint, tmp_path):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model_name"] = "unregistered_net"
    torch.save(ckpt, tmp_path / "other.pt")
    _predict_fails(capsys, tmp_path / "other.pt", _inputs(tmp_path), tmp_path,
                   "other.pt: checkpoint model 'unregistered_net' is not registered")
    ckpt["model_name"], ckpt["model_args"]["feature_size"] = "tiny_seg", 8  # weights of another width
    torch.save(ckpt, tmp_path / "other.pt")
    _predict_fails(capsys, tmp_path / "other.pt", tmp_path / "in", tmp_path,
                   "other.pt: weights do not fit model 'tiny_seg' (size mismatch for body.0.weight")


def test_checkpoint_of_another_channel_count(capsys, checkpoint, tmp_path):
    _predict_fails(capsys, checkpoint, _inputs(tmp_path, channels=2), tmp_path,
                   "scan.nii.gz: case 'scan' has 2 channel(s), the checkpoint expects 1")


def test_resume_from_another_model(capsys, dataset, tmp_path, checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model_args"]["feature_size"] = 8
    torch.save(ckpt, run / "last.pt")
    before = sorted(run.iterdir())
    _fails(capsys, ["train", "--dataset", str(dataset), "--model", "tiny_seg", "--output", str(run), "--epochs", "1",
                    "--roi-size", "8", "--model-arg", "feature_size=4", "--resume"],
           "run/last.pt: cannot resume: the checkpoint holds tiny_seg")
    assert sorted(run.iterdir()) == before


class _RunsCode:
    """Pickles as a call that writes a file: what a malicious checkpoint does when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the pickle ran')",))


def test_checkpoint_with_code_does_not_run(capsys, checkpoint, tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["payload"] = _RunsCode(marker)
    torch.save(ckpt, evil)
    _predict_fails(capsys, evil, _inputs(tmp_path), tmp_path, "evil.pt: not a sparseseg checkpoint (holds Python code",
                   "'exec'")
    _fails(capsys, ["export", "--checkpoint", str(evil), "--output", str(tmp_path / "m.onnx")], "evil.pt")
    assert not marker.exists()  # weights_only loading refused the call
    torch.load(evil, weights_only=False)  # the file really carries code: unrestricted unpickling runs it
    assert marker.read_text() == "the pickle ran"


# -- outputs ---------------------------------------------------------------------------------------------------


def test_output_under_a_file(capsys, dataset, checkpoint, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    _train_fails(capsys, dataset, tmp_path, "not_a_folder/run: cannot create an output folder", output=blocker / "run")
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(_inputs(tmp_path)),
                    "--output", str(blocker / "pred")], "cannot create an output folder")
    save(np.zeros((6, 6, 6), np.uint8), tmp_path / "seg" / "a.nii.gz")
    _fails(capsys, ["evaluate", "--pred", str(tmp_path / "seg"), "--label", str(tmp_path / "seg"),
                    "--output", str(blocker / "metrics.json")], "metrics.json: cannot write here")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root (the case above covers the path)")
def test_read_only_output_folder(capsys, checkpoint, tmp_path):
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o555)
    try:
        _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(_inputs(tmp_path)),
                        "--output", str(out)], "read_only: output folder is not writable")
        assert not any(out.iterdir())
    finally:
        out.chmod(0o755)


# -- geometry --------------------------------------------------------------------------------------------------


def test_volume_smaller_than_roi_is_padded_and_cropped_back(tmp_path, checkpoint):
    src = save(synthetic_case((5, 7, 3))[0], tmp_path / "in" / "small.nii.gz")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(tmp_path / "out"),
                 "--save-probabilities", "--stitch-device", "cpu"]) == 0
    out = nib.load(tmp_path / "out" / "small.nii.gz")
    probs = np.asarray(nib.load(tmp_path / "out" / "small_probabilities.nii.gz").dataobj)
    assert out.shape == (5, 7, 3) and np.allclose(out.affine, TEST_AFFINE)
    assert probs.shape == (5, 7, 3, 3) and np.allclose(probs.sum(-1), 1.0, atol=1e-4)


def test_bad_stitch_device(capsys, checkpoint, tmp_path):
    _fails(capsys, ["predict", "--checkpoint", str(checkpoint), "--input", str(_inputs(tmp_path)),
                    "--output", str(tmp_path / "out"), "--stitch-device", "nonsense"], "unknown device 'nonsense'")
    assert _empty(tmp_path / "out")


def test_large_volumes_are_stitched_off_the_gpu():
    cuda = torch.device("cuda", 0)
    assert _stitch_device("auto", cuda, 3, (96, 96, 96)) == cuda  # 14 MB of buffers stay on the GPU
    assert _stitch_device("auto", cuda, 14, (512, 512, 512)) == torch.device("cpu")  # 8 GB go to the CPU
    assert _stitch_device("auto", torch.device("cpu"), 14, (512, 512, 512)) == torch.device("cpu")
    assert _stitch_device("cpu", cuda, 3, (8, 8, 8)) == torch.device("cpu")
