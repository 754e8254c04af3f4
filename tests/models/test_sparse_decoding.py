"""Sparse decoding (models/common/sparse_decoding.py): every block refined reproduces dense decoding, the selection
and its statistics weights, uncertainty scores, training outputs and gradients, the knob, MACs."""

from __future__ import annotations

import math

import pytest
import torch

from sparseseg import count_macs, create_model
from sparseseg.models.common.blocks import block_grid, inside_mask, scatter_blocks
from sparseseg.models.common.norms import ChannelInstanceNorm3d
from sparseseg.models.common.sparse_decoding import (
    BlockSelection,
    _Blocks,
    block_scores,
    refine_blocks,
    select_blocks,
    uncertainty,
)
from sparseseg.models.common.vit import tokens_to_map
from sparseseg.models.stp_mta.unetr import UNETR

TINY = dict(in_channels=2, out_channels=3, hidden_size=48, mlp_dim=96, num_layers=4, num_heads=3, feature_size=4)
SPARSE = dict(prune_after=(1, 2, 3), completion_size=48, completion_heads=3, prune_ratio=0.5)


def _model(name: str, decoder: str, patch: int, img, **kw):
    extra = SPARSE if name == "stp_mta_unetr" else {"skip_layers": (1, 2, 3)[: 2 if decoder == "v1" else 3]}
    return create_model(name, img_size=img, patch_size=patch, decoder=decoder, **{**TINY, **extra, **kw}).eval()


def _coarse_map(model, x: torch.Tensor) -> torch.Tensor:
    """The half-resolution map the full-resolution level reads (what the model's forward computes)."""
    if isinstance(model, UNETR):
        final, taps = model.forward_encoder(x)
        skips = [tokens_to_map(t[:, 1:], model.grid_size) for t in taps]
        return model.decoder.decode_coarse(skips, tokens_to_map(final[:, 1:], model.grid_size))
    feat = tokens_to_map(model.completion(model.forward_encoder(x)), model.grid_size)
    return model.decoder.decode_coarse([feat] * model.decoder.num_skips, feat)


@pytest.mark.parametrize("name", ["unetr", "stp_mta_unetr"])
@pytest.mark.parametrize("decoder,patch,img,block", [("v2", 8, 32, 8), ("v1", 8, (16, 24, 40), 6),
                                                     ("v1", 8, (16, 24, 40), 16), ("original", 16, 32, 16)])
def test_every_block_refined_is_dense_decoding(name, decoder, patch, img, block):
    """The gathered blocks through the same weights, with the weighted statistics at weight 1, give the dense
    decoder's logits within float32 rounding: any block size, blocks overhanging odd sizes, batch 2."""
    torch.manual_seed(0)
    model = _model(name, decoder, patch, img, refine_block=block)
    size = (img,) * 3 if isinstance(img, int) else img
    x = torch.randn(2, 2, *size)
    nb = math.prod(block_grid(size, block))
    with torch.no_grad():
        dense = model(x)
        idx = torch.arange(nb).expand(2, nb)
        sel = select_blocks(torch.randn(2, nb), nb)
        assert torch.equal(sel.idx, idx) and torch.equal(sel.weight, torch.ones(2, nb))
        refined = refine_blocks(model.decoder, x, _coarse_map(model, x), sel, block)
    out = scatter_blocks(torch.zeros_like(dense), idx, refined, block)
    torch.testing.assert_close(out, dense, atol=1e-4 * dense.abs().max().item(), rtol=1e-4)


