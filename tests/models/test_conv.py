"""The oneDNN-routed Conv3d computes what nn.Conv3d computes, forward and backward, with the same state_dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparseseg.models.common.conv as conv
from sparseseg.models.common.conv import Conv3d


@pytest.mark.parametrize(
    "kwargs",
    [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1),
     dict(kernel_size=3, padding=1, groups=4), dict(kernel_size=5, padding=2, bias=False)],
)
def test_matches_nn_conv3d_forward_and_backward(kwargs):
    torch.manual_seed(0)
    ours = Conv3d(8, 16, **kwargs)
    ref = nn.Conv3d(8, 16, **kwargs)
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 8, 12, 10, 8)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-3, rtol=1e-4)


def test_routes_only_dense_spatial_kernels(monkeypatch):
    calls = []
    real = torch.ops.aten.mkldnn_convolution

    class Spy:
        def __call__(self, *args):
            calls.append(args[1].shape)
            return real(*args)

    monkeypatch.setattr(torch.ops.aten, "mkldnn_convolution", Spy(), raising=False)
    x = torch.randn(1, 8, 6, 6, 6)
    if not conv._onednn_usable(x):
        pytest.skip("this PyTorch build has no usable oneDNN")
    Conv3d(8, 8, 1)(x)
    Conv3d(8, 8, 3, padding=1, groups=8)(x)
    assert calls == []
    Conv3d(8, 4, 3, padding=1)(x)
    assert calls == [torch.Size([4, 8, 3, 3, 3])]


def test_meta_and_other_dtypes_fall_back():
    meta = Conv3d(2, 4, 3, padding=1, device="meta")
    assert meta(torch.empty(1, 2, 8, 8, 8, device="meta")).shape == (1, 4, 8, 8, 8)
    double = Conv3d(2, 4, 3, padding=1, dtype=torch.float64)
    ref = nn.Conv3d(2, 4, 3, padding=1, dtype=torch.float64)
    ref.load_state_dict(double.state_dict())
    x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(double(x), ref(x))


def _needs_onednn():
    if not conv._onednn_usable(torch.randn(1, 1, 2, 2, 2)):
        pytest.skip("this PyTorch build has no usable oneDNN")


@pytest.mark.parametrize(
    "kwargs",
    [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, stride=2, groups=2),
     dict(kernel_size=5, padding=2, groups=4, bias=False)],
)
def test_small_maps_at_inference_use_packed_weights_with_the_same_result(kwargs):
    _needs_onednn()
    torch.manual_seed(0)
    ours = Conv3d(8, 16, **kwargs)
    ref = nn.Conv3d(8, 16, **kwargs)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 6, 6, 6)  # 216 voxels <= PACKED_MAX_VOXELS
    with torch.inference_mode():
        y = ours(x)
        assert ours in conv._packed_weights
        assert y.is_contiguous()
        torch.testing.assert_close(y, ref(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(x), y)  # second call: the cached weight


def test_packed_weights_follow_weight_changes_and_autograd_never_uses_them():
    _needs_onednn()
    torch.manual_seed(0)
    ours = Conv3d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        before = ours(x)
        ours.weight.mul_(2.0)  # an optimiser step changes the weight in place
        after = ours(x)
    expected = nn.functional.conv3d(x, ours.weight.detach(), ours.bias.detach(), padding=1)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)
    conv._packed_weights.pop(ours, None)
    y = ours(x.requires_grad_())  # grad mode: never the packed path, and the backward works
    assert ours not in conv._packed_weights
    y.sum().backward()
    assert ours.weight.grad is not None and x.grad is not None


def test_models_with_packed_weights_can_be_copied():
    import copy

    _needs_onednn()
    model = nn.Sequential(Conv3d(4, 8, 3, padding=1)).eval()
    with torch.inference_mode():
        model(torch.randn(1, 4, 4, 4, 4))
    assert model[0] in conv._packed_weights
    copied = copy.deepcopy(model)  # the cache lives outside the module, so copies and pickles never see it
    assert copied[0] not in conv._packed_weights


def test_weights_made_under_inference_mode_are_not_packed():
    _needs_onednn()
    with torch.inference_mode():
        ours = Conv3d(4, 8, 3, padding=1)
        x = torch.randn(1, 4, 4, 4, 4)
        y = ours(x)
        assert ours not in conv._packed_weights
        torch.testing.assert_close(y, nn.functional.conv3d(x, ours.weight, ours.bias, padding=1), atol=1e-5, rtol=1e-5)
