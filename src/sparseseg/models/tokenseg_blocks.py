"""Building blocks of TokenSeg: token position embedding, the token mixer block and the importance scorer."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_3d(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos embedding of 3-D positions: ``[B, N, 3] -> [B, N, dim]``.

    Each axis gets ``dim // 6`` frequencies (sin and cos); the remaining ``dim % 6`` channels are zero. Positions
    are in image voxels, so the same cell gets the same embedding at every ROI size.
    """
    n_freq = dim // 6
    omega = 1.0 / temperature ** (torch.arange(n_freq, dtype=pos.dtype, device=pos.device) / max(n_freq, 1))
    angles = pos[..., None] * omega  # [B, N, 3, F]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2)  # [B, N, 3, 2F] -> [B, N, 6F]
    return F.pad(emb, (0, dim - emb.shape[-1]))  # [B, N, dim]


class TokenBlock(nn.Module):
    """Pre-norm Transformer block over a short token sequence (SDPA attention, MLP ratio 4, GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, K, C] -> [B, K, C]``."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads)  # [B, K, 3, h, C/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, h, K, C/h]
        a = F.scaled_dot_product_attention(q, k, v)  # [B, h, K, C/h]
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))  # [B, h, K, C/h] -> [B, K, C]
        return x + self.mlp(self.norm2(x))


class ImportanceScorer(nn.Module):
    """Per-token importance logit ``[B, N, C] -> [B, N]``, the STP score net shape (SPEC section 1).

    LayerNorm -> Linear(C, C) -> GELU; the first half of the channels is the local feature, the mean of the second
    half over the tokens the global one; concat -> Linear(C, C/2) -> GELU -> Linear(C/2, 1). The caller takes
    ``logsigmoid`` of it for the soft top-K and uses the raw logit for the boundary BCE.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"token_size must be even for the importance scorer, got {dim}")
        self.inp = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # [B, N, C]
        local, glob = h.chunk(2, dim=-1)  # 2 x [B, N, C/2]
        glob = glob.mean(dim=1, keepdim=True).expand_as(glob)  # [B, 1, C/2] -> [B, N, C/2]
        return self.out(torch.cat([local, glob], dim=-1)).squeeze(-1)  # [B, N, C] -> [B, N]


def split_candidates(total: int, cells_per_level: list[int], shares: tuple[float, ...]) -> list[int]:
    """Default tokens per level: ``shares`` of ``total`` (finest first), capped by each level's cell count.

    What a level cannot hold goes to the next finer level that can (the finest levels have the most cells).
    """
    counts = [math.floor(total * s) for s in shares]
    counts[0] += total - sum(counts)
    spill = 0
    for level in reversed(range(len(counts))):  # coarsest first: it is the one that runs out of cells
        counts[level] += spill
        spill = max(0, counts[level] - cells_per_level[level])
        counts[level] -= spill
    if spill:
        raise ValueError(f"num_candidates ({total}) exceeds the {sum(cells_per_level)} cells of all levels")
    return counts
