from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch.nn as nn

from conftest import save, synthetic_case
from sparseseg.checkpoint import save_checkpoint
from sparseseg.data.transforms import DataConfig
from sparseseg.errors import InputError
from sparseseg.inference.predictor import collect_cases, predict, set_prune_ratio
from sparseseg.models.common.registry import create_model


def test_collect_cases_groups_channels(tmp_path):
    vol = np.zeros((4, 4, 4), np.float32)
    for c in range(2):
        save(vol, tmp_path / "in" / f"brain_{c:04d}.nii.gz")
    save(np.zeros((4, 4, 4, 2), np.float32), tmp_path / "in" / "four_d.nii.gz")
    save(vol, tmp_path / "one" / "scan_2019.nii.gz")
    cases = collect_cases(tmp_path / "in", in_channels=2)
    assert {k: [p.name for p in v] for k, v in cases.items()} == {
        "brain": ["brain_0000.nii.gz", "brain_0001.nii.gz"], "four_d": ["four_d.nii.gz"]}
    assert list(collect_cases([tmp_path / "one" / "scan_2019.nii.gz"], 1)) == ["scan_2019"]
    save(vol, tmp_path / "in" / "brain_0003.nii.gz")
    with pytest.raises(InputError, match="numbered _0000, _0001"):
        collect_cases(tmp_path / "in", in_channels=2)
    with pytest.raises(InputError, match="input not found"):
        collect_cases(tmp_path / "nowhere", 1)


def test_prune_ratio_needs_a_sparse_model():
    class Sparse(nn.Module):
        prune_ratio = 0.75

    model = Sparse()
    set_prune_ratio(model, 0.5)
    assert model.prune_ratio == 0.5
    with pytest.raises(InputError, match="has no pruning ratio"):
        set_prune_ratio(nn.Linear(1, 1), 0.5)
    with pytest.raises(InputError, match=r"must be in \[0, 1\)"):
        set_prune_ratio(model, 1.0)


def test_predict_resampled_and_reoriented_lands_on_input_grid(tmp_path):
    model = create_model("tiny_seg", in_channels=1, out_channels=3, feature_size=4)
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "a", "b"], roi_size=[8, 8, 8],
                      intensity="ct", target_spacing=[2.0, 2.0, 2.0], orientation="RAS", crop_foreground=True)
    ckpt = save_checkpoint(tmp_path / "best.pt", model, data.to_dict())
    image, _ = synthetic_case((18, 14, 11), seed=3)
    src = save(image, tmp_path / "in" / "x_0000.nii.gz")
    (out,) = predict(ckpt, tmp_path / "in", tmp_path / "out", overlap=0.25, sw_batch_size=2)
    assert out.name == "x.nii.gz"
    a, b = nib.load(out), nib.load(src)
    assert a.shape == b.shape and np.allclose(a.affine, b.affine) and a.get_data_dtype() == np.uint8
