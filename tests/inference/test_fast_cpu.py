"""The CPU fast path (optimize_for_cpu_inference) computes what the standard modules compute, cannot go stale when
weights change, keeps autocast's dtype and the MAC count, and falls back with one warning without oneDNN."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

import sparseseg.inference.fast_cpu as fast_cpu
from conftest import LIBRARY_MODELS, tiny_model
from sparseseg import count_macs
from sparseseg.inference.fast_cpu import CpuConv3d, optimize_for_cpu_inference, uses_cpu_fast_path


def _needs_onednn():
    if not fast_cpu.onednn_convolution_available():
        pytest.skip("this PyTorch build has no oneDNN convolution")


def _convs() -> nn.Sequential:
    """One convolution of each route: oneDNN (dense 3^3, strided 3^3), batched matmul (grouped 1^3, 16 channels a
    group), and one left standard (grouped 3^3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(4, 32, 3, padding=1), nn.Conv3d(32, 32, 1, groups=2), nn.GELU(),
                         nn.Conv3d(32, 32, 3, stride=2, padding=1), nn.Conv3d(32, 32, 3, padding=1, groups=4)).eval()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_routes_share_parameters_and_leave_the_model_unchanged():
    _needs_onednn()
    plain = _convs()
    fast = optimize_for_cpu_inference(plain)
    assert [getattr(m, "route", None) for m in fast] == ["onednn", "matmul", None, "onednn", None]
    assert not uses_cpu_fast_path(plain) and uses_cpu_fast_path(fast)
    assert all(a is b for a, b in zip(fast.parameters(), plain.parameters(), strict=True))  # no weight copied
    assert list(fast.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_each_route_equals_nn_conv3d_and_is_taken(monkeypatch, layout):
    _needs_onednn()
    calls = []
    real = torch.ops.aten.mkldnn_convolution

    def spy(*args):
        calls.append(tuple(args[1].shape))
        return real(*args)

    monkeypatch.setattr(torch.ops.aten, "mkldnn_convolution", spy, raising=False)
    plain = _convs()
    fast = optimize_for_cpu_inference(plain)
    x = torch.randn(1, 4, 8, 8, 8).contiguous(memory_format=layout)
    torch.testing.assert_close(_run(fast, x), _run(plain, x), atol=1e-5, rtol=1e-5)
    assert calls == [(32, 4, 3, 3, 3), (32, 32, 3, 3, 3)]  # the two dense convs, called directly


def _fresh_copy_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of an independent standard copy of ``model`` with its current weights."""
    return _run(copy.deepcopy(model), x)


@pytest.mark.parametrize("write", ["data", "load_state_dict", "fused_adamw"])
def test_every_kind_of_weight_write_changes_the_output(write):
    plain = _convs()
    fast = optimize_for_cpu_inference(plain)
    x = torch.randn(1, 4, 8, 8, 8)
    before = _run(fast, x)
    if write == "data":
        for p in fast.parameters():
            p.data.mul_(0.5)  # bumps no version counter
    elif write == "load_state_dict":
        fast.load_state_dict({k: v * 0.5 for k, v in fast.state_dict().items()})
    else:
        optimizer = torch.optim.AdamW(fast.parameters(), lr=0.1, fused=True)
        fast.train()
        fast(x).square().mean().backward()
        optimizer.step()
        fast.eval()
    after = _run(fast, x)
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, _fresh_copy_output(plain, x), atol=1e-5, rtol=1e-5)


def test_whole_model_follows_a_data_write():
    model, shape = tiny_model("veloxseg")
    fast = optimize_for_cpu_inference(model)
    x = torch.randn(shape)
    _run(fast, x)
    for p in model.parameters():
        p.data.mul_(0.9)
    torch.testing.assert_close(_run(fast, x), _fresh_copy_output(model, x), atol=1e-5, rtol=1e-5)


def test_autocast_keeps_its_dtype_and_autograd_its_gradients():
    plain = _convs()
    fast = optimize_for_cpu_inference(plain)
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = fast(x), plain(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    xg = x.clone().requires_grad_()
    fast(xg).sum().backward()
    grad = xg.grad.clone()
    xg.grad = None
    plain(xg).sum().backward()
    torch.testing.assert_close(grad, xg.grad)


@pytest.mark.parametrize("name", LIBRARY_MODELS)
def test_every_model_gives_the_same_output_and_macs(name):
    model, shape = tiny_model(name)
    fast = optimize_for_cpu_inference(model)
    assert not uses_cpu_fast_path(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref = _run(model, x)
    torch.testing.assert_close(_run(fast, x), ref, atol=1e-4, rtol=1e-4)
    assert count_macs(fast, shape) == count_macs(model, shape)
    assert getattr(fast, "model_args", None) == getattr(model, "model_args", None)


def test_without_onednn_one_warning_and_the_standard_convolutions(monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    fast_cpu.onednn_convolution_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="sparseseg.inference.fast_cpu"):
            plain = _convs()
            fast = optimize_for_cpu_inference(plain)
            optimize_for_cpu_inference(plain)
        assert [getattr(m, "route", None) for m in fast] == [None, "matmul", None, None, None]
        assert not any(isinstance(m, CpuConv3d) and m.route == "onednn" for m in fast.modules())
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
        x = torch.randn(1, 4, 8, 8, 8)
        torch.testing.assert_close(_run(fast, x), _run(plain, x), atol=1e-5, rtol=1e-5)
    finally:
        fast_cpu.onednn_convolution_available.cache_clear()
