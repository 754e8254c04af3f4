"""The sparse-decoding knob through checkpoints and ``predict``: a checkpoint rebuilds its model with the
refine fraction it was trained with; ``predict --refine-fraction`` overrides it (1 = dense decoding)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import save, synthetic_case
from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from sparseseg.cli import main
from sparseseg.data.transforms import DataConfig
from sparseseg.errors import InputError
from sparseseg.inference.predictor import set_refine_fraction
from sparseseg.models.common.registry import create_model

ARGS = {"in_channels": 1, "out_channels": 3, "img_size": 16, "patch_size": 8, "decoder": "v1", "hidden_size": 32,
        "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "feature_size": 4, "prune_after": [1], "prune_ratio": 0.5,
        "completion_size": 48, "completion_heads": 2, "refine_fraction": 0.25, "refine_block": 4}


def _checkpoint(path, refine_fraction: float):
    torch.manual_seed(0)  # the same weights at every fraction
    model = create_model("stp_mta_unetr", **{**ARGS, "refine_fraction": refine_fraction})
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "a", "b"], roi_size=[16, 16, 16],
                      intensity="ct")
    return save_checkpoint(path, model, data.to_dict())


@pytest.fixture
def checkpoint(tmp_path):
    return _checkpoint(tmp_path / "best.pt", 0.25)


def test_checkpoint_rebuilds_with_its_refine_fraction(checkpoint):
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    assert model.refine_fraction == 0.25 and model.sparse_decoding.block_size == 4


def test_predict_overrides_the_refine_fraction(tmp_path, checkpoint):
    """``--refine-fraction F`` on a checkpoint trained at 0.25 gives what a checkpoint saved at F gives."""
    dense = _checkpoint(tmp_path / "dense.pt", 1.0)
    image, _ = synthetic_case((20, 18, 16), seed=1)
    save(image, tmp_path / "in" / "x.nii.gz")

    def probabilities(ckpt, *flag: str) -> np.ndarray:
        out = tmp_path / f"{ckpt.stem}{''.join(flag)}"
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--output", str(out),
                     "--save-probabilities", *flag]) == 0
        return np.asarray(nib.load(out / "x_probabilities.nii.gz").dataobj)

    trained, overridden = probabilities(checkpoint), probabilities(checkpoint, "--refine-fraction", "1")
    np.testing.assert_array_equal(overridden, probabilities(dense))
    np.testing.assert_array_equal(trained, probabilities(dense, "--refine-fraction", "0.25"))
    assert trained.shape == (20, 18, 16, 3) and np.abs(trained - overridden).max() > 1e-3


def test_bad_refine_fraction(tmp_path, checkpoint, capsys):
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path), "--output",
                 str(tmp_path / "o"), "--refine-fraction", "0"]) == 2
    assert "refine fraction must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(InputError, match="no sparse decoding"):
        set_refine_fraction(nn.Linear(1, 1), 0.5)
