from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sparseseg import count_macs
from sparseseg.models import create_model
from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.veloxseg.blocks import JLC, instance_norm, pixel_shuffle_3d
from sparseseg.models.veloxseg.model import VeloxDecoder, VeloxSeg
from sparseseg.models.veloxseg.pwa import (
    ModalLayerNorm,
    ModalLinear,
    ModalPatchMerging,
    PairedWindowAttention,
    PWABlock,
    max_pool,
    merge_cells,
    paired_windows,
    relative_position_index,
    upsample_in_windows,
    window_attention,
)
from sparseseg.models.veloxseg.sdkt import gram_matrix

# Two stages on 24^3: maps 6 and 3, windows 3 -> scales (3, 6) and (3).
TINY = {"channels": (8, 16), "num_heads": (1, 2), "head_dim": (4, 8), "group_channels": (4, 8),
        "window_size": (3, 3)}
# Three stages on 48^3: maps 12, 6, 3 with the authors' 6^3 window on the second stage.
THREE = {"channels": (8, 16, 32), "num_heads": (1, 2, 2), "head_dim": (4, 8, 8), "group_channels": (4, 8, 8),
         "window_size": (3, 6, 3), "img_size": 48}


def tiny(modalities=(1, 1), out_channels=3, img_size=24, **kwargs) -> VeloxSeg:
    torch.manual_seed(0)
    args = {**TINY, "img_size": img_size, "modalities": modalities, **kwargs}
    return VeloxSeg(in_channels=sum(modalities), out_channels=out_channels, **args)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def windows_of(x: torch.Tensor, window) -> torch.Tensor:
    """``[B, C, D, H, W] -> [B * nW, C, wd, wh, ww]``, windows in raster order (a loop, independent of the model)."""
    b, c, *spatial = x.shape
    origins = itertools.product(*(range(0, n, w) for n, w in zip(spatial, window, strict=True)))
    return torch.stack([x[:, :, d:d + window[0], h:h + window[1], w:w + window[2]] for d, h, w in origins], 1).flatten(
        0, 1)


def map_of(windows: torch.Tensor, spatial) -> torch.Tensor:
    """Inverse of :func:`windows_of` for one batch element per ``windows.shape[0] / nW``."""
    window = windows.shape[2:]
    origins = list(itertools.product(*(range(0, n, w) for n, w in zip(spatial, window, strict=True))))
    per_batch = windows.view(-1, len(origins), *windows.shape[1:])
    out = windows.new_zeros(per_batch.shape[0], windows.shape[1], *spatial)
    for i, (d, h, w) in enumerate(origins):
        out[:, :, d:d + window[0], h:h + window[1], w:w + window[2]] = per_batch[:, i]
    return out


# ------------------------------------------------------------------------------------------ the authors' setting


def test_authors_setting_windows_widths_and_size():
    with torch.device("meta"):
        model = VeloxSeg(in_channels=2, out_channels=2, img_size=96, modalities=(1, 1))
    # 24^3: windows 3..24 pooled by 1..8; 12^3: 6 and 12 pooled by 1, 2 (216 tokens); 6^3: 3, 6; 3^3: 3
    assert model.windows == [
        [((3,) * 3, (1,) * 3), ((6,) * 3, (2,) * 3), ((12,) * 3, (4,) * 3), ((24,) * 3, (8,) * 3)],
        [((6,) * 3, (1,) * 3), ((12,) * 3, (2,) * 3)],
        [((3,) * 3, (1,) * 3), ((6,) * 3, (2,) * 3)],
        [((3,) * 3, (1,) * 3)],
    ]
    attns = [block.attn for block in model.token_blocks]
    assert [math.prod(a.tokens) for a in attns] == [27, 216, 27, 27]
    assert [a.head_dim for a in attns] == [4, 8, 8, 16] and [a.value_dim for a in attns] == [4, 8, 16, 32]
    # 1.66 M by the authors' count; the deep-supervision heads (454) are training-only here
    assert model.inference_parameters() == 1_669_185
    assert n_params(model.ds_heads) == 454


