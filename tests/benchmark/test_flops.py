from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseseg import count_macs, count_params, create_model
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
