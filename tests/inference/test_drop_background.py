"""``predict --drop-background-tokens``: the background value comes from the checkpoint's preprocessing; windows
without background patches give the same output, windows with them run fewer tokens."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import save
from sparseseg.checkpoint import save_checkpoint
from sparseseg.cli import main
from sparseseg.data.transforms import DataConfig
from sparseseg.errors import InputError
from sparseseg.inference.predictor import input_background_value, set_drop_background
from sparseseg.models.common.registry import create_model

ARGS = {"in_channels": 1, "out_channels": 3, "img_size": 16, "patch_size": 8, "decoder": "v1", "hidden_size": 32,
        "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "feature_size": 4, "prune_after": [1], "prune_ratio": 0.5,
        "completion_size": 48, "completion_heads": 2}
DENSE = {k: v for k, v in ARGS.items() if k not in ("prune_after", "prune_ratio", "completion_size",
                                                   "completion_heads")}
CT = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "a", "b"], roi_size=[16, 16, 16],
                intensity="ct")


def test_background_value_follows_the_preprocessing():
    assert input_background_value(CT) == -1.0  # air is clipped to the window's b_min
    ct = DataConfig.from_dict({**CT.to_dict(), "ct_window": [-1000.0, 1000.0, 0.0, 1.0]})
    assert input_background_value(ct) == 0.0
    assert input_background_value(DataConfig.from_dict({**CT.to_dict(), "intensity": "mri"})) == 0.0


def test_set_drop_background_needs_a_token_model():
    model = create_model("stp_mta_unetr", **ARGS)
    set_drop_background(model, True, -1.0)
    assert model.drop_background and model.background_value == -1.0
    with pytest.raises(InputError, match="cannot drop background tokens"):
        set_drop_background(create_model("unetr", **DENSE), True)  # the dense baseline stays dense
    with pytest.raises(InputError, match="cannot drop background tokens"):
        set_drop_background(nn.Linear(1, 1), True)


@pytest.mark.slow
def test_predict_drops_background_tokens_end_to_end(tmp_path):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "best.pt", create_model("stp_mta_unetr", **ARGS), CT.to_dict())
    rng = np.random.default_rng(0)
    body = rng.normal(40.0, 30.0, (16, 16, 16)).astype(np.float32)  # HU, no air
    air = body.copy()
    air[:8] = -1000.0  # half of the patches are air: -1 after the CT window

    def probabilities(image: np.ndarray, name: str, *flag: str) -> np.ndarray:
        save(image, tmp_path / name / "x.nii.gz")
        out = tmp_path / f"out_{name}{''.join(flag)}"
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / name), "--output", str(out),
                     "--save-probabilities", *flag]) == 0
        return np.asarray(nib.load(out / "x_probabilities.nii.gz").dataobj)

    np.testing.assert_array_equal(probabilities(body, "body"),
                                  probabilities(body, "body", "--drop-background-tokens"))
    dropped, full = probabilities(air, "air", "--drop-background-tokens"), probabilities(air, "air")
    assert dropped.shape == full.shape == (16, 16, 16, 3) and np.abs(dropped - full).max() > 1e-4