def test_brats_preset_is_the_authors_96_crop():
    with torch.device("meta"):
        brats = create_model("veloxseg", preset="brats")
    assert brats.img_size == (96, 96, 96) and brats.modalities == (4,) and brats.num_scales == (4, 2, 2, 1)
    assert brats.model_args["modalities"] == [4]


# --------------------------------------------------------------------------------------------- window geometry


@pytest.mark.parametrize(
    "spatial,window,small,expected",
    [
        ((24, 24, 24), (3, 3, 3), (1, 1, 1), [3, 6, 12, 24]),
        ((12, 12, 12), (6, 6, 6), (1, 1, 1), [6, 12]),
        ((6, 6, 6), (3, 3, 3), (1, 1, 1), [3, 6]),
        ((3, 3, 3), (3, 3, 3), (1, 1, 1), [3]),
        ((32, 32, 16), (4, 4, 2), (1, 1, 1), [4, 8, 16, 32]),  # the authors' HECKTOR geometry, first stage
        ((12, 12, 12), (6, 6, 6), (2, 2, 2), [6, 12]),
    ],
)
def test_windows_of_every_stage_cover_every_voxel_once(spatial, window, small, expected):
    pairs = paired_windows(spatial, window, small)
    assert [big[0] for big, _ in pairs] == expected
    tokens = {tuple(b // s for b, s in zip(big, sm, strict=True)) for big, sm in pairs}
    assert tokens == {tuple(w // s for w, s in zip(window, small, strict=True))}  # same tokens at every scale
    for big, sm in pairs:
        assert all(n % b == 0 and b % s == 0 for n, b, s in zip(spatial, big, sm, strict=True))  # tiles
        covered = torch.zeros(spatial)
        for origin in itertools.product(*(range(0, n, b) for n, b in zip(spatial, big, strict=True))):
            covered[tuple(slice(o, o + b) for o, b in zip(origin, big, strict=True))] += 1
        assert torch.equal(covered, torch.ones(spatial))  # each voxel in exactly one window


def test_paired_windows_rejects_untileable_maps():
    with pytest.raises(ValueError, match="cannot be tiled"):
        paired_windows((8, 8, 8), (3, 3, 3))
    with pytest.raises(ValueError, match="cannot be tiled"):
        paired_windows((2, 2, 2), (3, 3, 3))  # no window fits
    with pytest.raises(ValueError, match="small window"):
        paired_windows((12, 12, 12), (6, 6, 6), (4, 4, 4))


def test_model_stage_windows_and_bad_sizes():
    model = tiny(**THREE)
    assert model.num_scales == (3, 1, 1)
    assert [math.prod(b.attn.tokens) for b in model.token_blocks] == [27, 216, 27]
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 2, 40, 48, 48))
    with pytest.raises(ValueError, match="cannot be tiled"):
        model(torch.randn(1, 2, 32, 32, 32))  # maps 8, 4, 2
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(1, 3, 48, 48, 48))
    with pytest.raises(ValueError, match="cannot be tiled"):
        tiny(img_size=32)
    with pytest.raises(ValueError, match="modalities"):
        VeloxSeg(in_channels=3, modalities=(1, 1))
    with pytest.raises(ValueError, match="stem_stride"):
        tiny(stem_stride=0)


# ------------------------------------------------------------------------------------------------ pure helpers


def test_pixel_shuffle_and_space_to_depth_place_subvoxels():
    r = 2
    x = torch.arange(2 * r**3 * 3 * 4 * 5, dtype=torch.float32).view(1, 2 * r**3, 3, 4, 5)
    y = pixel_shuffle_3d(x, r)
    assert y.shape == (1, 2, 6, 8, 10)
    for c, i, j, k, d, h, w in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 0, 1, 2, 3, 4), (0, 1, 1, 0, 1, 2, 3)]:
        assert y[0, c, d * r + i, h * r + j, w * r + k] == x[0, c * r**3 + i * r * r + j * r + k, d, h, w]
    tokens = torch.randn(2, 2, 4, 6, 2, 3)  # [B, M, D, H, W, C]
    cells = merge_cells(tokens)  # [2, 2, 2, 3, 1, 8 * 3]
    assert cells.shape == (2, 2, 2, 3, 1, 24)
    for (i, j, k), c in [((0, 0, 0), 0), ((1, 0, 1), 2), ((1, 1, 1), 1)]:
        assert torch.equal(cells[..., (i * 4 + j * 2 + k) * 3 + c], tokens[:, :, i::2, j::2, k::2, c])