def test_norm_statistics_are_weighted_over_block_interiors_inside_the_map():
    """Instance norm on gathered blocks: the mean and variance of each image and channel come from the block
    interiors only (not the halos, not the voxels past the map's edge), each block counted ``weight`` times."""
    torch.manual_seed(0)
    size, block, halo = (6, 10, 8), 4, 1  # the last blocks overhang the 6 and 10 sides
    grid = block_grid(size, block)
    idx = torch.tensor([[0, 3, 5], [1, 2, 11]])
    weight = torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.0, 1.0]])
    blocks = _Blocks(BlockSelection(idx, weight), size, block, torch.float32)
    y = torch.randn(6, 2, block + 2 * halo, block + 2 * halo, block + 2 * halo)
    got = blocks.norm(y, ChannelInstanceNorm3d(2), halo)
    core = y[:, :, halo:-halo, halo:-halo, halo:-halo]
    inside = inside_mask(idx, grid, size, block, 0)  # [6, 1, 4, 4, 4]
    for b in range(2):
        w = (weight[b].view(3, 1, 1, 1, 1) * inside[3 * b:3 * b + 3]).expand(-1, 2, -1, -1, -1)
        vals = core[3 * b:3 * b + 3]
        mean = (w * vals).sum((0, 2, 3, 4)) / w.sum((0, 2, 3, 4))
        var = (w * (vals - mean.view(1, 2, 1, 1, 1)) ** 2).sum((0, 2, 3, 4)) / w.sum((0, 2, 3, 4))
        want = (y[3 * b:3 * b + 3] - mean.view(1, 2, 1, 1, 1)) / torch.sqrt(var.view(1, 2, 1, 1, 1) + 1e-5)
        torch.testing.assert_close(got[3 * b:3 * b + 3], want, atol=1e-5, rtol=1e-5)


def test_selection_takes_the_top_scores_and_stand_ins_for_the_rest():
    nb, num = 216, 54
    torch.manual_seed(0)
    scores = torch.rand(3, nb)
    sel = select_blocks(scores, num)
    stand_ins = math.ceil((nb - num) / 7)  # 24 stand-ins, each for about 7 blocks left to the fill and itself
    assert sel.idx.shape == (3, num) and torch.equal(sel.idx, sel.idx.sort(1).values)
    for b in range(3):
        ranked = scores[b].argsort(descending=True).tolist()
        chosen = sel.idx[b].tolist()
        assert set(ranked[: num - stand_ins]) <= set(chosen)  # the best scores
        rest = ranked[num - stand_ins:]
        run = len(rest) / stand_ins
        for j in range(stand_ins):  # one block from the middle of each run of the rest, by score
            assert rest[int((j + 0.5) * run)] in chosen
        weights = dict(zip(chosen, sel.weight[b].tolist(), strict=True))
        assert all(weights[n] == 1.0 for n in ranked[: num - stand_ins])
    # every block is counted once in the statistics: the best ones by themselves, the rest through stand-ins
    torch.testing.assert_close(sel.weight.sum(1), torch.full((3,), float(nb)))
    jittered = select_blocks(scores, num, jitter=True)  # training: a random block of each run
    torch.testing.assert_close(jittered.weight.sum(1), torch.full((3,), float(nb)))
    plain = select_blocks(scores, 10, stratified=False)  # the top scores alone, weight 1
    assert torch.equal(plain.idx, scores.topk(10, 1).indices.sort(1).values) and (plain.weight == 1).all()
    everything = select_blocks(scores, nb)
    assert torch.equal(everything.idx, torch.arange(nb).expand(3, nb)) and (everything.weight == 1).all()


def test_uncertainty_reads_softmax_and_sigmoid_outputs():
    sure = torch.tensor([10.0, -10.0, -10.0]).view(1, 3, 1, 1, 1)
    tie = torch.tensor([2.0, 2.0, -10.0]).view(1, 3, 1, 1, 1)
    for kind in ("margin", "entropy"):
        assert uncertainty(sure, False, kind).item() < 1e-3
        assert uncertainty(tie, False, kind).item() > 0.6
        assert uncertainty(torch.full((1, 2, 1, 1, 1), 8.0), True, kind).item() < 1e-2  # both regions sure
        assert uncertainty(torch.tensor([8.0, 0.0]).view(1, 2, 1, 1, 1), True, kind).item() == pytest.approx(1.0)
    assert uncertainty(tie, False, "margin").item() == pytest.approx(1.0, abs=1e-6)


