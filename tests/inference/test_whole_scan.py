"""Whole scans: exact window skipping, the per-channel mapping back, stage timings, the predict flags."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import save, tiny_model
from sparseseg.checkpoint import save_checkpoint
from sparseseg.cli import main
from sparseseg.data.transforms import DataConfig, build_transforms, invert_to_input, regions_to_labels
from sparseseg.inference.predictor import predict
from sparseseg.inference.sliding_window import WindowCounts, skipping_sliding_window, sliding_window_logits
from sparseseg.inference.whole_scan import STAGES, background_value, inverse_plan, labels_on_input
from sparseseg.models.common.registry import create_model


def _island(shape, fill: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``[1, 1, *shape]`` of ``fill`` with a random block in one corner: most windows are all ``fill``."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((1, 1, *shape), fill)
    block = image[..., :10, :9, :7]
    block.copy_(torch.randn(block.shape, generator=g) + 2.0)
    return image


@pytest.mark.parametrize("shape", [(20, 16, 12), (20, 6, 12)])  # the second is thinner than the ROI: padded
def test_no_skipping_is_monais_sliding_window(shape):
    model = create_model("tiny_seg", in_channels=1, out_channels=3, feature_size=4).eval()
    image = _island(shape)
    with torch.inference_mode():
        ours = skipping_sliding_window(model, image, (8, 8, 8), 3, 0.5)
        monai = sliding_window_logits(model, image, (8, 8, 8), 3, 0.5)
    assert ours.shape == monai.shape == (1, 3, *shape)
    torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny_seg", "stp_mta_unetr"])
def test_skipping_background_windows_is_exact(name):
    if name == "tiny_seg":
        model, roi, shape = create_model(name, in_channels=1, out_channels=3, feature_size=4).eval(), 8, (20, 16, 12)
    else:  # a token-pruning model: its top-k sees the same constant window whether skipped or run
        (model, _), roi, shape = tiny_model(name), 32, (48, 32, 32)
    image = _island(shape, fill=-1.0)
    skip, full = WindowCounts(), WindowCounts()
    with torch.inference_mode():  # one window per pass: a skipped window's output is bit for bit the one it replaces
        skipped = skipping_sliding_window(model, image, (roi,) * 3, 1, 0.5, background=-1.0, counts=skip)
        run_all = skipping_sliding_window(model, image, (roi,) * 3, 1, 0.5, background=None, counts=full)
    assert skip.skipped > 0 and skip.run > 0 and skip.run + skip.skipped == full.run and full.skipped == 0
    assert torch.equal(skipped, run_all)


def test_skipping_in_batches_differs_by_batch_rounding_only():
    model = create_model("tiny_seg", in_channels=1, out_channels=3, feature_size=4).eval()
    image = _island((20, 16, 12), fill=-1.0)
    with torch.inference_mode():
        skipped = skipping_sliding_window(model, image, (8, 8, 8), 4, 0.5, background=-1.0)
        run_all = skipping_sliding_window(model, image, (8, 8, 8), 4, 0.5)
    torch.testing.assert_close(skipped, run_all, rtol=1e-5, atol=1e-6)


def test_background_value_per_intensity_preset():
    base = {"in_channels": 1, "label_values": [0, 1], "class_names": ["bg", "a"], "roi_size": [8, 8, 8]}
    assert background_value(DataConfig(**base, intensity="mri")) == 0.0
    assert background_value(DataConfig(**base, intensity="ct", ct_window=[-500.0, 500.0, -2.0, 1.0])) == -2.0
    assert background_value(DataConfig(**base, intensity="none")) is None


def _resampled_probs(tmp_path, regions, orientation="RAS", crop=True):
    data = DataConfig(in_channels=1, label_values=[0, 1, 2, 3], class_names=["a", "b", "c"] if regions else
                      ["bg", "a", "b", "c"], roi_size=[8, 8, 8], intensity="ct", target_spacing=[1.7, 1.3, 2.2],
                      orientation=orientation, crop_foreground=crop, regions=regions)
    rng = np.random.default_rng(0)
    image = np.full((19, 15, 12), -1000.0, np.float32)
    image[3:16, 2:13, 2:10] = rng.normal(40, 30, (13, 11, 8))
    pipeline = build_transforms(data, "infer")
    loaded = pipeline({"image": [str(save(image, tmp_path / "x.nii.gz"))]}, end=1)
    affine = loaded["image"].affine.numpy()
    d = pipeline(loaded, start=1)
    k = data.out_channels
    logits = torch.from_numpy(rng.normal(0, 2, (k, *d["image"].shape[1:])).astype(np.float32))
    probs = torch.sigmoid(logits) if regions else torch.softmax(logits, 0)
    return data, pipeline, d["image"], probs, affine, image.shape


@pytest.mark.parametrize(("regions", "orientation", "crop"), [(None, "RAS", True), ([[1, 2, 3], [2, 3], [3]], "RAS",
                                                              True), (None, None, False), (None, "LPI", False)])
def test_per_channel_mapping_back_equals_all_channels(tmp_path, regions, orientation, crop):
    data, pipeline, image, probs, affine, shape = _resampled_probs(tmp_path, regions, orientation, crop)
    every = invert_to_input(probs, image, pipeline)  # [K, d, h, w] -> [K, X, Y, Z], MONAI's inverse
    expected = regions_to_labels(every > 0.5, regions) if regions else every.argmax(0).to(torch.uint8)
    assert len(expected.unique()) > 1
    monai_labels, monai_probs = labels_on_input(probs, image, pipeline, data, save_probabilities=True)
    assert torch.equal(monai_labels, expected)  # each channel through MONAI's inverse alone
    np.testing.assert_array_equal(monai_probs, every.permute(1, 2, 3, 0).numpy())
    assert inverse_plan(image, probs.shape[1:], affine, shape) is not None
    labels, probabilities = labels_on_input(probs, image, pipeline, data, True, affine, shape)  # in slabs
    assert labels.shape == shape and labels.dtype == torch.uint8
    assert torch.equal(labels, expected)
    # MONAI inverts Spacing in float32, the type it resamples in
    np.testing.assert_allclose(probabilities, every.permute(1, 2, 3, 0).numpy(), atol=1e-5)
    assert labels_on_input(probs, image, pipeline, data, False, affine, shape)[1] is None


def _ct_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_seg", in_channels=1, out_channels=3, feature_size=4)
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "a", "b"], roi_size=[8, 8, 8],
                      intensity="ct", target_spacing=[1.5, 1.5, 2.0])
    image = _island((30, 26, 18), fill=-1000.0)[0, 0].numpy() * 100
    save(image, tmp_path / "in" / "scan.nii.gz")
    return save_checkpoint(tmp_path / "best.pt", model, data.to_dict())


def test_predict_skipping_writes_the_same_files_and_times_the_stages(tmp_path):
    ckpt = _ct_checkpoint(tmp_path)
    runs = {}
    for skip in (True, False):
        timings: list[dict] = []
        (out,) = predict(ckpt, tmp_path / "in", tmp_path / f"out_{skip}", overlap=0.5, sw_batch_size=2,
                         save_probabilities=True, skip_background=skip, threads=1, timings=timings)
        (record,) = timings
        assert record["case"] == "scan" and record["shape"] == [30, 26, 18]
        assert set(record["stages"]) == set(STAGES) and all(t >= 0 for t in record["stages"].values())
        runs[skip] = (nib.load(out).get_fdata(), nib.load(out.parent / "scan_probabilities.nii.gz").get_fdata(),
                      record["windows"])
    assert runs[True][2]["skipped"] > 0 and runs[False][2]["skipped"] == 0
    assert sum(runs[True][2].values()) == runs[False][2]["run"]
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    np.testing.assert_allclose(runs[True][1], runs[False][1], atol=1e-5)


def test_predict_flags(tmp_path, monkeypatch):
    ckpt = _ct_checkpoint(tmp_path)
    seen = {}
    import sparseseg.inference.predictor as predictor

    real = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    threads = torch.get_num_threads()
    try:
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--output",
                     str(tmp_path / "out"), "--no-skip-background", "--threads", "1", "--crop-foreground"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen["skip_background"] is False and seen["threads"] == 1 and seen["crop_foreground"] is True
    assert seen["sw_batch_size"] is None  # 1 window per pass on the CPU
    assert nib.load(tmp_path / "out" / "scan.nii.gz").shape == (30, 26, 18)  # cropped, then padded back