def test_max_pool_is_exact_with_ties_nan_and_strides():
    x = torch.randn(2, 3, 12, 12, 6)
    x[:, :, :6] = 0.5  # a constant region: every window there is all ties
    x[0, 1, 7, 3, 2] = float("nan")
    view = x.unsqueeze(1).expand(2, 2, 3, 12, 12, 6)[:, 1]  # a strided view
    for window in [(2, 2, 2), (4, 4, 2), (3, 3, 3), (12, 12, 6), (1, 1, 1)]:
        direct = F.max_pool3d(x, window, window)
        with torch.inference_mode():
            pooled = max_pool(view, window, axes=(-3, -2, -1))
        assert torch.equal(pooled.isnan(), direct.isnan())
        assert torch.equal(pooled.nan_to_num(), direct.nan_to_num())
    leaf = torch.randn(1, 2, 3, 8, 8, 8, requires_grad=True)
    max_pool(leaf, (2, 4, 2), axes=(-3, -2, -1)).sum().backward()
    expected = torch.autograd.grad(F.max_pool3d(leaf.view(1, 6, 8, 8, 8), (2, 4, 2), (2, 4, 2)).sum(), leaf)[0]
    assert torch.equal(leaf.grad, expected)
    tokens = torch.randn(1, 2, 4, 4, 4, 3)  # [B, M, D, H, W, C]: the default axes are D, H, W
    with torch.inference_mode():
        expected = F.max_pool3d(tokens.permute(0, 1, 5, 2, 3, 4).reshape(1, 6, 4, 4, 4), 2, 2)
        assert torch.equal(max_pool(tokens, (2, 2, 2)).permute(0, 1, 5, 2, 3, 4).reshape(1, 6, 2, 2, 2), expected)


@pytest.mark.parametrize("tokens,window,grid", [
    ((3, 3, 3), (6, 6, 6), (2, 1, 3)), ((3, 3, 3), (24, 24, 24), (1, 1, 1)), ((6, 6, 6), (12, 12, 12), (1, 1, 1)),
    ((2, 3, 1), (4, 3, 2), (2, 2, 3)),
])
def test_upsample_in_windows_is_trilinear_per_window(tokens, window, grid):
    x = torch.randn(2, 5, *(g * t for g, t in zip(grid, tokens, strict=True)))
    y = upsample_in_windows(x, tokens, window, axes=(-3, -2, -1))
    size = tuple(g * w for g, w in zip(grid, window, strict=True))
    assert y.shape == (2, 5, *size)
    up = F.interpolate(windows_of(x, tokens), size=window, mode="trilinear", align_corners=True)
    torch.testing.assert_close(y, map_of(up, size))
    channels_last = upsample_in_windows(x.permute(0, 2, 3, 4, 1)[:, None], tokens, window)  # [B, 1, D, H, W, C]
    torch.testing.assert_close(channels_last[:, 0].permute(0, 4, 1, 2, 3), y)


def test_relative_position_index_depends_only_on_the_offset():
    window = (3, 2, 4)
    index = relative_position_index(window)
    coords = list(itertools.product(*(range(n) for n in window)))
    assert index.shape == (24, 24) and index.min() == 0 and index.max() == 5 * 3 * 7 - 1
    by_offset: dict[tuple[int, ...], int] = {}
    for (i, a), (j, b) in itertools.product(enumerate(coords), repeat=2):
        offset = tuple(p - q for p, q in zip(a, b, strict=True))
        assert by_offset.setdefault(offset, int(index[i, j])) == index[i, j]
    assert len(set(by_offset.values())) == len(by_offset) == 5 * 3 * 7  # one entry per offset