def test_block_scores_take_each_blocks_most_uncertain_voxel_and_depth_ranks_first():
    fill = torch.full((1, 2, 16, 16, 16), -5.0)
    fill[:, 0] = 5.0
    fill[0, :, 1, 1, 1] = 0.0  # one uncertain voxel in block 0 of the 2 x 2 x 2 blocks of side 8
    fill[0, 0, 8:, 8:10, 8:] = -4.0  # a quarter of block 7 unsure (logits -4 against -5)
    scores = block_scores(fill, 8, sigmoid=False)
    assert scores.shape == (1, 8) and scores[0, 0] == pytest.approx(1.0)
    assert 0.1 < scores[0, 7] < 0.9 and scores[0, 1:7].max() < 1e-3
    depth = torch.full((1, 8), 3)
    depth[0, 5] = 12  # the token over block 5 was kept to the last block
    ranked = block_scores(fill, 8, sigmoid=False, kind="depth", depth=depth, patch_size=8)
    assert ranked.argmax().item() == 5 and ranked[0, 0] > ranked[0, 7] > ranked[0, 1]  # ties broken by uncertainty


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_training_returns_coarse_logits_and_reaches_both_levels(fraction):
    torch.manual_seed(0)
    model = _model("stp_mta_unetr", "v2", 8, 32, refine_fraction=fraction, refine_score="depth").train()
    x, y = torch.randn(2, 2, 32, 32, 32), torch.randint(0, 3, (2, 1, 32, 32, 32))
    out = model(x, target=y)
    assert out.logits.shape == (2, 3, 32, 32, 32)
    assert [d.shape for d in out.deep_supervision] == [(2, 3, 32, 32, 32)]  # the fill, trained everywhere
    (out.logits.square().mean() + out.deep_supervision[0].square().mean()).backward()
    dec = model.decoder
    for param in (dec.encoder1.layer.conv1.conv.weight, dec.decoder2.conv_block.conv2.conv.weight,
                  model.sparse_decoding.coarse_head.conv.conv.weight, model.sparse_decoding.image_head.weight,
                  dec.encoder2.transp_conv_init.conv.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_knob_is_a_runtime_attribute():
    torch.manual_seed(0)
    model = _model("unetr", "v2", 8, 32)
    keys = list(model.state_dict())
    assert model.refine_fraction == 1.0
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        dense = model(x)
        model.refine_fraction = 0.25
        sparse = model(x)
        model.refine_fraction = 1
        again = model(x)
    assert sparse.shape == dense.shape and not torch.allclose(sparse, dense) and torch.equal(again, dense)
    assert list(create_model("unetr", img_size=32, refine_fraction=0.5, **TINY, skip_layers=(1, 2, 3)).state_dict()) \
        == keys
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="refine_fraction"):
            model.refine_fraction = bad


@pytest.mark.parametrize("kw,match", [({"refine_fraction": 0.0}, "refine_fraction"),
                                      ({"refine_score": "random"}, "refine_score"),
                                      ({"refine_block": 5}, "refine_block"),
                                      ({"refine_fraction": 0.5, "norm_name": "batch"}, "instance norm")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        create_model("unetr", img_size=32, skip_layers=(1, 2, 3), **TINY, **kw)


def test_batch_norm_decoder_decodes_densely_but_not_sparsely():
    model = create_model("unetr", img_size=32, skip_layers=(1, 2, 3), norm_name="batch", **TINY).eval()
    assert model(torch.randn(1, 2, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError, match="instance norm"):
        model.refine_fraction = 0.5


def test_macs_fall_with_the_fraction_and_meta_equals_real():
    """Counted on the meta device and on real tensors alike (the selection has a fixed size); at 64^3 (512
    blocks) refining a quarter costs less than the dense level in spite of the halos."""
    torch.manual_seed(0)
    model = _model("stp_mta_unetr", "v2", 8, 64, feature_size=8)
    macs = {}
    for f in (1.0, 0.5, 0.25, 0.1):
        model.refine_fraction = f
        macs[f] = count_macs(model, (2, 2, 64, 64, 64))
        assert macs[f] == pytest.approx(count_macs(model, (2, 2, 64, 64, 64), device="cpu"), rel=1e-9)
    assert macs[1.0] > macs[0.25] > macs[0.1]
