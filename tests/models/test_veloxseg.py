from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseseg.models import create_model
from sparseseg.models.common.norms import affine_instance_norm
from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.veloxseg.blocks import (
    ModalLayerNorm,
    PairedWindowAttention,
    max_pool_pyramid,
    num_pwa_scales,
    paired_windows,
    pixel_shuffle_3d,
    upsample_nearest,
    window_attention,
    window_partition,
    window_reverse,
)
from sparseseg.models.veloxseg.model import VeloxSeg
from sparseseg.models.veloxseg.sdkt import gram_matrix

TINY = {"channels": (8, 16), "num_heads": (1, 2), "head_dim": (4, 8), "group_channels": (4, 8)}


def tiny(modalities=(1, 1), out_channels=3, img_size=24, **kwargs) -> VeloxSeg:
    torch.manual_seed(0)
    args = {**TINY, "img_size": img_size, "modalities": modalities, **kwargs}
    return VeloxSeg(in_channels=sum(modalities), out_channels=out_channels, **args)


def test_authors_setting_parameter_count_and_scales():
    with torch.device("meta"):
        model = VeloxSeg(in_channels=2, out_channels=2, img_size=96, modalities=(1, 1))
    assert abs(model.inference_parameters() - 1.66e6) / 1.66e6 < 0.10
    assert model.num_scales == (4, 3, 2, 1)  # 24^3, 12^3, 6^3, 3^3 maps: windows 3..24, 3..12, 3..6, 3


@pytest.mark.parametrize(
    "spatial,num_scales,ratio", [((24, 24, 24), 4, 3), ((12, 12, 6), 3, 3), ((32, 16, 8), 4, 4), ((72, 24, 12), 5, 3)]
)
def test_windows_cover_every_voxel_once_per_scale(spatial, num_scales, ratio):
    index = torch.arange(torch.Size(spatial).numel(), dtype=torch.float64).view(1, 1, *spatial)
    pairs = paired_windows(spatial, num_scales, ratio)
    assert all(n % w == 0 for n, w in zip(spatial, pairs[-1][0], strict=True))
    assert pairs[-1][0] == spatial  # the coarsest scale is global
    for big, small in pairs:
        windows = window_partition(index, big)  # [nW, prod(big), 1]
        assert torch.equal(windows.flatten().sort().values, index.flatten())  # each voxel exactly once
        assert all(b == ratio * s for b, s in zip(big, small, strict=True))  # pooled windows hold ratio^3 tokens
        assert torch.equal(window_reverse(windows, big, spatial), index)


def test_paired_windows_rejects_untileable_maps():
    with pytest.raises(ValueError, match="cannot be tiled"):
        paired_windows((32, 32, 32), 4, 3)
    with pytest.raises(ValueError):
        num_pwa_scales(8, 3)
    assert num_pwa_scales(24, 3) == 4 and num_pwa_scales(3, 3) == 1
    # 72 = 3 * 24: local windows 3, 6, 12, 24 tile it, 48 does not, so the fifth scale is the global one.
    assert num_pwa_scales(72, 3) == 5
    expected = [(3, 3, 3), (6, 6, 6), (12, 12, 12), (24, 24, 24), (72, 24, 24)]
    assert [big for big, _ in paired_windows((72, 24, 24), 5, 3)] == expected


def test_pixel_shuffle_3d_places_subvoxels():
    r = 2
    x = torch.arange(2 * r**3 * 3 * 4 * 5, dtype=torch.float32).view(1, 2 * r**3, 3, 4, 5)
    y = pixel_shuffle_3d(x, r)
    assert y.shape == (1, 2, 6, 8, 10)
    for c, i, j, k, d, h, w in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 0, 1, 2, 3, 4), (0, 1, 1, 0, 1, 2, 3)]:
        assert y[0, c, d * r + i, h * r + j, w * r + k] == x[0, c * r**3 + i * r * r + j * r + k, d, h, w]