def test_window_attention_with_bias_matches_reference_and_sdpa():
    torch.manual_seed(0)
    q, k = torch.randn(7, 2, 54, 4), torch.randn(7, 2, 54, 4)
    v = torch.randn(7, 2, 54, 8)  # values wider than queries
    bias = torch.randn(2, 27, 27)
    full = bias.repeat(1, 2, 2)  # the same bias for the 2 x 2 modality pairs
    expected = ((q @ k.transpose(-1, -2)) / 2 + full).softmax(-1) @ v
    torch.testing.assert_close(window_attention(q, k, v, bias), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=full), expected, atol=1e-5,
                               rtol=1e-5)
    many = [torch.randn(101, 1, 54, 8) for _ in range(3)]  # more windows than one block of scores holds
    with torch.inference_mode():
        torch.testing.assert_close(window_attention(*many, bias[:1]), F.scaled_dot_product_attention(
            *many, attn_mask=bias[:1].repeat(1, 2, 2)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ modules


def reference_pwa(attn: PairedWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Paired window attention window by window on a token map ``[B, M, D, H, W, C]``, written from the description
    with the module's projections and table only."""
    b, m, *spatial, c = x.shape
    h, dq, dv, scales = attn.num_heads, attn.head_dim, attn.value_dim, len(attn.windows)
    qkv = attn.qkv(x.reshape(b, m, -1, c)).view(b, m, *spatial, scales, h, 2 * dq + dv)
    coords = list(itertools.product(*(range(n) for n in attn.tokens)))
    table = attn.relative_position_bias
    bias = torch.stack([torch.stack([table[attn.relative_index[i, j]] for j in range(len(coords))])
                        for i in range(len(coords))]).permute(2, 0, 1)  # [h, L, L]
    out = torch.zeros(b, m, *spatial, scales, h * dv)
    for s, (big, small) in enumerate(attn.windows):
        for n, origin in itertools.product(range(b), itertools.product(*(range(0, d, w) for d, w in zip(
                spatial, big, strict=True)))):
            box = tuple(slice(o, o + w) for o, w in zip(origin, big, strict=True))
            per_modality = []
            for i in range(m):
                window = qkv[(n, i) + box + (s,)].permute(3, 4, 0, 1, 2)  # [h, 2dq+dv, *big]
                pooled = F.max_pool3d(window.reshape(h * (2 * dq + dv), *big), small, small)
                per_modality.append(pooled.view(h, 2 * dq + dv, -1).transpose(1, 2))  # [h, L, 2dq+dv]
            t = torch.cat(per_modality, 1)  # [h, M*L, 2dq+dv]
            scores = t[..., :dq] @ t[..., dq:2 * dq].transpose(1, 2) / math.sqrt(dq) + bias.repeat(1, m, m)
            o = scores.softmax(-1) @ t[..., 2 * dq:]  # [h, M*L, dv]
            for i, oi in enumerate(o.split(len(coords), 1)):
                grid = oi.permute(0, 2, 1).reshape(1, h * dv, *attn.tokens)
                up = F.interpolate(grid, size=big, mode="trilinear", align_corners=True)[0]  # [h*dv, *big]
                out[(n, i) + box + (s,)] = up.permute(1, 2, 3, 0)
    return attn.proj(out.view(b, m, -1, scales * h * dv)).view_as(x)


@pytest.mark.parametrize("window,small,spatial", [
    ((3, 3, 6), (1, 1, 2), (6, 6, 12)), ((4, 4, 2), (2, 2, 1), (8, 8, 4)),
])
def test_paired_window_attention_equals_window_by_window_reference(window, small, spatial):
    torch.manual_seed(0)
    attn = PairedWindowAttention(8, 2, paired_windows(spatial, window, small), num_heads=2, head_dim=2).eval()
    torch.nn.init.normal_(attn.relative_position_bias)
    x = torch.randn(2, 2, *spatial, 8)
    with torch.no_grad():
        expected = reference_pwa(attn, x)
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)  # autograd-free path
    with torch.inference_mode():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)  # inference path


def test_attention_is_joint_across_modalities_and_uses_its_position_bias():
    torch.manual_seed(0)
    attn = PairedWindowAttention(8, 2, paired_windows((6, 6, 6), (3, 3, 3)), num_heads=2, head_dim=4).eval()
    x = torch.randn(1, 2, 6, 6, 6, 8)
    y = attn(x)
    x2 = x.clone()
    x2[:, 1] += torch.randn_like(x2[:, 1])  # change modality 1 only
    assert not torch.allclose(y[:, 0], attn(x2)[:, 0])  # modality 0 attends to modality 1's tokens
    with torch.no_grad():
        attn.relative_position_bias.add_(torch.randn_like(attn.relative_position_bias))
    assert not torch.allclose(y, attn(x))


def test_norms_and_per_modality_linear_maps():
    x = torch.randn(2, 6, 5, 4, 3) * 3 + 1
    torch.testing.assert_close(instance_norm(6)(x), torch.nn.InstanceNorm3d(6)(x))
    assert n_params(instance_norm(6)) == 0
    torch.manual_seed(0)
    tokens = torch.randn(2, 2, 3, 4, 5, 8)  # [B, M, D, H, W, C]
    norm = ModalLayerNorm(2, 8)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    for i in range(2):
        ref = F.layer_norm(tokens[:, i], (8,), norm.weight[i], norm.bias[i], eps=1e-6)
        torch.testing.assert_close(norm(tokens)[:, i], ref)
    linear = ModalLinear(2, 8, 5)
    torch.nn.init.normal_(linear.bias)
    flat = tokens.view(2, 2, -1, 8)
    for i in range(2):
        torch.testing.assert_close(linear(flat)[:, i], F.linear(flat[:, i], linear.weight[i], linear.bias[i]))


def test_patch_merging_is_layer_norm_and_linear_per_modality():
    torch.manual_seed(0)
    merge = ModalPatchMerging(4, 8, num_modalities=2)
    x = torch.randn(1, 2, 4, 4, 4, 4)  # [B, M, D, H, W, C]
    y = merge(x)
    assert y.shape == (1, 2, 2, 2, 2, 8)
    cell = x[0, 1, 0:2, 2:4, 0:2].reshape(-1)  # modality 1's cell (0, 1, 0): offsets major, channels minor
    cell = F.layer_norm(cell, (32,), merge.norm.weight[1], merge.norm.bias[1], eps=1e-6)
    torch.testing.assert_close(y[0, 1, 0, 1, 0], merge.reduction.weight[1] @ cell)


def test_pwa_block_doubles_its_input_as_the_authors_residuals_do():
    torch.manual_seed(0)
    block = PWABlock(8, 2, paired_windows((6, 6, 6), (3, 3, 3)), 1, 4, expansion=2).eval()
    for layer in (block.attn.proj, block.mlp[3]):
        torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)
    x = torch.randn(1, 2, 6, 6, 6, 8)
    torch.testing.assert_close(block(x), 2 * x)  # x + (x + PWA(LN x)), with the attention and MLP outputs zeroed


