"""Background tokens dropped before the first block (``stp_mta_unetr``'s ``drop_background``)."""

from __future__ import annotations

import pytest
import torch

from sparseseg import count_macs, create_model
from sparseseg.benchmark.flops import MacCountError
from sparseseg.models.common.tokens import num_keep
from sparseseg.models.stp_mta.background import foreground_patches, split_foreground

# 32^3 with patch 8: a 4 x 4 x 4 grid of 64 tokens; half of the grid is 2 slabs of 16 tokens along the first axis
TINY = dict(in_channels=2, out_channels=3, img_size=32, hidden_size=48, mlp_dim=96, num_layers=3, num_heads=3,
            feature_size=4, decoder="v1", prune_after=(1, 2), completion_size=48, completion_heads=3,
            prune_ratio=0.5)


def tiny_stp(**kw):
    torch.manual_seed(0)
    return create_model("stp_mta_unetr", **{**TINY, **kw}).eval()


def scan(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 2, 32, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_foreground_patches_known_answer():
    x = torch.full((2, 2, 16, 16, 16), -1.0)  # a 2 x 2 x 2 grid, all background at -1
    x[0, 1, 9, 0, 15] = 0.5  # one voxel of one channel: patch (1, 0, 1) = token 5
    x[1, 0, :8, :8, :8] = float("nan")  # NaN is not background: token 0
    fg = foreground_patches(x, 8, -1.0)
    assert fg.shape == (2, 8)
    assert fg[0].nonzero().flatten().tolist() == [5] and fg[1].nonzero().flatten().tolist() == [0]
    assert foreground_patches(x, 8, 0.0).all()


def test_split_foreground_keeps_a_common_count():
    fg = torch.zeros(3, 8, dtype=torch.bool)
    fg[0, [1, 4, 6]] = True  # 3 foreground tokens
    fg[1, [2]] = True  # 1: filled up with its highest-index background tokens
    keep, drop = split_foreground(fg)  # (sample 2 is all background)
    assert keep.tolist() == [[1, 4, 6], [2, 6, 7], [5, 6, 7]]
    assert drop.tolist() == [[0, 2, 3, 5, 7], [0, 1, 3, 4, 5], [0, 1, 2, 3, 4]]
    keep, drop = split_foreground(torch.zeros(2, 8, dtype=torch.bool))  # all background: one token goes on
    assert keep.tolist() == [[7], [7]] and drop.shape == (2, 7)


def test_no_background_gives_the_same_output():
    model = tiny_stp()
    x = scan(2)
    with torch.inference_mode():
        off = model(x)
        model.drop_background = True
        assert torch.equal(model(x), off)
        assert torch.equal(model.pruning_policy(x), model.encoder(x, 0.5, stochastic=False).depth)


def test_background_tokens_skip_the_encoder_and_shrink_every_stage():
    model = tiny_stp(drop_background=True)
    x = scan()
    x[:, :, :16] = 0.0  # the first half of the grid is background: 32 of 64 tokens
    with torch.inference_mode():
        enc = model.forward_encoder(x)
    background = torch.arange(64) < 32
    assert torch.equal(enc.depth[0] == 0, background)  # depth 0: dropped before the first block
    k1, k2 = num_keep(32, 0.5), num_keep(num_keep(32, 0.5), 0.5)  # a fraction of the tokens each stage receives
    assert model.num_kept(32) == [k1, k2] == [16, 8]
    assert enc.final.shape == (1, 1 + k2, 48) and [g.tokens.shape[1] for g in enc.pruned] == [32 + 32 - k1, k1 - k2]
    assert set(enc.pruned[0].idx[0].tolist()) >= set(range(32))  # completed as tokens pruned by the first stage
    positions = torch.cat([enc.keep_idx, *[g.idx for g in enc.pruned]], 1)
    assert torch.equal(positions.sort(1).values, torch.arange(64).expand(1, 64))  # every token completed once
    with torch.inference_mode():
        out = model(x)
        model.drop_background = False
        full = model(x)
    assert out.shape == full.shape and torch.isfinite(out).all() and not torch.equal(out, full)


def test_batches_with_different_background_counts():
    model = tiny_stp(drop_background=True)
    x = scan(3)
    x[0, :, :16] = 0.0  # 32 background tokens
    x[1, :, :8] = 0.0  # 16: the largest foreground count (48) sets the batch's
    x[2] = 0.0  # all background
    with torch.inference_mode():
        enc = model.forward_encoder(x)
        assert enc.final.shape[1] == 1 + model.num_kept(48)[-1]
        assert (enc.depth == 0).sum(1).tolist() == [16, 16, 16]  # samples 0 and 2 fill up with background tokens
        out = model(x)
        alone = model(x[1:2])  # the sample that sets the count computes exactly what it computes alone
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:2], alone, rtol=1e-4, atol=1e-5)


def test_all_background_window_keeps_one_token():
    model = tiny_stp(drop_background=True, background_value=-1.0)
    x = torch.full((1, 2, 32, 32, 32), -1.0)
    with torch.inference_mode():
        enc = model.forward_encoder(x)
        out = model(x)
    assert enc.final.shape == (1, 2, 48) and int((enc.depth > 0).sum()) == 1
    assert torch.isfinite(out).all() and out.shape == (1, 3, 32, 32, 32)


def test_drop_background_is_a_test_time_attribute():
    model = tiny_stp()
    keys = set(model.state_dict())
    model.drop_background, model.background_value = True, -1
    assert set(model.state_dict()) == keys and model.background_value == -1.0
    with pytest.raises(ValueError, match="finite"):
        model.background_value = float("nan")
    model.train()
    with pytest.raises(ValueError, match="inference option"):
        model(scan())
    model.drop_background = False
    assert model(scan()).logits.shape == (1, 3, 32, 32, 32)  # training with it off: as before


def test_mac_counts_with_background_dropping():
    model = tiny_stp(drop_background=True)
    shape = (1, 2, 32, 32, 32)
    with pytest.raises(MacCountError, match="meta device.*real example input"):
        count_macs(model, shape)
    x = scan()
    full = count_macs(model, x, device="cpu")  # no background: the count of the model without dropping
    model.drop_background = False
    assert full == pytest.approx(count_macs(model, shape), rel=1e-12)  # (meta equals real: tests/benchmark)
    model.drop_background = True
    x[:, :, :16] = 0.0
    half = count_macs(model, x, device="cpu")
    x[:, :, :24] = 0.0
    quarter = count_macs(model, x, device="cpu")
    assert quarter < half < full


@pytest.mark.parametrize("scorer", ["cls_attention", "dynamic"])
def test_the_ablation_scorers_drop_background_at_inference(scorer):
    model = tiny_stp(scorer=scorer, drop_background=True)
    x = scan()
    x[:, :, :16] = 0.0
    with torch.inference_mode():
        enc = model.forward_encoder(x)
    assert int((enc.depth == 0).sum()) == 32 and enc.final.shape[1] == 1 + model.num_kept(32)[-1]
