"""Cells of TokenSeg's token octree as blocks of a feature map: pure, batched gather and scatter with a halo.

A token of level ``l`` covers a cell of ``2^(l+1)`` image voxels per axis. On a map of stride ``t`` that cell is a
cubic block of ``side = 2^(l+1) / t`` voxels whose corner is the cell's (z, y, x) times ``side``. The sparse decoder
(:mod:`.decoder`) gathers such blocks with a halo, runs unpadded convolutions on the batch of blocks and scatters
the interiors back. The halo beyond the volume's edge is zeros, so an unpadded convolution on a gathered block gives
exactly what the same convolution with zero padding gives on the whole map. Where blocks overlap they computed the
same values from the same inputs: dividing each block by the overlap count (:func:`block_count_`) before adding it
(:func:`scatter_blocks_`) averages them.

Every shape is fixed by the number of tokens per level, never by their positions, so MAC counters (on the meta
device too) and exporters see the same graph for every input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cell_corners(cells: torch.Tensor, grid: tuple[int, int, int], side: int) -> torch.Tensor:
    """Flat cell indices ``[B, K]`` in ``grid`` -> block corners ``[B, K, 3]`` (z, y, x) on a map where a cell is
    ``side`` voxels wide."""
    h, w = grid[1], grid[2]
    return torch.stack([cells // (h * w), (cells // w) % h, cells % w], dim=-1) * side  # [B, K, 3]


def block_index(corners: torch.Tensor, side: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Flat indices ``[B, K * side^3]`` of the ``side^3`` blocks at ``corners`` ``[B, K, 3]`` in a map of spatial
    ``shape`` (blocks in order, each in raster order)."""
    h, w = int(shape[1]), int(shape[2])
    r = torch.arange(side, device=corners.device)
    offsets = ((r[:, None, None] * h + r[None, :, None]) * w + r[None, None, :]).flatten()  # [side^3]
    start = (corners[..., 0] * h + corners[..., 1]) * w + corners[..., 2]  # [B, K]
    return (start[..., None] + offsets).flatten(1)  # [B, K, side^3] -> [B, K * side^3]


def gather_blocks(x: torch.Tensor, corners: torch.Tensor, side: int, halo: int = 0) -> torch.Tensor:
    """Blocks of ``x`` ``[B, C, D, H, W]`` at ``corners`` ``[B, K, 3]``, each widened by ``halo`` voxels on every
    side (zeros outside the map): ``[B * K, C, n, n, n]`` with ``n = side + 2 * halo``, batch-major."""
    if halo:
        x = F.pad(x, (halo,) * 6)  # a block's corner moves by -halo, the map by +halo: the index is unchanged
    c, k, n = x.shape[1], corners.shape[1], side + 2 * halo
    idx = block_index(corners, n, x.shape[2:])  # [B, K * n^3]
    blocks = x.flatten(2).gather(2, idx[:, None].expand(-1, c, -1))  # [B, C, D*H*W] -> [B, C, K * n^3]
    return blocks.view(-1, c, k, n, n, n).transpose(1, 2).reshape(-1, c, n, n, n)  # -> [B * K, C, n, n, n]


def scatter_blocks_(out: torch.Tensor, blocks: torch.Tensor, corners: torch.Tensor, shape: tuple[int, ...]
                    ) -> torch.Tensor:
    """Add the blocks ``[B * K, C, s, s, s]`` at ``corners`` ``[B, K, 3]`` into ``out`` ``[B, C, D*H*W]`` (a flat map
    of spatial ``shape``), in place (overlapping blocks add up); returns ``out``. Only the block voxels are touched.

    In place on the flat tensor itself, never through a view of another: exporters follow such a write only when
    later code reads the written tensor."""
    c, k, s = out.shape[1], corners.shape[1], blocks.shape[-1]
    idx = block_index(corners, s, shape)  # [B, K * s^3]
    src = blocks.reshape(-1, k, c, s**3).transpose(1, 2).reshape(-1, c, k * s**3)  # [B * K, C, s,s,s] -> [B, C, K s^3]
    return out.scatter_add_(2, idx[:, None].expand(-1, c, -1), src.to(out.dtype))


def block_count_(count: torch.Tensor, corners: torch.Tensor, side: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Add one to every voxel of the ``side^3`` blocks at ``corners`` in ``count`` ``[B, 1, D*H*W]`` (a flat map of
    spatial ``shape``), in place; returns ``count``."""
    idx = block_index(corners, side, shape)  # [B, K * side^3]
    return count.scatter_add_(2, idx[:, None], torch.ones_like(idx[:, None], dtype=count.dtype))


def cell_map(cells: torch.Tensor, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    """``[B, 1, *grid]`` map (``like``'s dtype) that is 1 at the flat cells ``[B, K]`` and 0 elsewhere."""
    n = grid[0] * grid[1] * grid[2]
    empty = like.new_zeros(1, 1).expand(cells.shape[0], n)  # [B, N]; the batch size follows ``cells``
    hit = empty.scatter(1, cells, torch.ones_like(cells, dtype=like.dtype))  # [B, N]
    return hit.view(-1, 1, *grid)  # [B, N] -> [B, 1, d, h, w]
