"""Pure, batched operations on cubic blocks of a 3-D feature map: the spatial counterpart of :mod:`.tokens`.

A map ``[B, C, D, H, W]`` is cut into a grid of ``block``-sided cubes, ``ceil(D / block) x ceil(H / block) x
ceil(W / block)`` of them per image, numbered in raster order (last axis fastest), like the patch tokens of a ViT.
Blocks on the far edges may stick out of the map when a side is not a multiple of ``block``. A selection is
``idx`` ``[B, K]`` (block numbers per image); :func:`gather_blocks` cuts the selected blocks out with a ``halo`` of
neighbouring voxels on every side (zeros outside the map, as a zero-padded convolution sees them) and
:func:`scatter_blocks` writes block interiors back. A gather is one ``index_select`` of channels-last voxel rows
(ONNX ``Gather``), a scatter one ``scatter`` along each image's flattened voxels (ONNX ``ScatterElements``), with
no Python loop over the batch or the blocks.

Examples:
    >>> x = torch.arange(2 * 3 * 4 * 4 * 4.0).view(2, 3, 4, 4, 4)
    >>> idx = torch.tensor([[0, 7], [3, 4]])  # two of the 2 x 2 x 2 blocks of side 2 per image
    >>> gather_blocks(x, idx, block=2, halo=1).shape
    torch.Size([4, 3, 4, 4, 4])
    >>> torch.equal(scatter_blocks(x, idx, gather_blocks(x, idx, 2), 2), x)  # writing the blocks back: no change
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def block_grid(size: Sequence[int], block: int) -> tuple[int, int, int]:
    """Blocks per axis, ``ceil(size / block)``."""
    if block < 1:
        raise ValueError(f"block side must be >= 1, got {block}")
    return tuple(math.ceil(int(s) / block) for s in size)  # type: ignore[return-value]


def block_coords(idx: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid coordinates ``(i, j, k)`` of block numbers ``idx`` (any shape), raster order."""
    _, gy, gx = grid
    return idx // (gy * gx), (idx // gx) % gy, idx % gx


def _rows(idx: torch.Tensor, grid: Sequence[int], block: int, halo: int, padded: Sequence[int],
          batched: bool = True) -> torch.Tensor:
    """Flat row of every voxel of every selected block (halo included) in a channels-last volume
    ``[B, P0, P1, P2, C]`` padded by ``halo`` in front: ``[B, K] -> [B * K * s^3]``, ``s = block + 2 halo``
    (``batched=False``: the voxel's place within its own image, ``[P0, P1, P2]``)."""
    b, _ = idx.shape
    p0, p1, p2 = (int(p) for p in padded)
    i, j, k = block_coords(idx, grid)  # [B, K] each
    batch = torch.arange(b, device=idx.device).view(b, 1) if batched else torch.zeros(1, 1, dtype=idx.dtype,
                                                                                      device=idx.device)
    start = ((batch * p0 + i * block) * p1 + j * block) * p2 + k * block  # [B, K]
    a = torch.arange(block + 2 * halo, device=idx.device)
    offset = (a.view(-1, 1, 1) * p1 + a.view(1, -1, 1)) * p2 + a.view(1, 1, -1)  # [s, s, s]
    return (start.view(-1, 1) + offset.view(1, -1)).view(-1)  # [B * K * s^3]


