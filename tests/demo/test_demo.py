"""The demo: dataset builder (offline, anterior split, geometry), replicate padding, the threshold baseline, and the
``--quick`` run end to end through the CLI."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sparseseg import create_model
from sparseseg.cli import main
from sparseseg.data.datasets import load_dataset
from sparseseg.demo.data import (
    AP_AXIS,
    CLASS_NAMES,
    TEST_CASE,
    TRAIN_CASE,
    Template,
    build_dataset,
    crop,
    replicate_pad,
    split_anterior,
)
from sparseseg.demo.report import policy_summary
from sparseseg.demo.run import SPARSE, apply_thresholds, demo_settings, fit_thresholds
from sparseseg.errors import InputError


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_build_dataset_offline_with_an_anterior_test_block(tmp_path, no_network):
    path = build_dataset(tmp_path / "icbm", resolution=4)
    ds = load_dataset(path)
    assert [c.name for c in ds.training] == [TRAIN_CASE] and [c.name for c in ds.test] == [TEST_CASE]
    assert ds.labels == dict(enumerate(CLASS_NAMES))
    tr_img, ts_img = nib.load(str(ds.training[0].images[0])), nib.load(str(ds.test[0].images[0]))
    tr_lab = np.asarray(nib.load(str(ds.training[0].label)).dataobj)
    ts_lab = np.asarray(nib.load(str(tmp_path / "icbm" / "labelsTs" / f"{TEST_CASE}.nii.gz")).dataobj)
    assert set(np.unique(tr_lab)) == {0, 1, 2, 3} and set(np.unique(ts_lab)) == {0, 1, 2, 3}
    # the two parts tile the cropped template along the A-P axis: the test block starts where training ends,
    # in front of it (larger world y: anterior in RAS)
    assert tr_img.shape[0] == ts_img.shape[0] and tr_img.shape[2] == ts_img.shape[2]
    first_test = ts_img.affine @ [0, 0, 0, 1]
    after_train = tr_img.affine @ [0, tr_img.shape[AP_AXIS], 0, 1]
    assert np.allclose(first_test, after_train)
    assert ts_img.affine[1, 1] > 0
    meta = json.loads(path.read_text())
    assert meta["split"]["test_fraction"] == 0.3


def test_split_and_crop_keep_world_positions():
    image = np.arange(4 * 10 * 3, dtype=np.float32).reshape(4, 10, 3)
    label = np.zeros((4, 10, 3), np.uint8)
    label[1:3, 2:8, 1] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-4, -10, 6]
    t = Template(image, label, affine)
    train, test, cut = split_anterior(t, 0.5)
    assert cut == 5 and train.label.shape == (4, 5, 3) and test.label.shape == (4, 5, 3)
    assert np.allclose(test.affine @ [0, 0, 0, 1], affine @ [0, cut, 0, 1])
    sub = crop(t, (1, 2, 0), (3, 9, 3))
    assert np.allclose(sub.affine @ [0, 0, 0, 1], affine @ [1, 2, 0, 1]) and sub.image[0, 0, 0] == image[1, 2, 0]
    with pytest.raises(ValueError, match="test_fraction"):
        split_anterior(t, 1.0)


def test_replicate_pad_copies_the_cut_face():
    array = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    padded, new_affine = replicate_pad(array, affine, 3)
    assert padded.shape == (3, 7, 5)
    assert np.array_equal(padded[:, 3:], array) and all(np.array_equal(padded[:, i], array[:, 0]) for i in range(3))
    assert np.allclose(new_affine @ [0, 3, 0, 1], affine @ [0, 0, 0, 1])  # original voxels keep their place


def test_thresholds_recover_ordered_classes():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, size=20000)
    image = np.array([0.0, 0.3, 0.6, 0.9])[label] + rng.uniform(-0.1, 0.1, size=label.shape)
    t = fit_thresholds(image.astype(np.float32), label)
    assert t == sorted(t)
    assert np.mean(apply_thresholds(image, t) == label) > 0.99


def test_policy_summary_counts_brain_patches_per_depth():
    depth = np.array([2, 4, 6, 6, 2, 2, 5, 2]).reshape(2, 2, 2)  # stages after blocks 2, 4, 5; 6 blocks
    label = np.zeros((16, 16, 15), np.uint8)  # the last patch column is cut short: padded as background
    label[:8, :8, 8:] = 1  # token (0, 0, 1): depth 4
    label[8:, 8:, 8:] = 3  # token (1, 1, 1): depth 2
    s = policy_summary(depth, label, 8, [2, 4, 5, 6])
    assert s["tokens"] == 8 and s["brain_share_all"] == 0.25 and s["kept_share"] == 0.25
    assert s["brain_share_passed"] == 0.25 and s["brain_share_kept"] == 0.0


def test_settings_follow_the_flags():
    full = demo_settings(False, None, 0.75, 0, "cpu")
    assert full.train["time_budget"] == 360.0 and full.roi == 48 and full.model_args["patch_size"] == 8
    quick = demo_settings(True, None, 0.5, 1, "cpu")
    assert "time_budget" not in quick.train and quick.sparse_args["prune_ratio"] == 0.5
    assert demo_settings(True, 0.05, 0.75, 0, "cpu").train["time_budget"] == 3.0
    assert full.models == ("unetr", "stp_mta_unetr") and full.args_of("stp_mta_unetr")["prune_ratio"] == 0.75
    velox = demo_settings(False, None, 0.75, 0, "cpu", model="veloxseg")
    assert velox.models == ("unetr", "veloxseg") and velox.args_of("veloxseg")["stem_stride"] == 2
    assert velox.args_of("veloxseg")["deep_supervision"] is False
    assert "hidden_size" in velox.args_of("unetr") and "prune_ratio" not in velox.args_of("unetr")
    with pytest.raises(InputError, match="--model"):
        demo_settings(False, None, 0.75, 0, "cpu", model="resnet")
    assert demo_settings(False, None, 0.75, 0, "cpu", lr=1e-3).train["lr"] == 1e-3 == full.train["lr"] / 3
    with pytest.raises(InputError, match="--lr"):
        demo_settings(False, None, 0.75, 0, "cpu", lr=0.0)
    assert full.args_of("stp_mta_unetr")["pruned_mask"] == "before_norm"  # the authors' order by default
    after = demo_settings(True, None, 0.75, 0, "cpu", pruned_mask="after_norm")
    assert after.args_of("stp_mta_unetr")["pruned_mask"] == "after_norm" and "pruned_mask" not in after.args_of("unetr")
    with pytest.raises(InputError, match="--pruned-mask"):
        demo_settings(False, None, 0.75, 0, "cpu", pruned_mask="inside")
    token = demo_settings(True, None, 0.75, 0, "cpu", model="tokenseg", model_args={"skips": "dense"})
    assert token.args_of("tokenseg")["skips"] == "dense" and token.args_of("tokenseg")["num_keep"] == 12
    assert "skips" not in demo_settings(True, None, 0.75, 0, "cpu", model="tokenseg").args_of("tokenseg")
    assert demo_settings(True, None, 0.75, 0, "cpu", model_args={"prune_ratio": 0.5}).sparse_args["prune_ratio"] == 0.5
    sparse = demo_settings(False, None, 0.75, 0, "cpu", refine_fraction=0.25)
    ckpts = {"unetr": Path("u.pt"), "stp_mta_unetr": Path("s.pt")}
    assert sparse.decoded(ckpts) == {"unetr": (Path("u.pt"), None), "stp_mta_unetr": (Path("s.pt"), 1.0),
                                     SPARSE: (Path("s.pt"), 0.25)}
    assert full.decoded(ckpts) == {"unetr": (Path("u.pt"), None), "stp_mta_unetr": (Path("s.pt"), None)}
    assert demo_settings(False, None, 0.75, 0, "cpu", refine_fraction=1.0).refine_fraction is None
    with pytest.raises(InputError, match="--refine-fraction"):
        demo_settings(False, None, 0.75, 0, "cpu", refine_fraction=0.0)


@pytest.mark.parametrize("quick,taps", [(True, (1, 2, 3)), (False, (2, 4, 5))])
def test_demo_unetr_taps_follow_its_depth(quick, taps):
    """The demo leaves unetr's taps to the default spread, the authors' 4/7/10 of 12 blocks scaled to its depth."""
    s = demo_settings(quick, None, 0.75, 0, "cpu")
    args = s.args_of("unetr")
    assert "skip_layers" not in args
    with torch.device("meta"):
        model = create_model("unetr", in_channels=1, out_channels=4, img_size=s.roi, **args)
    assert model.skip_layers == taps


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    for row in ("| UNETR (dense) |", "| STP + MTA + UNETR |", "| STP + MTA + UNETR, sparse decoding |",
                "| intensity threshold |", "Total wall time", "blocks its sparse decoding computed"):
        assert row in report
    ref = nib.load(str(out / "data" / "labelsTs" / f"{TEST_CASE}.nii.gz"))
    for name in ("unetr", "stp_mta_unetr", SPARSE, "threshold"):
        pred = nib.load(str(out / "predictions" / name / f"{TEST_CASE}.nii.gz"))
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
        metrics = json.loads((out / "metrics" / f"{name}.json").read_text())
        assert metrics["classes"] == list(CLASS_NAMES[1:])
        assert 0.0 <= metrics["mean"]["dice"] <= 1.0
    for pic in ("overlay.png", "overlay_axial.png", "policy.png", "policy_axial.png", "curves.png"):
        w, h = _png_size(out / pic)
        assert w > 100 and h > 100
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["inference_seconds"]) == {"unetr", "stp_mta_unetr", SPARSE}
    assert all(v > 0 for v in summary["inference_seconds"].values())
    assert "report.md" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_with_veloxseg(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", "veloxseg", "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    for row in ("dense UNETR vs VeloxSeg", "| UNETR (dense) |", "| VeloxSeg |", "| intensity threshold |"):
        assert row in report
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean_dice"]) == {"unetr", "veloxseg", "threshold"}
    assert (out / "curves.png").exists() and not (out / "policy.png").exists()


@pytest.mark.slow
def test_quick_demo_with_tokenseg_reports_the_ablation_and_the_boundary_fraction(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", "tokenseg", "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    for row in ("| TokenSeg |", "| TokenSeg, tokens zeroed |", "| TokenSeg, skips removed |",
                "Tokens zeroed at inference", "Skips removed at inference", "chance, random cells",
                "![kept token cells](tokens.png)"):
        assert row in report
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean_dice"]) == {"unetr", "tokenseg", "tokenseg_zeroed", "tokenseg_no_skips", "threshold"}
    assert set(summary["inference_seconds"]) == {"unetr", "tokenseg"}
    w, h = _png_size(out / "tokens.png")
    assert w > 100 and h > 100
