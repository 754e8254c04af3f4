from __future__ import annotations

import pytest
import torch

from sparseseg.models.common.tokens import gather_tokens, split_topk
from sparseseg.models.stp_mta.completion import (
    MaskedTokenCompletion,
    MultiLayerTokenAssembly,
    build_completion,
    sincos_pos_embed_3d,
)
from sparseseg.models.stp_mta.pruning import SparseEncoding, TokenGroup

GRID = (2, 3, 2)  # 12 tokens
HIDDEN, WIDTH = 12, 18


def test_sincos_embedding():
    emb = sincos_pos_embed_3d(GRID, 12)
    assert emb.shape == (13, 12)
    assert torch.equal(emb[0], torch.zeros(12))  # [CLS] row
    assert emb[1:].abs().max() <= 1.0
    assert len({tuple(r.tolist()) for r in emb[1:]}) == 12  # every position distinct
    # raster order, last axis fastest: token 1 is (0, 0, 1), so only the last axis' channels change
    assert torch.equal(emb[1, :8], emb[2, :8]) and not torch.equal(emb[1, 8:], emb[2, 8:])
    assert sincos_pos_embed_3d(GRID, 6, cls_token=False).shape == (12, 6)
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_pos_embed_3d(GRID, 16)


def make_encoding(b: int = 2, generator_seed: int = 0) -> tuple[SparseEncoding, torch.Tensor, torch.Tensor]:
    """A two-stage encoding of 12 tokens: stage 1 drops 6, stage 2 drops 3, 3 kept; returns it, the per-position
    token of its group ``[B, 12, hidden]`` and the group of each position ``[B, 12]`` (0, 1 pruned; 2 kept)."""
    g = torch.Generator().manual_seed(generator_seed)
    n = 12
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])  # [B, N]
    drop1, drop2, keep = order[:, :6].sort(1).values, order[:, 6:9].sort(1).values, order[:, 9:].sort(1).values
    full = torch.randn(b, n, HIDDEN, generator=g)
    cls = torch.randn(b, 1, HIDDEN, generator=g)
    group = torch.full((b, n), 2)
    group.scatter_(1, drop1, 0)
    group.scatter_(1, drop2, 1)
    enc = SparseEncoding(
        final=torch.cat([cls, gather_tokens(full, keep)], 1), keep_idx=keep,
        pruned=[TokenGroup(gather_tokens(full, drop1), drop1), TokenGroup(gather_tokens(full, drop2), drop2)],
        depth=torch.zeros(b, n, dtype=torch.long),
    )
    return enc, torch.cat([cls, full], 1), group


def mta(depth: int = 0) -> MultiLayerTokenAssembly:
    torch.manual_seed(0)
    m = MultiLayerTokenAssembly(num_groups=3, hidden_size=HIDDEN, grid_size=GRID, width=WIDTH, depth=depth,
                                num_heads=3).eval()
    with torch.no_grad():
        m.blk_tokens.normal_()  # zero at init; non-zero here so the test sees which group each token took
    return m


def test_mta_puts_every_group_back_at_its_position():
    enc, tokens, group = make_encoding()
    m = mta(depth=0)
    out = m(enc)
    assert out.shape == (2, 12, HIDDEN)
    # reference, one token at a time: the group's norm (pruned only), Linear and [BLK] token, then pos, norm, head
    ref = torch.empty(2, 13, WIDTH)
    for b in range(2):
        ref[b, 0] = m.embeds[-1](tokens[b, 0]) + m.blk_tokens[-1]
        for n in range(12):
            g = int(group[b, n])
            t = tokens[b, n + 1] if g == 2 else m.norms[g](tokens[b, n + 1])
            ref[b, n + 1] = m.embeds[g](t) + m.blk_tokens[g]
    expected = m.head(m.norm(ref + m.pos_embed)[:, 1:])
    assert torch.allclose(out, expected, atol=1e-5)


def test_mta_weighted_groups_equal_disjoint_groups():
    """The DynamicViT training layout (every group full length, 0/1 memberships) gives the same result."""
    enc, tokens, group = make_encoding()
    m = mta(depth=1)
    full_idx = torch.arange(12).expand(2, 12)
    weights = [(group == g).float() for g in range(3)]
    dense = SparseEncoding(final=tokens, keep_idx=full_idx, depth=enc.depth, keep_weight=weights[2],
                           pruned=[TokenGroup(tokens[:, 1:], full_idx, weights[g]) for g in range(2)])
    assert torch.allclose(m(enc), m(dense), atol=1e-5)


def test_blk_tokens_start_at_zero_and_group_count_is_checked():
    m = MultiLayerTokenAssembly(num_groups=3, hidden_size=HIDDEN, grid_size=GRID, width=WIDTH, depth=1, num_heads=3)
    assert torch.equal(m.blk_tokens, torch.zeros(3, WIDTH))
    enc, _, _ = make_encoding()
    enc.pruned = enc.pruned[:1]
    with pytest.raises(ValueError, match="2 pruned groups"):
        m(enc)


def test_mim_fills_pruned_positions_with_the_mask_token():
    enc, tokens, group = make_encoding()
    torch.manual_seed(0)
    m = MaskedTokenCompletion(hidden_size=HIDDEN, grid_size=GRID, width=WIDTH, depth=0, num_heads=3).eval()
    out = m(enc)
    z = m.mask_token.expand(2, 13, WIDTH).clone()
    kept = torch.cat([torch.ones(2, 1, dtype=torch.bool), group == 2], 1)  # [B, 1 + N]
    z[kept] = m.embed(tokens[kept])
    expected = m.head(m.norm(z + m.pos_embed)[:, 1:])
    assert torch.allclose(out, expected, atol=1e-5)
    # with a Transformer block the pruned tokens' features no longer matter: only final tokens are used
    m2 = MaskedTokenCompletion(hidden_size=HIDDEN, grid_size=GRID, width=WIDTH, depth=1, num_heads=3).eval()
    enc.pruned = [TokenGroup(g.tokens + 100.0, g.idx) for g in enc.pruned]
    assert torch.allclose(m2(enc), m2(make_encoding()[0]), atol=1e-6)


def test_completion_gradients_and_round_trip_with_split_topk():
    torch.manual_seed(0)
    x = torch.randn(2, 12, HIDDEN)
    keep, drop = split_topk(torch.randn(2, 12), 5)
    enc = SparseEncoding(final=torch.cat([torch.zeros(2, 1, HIDDEN), gather_tokens(x, keep)], 1), keep_idx=keep,
                         pruned=[TokenGroup(gather_tokens(x, drop), drop)], depth=torch.zeros(2, 12, dtype=torch.long))
    m = build_completion("mta", num_groups=2, hidden_size=HIDDEN, grid_size=GRID, width=WIDTH, depth=1, num_heads=3)
    m(enc).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("kw,match", [
    (dict(width=16), "divisible by 6"),
    (dict(width=18, num_heads=4), "heads 4"),
    (dict(depth=-1), "depth"),
])
def test_bad_completion_arguments(kw, match):
    args = dict(num_groups=2, hidden_size=HIDDEN, grid_size=GRID, width=WIDTH, depth=1, num_heads=3)
    with pytest.raises(ValueError, match=match):
        build_completion("mta", **{**args, **kw})
    with pytest.raises(ValueError, match="'fill'"):
        build_completion("fill", **args)