@pytest.mark.parametrize("windows", [[(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)], [(2, 2, 1), (3, 4, 2), (6, 8, 8)]])
def test_max_pool_pyramid_equals_direct_pooling(windows):
    x = torch.randn(2, 5, 24, 24, 16, requires_grad=True)
    maps = max_pool_pyramid(x, windows)
    for window, pooled in zip(windows, maps, strict=True):
        direct = torch.nn.functional.max_pool3d(x, window, window)
        assert pooled.is_contiguous() and torch.equal(pooled, direct)
    sum(m.sum() for m in maps).backward()
    expected = torch.autograd.grad(sum(torch.nn.functional.max_pool3d(x, w, w).sum() for w in windows), x)[0]
    assert torch.equal(x.grad, expected)


def test_max_pool_pyramid_at_inference_is_exact_with_ties_and_nan():
    x = torch.randn(1, 3, 24, 12, 6)
    x[:, :, :6] = 0.5  # a constant region: every window there is all ties
    x[0, 1, 7, 3, 2] = float("nan")
    windows = [(2, 2, 2), (4, 4, 2), (3, 3, 3), (24, 12, 6)]
    with torch.inference_mode():
        maps = max_pool_pyramid(x, windows)
        for window, pooled in zip(windows, maps, strict=True):
            direct = torch.nn.functional.max_pool3d(x, window, window)
            assert pooled.is_contiguous() and torch.equal(pooled.isnan(), direct.isnan())
            assert torch.equal(pooled.nan_to_num(), direct.nan_to_num())


@pytest.mark.parametrize("shape, size", [((2, 3, 4, 3, 2), (8, 12, 6)), ((1, 2, 3, 3, 3), (24, 24, 24)),
                                         ((1, 2, 5, 1, 2), (5, 4, 6))])
def test_upsample_nearest_equals_interpolate(shape, size):
    x = torch.randn(shape)
    y = upsample_nearest(x, size)
    assert y.is_contiguous() and torch.equal(y, F.interpolate(x, size=size, mode="nearest"))


def test_affine_instance_norm_matches_instance_norm_and_its_state_dict():
    reference = torch.nn.InstanceNorm3d(6, affine=True)
    torch.nn.init.normal_(reference.weight), torch.nn.init.normal_(reference.bias)
    norm = affine_instance_norm(6)
    norm.load_state_dict(reference.state_dict())
    x = torch.randn(2, 6, 5, 4, 3) * 3 + 1
    torch.testing.assert_close(norm(x), reference(x))


def test_stem_stride_sets_stems_and_head():
    model = tiny(img_size=24, stem_stride=2, channels=(8, 16, 32), num_heads=(1, 2, 2), head_dim=(4, 8, 8),
                 group_channels=(4, 8, 8)).eval()
    assert model.conv_stem.kernel_size == (3, 3, 3) and model.conv_stem.stride == (2, 2, 2)
    assert [f.shape[2] for f in model.forward_encoder(torch.randn(1, 2, 24, 24, 24))] == [12, 6, 3]
    assert model(torch.randn(1, 2, 24, 24, 24)).shape == (1, 3, 24, 24, 24)
    with pytest.raises(ValueError, match="stem_stride"):
        tiny(stem_stride=0)


def test_modal_layer_norm_normalises_each_modality_token():
    x = torch.randn(2, 16, 3, 4, 5)
    ref = torch.nn.functional.layer_norm(x.view(2, 2, 8, 3, 4, 5).movedim(2, -1), (8,), eps=1e-6)  # [B, M, ..., C]
    torch.testing.assert_close(ModalLayerNorm(2, 8)(x), ref.movedim(-1, 2).reshape_as(x))


def test_attention_is_joint_across_modalities():
    torch.manual_seed(0)
    attn = PairedWindowAttention(channels=8, num_modalities=2, num_scales=2, num_heads=2, head_dim=4).eval()
    x = torch.randn(1, 16, 6, 6, 6)
    y = attn(x)
    x2 = x.clone()
    x2[:, 8:] += torch.randn_like(x2[:, 8:])  # change modality 1 only
    y2 = attn(x2)
    assert not torch.allclose(y[:, :8], y2[:, :8])  # modality 0 attends to modality 1's tokens


def test_training_returns_deep_supervision_and_sdkt_losses():
    model = tiny(channels=(8, 16, 32), num_heads=(1, 2, 2), head_dim=(4, 8, 8), group_channels=(4, 8, 8), img_size=48)
    out = model.train()(torch.randn(1, 2, 48, 48, 48))
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (1, 3, 48, 48, 48)
    assert [tuple(d.shape[2:]) for d in out.deep_supervision] == [(12,) * 3, (6,) * 3]  # finest first
    assert set(out.aux_losses) == {"sdkt_recon", "sdkt_gram"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.aux_losses.values())


