"""TokenSeg's sparse-to-dense decoder: block gather/scatter, only kept tokens reach it, cost follows the tokens,
exactness against dense decoding, the skip rule, the zeroed-token ablation and export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_tokenseg import tiny  # the tiny TokenSeg of the model tests (2 channels in, 3 out, 32^3)
from torch.utils.flop_counter import FlopCounterMode

from sparseseg.benchmark.flops import count_macs
from sparseseg.checkpoint import save_checkpoint
from sparseseg.data.transforms import DataConfig
from sparseseg.inference.export import export, load_for_export
from sparseseg.models.tokenseg.cells import (
    block_count_,
    cell_corners,
    cell_map,
    gather_blocks,
    scatter_blocks_,
)
from sparseseg.models.tokenseg.model import TokenSeg

SHAPE = (1, 2, 32, 32, 32)


class EncoderOnly(nn.Module):
    """TokenSeg up to the decoder (encoder, proposal, VQ, scorer, top-K, mixer): its MACs are the model's minus the
    decoder's."""

    def __init__(self, model: TokenSeg) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_encoder(x).kept


def decoder_macs(model: TokenSeg, shape=SHAPE, device: str = "meta") -> float:
    return count_macs(model, shape, device=device) - count_macs(EncoderOnly(model), shape, device=device)


# ---- cells: gather / scatter of blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("halo", [0, 1, 2])
def test_gather_blocks_equals_slicing_the_zero_padded_map(halo):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 4, 10)  # batch 2, an odd, non-cubic map
    corners = torch.tensor([[[0, 0, 0], [4, 2, 8]], [[2, 2, 4], [0, 2, 0]]])  # edges and corners of the map
    side = 2
    blocks = gather_blocks(x, corners, side, halo)
    n = side + 2 * halo
    assert blocks.shape == (4, 3, n, n, n)
    padded = F.pad(x, (halo,) * 6)
    for b in range(2):
        for k in range(2):
            z, y, w = corners[b, k].tolist()  # the corner in the padded map is corner - halo + halo
            assert torch.equal(blocks[b * 2 + k], padded[b, :, z:z + n, y:y + n, w:w + n])


def test_scatter_blocks_inverts_gather_and_counts_overlaps():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 8)
    corners = torch.tensor([[[0, 0, 0], [2, 4, 6]], [[2, 2, 2], [2, 2, 2]]])  # case 1: the same block twice
    shape = x.shape[2:]
    out = scatter_blocks_(torch.zeros_like(x).flatten(2), gather_blocks(x, corners, 2), corners, shape).view_as(x)
    count = block_count_(torch.zeros_like(x[:, :1]).flatten(2), corners, 2, shape).view_as(x[:, :1])
    inside = count > 0
    assert int(inside[0].sum()) == 16 and int(inside[1].sum()) == 8 and int(count.max()) == 2
    assert torch.allclose(out / count.clamp_min(1), x * inside)


def test_unpadded_conv_on_gathered_blocks_equals_the_padded_conv_on_the_map():
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 5, 3)  # unpadded
    x = torch.randn(2, 3, 8, 8, 4)
    dense = F.conv3d(x, conv.weight, conv.bias, padding=1)
    cells = torch.tensor([[0, 3], [2, 1]])  # flat cells of a 2 x 2 x 1 grid of 4^3 blocks
    corners = cell_corners(cells, (2, 2, 1), 4)
    blocks = conv(gather_blocks(x, corners, 4, 1))
    out = scatter_blocks_(torch.zeros_like(dense).flatten(2), blocks, corners, dense.shape[2:]).view_as(dense)
    count = block_count_(torch.zeros_like(dense[:, :1]).flatten(2), corners, 4, dense.shape[2:])
    inside = count.view_as(out[:, :1]) > 0
    assert torch.allclose(out, dense * inside, atol=1e-6)
    assert torch.equal(cell_map(cells, (2, 2, 1), x)[:, 0].flatten(1) > 0, inside[:, 0, ::4, ::4, ::4].flatten(1))


