"""Building blocks of TokenSeg: token position embedding, the token mixer block, the importance scorer and the
convolution blocks of the encoder and the decoder."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseseg.models.common.norms import affine_instance_norm


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


def norm_layer(norm_name: str, channels: int) -> nn.Module:
    """``"instance"``: :func:`~sparseseg.models.common.norms.affine_instance_norm`; ``"batch"``: BatchNorm3d."""
    if norm_name == "instance":
        return affine_instance_norm(channels)
    if norm_name == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"norm_name must be 'instance' or 'batch', got {norm_name!r}")


class ResBlock(nn.Module):
    """Residual block ``[B, C, ...] -> [B, C, ...]``: conv 3^3 - norm - LeakyReLU - conv 3^3 - norm, + input, LeakyReLU.
    """

    def __init__(self, channels: int, norm_name: str = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1, bias=False), norm_layer(norm_name, channels),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(channels, channels, 3, padding=1, bias=False), norm_layer(norm_name, channels),
        )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + x)


class Down(nn.Sequential):
    """One encoder level: a 2^3 stride-2 conv (each output voxel pools its non-overlapping 2^3 cell) + ResBlock."""

    def __init__(self, in_channels: int, out_channels: int, norm_name: str = "instance") -> None:
        super().__init__(nn.Conv3d(in_channels, out_channels, 2, stride=2), ResBlock(out_channels, norm_name))


class RefineBlock(nn.Sequential):
    """Residual update of a decoder map computed only where it is refined: LeakyReLU - conv 3^3 - LeakyReLU -
    conv 3^3, both unpadded, ``[N, C, n, n, n] -> [N, C, n - 4, n - 4, n - 4]`` (a halo of ``HALO`` voxels).

    No normalisation: statistics over a batch of blocks would differ from those over the whole map, and the
    full-resolution stem trains better without (SPEC section 5)."""

    HALO = 2

    def __init__(self, channels: int) -> None:
        super().__init__(nn.LeakyReLU(0.01), nn.Conv3d(channels, channels, 3),
                         nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(channels, channels, 3))


class Head(nn.Sequential):
    """Full-resolution head: LeakyReLU - unpadded conv 3^3 - LeakyReLU - 1^3 classifier,
    ``[N, C, n, n, n] -> [N, out, n - 2, n - 2, n - 2]`` (a halo of ``HALO`` voxel)."""

    HALO = 1

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__(nn.LeakyReLU(0.01), nn.Conv3d(channels, channels, 3),
                         nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(channels, out_channels, 1))
