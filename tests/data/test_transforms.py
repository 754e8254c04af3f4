from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import save, synthetic_case
from sparseseg.data.transforms import (
    DataConfig,
    LabelToRegionsd,
    build_transforms,
    invert_to_input,
    regions_to_labels,
)

LABELS = [0, 1, 2]


def _cfg(**kw) -> DataConfig:
    base = {"in_channels": 1, "label_values": LABELS, "class_names": ["background", "ball", "core"],
            "roi_size": [16, 16, 16], "intensity": "ct"}
    return DataConfig(**{**base, **kw})


def _case(tmp_path, shape=(24, 20, 22), channels=1, ct=True):
    image, label = synthetic_case(shape, seed=5, channels=channels, ct=ct)
    return {"image": [str(save(image, tmp_path / "img.nii.gz"))], "label": str(save(label, tmp_path / "lab.nii.gz"))}


def test_ct_window(tmp_path):
    img = np.array([-2000.0, -958.0, -316.0, 326.0, 3000.0], np.float32).reshape(5, 1, 1)
    out = build_transforms(_cfg(), "infer")({"image": [str(save(img, tmp_path / "ct.nii.gz"))]})["image"]
    np.testing.assert_allclose(out.flatten().numpy(), [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)


def test_mri_nonzero_zscore_per_channel(tmp_path):
    case = _case(tmp_path, channels=2, ct=False)
    raw = build_transforms(_cfg(in_channels=2, intensity="none"), "val")(case)["image"]
    out = build_transforms(_cfg(in_channels=2, intensity="mri"), "val")(case)["image"]
    for c in range(2):
        nz = raw[c] != 0
        assert float(out[c][nz].mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(out[c][nz].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
        assert bool((out[c][~nz] == 0).all())


def test_brats_regions_and_back():
    lab = torch.tensor([0, 1, 2, 3]).view(1, 4, 1, 1)
    regions = [[2, 3], [1, 2, 3], [3]]  # TC, WT, ET
    multi = LabelToRegionsd(regions)({"label": lab})["label"]
    assert multi.shape == (3, 4, 1, 1)
    np.testing.assert_array_equal(multi[:, :, 0, 0].numpy(), [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(regions_to_labels(multi > 0.5, regions).flatten().numpy(), [0, 1, 2, 3])


def test_training_crops_have_roi_shape(tmp_path):
    case = _case(tmp_path, shape=(14, 20, 22))  # smaller than the ROI along one axis: padded
    pipeline = build_transforms(_cfg(), "train")
    pipeline.set_random_state(seed=0)
    for _ in range(3):
        out = pipeline(case)[0]
        assert out["image"].shape == (1, 16, 16, 16) and out["label"].shape == (1, 16, 16, 16)
        assert set(torch.unique(out["label"]).tolist()) <= set(LABELS)


def _one_hot(label: torch.Tensor) -> torch.Tensor:
    return F.one_hot(label[0].long(), 3).permute(3, 0, 1, 2).float()  # [1, D, H, W] -> [3, D, H, W]


def test_inverse_lands_on_the_input_grid_exactly(tmp_path):
    case = _case(tmp_path)
    cfg = _cfg(orientation="RAS", crop_foreground=True, intensity="none")
    val = build_transforms(cfg, "val")(case)
    assert tuple(val["image"].shape[1:]) != (24, 20, 22)  # reoriented and cropped
    infer = build_transforms(cfg, "infer")
    image = infer({"image": case["image"]})["image"]
    back = invert_to_input(_one_hot(val["label"]), image, infer)
    original = synthetic_case((24, 20, 22), seed=5)[1]
    assert tuple(back.shape) == (3, 24, 20, 22)
    np.testing.assert_array_equal(back.argmax(0).numpy(), original)


def test_inverse_after_resampling(tmp_path):
    case = _case(tmp_path)
    cfg = _cfg(orientation="RAS", target_spacing=[2.0, 2.0, 2.0])
    infer = build_transforms(cfg, "infer")
    image = infer({"image": case["image"]})["image"]
    assert tuple(image.shape[1:]) == (12, 12, 17)  # 24 x 1 mm, 20 x 1.2 mm, 22 x 1.5 mm at 2 mm
    label = build_transforms(cfg, "val")(case)["label"]
    back = invert_to_input(_one_hot(label), image, infer)
    original = synthetic_case((24, 20, 22), seed=5)[1]
    assert tuple(back.shape) == (3, 24, 20, 22)
    assert (back.argmax(0).numpy() == original).mean() > 0.9


def test_bad_config_values():
    with pytest.raises(ValueError, match="intensity"):
        _cfg(intensity="pet")
    with pytest.raises(ValueError, match="roi_size"):
        _cfg(roi_size=[16, 16])


def test_foreground_crop_keeps_the_non_zero_region_of_mri(tmp_path):
    """MRI: the crop keeps every non-zero voxel (also those below the mean, negative after the z-score);
    CT: voxels > 0 after the window, the STP + MTA authors' rule."""
    img = np.zeros((20, 20, 20), np.float32)
    img[4:12, 5:15, 6:16] = 50.0  # dim tissue: below the mean of the non-zero voxels
    img[8:12, 9:13, 10:14] = 400.0
    path = save(img, tmp_path / "mri.nii.gz")
    out = build_transforms(_cfg(intensity="mri", crop_foreground=True), "infer")({"image": [str(path)]})["image"]
    assert tuple(out.shape[1:]) == (8, 10, 10)
    hu = np.where(img == 0, -1000.0, np.where(img == 50.0, -500.0, 400.0)).astype(np.float32)
    ct_path = save(hu, tmp_path / "ct.nii.gz")
    ct = build_transforms(_cfg(intensity="ct", crop_foreground=True), "infer")({"image": [str(ct_path)]})["image"]
    assert tuple(ct.shape[1:]) == (4, 4, 4)  # only the 400 HU block is above the window's middle (-316 HU)
