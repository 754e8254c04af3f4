"""Label boundary bands and the token-level views of them used by TokenSeg (SPEC section 2).

The *boundary band* of a label is the set of voxels within ``radius`` voxels (Chebyshev distance, a cubic
structuring element of edge ``2 * radius + 1``) of a label change. For a binary label it is exactly the dilation
minus the erosion of the foreground; for class indices (``[B, 1, ...]``) and multi-hot regions (``[B, C, ...]``)
it is the union of that band over the classes (a voxel is in the band when its neighbourhood holds two different
values). Volume edges are not boundaries (the pooling pads with -inf).

A token covers a *cell*: a cube of ``stride`` image voxels per axis at its level. Its boundary target is the
fraction of its cell inside the band; it *touches* the band when that fraction is positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def boundary_band(target: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Boolean band ``[B, 1, D, H, W]`` of voxels within ``radius`` of a label change.

    ``target``: class indices ``[B, 1, D, H, W]`` or multi-hot regions ``[B, C, D, H, W]`` (any dtype).

    Examples:
        >>> cube = torch.zeros(1, 1, 8, 8, 8); cube[..., 2:6, 2:6, 2:6] = 1
        >>> int(boundary_band(cube, radius=1).sum())  # 6^3 dilation - 2^3 erosion
        208
    """
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    t = target.float()
    high = _cube_max(t, radius)  # [B, C, D, H, W] dilation
    low = -_cube_max(-t, radius)  # [B, C, D, H, W] erosion
    return (high != low).any(dim=1, keepdim=True)  # [B, 1, D, H, W]


def _cube_max(t: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over a ``(2r+1)^3`` cube as three 1-D max pools (exact: the cube is separable, 3k instead of k^3)."""
    k = 2 * radius + 1
    for kernel, pad in (((k, 1, 1), (radius, 0, 0)), ((1, k, 1), (0, radius, 0)), ((1, 1, k), (0, 0, radius))):
        t = F.max_pool3d(t, kernel, stride=1, padding=pad)
    return t


def cell_band_fraction(band: torch.Tensor, stride: int) -> torch.Tensor:
    """Fraction of each ``stride^3`` cell inside the band: ``[B, 1, D, H, W] -> [B, D*H*W / stride^3]``."""
    return F.avg_pool3d(band.float(), stride, stride).flatten(1)  # [B, 1, d, h, w] -> [B, N_cells]


def cell_touches_band(band: torch.Tensor, stride: int) -> torch.Tensor:
    """Whether each ``stride^3`` cell holds a band voxel: ``[B, 1, D, H, W] -> [B, N_cells]`` (bool)."""
    return F.max_pool3d(band.float(), stride, stride).flatten(1) > 0  # [B, N_cells]


@dataclass
class TokenSelection:
    """The tokens an importance scorer kept, in a form a picture can draw.

    ``levels`` ``[B, K]`` (0 = finest level, stride ``strides[0]``), ``cells`` ``[B, K, 3]`` (z, y, x) in the grid
    of the token's level, ``scores`` ``[B, K]`` (log importance), ``grid_sizes`` the cell grid of every level.
    A token of level ``l`` at cell ``c`` covers image voxels ``c * strides[l]`` to ``(c + 1) * strides[l]``.
    """

    levels: torch.Tensor
    cells: torch.Tensor
    scores: torch.Tensor
    strides: tuple[int, ...]
    grid_sizes: tuple[tuple[int, int, int], ...]

    def level_maps(self) -> list[torch.Tensor]:
        """One boolean map per level, ``[B, *grid_sizes[l]]``: True at the selected cells of that level."""
        maps = []
        b = self.levels.shape[0]
        for level, grid in enumerate(self.grid_sizes):
            flat = _flat_cell(self.cells, grid)  # [B, K]
            hit = torch.zeros(b, grid[0] * grid[1] * grid[2] + 1, dtype=torch.bool, device=self.cells.device)
            slot = torch.where(self.levels == level, flat, torch.full_like(flat, hit.shape[1] - 1))  # [B, K]
            hit.scatter_(1, slot, True)
            maps.append(hit[:, :-1].reshape(b, *grid))  # [B, N_l] -> [B, d, h, w]
        return maps

    def voxel_map(self) -> torch.Tensor:
        """``[B, D, H, W]`` int map at image resolution: 1 + the finest selected level covering a voxel, 0 if none."""
        out = None
        maps = self.level_maps()
        for level in reversed(range(len(self.grid_sizes))):  # coarse first, finer levels painted over
            m = maps[level].float()[:, None]  # [B, 1, d, h, w]
            up = F.interpolate(m, scale_factor=self.strides[level], mode="nearest")[:, 0] > 0  # [B, D, H, W]
            value = torch.full(up.shape, level + 1, dtype=torch.long, device=up.device)
            out = torch.where(up, value, out if out is not None else torch.zeros_like(value))
        return out

    def touches_band(self, band: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` bool: whether the cell of each selected token holds a voxel of ``band`` ``[B, 1, D, H, W]``."""
        touch = torch.zeros(self.levels.shape, dtype=torch.bool, device=self.levels.device)
        for level, (stride, grid) in enumerate(zip(self.strides, self.grid_sizes, strict=True)):
            cell_touch = cell_touches_band(band, stride)  # [B, N_l]
            hit = cell_touch.gather(1, _flat_cell(self.cells, grid).clamp_max(cell_touch.shape[1] - 1))  # [B, K]
            touch = torch.where(self.levels == level, hit, touch)
        return touch


def selected_boundary_fraction(selection: TokenSelection, target: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Per case ``[B]``: the fraction of selected tokens whose cell touches the boundary band of ``target``.

    ``target`` is a reference label (``[B, 1, D, H, W]`` class indices or ``[B, C, D, H, W]`` regions) on the grid
    the selection was computed on. The TokenSeg abstract reports more than 60 % of the kept tokens near the boundary.
    """
    return selection.touches_band(boundary_band(target, radius)).float().mean(dim=1)


def _flat_cell(cells: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``[B, K, 3]`` (z, y, x) cell coordinates -> ``[B, K]`` row-major flat index in ``grid``."""
    return (cells[..., 0] * grid[1] + cells[..., 1]) * grid[2] + cells[..., 2]