# ---- the decoder in the model ----------------------------------------------------------------------------------

def _perturbed_output(model: TokenSeg, x: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Eval output when the quantised candidates ``idx`` are replaced by noise, with the selection held fixed."""
    def perturb(module, inputs, q):
        tokens = q.tokens.clone()
        tokens[:, idx] = 3.0 * torch.randn(tokens[:, idx].shape, generator=torch.Generator().manual_seed(1))
        return q._replace(tokens=tokens)

    hooks = [model.vq.register_forward_hook(perturb),
             model.scorer.register_forward_hook(lambda module, inputs, out: scores)]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def test_only_the_kept_tokens_reach_the_decoder():
    model = tiny().eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        enc, clean = model.forward_encoder(x), model(x)
    dropped, kept = enc.drop_idx[0, :10], enc.keep_idx[0, :3]
    assert torch.equal(_perturbed_output(model, x, dropped, enc.score_logits), clean)
    assert not torch.allclose(_perturbed_output(model, x, kept, enc.score_logits), clean, atol=1e-4)


def test_zeroed_tokens_change_the_output_and_are_a_constructor_argument_too():
    model = tiny().eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        clean = model(x)
        model.zero_tokens = True
        zeroed = model(x)
    assert not torch.allclose(clean, zeroed, atol=1e-3)
    other = tiny(zero_tokens=True).eval()
    assert other.model_args["zero_tokens"] and other.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(other(x), zeroed)


def test_dense_decoding_equals_sparse_when_the_kept_cells_cover_the_volume():
    # all 8 cells of the coarsest level (2^3 at 32^3) are kept: their blocks tile every level
    model = tiny(num_keep=20, keep_per_level=(4, 4, 4, 8)).eval()
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        sparse = model(x)
        model.dense_decoding = True
        dense = model(x)
    assert torch.allclose(sparse, dense, atol=1e-5)
    model.keep_per_level = (8, 6, 6, 0)  # no coarse token: the sparse path now differs from the dense one
    with torch.no_grad():
        dense = model(x)
        model.dense_decoding = False
        assert not torch.allclose(model(x), dense, atol=1e-4)


def _cover(model: TokenSeg, x: torch.Tensor, level: int) -> torch.Tensor:
    """``[B, *grid_level]`` bool: voxels of the level's map inside a kept cell of a coarser level."""
    maps = model.select_tokens(x).level_maps()
    cover = torch.zeros(x.shape[0], *model.grid_sizes[level], dtype=torch.bool)
    for coarser in range(level + 1, 4):
        f = 2 ** (coarser - level)
        up = maps[coarser].repeat_interleave(f, 1).repeat_interleave(f, 2).repeat_interleave(f, 3)
        cover |= up
    return cover


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_sparse_skips_enter_only_the_fine_levels_inside_the_cells_of_kept_coarser_tokens(level):
    model = tiny().eval()
    x = torch.randn(1, 2, 32, 32, 32)
    cover = _cover(model, x, level)
    enc = model.forward_encoder(x)

    def decode_with(feature: torch.Tensor) -> torch.Tensor:
        enc.features[level] = feature
        with torch.no_grad():
            return model._decode(x, enc)

    clean_feature = enc.features[level].clone()
    clean = decode_with(clean_feature)
    noise = torch.randn_like(clean_feature)
    assert torch.equal(decode_with(clean_feature + noise * (~cover)[:, None]), clean)
    inside = decode_with(clean_feature + noise * cover[:, None])
    if level < 2:  # 1/2 and 1/4: the encoder's detail enters the kept coarser cells
        assert cover.any() and not cover.all()
        assert not torch.allclose(inside, clean, atol=1e-4)
    else:  # 1/8 and 1/16 make the coarse prediction from the tokens alone
        assert torch.equal(inside, clean)
    model.decoder.skips = "dense"  # a U-Net's skips: the map enters everywhere
    assert not torch.allclose(decode_with(clean_feature + noise * (~cover)[:, None]), decode_with(clean_feature))


@pytest.mark.parametrize("skips", ["dense", "none"])
def test_other_skip_choices_train(skips):
    model = tiny(skips=skips).train()
    out = model(torch.randn(1, 2, 32, 32, 32), torch.randint(0, 3, (1, 1, 32, 32, 32)))
    (out.logits.square().mean() + sum(out.aux_losses.values())).backward()
    assert model.decoder.head[1].weight.grad.abs().sum() > 0
    assert (model.decoder.image_skip.weight.grad is None) == (skips == "none")


# ---- cost ------------------------------------------------------------------------------------------------------

def test_decoder_macs_follow_the_kept_tokens():
    model = tiny()
    macs = {}
    for k in (4, 24, 98):
        model.num_keep = k
        macs[k] = decoder_macs(model)
    assert macs[4] < macs[24] < macs[98]
    assert macs[24] / macs[98] <= 0.5


def test_macs_of_one_more_coarse_token_equal_a_hand_count():
    model = tiny(num_keep=21, keep_per_level=(5, 5, 5, 6))
    before = decoder_macs(model)
    model.num_keep, model.keep_per_level = 22, (5, 5, 5, 7)
    f, t, c_in, c_out = 4, 24, 2, 3  # feature_size, token_size, in and out channels
    per_token = (t * 16 * f  # reprojection into the 1/16 map (16 f channels)
                 + 27 * (4 * f) ** 2 * (6**3 + 4**3)  # refinement at 1/4: a 4^3 block, halo 2, two 3^3 convs
                 + 27 * (2 * f) ** 2 * (10**3 + 8**3)  # refinement at 1/2: an 8^3 block
                 + 2 * f * f * 10**3  # full resolution: the 1^3 up conv on the 8^3 + halo 1/2 block
                 + c_in * f * 18**3  # image skip on the 16^3 + halo block
                 + 27 * f * f * 16**3 + f * c_out * 16**3)  # head: 3^3 conv and 1^3 classifier
    assert decoder_macs(model) - before == pytest.approx(per_token / 1e9, rel=1e-9)


def test_macs_on_the_meta_device_equal_the_real_count():
    model = tiny()
    real = count_macs(model, SHAPE, device="cpu")
    assert count_macs(model, SHAPE) == real
    meta = copy.deepcopy(model).to("meta").eval()  # the meta run itself works (no fallback to real tensors)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        assert meta(torch.zeros(SHAPE, device="meta")).shape == (1, 3, 32, 32, 32)
    assert counter.get_total_flops() / 2e9 == pytest.approx(real, rel=1e-12)


# ---- export ----------------------------------------------------------------------------------------------------

def _checkpoint(tmp_path):
    model = tiny(in_channels=1)
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "a", "b"], roi_size=[32, 32, 32])
    return save_checkpoint(tmp_path / "tokenseg.pt", model, data.to_dict())


def test_torchscript_export_matches_pytorch(tmp_path):
    ckpt = _checkpoint(tmp_path)
    out = export(ckpt, tmp_path / "tokenseg.ts.pt", format="torchscript")
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    graph, _ = load_for_export(ckpt)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(str(out))(x).numpy(), graph(x).numpy(), atol=1e-5, rtol=1e-5)


def test_onnx_export_matches_pytorch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ckpt = _checkpoint(tmp_path)
    out = export(ckpt, tmp_path / "tokenseg.onnx", format="onnx")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"TopK", "GatherElements", "ScatterElements"} <= ops  # selection and block gather/scatter in the graph
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))  # batch 2: the axis is dynamic
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    graph, _ = load_for_export(ckpt)
    with torch.no_grad():
        np.testing.assert_allclose(logits, graph(x).numpy(), atol=1e-4, rtol=1e-4)