def test_parameters_of_every_part_match_a_hand_count():
    m, out, r = 2, 3, 4
    c0, c1 = TINY["channels"]
    model = tiny(out_channels=out)

    def jlc(c, g, e):  # three grouped convs with bias, FFN with bias, norms without affine
        return sum(c * g * k**3 + c for k in (1, 3, 5)) + 2 * c * e * c + e * c + c

    def pwa(c, scales, h, dq, dv, tokens, e):
        attention = m * c * scales * h * (2 * dq + dv) + m * scales * h * (2 * dq + dv)  # q, k, v projection
        attention += m * scales * h * dv * c + m * c + (2 * tokens - 1) ** 3 * h  # proj, position table
        return 2 * 2 * m * c + attention + m * (2 * c * e * c + e * c + c)  # two norms, MLP

    expected = {
        "conv_stem": 2 * c0 * (2 * r - 1) ** 3 + c0,
        "token_stems": m * (c0 * r**3 + c0),
        "token_blocks": pwa(c0, 2, 1, 4, 4, 3, 3) + pwa(c1, 1, 2, 8, 8, 3, 3),
        "token_downs": 2 * m * 8 * c0 + m * 8 * c0 * c1,
        "mixers": m * c0 * c0 + c0 + m * c1 * c1 + c1,
        "conv_downs": c0 * c1 * 27 + c1,
        "conv_blocks": jlc(c0, 4, 3) + jlc(c1, 8, 3),
        "decoder": c1 * c0 * 8 + c0 + jlc(c0, 4, 3) + c0 * out * r**3 * 27 + out * r**3,
        "ds_heads": c1 * out + out,
        "reconstruction": m * (2 * c0 * c0 + c0 + 2 * c1 * c1 + c1 + c1 * c0 * 8 + c0 + jlc(c0, 4, 3)
                               + c0 * r**3 * 27 + r**3),
    }
    assert {name: n_params(part) for name, part in model.named_children() if n_params(part)} == expected
    assert model.token_blocks[0].attn.value_dim == 4  # 8 channels, 2 scales x 1 head x 4: ceil(8 / 8) * 8 / 2
    assert model.inference_parameters() == sum(expected.values()) - expected["reconstruction"] - expected["ds_heads"]