def _padded_rows(x: torch.Tensor, block: int, halo: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``x`` ``[B, C, D, H, W]`` as channels-last rows ``[B * P0 * P1 * P2, C]``, zero-padded by ``halo`` in front
    and by ``halo`` plus the overhang of the last block behind; and ``(P0, P1, P2)``."""
    grid = block_grid(x.shape[2:], block)
    pad: list[int] = []
    for size, g in zip(reversed(x.shape[2:]), reversed(grid), strict=True):  # F.pad lists the last axis first
        pad += [halo, halo + g * block - size]
    xl = x.permute(0, 2, 3, 4, 1)  # [B, C, D, H, W] -> [B, D, H, W, C] (a view: free for channels-last maps)
    if any(pad):
        xl = F.pad(xl, [0, 0, *pad])  # [B, P0, P1, P2, C], zeros outside the map
    return xl.reshape(-1, x.shape[1]), tuple(xl.shape[1:4])  # type: ignore[return-value]


def gather_blocks(x: torch.Tensor, idx: torch.Tensor, block: int, halo: int = 0) -> torch.Tensor:
    """The blocks ``idx`` ``[B, K]`` of ``x`` ``[B, C, D, H, W]`` with ``halo`` voxels around each (zeros outside
    the map): ``[B * K, C, s, s, s]``, ``s = block + 2 halo``, block-major per image, channels-last in memory."""
    b, c = x.shape[:2]
    rows, padded = _padded_rows(x, block, halo)
    s = block + 2 * halo
    picked = rows.index_select(0, _rows(idx, block_grid(x.shape[2:], block), block, halo, padded))  # [B*K*s^3, C]
    return picked.view(b * idx.shape[1], s, s, s, c).permute(0, 4, 1, 2, 3)  # -> [B * K, C, s, s, s]


def scatter_blocks(dst: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, block: int) -> torch.Tensor:
    """Out-of-place inverse of :func:`gather_blocks` without halo: ``dst`` ``[B, C, D, H, W]`` with the blocks
    ``idx`` ``[B, K]`` replaced by ``values`` ``[B * K, C, block, block, block]`` (parts outside the map dropped).
    Differentiable in ``dst`` (outside the blocks) and ``values``; works on ``dst``'s voxels in place of layout, so a
    contiguous ``dst`` (e.g. full-resolution logits) is never transposed, only the refined values are."""
    b, c, *size = dst.shape
    grid = block_grid(size, block)
    padded = [g * block for g in grid]
    overhang = [p - s for p, s in zip(padded, size, strict=True)]
    if any(overhang):
        dst = F.pad(dst, [0, overhang[2], 0, overhang[1], 0, overhang[0]])  # [B, C, P0, P1, P2]
    pos = _rows(idx, grid, block, 0, padded, batched=False)  # [B * K * b^3]: voxel within its own image
    k = idx.shape[1]
    src = values.view(b, k, c, -1).transpose(1, 2).reshape(b, c, -1)  # [B * K, C, b^3] -> [B, C, K * b^3]
    out = dst.flatten(2).scatter(2, pos.view(b, 1, -1).expand(-1, c, -1), src)  # [B, C, P0 * P1 * P2]
    out = out.view(b, c, *padded)
    return out[:, :, : size[0], : size[1], : size[2]] if any(overhang) else out


def inside_mask(idx: torch.Tensor, grid: Sequence[int], size: Sequence[int], block: int, halo: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1 where a voxel of a gathered block (with ``halo``) lies inside the ``size`` map, else 0:
    ``[B, K] -> [B * K, 1, s, s, s]``."""
    s = block + 2 * halo
    t = torch.arange(s, device=idx.device) - halo  # [s]
    flat = idx.reshape(-1)
    axes = []
    for coord, n in zip(block_coords(flat, grid), size, strict=True):
        pos = coord.view(-1, 1) * block + t  # [B * K, s] voxel coordinate along this axis
        axes.append((pos >= 0) & (pos < int(n)))
    mask = axes[0].view(-1, s, 1, 1) & axes[1].view(-1, 1, s, 1) & axes[2].view(-1, 1, 1, s)  # [B * K, s, s, s]
    return mask.unsqueeze(1).to(dtype)


def centre(x: torch.Tensor, trim: int) -> torch.Tensor:
    """``x`` ``[N, C, s, s, s]`` without ``trim`` voxels on every side: ``[N, C, s - 2 trim, ...]`` (a view)."""
    if trim == 0:
        return x
    return x[:, :, trim:-trim, trim:-trim, trim:-trim]
