"""Convolution-stream building blocks of VeloxSeg: JL-guided convolution (JLC), its norms and the pixel shuffle.

Feature maps are ``[B, C, D, H, W]``. The transformer stream lives in :mod:`.pwa`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """3-D pixel shuffle: ``[B, C * r^3, D, H, W] -> [B, C, D * r, H * r, W * r]`` with ``r = factor``."""
    b, cr3, d, h, w = x.shape
    c = cr3 // factor**3
    if c * factor**3 != cr3:
        raise ValueError(f"channels {cr3} are not divisible by factor^3 = {factor**3}")
    x = x.view(b, c, factor, factor, factor, d, h, w)  # [B, C, r, r, r, D, H, W]
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, C, D, r, H, r, W, r]
    return x.reshape(b, c, d * factor, h * factor, w * factor)  # [B, C, D*r, H*r, W*r]


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm without affine (``nn.InstanceNorm3d(channels)``, VeloxSeg's norm) as ``GroupNorm`` with one group
    per channel: the same result and eps, no parameters either, faster on contiguous CPU maps."""
    return nn.GroupNorm(channels, channels, affine=False)


def conv_norm(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Convolution (padding ``kernel_size // 2``) + instance norm: VeloxSeg's stem, downsampling, mixers, adapters."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
        instance_norm(out_channels),
    )


class JLC(nn.Module):
    """Johnson-Lindenstrauss guided convolution block (VeloxSeg): ``[B, C, D, H, W] -> [B, C, D, H, W]``.

    ``x + sum_k GELU(IN(GroupedConv_k(x)))`` for kernels 1, 3, 5 with ``group_channels`` channels per group (the JL
    lower bound on the width that preserves pairwise distances), then a residual feed-forward network
    ``x + Dropout(W2 GELU(W1 IN(x)))`` with ``expansion``. Instance norms without affine, convolutions with bias.
    """

    def __init__(
        self, channels: int, group_channels: int, expansion: int, kernels: Sequence[int] = (1, 3, 5),
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if channels % group_channels != 0:
            raise ValueError(f"channels {channels} must be divisible by group_channels {group_channels}")
        groups = channels // group_channels
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(channels, channels, k, padding=k // 2, groups=groups), instance_norm(channels), nn.GELU()
            )
            for k in kernels
        )
        self.ffn = nn.Sequential(
            instance_norm(channels),
            nn.Conv3d(channels, channels * expansion, 1),
            nn.GELU(),
            nn.Conv3d(channels * expansion, channels, 1),
            nn.Dropout(dropout_rate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + sum(branch(x) for branch in self.branches)
        return x + self.ffn(x)
