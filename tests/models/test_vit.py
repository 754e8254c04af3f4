from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseseg.models.common.vit import Attention, ViT3d, _policy_attention, patch_grid, tokens_to_map


def tiny_vit(**kw) -> ViT3d:
    args = dict(in_channels=2, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=3)
    args.update(kw)
    return ViT3d(**args)


def test_vit_shapes_and_token_layout():
    torch.manual_seed(0)
    vit = tiny_vit(img_size=(32, 16, 24)).eval()
    assert vit.grid_size == (4, 2, 3) and vit.num_tokens == 24
    x = torch.randn(3, 2, 32, 16, 24)
    z = vit(x)
    assert z.shape == (3, 25, 48)
    # patch tokens are in raster order of the grid: the map built from them equals the conv output
    emb = vit.embed(x)[:, 1:] - vit.pos_embed[:, 1:]
    assert torch.allclose(tokens_to_map(emb, vit.grid_size), vit.patch_embed(x), atol=1e-6)


@pytest.mark.parametrize("img_size,patch", [(30, 8), ((32, 32, 20), 8), (32, 0)])
def test_patch_grid_rejects_indivisible_sizes(img_size, patch):
    with pytest.raises(ValueError, match="divisible"):
        patch_grid(img_size, patch)


def test_bad_vit_arguments():
    with pytest.raises(ValueError, match="num_heads 5"):
        tiny_vit(num_heads=5)
    with pytest.raises(ValueError, match="dropout_rate"):
        tiny_vit(dropout_rate=1.5)
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        tiny_vit(drop_path_rate=1.0)


def explicit_attention(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, c = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) / attn.head_dim**0.5).softmax(-1)  # [B, h, L, L]
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out), weights


def test_attention_matches_explicit_softmax_and_cls_row():
    torch.manual_seed(0)
    attn = Attention(48, 3).eval()
    x = torch.randn(2, 9, 48)
    out, cls_attn = attn(x, return_cls_attention=True)
    ref, weights = explicit_attention(attn, x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert cls_attn.shape == (2, 8)
    assert torch.allclose(cls_attn, weights[:, :, 0, 1:].mean(1), atol=1e-6)
    assert attn(x)[1] is None


def test_policy_attention_masks_dropped_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 6, 4).unbind(0)
    ones = torch.ones(2, 6)
    assert torch.allclose(_policy_attention(q, k, v, ones, 0.0), F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    policy = torch.tensor([[1.0, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1]])
    allowed = policy.bool()[:, None, None, :] | torch.eye(6, dtype=torch.bool)  # a token always sees itself
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(_policy_attention(q, k, v, policy, 0.0), ref, atol=1e-4)
    # the policy receives a gradient (DynamicViT trains its scorer through the attention)
    soft = policy.clone().requires_grad_(True)
    _policy_attention(q, k, v, soft, 0.0).sum().backward()
    assert soft.grad.abs().sum() > 0


def test_dropout_only_in_training():
    torch.manual_seed(0)
    vit = tiny_vit(dropout_rate=0.5)
    x = torch.randn(1, 2, 32, 32, 32)
    vit.eval()
    assert torch.equal(vit(x), vit(x))
    vit.train()
    assert not torch.equal(vit(x), vit(x))


def test_stochastic_depth_rises_linearly_and_acts_only_in_training():
    torch.manual_seed(0)
    vit = tiny_vit(num_layers=5, drop_path_rate=0.8)
    assert [b.drop_path.drop_prob for b in vit.blocks] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    plain = tiny_vit(num_layers=5)
    plain.load_state_dict(vit.state_dict())  # the rate adds no parameters: the same keys load
    x = torch.randn(8, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit.eval()(x), plain.eval()(x))
        torch.manual_seed(1)
        dropped = vit.train()(x)
        assert torch.equal(plain.train()(x), plain.eval()(x))  # no dropout: training alone changes nothing
    # whole samples skip branches: each sample's output differs from the deterministic one
    differs = (dropped - plain(x)).flatten(1).abs().amax(1) > 1e-6
    assert differs.any()
