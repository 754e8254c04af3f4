"""sparseseg train -> predict -> evaluate on a synthetic dataset in a temporary folder."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import write_msd_dataset
from sparseseg.cli import main
from sparseseg.models.common.registry import list_models


def _run(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def _end_to_end(tmp_path, capsys, model: str, model_args: list[str], extra: list[str] = (),
                predict_args: list[str] = (), shape: tuple[int, int, int] = (24, 28, 32)) -> dict:
    dataset = write_msd_dataset(tmp_path / "Task00", num_cases=4, shape=shape, num_test=2)
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {model}\nepochs: 5\niters_per_epoch: 2\nbatch_size: 2\nlr: 0.003\n")
    args = ["train", "--config", str(config), "--dataset", str(dataset), "--output", str(run), "--epochs", "2",
            "--roi-size", "16", "--seed", "1", *extra]
    for a in model_args:
        args += ["--model-arg", a]
    _run(args)
    assert capsys.readouterr().out.strip().endswith("best.pt")
    for name in ("config.json", "log.csv", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 2  # the flag beat the file
    assert len((run / "log.csv").read_text().splitlines()) == 3  # header + 2 epochs

    pred = tmp_path / "pred"
    _run(["predict", "--checkpoint", str(run / "best.pt"), "--input", str(dataset.parent / "imagesTs"),
          "--output", str(pred), "--save-probabilities", "--sw-batch-size", "2", *predict_args])
    train_image = dataset.parent / "imagesTr" / "case_000.nii.gz"
    _run(["predict", "--checkpoint", str(run / "last.pt"), "--input", str(train_image),
          "--output", str(tmp_path / "pred_tr"), "--overlap", "0.25"])
    for case, image_dir, folder in (("case_004", "imagesTs", pred), ("case_005", "imagesTs", pred),
                                    ("case_000", "imagesTr", tmp_path / "pred_tr")):
        src = nib.load(dataset.parent / image_dir / f"{case}.nii.gz")
        out = nib.load(folder / f"{case}.nii.gz")
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
        assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2}
    for case in ("case_004", "case_005"):
        probs = np.asarray(nib.load(pred / f"{case}_probabilities.nii.gz").dataobj)
        assert probs.shape == (*shape, 3) and np.allclose(probs.sum(-1), 1.0, atol=1e-4)

    metrics = tmp_path / "metrics.json"
    _run(["evaluate", "--pred", str(pred), "--label", str(dataset.parent / "labelsTs"), "--output", str(metrics),
          "--dataset", str(dataset)])
    table = capsys.readouterr().out
    assert "ball" in table and "core" in table and "2 case(s)" in table
    res = json.loads(metrics.read_text())
    assert res["num_cases"] == 2 and res["classes"] == ["ball", "core"]
    for c in res["classes"]:
        for entry in (case["metrics"][c] for case in res["cases"]):
            assert entry["status"] in ("ok", "prediction_empty", "reference_empty", "both_empty")
            assert entry["dice"] is None or 0.0 <= entry["dice"] <= 1.0
        summary = res["per_class"][c]
        assert summary["n_dice"] + summary["status_counts"]["both_empty"] == 2
        assert sum(summary["status_counts"].values()) == 2
    return res


@pytest.mark.slow
def test_train_predict_evaluate(tmp_path, capsys):
    _end_to_end(tmp_path, capsys, "tiny_seg", ["feature_size=8"])


VIT = ["hidden_size=48", "num_layers=3", "num_heads=3", "mlp_dim=96", "feature_size=4", "patch_size=8", "decoder=v1"]


@pytest.mark.slow
@pytest.mark.parametrize("model, extra_args, predict_args", [
    ("unetr", ["skip_layers=[1, 2]"], []),
    ("stp_mta_unetr", ["prune_after=[1, 2]", "completion_size=48", "completion_heads=3"], ["--prune-ratio", "0.25"]),
])
def test_train_predict_evaluate_vit(tmp_path, capsys, model, extra_args, predict_args):
    if model not in list_models():
        pytest.skip(f"{model} is not registered")
    _end_to_end(tmp_path, capsys, model, VIT + extra_args, predict_args=predict_args, shape=(16, 20, 16))


@pytest.mark.slow
def test_train_predict_evaluate_dynunet(tmp_path, capsys):
    """The CNN reference: deep supervision in training (16^3 crops, 4 stages with maps down to 2^3), plain logits
    in predict."""
    _end_to_end(tmp_path, capsys, "dynunet", ["base_features=4", "max_features=16", "min_feature_map_size=2"])
