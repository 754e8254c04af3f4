"""Pictures: valid PNGs of the expected pixel size for tiny inputs, policy stitching invariants, CLI entry points."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sparseseg.checkpoint import save_checkpoint
from sparseseg.cli import main
from sparseseg.data.transforms import DataConfig
from sparseseg.errors import InputError
from sparseseg.models.common.registry import create_model
from sparseseg.visualize.plots import (
    CELL_INCHES,
    DPI,
    figure_size,
    panel_aspect,
    pick_slices,
    plot_curves,
    plot_overlay,
    plot_policy,
    policy_volume,
)
from sparseseg.visualize.policy import policy_levels, policy_map
from sparseseg.visualize.tokens import token_map

TINY_SPARSE = {"in_channels": 1, "out_channels": 3, "img_size": 16, "patch_size": 8, "hidden_size": 24,
               "mlp_dim": 48, "num_layers": 3, "num_heads": 2, "feature_size": 4, "decoder": "v1",
               "prune_after": (1, 2), "completion_size": 24, "completion_heads": 2}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; asserts the PNG signature."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def tiny_volume(shape=(16, 12, 20), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    r = np.linalg.norm(grid - np.array(shape) / 2, axis=-1)
    label = np.where(r < 3, 2, np.where(r < 5, 1, 0)).astype(np.uint8)
    image = (label * 100 + rng.normal(0, 10, shape)).astype(np.float32)
    return image, label


def test_overlay_png_of_the_requested_size(tmp_path):
    image, label = tiny_volume()
    out = plot_overlay(image, label, {"a": label, "b": np.zeros_like(label)}, output=tmp_path / "o.png",
                       class_names=["bg", "shell", "core"], figsize=(4, 3), dpi=50)
    assert png_size(out) == (200, 150)
    assert not list(tmp_path.glob(".o.png*"))  # no temporary file left behind


def test_overlay_default_layout_size(tmp_path):
    image, label = tiny_volume()
    out = plot_overlay(image, label, [label, label], output=tmp_path / "o.png", slices=[4, 8, 10], axis=2)
    rows, cols = 3, 4  # image, reference, two predictions
    w, h = figure_size(rows, cols, legend=True, aspect=12 / 16)  # axial panels of a 16 x 12 x 20 volume
    assert png_size(out) == (round(w * DPI), round(h * DPI))
    assert panel_aspect((16, 12, 20), 2) == 0.75 and panel_aspect((100, 10, 5), 2) == 0.4


def test_overlay_rejects_bad_input(tmp_path):
    image, label = tiny_volume()
    with pytest.raises(ValueError, match="shape"):
        plot_overlay(image, label[:-1], None, output=tmp_path / "o.png")
    with pytest.raises(ValueError, match="outside"):
        plot_overlay(image, label, None, output=tmp_path / "o.png", slices=[99])
    with pytest.raises(InputError, match="PNG"):
        plot_overlay(image, label, None, output=tmp_path / "o.jpg")


def test_pick_slices_stay_inside_the_foreground():
    _, label = tiny_volume()
    idx = pick_slices(label, axis=2, num=4)
    filled = np.flatnonzero(label.any(axis=(0, 1)))
    assert idx and all(filled[0] <= i <= filled[-1] for i in idx)


def test_policy_volume_repeats_each_token_over_its_patch():
    policy = np.arange(2 * 2 * 3)
    vol = policy_volume(policy, (2, 2, 3), 4, (8, 7, 12))
    assert vol.shape == (8, 7, 12)
    assert vol[0, 0, 0] == 0 and vol[7, 6, 11] == 11
    assert np.all(vol[4:8, 0:4, 4:8] == policy.reshape(2, 2, 3)[1, 0, 1])


def test_policy_png_sizes_and_errors(tmp_path):
    image, label = tiny_volume((16, 16, 16))
    depth = np.array([1, 2, 3, 3, 1, 1, 2, 1])  # [2, 2, 2] tokens of patch 8
    out = plot_policy(image, depth, 8, label, output=tmp_path / "p.png", num_layers=3, depths=[1, 2, 3],
                      figsize=(6, 4), dpi=40)
    assert png_size(out) == (240, 160)
    out = plot_policy(image, depth, 8, None, output=tmp_path / "p2.png", slices=[3, 12])
    w, h = figure_size(2, 2, legend=True)
    assert png_size(out) == (round(w * DPI), round(h * DPI))
    dense = plot_policy(image, np.full(8, 3), 8, output=tmp_path / "dense.png", num_layers=3)  # nothing pruned
    assert png_size(dense)[0] > 0
    with pytest.raises(ValueError, match="tokens"):
        plot_policy(image, depth[:-1], 8, output=tmp_path / "bad.png")


def _tiny_sparse(prune_ratio: float):
    torch.manual_seed(0)
    return create_model("stp_mta_unetr", prune_ratio=prune_ratio, **TINY_SPARSE).eval()


def test_policy_map_stitches_tiles_with_k_kept_each():
    model = _tiny_sparse(0.5)
    image = torch.randn(1, 32, 32, 16)  # 2 x 2 x 1 tiles of 16^3
    depth = policy_map(model, image, [16, 16, 16])
    assert depth.shape == (4, 4, 2)
    assert set(np.unique(depth)) <= set(policy_levels(model)) == {1, 2, 3}
    kept_last = model.num_kept()[-1]
    assert int((depth == 3).sum()) == 4 * kept_last
    assert int((depth >= 2).sum()) == 4 * model.num_kept()[0]


def test_policy_map_shows_background_tokens_dropped_before_the_first_block(tmp_path):
    model = _tiny_sparse(0.5)
    model.drop_background = True
    image = torch.randn(1, 32, 32, 16)
    image[:, :16] = 0.0  # the first row of tiles is background
    depth = policy_map(model, image, [16, 16, 16], batch_size=1)  # (a batch keeps its largest foreground count)
    assert policy_levels(model) == [0, 1, 2, 3]
    assert int((depth[:2] == 0).sum()) == 2 * 7  # two background tiles of 8 tokens, each keeps one
    assert np.all(depth[2:] > 0)  # the other tiles: pruned by STP as before
    out = plot_policy(image[0].numpy(), depth, 8, output=tmp_path / "bg.png", num_layers=3,
                      depths=policy_levels(model), dpi=40)
    assert png_size(out)[0] > 0


def test_policy_map_pads_odd_sizes_and_ratio_zero_keeps_everything():
    model = _tiny_sparse(0.0)
    depth = policy_map(model, torch.randn(1, 20, 9, 16), [16, 16, 16])
    assert depth.shape == (3, 2, 2)
    assert np.all(depth == model.num_layers)


def test_token_map_stitches_kept_cells_and_averages_the_boundary_report():
    torch.manual_seed(0)
    model = create_model("tokenseg", in_channels=1, out_channels=3, img_size=32, feature_size=4, token_size=24,
                         num_heads=2, tokens_per_level=(40, 30, 20, 8), num_candidates=98, num_keep=24,
                         codebook_size=64, mixer_depth=1).eval()
    image = torch.randn(1, 40, 32, 20)  # 2 x 1 x 1 tiles of 32^3 after edge padding
    label = torch.zeros(40, 32, 20, dtype=torch.long)
    label[10:30, 8:24, 4:16] = 1
    tm = token_map(model, image, [32, 32, 32], label)
    assert tm.cells.shape == (40, 32, 20) and tm.tiles == 2 and sum(tm.kept_per_level) == 24
    assert set(np.unique(tm.cells)) <= {0, 1, 2, 3, 4} and (tm.cells > 0).any()
    assert set(tm.report) == {"touches", "touches_chance", "share", "share_chance"}
    assert all(0.0 <= v <= 1.0 for v in tm.report.values())
    assert token_map(model, image, [32, 32, 32]).report == {}
    with pytest.raises(ValueError, match="select_tokens"):
        token_map(_tiny_sparse(0.5), image, [16, 16, 16])


def _write_log(run: Path, rows: list[list], dice: bool) -> None:
    run.mkdir(parents=True)
    with (run / "log.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "iteration", "train_loss", "lr"] + (["mean_dice", "dice_shell"] if dice else []))
        w.writerows(rows)


def test_curves_of_several_runs_with_and_without_validation(tmp_path):
    _write_log(tmp_path / "a", [[1, 10, 1.2, 1e-3, "", ""], [2, 20, 0.8, 5e-4, 0.5, 0.4]], dice=True)
    _write_log(tmp_path / "b", [[1, 10, 1.5, 1e-3], [2, 20, 0.9, 0.0]], dice=False)
    out = plot_curves([tmp_path / "a", tmp_path / "b"], tmp_path / "c.png", labels=["A", "B"], figsize=(6, 2),
                      dpi=50)
    assert png_size(out) == (300, 100)
    assert png_size(plot_curves(tmp_path / "b")) == (1200, 360)  # default: RUN_DIR/curves.png
    with pytest.raises(InputError, match="log"):
        plot_curves(tmp_path / "missing", tmp_path / "d.png")


def _nifti(array: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def test_cli_overlay_policy_and_curves(tmp_path, capsys):
    image, label = tiny_volume((32, 16, 24))
    img = _nifti(image, tmp_path / "img.nii.gz")
    lab = _nifti(label, tmp_path / "lab.nii.gz")
    assert main(["visualize", "overlay", "--image", str(img), "--label", str(lab), "--pred", f"model={lab}",
                 "--output", str(tmp_path / "overlay.png"), "--axis", "1"]) == 0
    assert png_size(tmp_path / "overlay.png")[0] == round(3 * CELL_INCHES * DPI)

    model = _tiny_sparse(0.5)
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "shell", "core"],
                      roi_size=[16, 16, 16], intensity="none").to_dict()
    ckpt = save_checkpoint(tmp_path / "sparse.pt", model, data)
    assert main(["visualize", "policy", "--checkpoint", str(ckpt), "--input", str(img), "--label", str(lab),
                 "--output", str(tmp_path / "policy.png"), "--prune-ratio", "0.25", "--device", "cpu"]) == 0
    assert png_size(tmp_path / "policy.png")[0] == round(3 * CELL_INCHES * DPI)

    run = tmp_path / "run"
    _write_log(run, [[1, 10, 1.2, 1e-3, "", ""], [2, 20, 0.8, 5e-4, 0.5, 0.4], [3, 30, 0.6, 0.0, 0.7, 0.6]], True)
    assert main(["visualize", "curves", "--run", str(run), "--output", str(tmp_path / "curves.png")]) == 0
    assert png_size(tmp_path / "curves.png") == (1200, 360)
    assert "wrote" in capsys.readouterr().out


def test_cli_visualize_bad_input_is_one_line(tmp_path, capsys):
    image, label = tiny_volume()
    img = _nifti(image, tmp_path / "img.nii.gz")
    bad = _nifti(label[:, :, :-1], tmp_path / "bad.nii.gz")
    code = main(["visualize", "overlay", "--image", str(img), "--label", str(bad), "--output",
                 str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.nii.gz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
    assert main(["visualize", "curves", "--run", str(tmp_path / "nope"), "--output", str(tmp_path / "c.png")]) == 2
