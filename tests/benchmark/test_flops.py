from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import LIBRARY_MODELS, tiny_model
from sparseseg import count_macs, count_params, create_model
from sparseseg.benchmark.flops import MacCountError
from sparseseg.inference.fast_cpu import onednn_convolution_available, optimize_for_cpu_inference
from sparseseg.models.common.vit import ViT3d


class OneAttention(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q)  # [B, heads, N, head_dim]


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_one_attention_call_is_counted(device):
    heads, n, head_dim = 3, 10, 8
    macs = count_macs(OneAttention(), (1, heads, n, head_dim), device=device) * 1e9
    assert macs == pytest.approx(2 * heads * n**2 * head_dim)


def test_attention_is_counted_on_cpu_in_backward_too():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_total_flops() > 2 * 2 * (2 * 2 * 36 * 4)  # the forward alone is 2 * (2 h N^2 d) FLOPs


def test_linear_and_conv_known_answers():
    assert count_macs(nn.Linear(8, 4), (2, 8)) * 1e9 == pytest.approx(2 * 8 * 4)
    conv = nn.Conv3d(2, 5, kernel_size=4, stride=4)
    assert count_macs(conv, torch.zeros(1, 2, 8, 8, 8)) * 1e9 == pytest.approx(8 * 5 * 2 * 64)


def test_vit_macs_match_the_analytic_count():
    c, mlp, layers, heads, p, cin = 48, 96, 2, 3, 8, 2
    vit = ViT3d(in_channels=cin, img_size=32, patch_size=p, hidden_size=c, mlp_dim=mlp, num_layers=layers,
                num_heads=heads)
    n, tokens = 64, 65
    block = 3 * c * c * tokens + 2 * tokens**2 * c + c * c * tokens + 2 * c * mlp * tokens
    expected = n * c * cin * p**3 + layers * block
    assert count_macs(vit, (1, cin, 32, 32, 32)) * 1e9 == pytest.approx(expected)
    assert count_macs(vit, (1, cin, 32, 32, 32), device="cpu") * 1e9 == pytest.approx(expected)


def test_sparse_model_counts_fewer_macs_and_meta_equals_cpu():
    torch.manual_seed(0)
    kw = dict(in_channels=1, out_channels=2, img_size=32, hidden_size=48, mlp_dim=96, num_layers=4, num_heads=3,
              feature_size=4)
    dense = create_model("unetr", skip_layers=(1, 2, 3), **kw)
    sparse = create_model("stp_mta_unetr", prune_after=(1, 2, 3), completion_size=48, completion_heads=3, **kw)
    shape = (1, 1, 32, 32, 32)
    macs = []
    for r in (0.25, 0.5, 0.75, 0.9):
        sparse.prune_ratio = r
        macs.append(count_macs(sparse, shape))
    assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0]
    assert count_macs(sparse, shape, device="cpu") == pytest.approx(macs[-1])
    sparse.train()
    assert count_macs(sparse, shape) == pytest.approx(macs[-1]) and sparse.training  # eval count, mode restored
    assert count_macs(dense, shape) > 0


def test_count_params():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_params(m) == 3 * 4 + 4 + 4 * 2 + 2
    m[0].weight.requires_grad_(False)
    assert count_params(m, trainable_only=True) == 4 + 4 * 2 + 2


def test_count_params_inference_only_leaves_out_training_only_parts():
    import sparseseg

    model = sparseseg.create_model("veloxseg", img_size=96, in_channels=2, out_channels=2, modalities=[1, 1])
    assert count_params(model, inference_only=True) == model.inference_parameters() < count_params(model)
    dense = sparseseg.create_model("unetr", img_size=32, hidden_size=48, num_layers=2, num_heads=2, mlp_dim=96,
                                   skip_layers=(1, 1, 2))
    assert count_params(dense, inference_only=True) == count_params(dense)


class ConvAttention(nn.Module):
    """A 3^3 conv, then attention over its voxels as tokens: q/k/v and output projections, two heads."""

    def __init__(self, cin: int = 2, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.conv = nn.Conv3d(cin, dim, 3, padding=1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)  # [B, C, D, H, W] -> [B, N, C]
        b, n, c = t.shape
        q, k, v = self.qkv(t).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, d]
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))  # [B, N, C]


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_conv_and_attention_match_a_hand_count(device):
    cin, dim, heads, side = 2, 8, 2, 4
    n = side**3
    conv = n * dim * cin * 27
    linears = n * dim * 3 * dim + n * dim * dim
    attention = 2 * heads * n * n * (dim // heads)  # q k^T and p v
    assert count_macs(ConvAttention(cin, dim, heads), (1, cin, side, side, side), device=device) * 1e9 == (
        conv + linears + attention)


@pytest.mark.parametrize("name", LIBRARY_MODELS)
def test_meta_and_real_tensor_counts_agree_for_every_model(name):
    model, shape = tiny_model(name)
    meta = count_macs(model, shape)
    assert meta > 0
    assert count_macs(model, shape, device="cpu") == pytest.approx(meta, rel=1e-12)
    fast = optimize_for_cpu_inference(model)  # the CPU fast path steps aside while a counter watches
    assert count_macs(fast, shape) == count_macs(fast, shape, device="cpu") == pytest.approx(meta, rel=1e-12)


class NeedsValues(nn.Module):
    """Reads a value (no meta kernel can)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.abs().max().item() > 0)


class PrivateConv(nn.Module):
    """Convolves with a private kernel the counter has no formula for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mkldnn_convolution(x, self.conv.weight, self.conv.bias, [0] * 3, [1] * 3, [1] * 3, 1)


def test_counting_never_falls_back_silently():
    with pytest.raises(MacCountError, match="meta device.*device='cpu'"):
        count_macs(NeedsValues(), (1, 2, 4, 4, 4))
    assert count_macs(NeedsValues(), (1, 2, 4, 4, 4), device="cpu") == 0  # the caller's choice: real tensors
    if not onednn_convolution_available():
        return
    with pytest.raises(MacCountError, match="aten.mkldnn_convolution"):
        count_macs(PrivateConv(), (1, 2, 6, 6, 6), device="cpu")  # would be counted as zero
