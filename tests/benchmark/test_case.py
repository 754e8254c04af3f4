"""Whole-case benchmark: ``predict``'s stage timings and window count, the preset's preprocessing for untrained
checkpoints, and ``sparseseg benchmark --case`` with two checkpoints in child processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import save, tiny_checkpoint
from sparseseg.benchmark.case import STAGES, preset_data_config
from sparseseg.checkpoint import save_checkpoint
from sparseseg.cli import main
from sparseseg.data.transforms import DataConfig
from sparseseg.inference.predictor import predict
from sparseseg.models.common.registry import create_model


def _case(tmp_path, shape=(24, 24, 24)):
    image = np.random.default_rng(0).normal(300, 100, size=shape).astype(np.float32)
    return save(image, tmp_path / "cases" / "scan.nii.gz")


def test_predict_reports_every_stage_and_the_windows_it_ran(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")  # 8^3 windows
    timings = []
    predict(ckpt, _case(tmp_path), tmp_path / "out", overlap=0.5, timings=timings)
    (rec,) = timings
    assert rec["case"] == "scan" and rec["shape"] == [24, 24, 24]
    assert tuple(rec["stages"]) == STAGES and all(s >= 0 for s in rec["stages"].values())
    assert rec["windows"] == {"run": 5**3, "skipped": 0}  # (24 - 8) / 4 + 1 = 5 positions per axis


def test_preset_data_configs_follow_the_recipes():
    brats, btcv = preset_data_config("brats"), preset_data_config("btcv")
    assert brats.in_channels == 4 and brats.sigmoid and brats.out_channels == 3 and brats.roi_size == [128] * 3
    assert brats.intensity == "mri" and brats.target_spacing == [1.0, 1.0, 1.0]
    assert btcv.out_channels == 14 and btcv.intensity == "ct" and btcv.target_spacing == [1.5, 1.5, 2.0]
    assert btcv.roi_size == [96] * 3 and btcv.crop_foreground


def test_a_case_benchmark_needs_checkpoints_or_a_preset(tmp_path, capsys):
    assert main(["benchmark", "--case", str(_case(tmp_path)), "--models", "unetr"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def _checkpoint(path, name: str, **args):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, out_channels=3, img_size=16, **args)
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "a", "b"], roi_size=[16, 16, 16])
    return save_checkpoint(path, model, data.to_dict())


@pytest.mark.slow
def test_case_benchmark_of_two_checkpoints(tmp_path, capsys):
    first = _checkpoint(tmp_path / "unetr.pt", "unetr", hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                        feature_size=4, patch_size=8, decoder="v1", skip_layers=[1, 2])
    second = _checkpoint(tmp_path / "dyn.pt", "dynunet", min_feature_map_size=2, base_features=4, max_features=16)
    out_json, out_md = tmp_path / "case.json", tmp_path / "case.md"
    assert main(["benchmark", "--case", str(_case(tmp_path)), "--checkpoint", str(first), str(second),
                 "--threads", "1", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    records = json.loads(out_json.read_text())
    assert [r["model"] for r in records] == ["unetr", "dynunet"]
    for rec in records:
        assert set(rec["stages_s"]) == set(STAGES) and rec["peak_rss_mb"] > rec["import_rss_mb"] > 0
        assert rec["wall_s"] >= sum(rec["stages_s"].values()) and rec["process_s"] > rec["wall_s"]
        assert rec["threads"] == 1 and rec["shape"] == [24, 24, 24]
    assert [r["windows"]["run"] for r in records] == [8, 8]  # 16^3 windows every 8 voxels: 2 positions per axis
    assert records[0]["speedup"] == records[0]["memory_ratio"] == 1.0
    table = out_md.read_text()
    assert "sliding_window s" in table and "| scan |" in table and table == capsys.readouterr().out
    assert not list(tmp_path.glob("sparseseg-case-*"))