def test_he_initialisation():
    model = tiny(channels=(16, 32))
    conv = model.conv_blocks[1].ffn[1]  # 32 -> 96 1^3 conv
    std = math.sqrt(2 / (1 + 0.01**2) / 32)
    assert abs(conv.weight.std().item() - std) < 0.1 * std and torch.count_nonzero(conv.bias) == 0
    assert torch.count_nonzero(model.decoder.ups[0][0].bias) == 0


# --------------------------------------------------------------------------------------- encoder, decoder, model


def test_mixer_adds_the_transformer_features_before_the_jlc():
    model = tiny().eval()
    seen = {}
    model.conv_blocks[1].register_forward_pre_hook(lambda _, args: seen.setdefault("jlc_in", args[0]))
    x = torch.randn(1, 2, 24, 24, 24)
    with torch.no_grad():
        conv_feats, token_feats = model._encode(x)
        expected = model.conv_downs[0](conv_feats[0]) + model.mixers[1](token_feats[1])
    torch.testing.assert_close(seen["jlc_in"], expected)
    torch.testing.assert_close(conv_feats[1], model.conv_blocks[1](expected))


def test_training_returns_full_size_deep_supervision_and_sdkt_losses():
    model = tiny(**THREE)
    taps = []
    for head in model.ds_heads:
        head.register_forward_hook(lambda _, args, out: taps.append(args[0].shape[1:]))
    out = model.train()(torch.randn(1, 2, 48, 48, 48))
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (1, 3, 48, 48, 48)
    assert [tuple(d.shape) for d in out.deep_supervision] == [(1, 3, 48, 48, 48)] * 2  # upsampled to full size
    assert taps == [(16, 6, 6, 6), (32, 3, 3, 3)]  # decoder level 2 and the bottleneck
    assert out.deep_supervision_weights == [1.0, 1.0, 1.0]  # equal weights
    assert set(out.aux_losses) == {"sdkt_recon", "sdkt_gram"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.aux_losses.values())
    assert tiny(deep_supervision=False).train()(torch.randn(1, 2, 24, 24, 24)).deep_supervision == []


def test_reconstruction_decoders_read_modality_tokens_beside_conv_features():
    model = tiny(modalities=(1, 2), dropout_rate=0.0, attn_dropout_rate=0.0, conv_dropout_rate=0.0).train()
    seen = []
    model.reconstruction[1].adapters[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randn(1, 3, 24, 24, 24)
    out = model(x)
    conv_feats, token_feats = model._encode(x)
    expected = torch.cat([token_feats[0][:, 8:], conv_feats[0]], 1)  # modality 1's 8 token channels, then conv
    torch.testing.assert_close(seen[0], expected)
    assert model.reconstruction[1].head.out_channels == 2 * 4**3  # that modality's 2 channels
    assert torch.isfinite(out.aux_losses["sdkt_recon"])


def test_eval_returns_logits_deterministically_without_training_only_parts():
    model = tiny().eval()
    calls = []
    for part in [*model.reconstruction, *model.ds_heads]:
        part.register_forward_hook(lambda *_: calls.append(1))
    used = set()
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda mod, *_: used.update(id(p) for p in mod.parameters(recurse=False)))
    x = torch.randn(2, 2, 24, 24, 24)
    with torch.inference_mode():
        y1, y2 = model(x), model(x)
    assert isinstance(y1, torch.Tensor) and y1.shape == (2, 3, 24, 24, 24)
    assert torch.equal(y1, y2)  # dropout off
    assert calls == []  # reconstruction decoders and deep-supervision heads cost nothing at inference
    used_count = sum(p.numel() for p in model.parameters() if id(p) in used)
    # parameters outside leaf modules (the position tables) are read in the attention's forward
    tables = sum(block.attn.relative_position_bias.numel() for block in model.token_blocks)
    assert used_count + tables == model.inference_parameters()
    model.train()(x)
    assert len(calls) == 2 + len(model.ds_heads)


