"""Free pruning of background patch tokens before the first Transformer block (``drop_background``).

A patch whose every voxel, in every channel, equals the scan's background value (the zeros around a skull-stripped
MRI after ``NormalizeIntensity(nonzero=True)``, CT air clipped to the HU window's ``b_min``) carries no information
a token could attend to; STP would still spend its budget on it (the demo's policy picture keeps such tokens to the
last block). :func:`foreground_patches` finds the patches, :func:`split_foreground` chooses which tokens go on.

Batches stay rectangular: every sample keeps ``M`` = the largest number of foreground tokens in the batch (at least
one), a sample with fewer fills its ``M`` with its highest-index background tokens (these go through the blocks as
ordinary tokens, as they would without dropping). An all-background window keeps one token. The selection returns
its indices, so it can be undone (:func:`~sparseseg.models.common.tokens.scatter_tokens`).
"""

from __future__ import annotations

import torch

from sparseseg.models.common.tokens import split_topk


def foreground_patches(x: torch.Tensor, patch_size: int, background_value: float) -> torch.Tensor:
    """``[B, C_in, D, H, W] -> [B, N]`` bool in raster order of the patch grid: True where some voxel of the patch,
    in some channel, differs from ``background_value`` (exact comparison; NaN counts as foreground)."""
    b, _, d, h, w = x.shape
    p = patch_size
    fg = (x != background_value).any(1)  # [B, C, D, H, W] -> [B, D, H, W]
    fg = fg.view(b, d // p, p, h // p, p, w // p, p)  # [B, D, H, W] -> [B, d, p, h, p, w, p]
    return fg.any(dim=(2, 4, 6)).flatten(1)  # -> [B, d, h, w] -> [B, N]


def split_foreground(foreground: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that go on and tokens dropped, ``keep_idx`` ``[B, M]`` and ``drop_idx`` ``[B, N - M]`` (ascending),
    from ``foreground`` ``[B, N]`` bool: ``M`` = the batch's largest foreground count (at least 1); all foreground
    tokens are kept, then the highest-index background tokens up to ``M``. Reads values (not on the meta device)."""
    n = foreground.shape[1]
    m = max(1, int(foreground.sum(1).max()))
    position = torch.arange(n, device=foreground.device)
    key = foreground.long() * n + position  # [B, N]: foreground first, then background from the last position back
    return split_topk(key, m)
