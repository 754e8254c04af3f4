"""Label boundary bands and the token-level views of them used by TokenSeg (SPEC section 2).

The *boundary band* of a label is the set of voxels within ``radius`` voxels (Chebyshev distance, a cubic
structuring element of edge ``2 * radius + 1``) of a label change. For a binary label it is exactly the dilation
minus the erosion of the foreground; for class indices (``[B, 1, ...]``) and multi-hot regions (``[B, C, ...]``)
it is the union of that band over the classes (a voxel is in the band when its neighbourhood holds two different
values). Volume edges are not boundaries (the pooling pads with -inf).

A token covers a *cell*: a cube of ``stride`` image voxels per axis at its level. Its boundary target is the
fraction of its cell inside the band. The boundary fraction of a selection has two measures:

* ``"touches"``: the share of selected tokens whose cell holds a band voxel (a loose test: at radius 2 a 16^3
  cell touches the 5-voxel band of almost any boundary that passes near it);
* ``"share"``: the mean share of each selected cell that lies inside the band (the band's share of the selected
  volume, each token weighted alike).

Each is reported beside its **chance level**: the expected value of the same measure for cells drawn uniformly at
random, in the same number per level (the per-level quota of the selection). For ``"share"`` that is the band's
share of the volume at every level.
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


MEASURES = ("touches", "share")


def cell_band_values(band: torch.Tensor, stride: int, measure: str = "touches") -> torch.Tensor:
    """Per cell ``[B, N_cells]`` (float): 1/0 whether it touches the band (``"touches"``) or its share inside the
    band (``"share"``)."""
    if measure == "touches":
        return cell_touches_band(band, stride).float()
    if measure == "share":
        return cell_band_fraction(band, stride)
    raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")


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

    def band_values(self, band: torch.Tensor, measure: str = "touches") -> torch.Tensor:
        """``[B, K]`` float: :func:`cell_band_values` of each selected token's cell for ``band`` ``[B, 1, D, H, W]``."""
        out = torch.zeros(self.levels.shape, dtype=torch.float32, device=self.levels.device)
        for level, (stride, grid) in enumerate(zip(self.strides, self.grid_sizes, strict=True)):
            values = cell_band_values(band, stride, measure)  # [B, N_l]
            hit = values.gather(1, _flat_cell(self.cells, grid).clamp_max(values.shape[1] - 1))  # [B, K]
            out = torch.where(self.levels == level, hit, out)
        return out

    def touches_band(self, band: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` bool: whether the cell of each selected token holds a voxel of ``band`` ``[B, 1, D, H, W]``."""
        return self.band_values(band, "touches") > 0

    def chance_band_value(self, band: torch.Tensor, measure: str = "touches") -> torch.Tensor:
        """``[B]``: the expected mean of :meth:`band_values` over cells drawn uniformly at random, as many per level
        as this selection holds."""
        total = torch.zeros(self.levels.shape[0], dtype=torch.float32, device=self.levels.device)
        for level, stride in enumerate(self.strides):
            count = (self.levels == level).sum(1).float()  # [B] tokens of this level
            total = total + count * cell_band_values(band, stride, measure).mean(1)  # [B, N_l] -> [B]
        return total / self.levels.shape[1]


def selected_boundary_fraction(selection: TokenSelection, target: torch.Tensor, radius: int = 2,
                               measure: str = "touches") -> torch.Tensor:
    """Per case ``[B]``: the boundary fraction of the selected tokens for the band of ``target`` (module docstring).

    ``target`` is a reference label (``[B, 1, D, H, W]`` class indices or ``[B, C, D, H, W]`` regions) on the grid
    the selection was computed on; ``measure`` is ``"touches"`` or ``"share"``. The TokenSeg abstract reports more
    than 60 % of the kept tokens near the boundary; read it beside :func:`chance_boundary_fraction`.
    """
    return selection.band_values(boundary_band(target, radius), measure).mean(dim=1)


def chance_boundary_fraction(selection: TokenSelection, target: torch.Tensor, radius: int = 2,
                             measure: str = "touches") -> torch.Tensor:
    """Per case ``[B]``: what :func:`selected_boundary_fraction` gives in expectation for a random selection of the
    same number of cells per level."""
    return selection.chance_band_value(boundary_band(target, radius), measure)


def boundary_report(selection: TokenSelection, target: torch.Tensor, radius: int = 2) -> dict[str, torch.Tensor]:
    """Both measures and their chance levels, per case ``[B]``: keys ``touches``, ``touches_chance``, ``share``,
    ``share_chance``.

    Examples:
        >>> sel = TokenSelection(torch.tensor([[0]]), torch.tensor([[[0, 0, 0]]]), torch.zeros(1, 1), (2,),
        ...                      ((2, 2, 2),))
        >>> label = torch.zeros(1, 1, 4, 4, 4); label[..., 2:] = 1  # a plane between x = 1 and x = 2
        >>> {k: round(float(v), 3) for k, v in boundary_report(sel, label, radius=1).items()}
        {'touches': 1.0, 'touches_chance': 1.0, 'share': 0.5, 'share_chance': 0.5}
    """
    band = boundary_band(target, radius)
    out = {}
    for measure in MEASURES:
        out[measure] = selection.band_values(band, measure).mean(dim=1)
        out[f"{measure}_chance"] = selection.chance_band_value(band, measure)
    return out


def _flat_cell(cells: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``[B, K, 3]`` (z, y, x) cell coordinates -> ``[B, K]`` row-major flat index in ``grid``."""
    return (cells[..., 0] * grid[1] + cells[..., 1]) * grid[2] + cells[..., 2]