def test_dropout_only_in_training():
    model = tiny().train()
    x = torch.randn(1, 2, 24, 24, 24)
    torch.manual_seed(1)
    a = model(x).logits
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x).logits)
    assert sum(isinstance(mod, torch.nn.Dropout) and mod.p == 0.1 for mod in model.modules()) > 0
    assert model.token_blocks[0].attn.attn_dropout_rate == 0.1


@pytest.mark.parametrize("modalities", [(1,), (1, 1), (2, 1)])
def test_gradient_reaches_every_parameter(modalities):
    model = tiny(modalities=modalities).train()
    x = torch.randn(1, sum(modalities), 24, 24, 24)
    out = model(x)
    loss = out.logits.square().mean() + sum(d.square().mean() for d in out.deep_supervision)
    loss = loss + sum(out.aux_losses.values())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("detach", [False, True])
def test_gram_loss_teacher_side_detached_only_as_an_option(detach):
    model = tiny(gram_detach=detach).train()
    torch.manual_seed(0)
    out = model(torch.randn(1, 2, 24, 24, 24))
    out.aux_losses["sdkt_gram"].backward()
    teacher = model.reconstruction[0].blocks[0].ffn[3].weight.grad  # the reconstruction decoder's last level
    student = model.decoder.blocks[0].ffn[3].weight.grad
    assert student is not None and student.abs().sum() > 0
    assert (teacher is None or teacher.abs().sum() == 0) == detach


def test_sdkt_can_be_disabled_and_weights_scale_losses():
    x = torch.randn(1, 2, 24, 24, 24)
    assert tiny(sdkt=False).train()(x).aux_losses == {}
    assert len(tiny(sdkt=False).reconstruction) == 0
    base = tiny(dropout_rate=0.0, attn_dropout_rate=0.0, conv_dropout_rate=0.0).train()(x).aux_losses
    double = tiny(recon_weight=1.0, gram_weight=4.0, dropout_rate=0.0, attn_dropout_rate=0.0,
                  conv_dropout_rate=0.0).train()(x).aux_losses
    torch.testing.assert_close(double["sdkt_recon"], 2 * base["sdkt_recon"])
    torch.testing.assert_close(double["sdkt_gram"], 2 * base["sdkt_gram"])


def test_gram_matrix_sums_out_space():
    f = torch.randn(2, 4, 3, 5, 2)
    g = gram_matrix(f)
    assert g.shape == (2, 4, 4)
    torch.testing.assert_close(g, g.transpose(1, 2))
    shuffled = f.flatten(2)[:, :, torch.randperm(30)].view_as(f)
    torch.testing.assert_close(gram_matrix(shuffled), g)  # spatially decoupled
    torch.testing.assert_close(gram_matrix(torch.ones(1, 4, 2, 2, 2)), torch.full((1, 4, 4), 0.25))


def test_decoder_levels_and_adapters():
    decoder = VeloxDecoder((8, 16), (4, 8), (3, 3), out_channels=2, skip_channels=(16, 32))
    logits, levels = decoder([torch.randn(1, 16, 6, 6, 6), torch.randn(1, 32, 3, 3, 3)])
    assert logits.shape == (1, 2, 24, 24, 24)
    assert [tuple(level.shape[1:]) for level in levels] == [(8, 6, 6, 6), (16, 3, 3, 3)]
    assert len(decoder.adapters) == 2 and n_params(decoder.adapters) == 16 * 8 + 8 + 32 * 16 + 16