def test_eval_returns_logits_deterministically_without_reconstruction():
    model = tiny().eval()
    calls = []
    for decoder in model.reconstruction:
        decoder.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 2, 24, 24, 24)
    with torch.inference_mode():
        y1, y2 = model(x), model(x)
    assert isinstance(y1, torch.Tensor) and y1.shape == (2, 3, 24, 24, 24)
    assert torch.equal(y1, y2)
    assert calls == []  # reconstruction decoders cost nothing at inference
    model.train()(x)
    assert len(calls) == 2  # one per modality in training


@pytest.mark.parametrize("modalities", [(1,), (1, 1), (2, 1)])
def test_forward_backward_finite(modalities):
    model = tiny(modalities=modalities).train()
    x = torch.randn(1, sum(modalities), 24, 24, 24)
    out = model(x)
    loss = out.logits.square().mean() + sum(d.mean() for d in out.deep_supervision) + sum(out.aux_losses.values())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.token_stems[0].weight.grad.abs().sum() > 0


def test_sdkt_can_be_disabled_and_weights_scale_losses():
    x = torch.randn(1, 2, 24, 24, 24)
    assert tiny(sdkt=False).train()(x).aux_losses == {}
    assert len(tiny(sdkt=False).reconstruction) == 0
    base = tiny().train()(x).aux_losses
    double = tiny(recon_weight=1.0, gram_weight=4.0).train()(x).aux_losses
    torch.testing.assert_close(double["sdkt_recon"], 2 * base["sdkt_recon"])
    torch.testing.assert_close(double["sdkt_gram"], 2 * base["sdkt_gram"])


def test_gram_matrix_sums_out_space():
    f = torch.randn(2, 4, 3, 5, 2)
    g = gram_matrix(f)
    assert g.shape == (2, 4, 4)
    torch.testing.assert_close(g, g.transpose(1, 2))
    perm = torch.randperm(30)
    shuffled = f.flatten(2)[:, :, perm].view_as(f)
    torch.testing.assert_close(gram_matrix(shuffled), g)  # spatially decoupled
    torch.testing.assert_close(gram_matrix(torch.ones(1, 4, 2, 2, 2)), torch.full((1, 4, 4), 0.25))


def test_bad_sizes_raise_value_error():
    model = tiny().eval()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 2, 20, 24, 24))
    with pytest.raises(ValueError, match="cannot be tiled|multiple"):
        model(torch.randn(1, 2, 32, 32, 32))  # stage maps 8 and 4 are not multiples of 3
    with pytest.raises(ValueError):
        tiny(img_size=64)
    with pytest.raises(ValueError, match="modalities"):
        VeloxSeg(in_channels=3, modalities=(1, 1))
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(1, 3, 24, 24, 24))


def test_registry_presets():
    model = create_model("veloxseg", preset="btcv", img_size=24, **TINY)
    assert model.modalities == (1,) and model.out_channels == 14
    with torch.device("meta"):
        brats = create_model("veloxseg", preset="brats")
    assert brats.modalities == (4,) and brats.window_ratio == 4 and brats.num_scales == (4, 3, 2, 1)
    assert model.model_args["modalities"] == [1]


@pytest.mark.parametrize("ratio,size", [(2, 16), (4, 32)])
def test_other_window_ratios(ratio, size):
    model = tiny(window_ratio=ratio, img_size=size).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 2, size, size, size)).shape == (1, 3, size, size, size)


def test_forward_encoder_returns_stage_features():
    feats = tiny().eval().forward_encoder(torch.randn(1, 2, 24, 24, 24))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 6, 6, 6), (1, 16, 3, 3, 3)]


def test_window_attention_matches_sdpa_on_cpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(7, 2, 54, 4) for _ in range(3))
    torch.testing.assert_close(window_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    q.requires_grad_()
    window_attention(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    many = [torch.randn(101, 1, 54, 8) for _ in range(3)]  # more windows than one block of scores holds
    with torch.inference_mode():
        torch.testing.assert_close(window_attention(*many), F.scaled_dot_product_attention(*many), atol=1e-5, rtol=1e-5)