def test_stem_stride_sets_stems_and_head():
    model = tiny(img_size=24, stem_stride=2, channels=(8, 16, 32), num_heads=(1, 2, 2), head_dim=(4, 8, 8),
                 group_channels=(4, 8, 8), window_size=(3, 3, 3)).eval()
    assert model.conv_stem[0].kernel_size == (3, 3, 3) and model.conv_stem[0].stride == (2, 2, 2)
    assert [f.shape[2] for f in model.forward_encoder(torch.randn(1, 2, 24, 24, 24))] == [12, 6, 3]
    assert model(torch.randn(1, 2, 24, 24, 24)).shape == (1, 3, 24, 24, 24)


def test_jlc_is_residual_and_keeps_shape():
    block = JLC(8, 4, 2).eval()
    for branch in block.branches:
        torch.nn.init.zeros_(branch[0].weight), torch.nn.init.zeros_(branch[0].bias)
    torch.nn.init.zeros_(block.ffn[3].weight), torch.nn.init.zeros_(block.ffn[3].bias)
    x = torch.randn(1, 8, 5, 5, 5)
    torch.testing.assert_close(block(x), x)  # zero convs: GELU(IN(0)) = 0 in every branch, FFN 0


def test_registry_presets():
    model = create_model("veloxseg", preset="btcv", img_size=24, **TINY)
    assert model.modalities == (1,) and model.out_channels == 14
    assert model.model_args["modalities"] == [1]


def test_macs_on_meta_equal_macs_on_real_tensors():
    model = tiny(**THREE)
    shape = (1, 2, 48, 48, 48)
    meta, real = count_macs(model, shape), count_macs(model, shape, device="cpu")
    assert meta == real > 0


def test_attention_macs_match_a_hand_count():
    attn = PairedWindowAttention(8, 2, paired_windows((6, 6, 6), (3, 3, 3)), num_heads=2, head_dim=2)
    m, h, dq, dv, c, voxels = 2, 2, 2, attn.value_dim, 8, 6**3
    projections = voxels * m * c * 2 * h * (2 * dq + dv) + voxels * m * 2 * h * dv * c  # qkv and proj
    windows = 8 + 1  # 3^3 windows of 6^3 at scale 0, one 6^3 window pooled by 2 at scale 1
    attention = windows * h * (m * 27) ** 2 * (dq + dv)  # q k^T and p v
    shape = (1, 2, 6, 6, 6, 8)  # a token map [B, M, D, H, W, C]
    assert count_macs(attn, shape) * 1e9 == pytest.approx(projections + attention)
    assert count_macs(attn, shape, device="cpu") == count_macs(attn, shape)


def test_recipe_is_the_authors_schedule():
    from sparseseg.config import TrainConfig
    from sparseseg.recipes import RECIPES
    from sparseseg.training.optim import WarmupCosine

    assert "veloxseg" in RECIPES
    config = TrainConfig.from_recipe("veloxseg", dataset="d", output="o").validate()
    assert config.model == "veloxseg" and config.num_samples == 2 and config.roi_size == [96, 96, 96]
    assert config.learning_rate() == 2.5e-4 and config.weight_decay == 0.01 and config.betas == [0.9, 0.999]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate())
    schedule = WarmupCosine(optimizer, config.learning_rate(), total_iters=300, warmup_fraction=config.warmup_fraction,
                            min_lr_ratio=config.min_lr_ratio)  # one iteration per epoch
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(299):
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[9] == pytest.approx(2.5e-4) and max(lrs) == pytest.approx(2.5e-4)  # 10 warm-up epochs
    assert lrs[-1] == pytest.approx(6e-6)  # cosine to 6e-6


def test_exports_to_torchscript_and_onnx_with_dynamic_batch(tmp_path):
    model = tiny().eval()
    x = torch.randn(2, 2, 24, 24, 24)
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x[:1])
        torch.testing.assert_close(traced(x), expected)
        path = tmp_path / "veloxseg.onnx"
        torch.onnx.export(model, (x[:1],), str(path), opset_version=17, dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    ort = pytest.importorskip("onnxruntime")
    logits = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)
