"""TokenSeg's sparse-to-dense decoder: token reprojection, progressive upsampling and skip connections, with the fine
levels computed only in the cells of the kept tokens (docs/tokenseg.md, "Sparse-to-dense decoder").

Levels are numbered as in the encoder (0 = 1/2 ... 3 = 1/16); ``cells[l]`` / ``tokens[l]`` are the kept tokens of
level ``l``. Coarse to fine, each level's input map is

    x_l = fill_l + up(y_{l+1}) + reprojection of the level-l tokens into their cells + skip_l,

where ``up`` is a 1^3 convolution followed by nearest x2 and the bottleneck (level 3) also gets a projection of the
mean kept token (global context). The two coarse levels (1/16, 1/8) are decoded densely (a residual block each: at
most 1 728 voxels at 96^3) and a 1^3 head on the 1/8 map gives the **coarse prediction**, upsampled trilinearly to
1/2 resolution and by nearest neighbour to full resolution. The fine levels (1/4, 1/2) update their map by a
residual :class:`~.blocks.RefineBlock` only in the cells of kept tokens of coarser levels, and the full-resolution
:class:`~.blocks.Head` runs only in the cells of all kept tokens, where it adds its correction to the coarse
prediction. Everything else is the coarse prediction. So the fine levels cost in proportion to the tokens kept,
per level quota, not to the volume.

``skips`` decides what the encoder may add to the decoder (``skip_l``):

* ``"sparse"`` (default): detail finer than a kept token, inside that token's cell, and only where the decoder is
  sparse: the encoder map of a fine level (1/4, 1/2) only inside the cells of kept tokens of coarser levels, and
  the image (a 1^3 conv) only inside the cells of kept tokens. The dense coarse levels, whose prediction is the
  answer wherever no token was kept, see the tokens alone (a skip there would spread through their convolutions
  into cells no token covers), and a token's own cell never gets the un-quantised encoder feature it was made from.
* ``"dense"``: the encoder maps and the image everywhere (a U-Net's skips; the tokens can then be bypassed).
* ``"none"``: tokens only.

With ``dense=True`` every refinement runs on the whole map instead (the same weights); that equals the sparse path
wherever the sparse path computed, and everywhere when the kept cells cover the volume (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseseg.models.tokenseg.blocks import Head, RefineBlock, ResBlock
from sparseseg.models.tokenseg.cells import block_count_, cell_corners, cell_map, gather_blocks, scatter_blocks_

SKIPS = ("sparse", "dense", "none")
COARSE_LEVEL = 2  # the coarse prediction is made at 1/8


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")  # [B, C, d, h, w] -> [B, C, 2d, 2h, 2w]


def _crop(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[..., n:-n, n:-n, n:-n]


class SparseDecoder(nn.Module):
    """``forward(image, features, tokens, cells) -> logits [B, out_channels, D, H, W]``.

    Args:
        channels: widths at full resolution, 1/2, 1/4, 1/8, 1/16 (5 entries; the encoder's level widths follow).
        out_channels, in_channels: classes and image channels.
        token_size: width of the kept tokens.
        grid_sizes: cell grid of each level, finest first.
        norm_name: norm of the two dense residual blocks.
        skips: ``"sparse"``, ``"dense"`` or ``"none"`` (module docstring).
    """

    def __init__(self, channels: Sequence[int], out_channels: int, in_channels: int, token_size: int,
                 grid_sizes: Sequence[tuple[int, int, int]], norm_name: str = "instance", skips: str = "sparse"
                 ) -> None:
        super().__init__()
        if skips not in SKIPS:
            raise ValueError(f"skips must be one of {', '.join(SKIPS)}, got {skips!r}")
        ch = list(channels)
        self.skips = skips
        self.grid_sizes = tuple(tuple(g) for g in grid_sizes)
        levels = range(len(self.grid_sizes))
        self.reproject = nn.ModuleList(nn.Linear(token_size, ch[lv + 1]) for lv in levels)
        self.fill = nn.ParameterList(nn.Parameter(torch.zeros(ch[lv + 1])) for lv in levels)
        self.context = nn.Linear(token_size, ch[-1])
        # no bias: a gathered block's zero halo stays zero through the conv, as zero padding of the whole map would
        self.up = nn.ModuleList(nn.Conv3d(ch[lv + 1], ch[lv], 1, bias=False) for lv in levels)
        self.dense = nn.ModuleList(ResBlock(ch[lv + 1], norm_name) for lv in levels[COARSE_LEVEL:])
        self.coarse_head = nn.Conv3d(ch[COARSE_LEVEL + 1], out_channels, 1)
        self.refine = nn.ModuleList(RefineBlock(ch[lv + 1]) for lv in levels[:COARSE_LEVEL])
        self.image_skip = nn.Conv3d(in_channels, ch[0], 1)
        self.head = Head(ch[0], out_channels)

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor], tokens: Sequence[torch.Tensor],
                cells: Sequence[torch.Tensor], dense: bool = False) -> torch.Tensor:
        """``image`` ``[B, in, D, H, W]``; ``features[l]`` ``[B, C_l, *grid_l]``; ``tokens[l]`` ``[B, k_l, T]`` and
        ``cells[l]`` ``[B, k_l]`` (flat cells in ``grid_l``) of the kept tokens of each level."""
        keep = [cell_map(c, g, features[0]) for c, g in zip(cells, self.grid_sizes, strict=True)]  # [B, 1, *grid_l]
        cover = torch.zeros_like(keep[-1])  # kept cells of the levels coarser than the current one, on its grid
        context = self.context(torch.cat(list(tokens), 1).mean(1))  # [B, K, T] -> [B, C_top]
        y, coarse = None, None
        for level in reversed(range(len(self.grid_sizes))):
            x = self._level_input(level, y, features[level], tokens[level], cells[level], cover)
            if level == len(self.grid_sizes) - 1:
                x = x + context[..., None, None, None].to(x.dtype)
            if level >= COARSE_LEVEL:
                y = self.dense[level - COARSE_LEVEL](x)
                if level == COARSE_LEVEL:
                    coarse = self.coarse_head(y)  # [B, out, *grid_2]
            else:
                y = self._refine(level, x, cells, dense)
            covered = torch.maximum(cover, keep[level])  # kept cells of this level and the coarser ones
            cover = _up2(covered) if level else covered
        return self._full_resolution(image, y, cover, cells, coarse, dense)

    def _level_input(self, level: int, y: torch.Tensor | None, feature: torch.Tensor, tokens: torch.Tensor,
                     cells: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        """``x_l``: fill + upsampled coarser map + the level's tokens in their cells + the encoder skip."""
        x = torch.zeros_like(feature) + self.fill[level].to(feature.dtype).view(1, -1, 1, 1, 1)  # [B, C_l, *grid]
        if y is not None:
            x = x + _up2(self.up[level + 1](y)).to(x.dtype)
        if self.skips == "dense":
            x = x + feature
        elif self.skips == "sparse" and level < COARSE_LEVEL:  # the coarse prediction is the tokens' alone
            x = x + feature * cover
        src = self.reproject[level](tokens).transpose(1, 2).to(x.dtype)  # [B, k, C_l] -> [B, C_l, k]
        return x.flatten(2).scatter_add(2, cells[:, None].expand(-1, x.shape[1], -1), src).view_as(x)

    def _refine(self, level: int, x: torch.Tensor, cells: Sequence[torch.Tensor], dense: bool) -> torch.Tensor:
        """``x + RefineBlock(x)`` in the cells of the kept tokens of coarser levels (everywhere when ``dense``)."""
        block, halo = self.refine[level], RefineBlock.HALO
        if dense:
            return x + block(F.pad(x, (halo,) * 6))
        groups = [(cells_l, 2 ** (lv - level), self.grid_sizes[lv])  # a level-lv cell is 2^(lv - level) voxels here
                  for lv, cells_l in enumerate(cells) if lv > level and cells_l.shape[1]]
        return _add_block_means(x.clone(), groups, lambda corners, side: block(gather_blocks(x, corners, side, halo)))

    def _full_resolution(self, image: torch.Tensor, y: torch.Tensor, covered: torch.Tensor,
                         cells: Sequence[torch.Tensor], coarse: torch.Tensor, dense: bool) -> torch.Tensor:
        """Coarse prediction everywhere, plus the head's correction in the cells of the kept tokens.

        ``y`` is the 1/2 map, ``covered`` ``[B, 1, *grid_0]`` the kept cells of all levels on the 1/2 grid. Blocks
        are gathered from the 1/2 map and upsampled inside the block, so no full-resolution feature map is made.
        """
        # trilinear to 1/2, then nearest: half the time of trilinear to full resolution, a 2-voxel step at most
        half_logits = F.interpolate(coarse, scale_factor=2**COARSE_LEVEL, mode="trilinear", align_corners=False)
        logits = _up2(half_logits)  # [B, out, D, H, W]
        mask = covered if self.skips == "sparse" else torch.ones_like(covered)  # where the image may enter
        if dense:
            f = _up2(self.up[0](y))
            if self.skips != "none":
                f = f + self.image_skip(image) * _up2(mask).to(f.dtype)
            return logits + self.head(F.pad(f, (Head.HALO,) * 6)).to(logits.dtype)

        def head(corners: torch.Tensor, side: int) -> torch.Tensor:  # corners and side at full resolution
            half, s = corners // 2, side // 2
            f = _crop(_up2(self.up[0](gather_blocks(y, half, s, 1))), 1)  # [B k, C_0, side + 2, ...]
            if self.skips != "none":
                m = _crop(_up2(gather_blocks(mask, half, s, 1)), 1)  # [B k, 1, side + 2, ...]
                f = f + self.image_skip(gather_blocks(image, corners, side, Head.HALO)) * m.to(f.dtype)
            return self.head(f)

        groups = [(cells_l, 2 ** (lv + 1), self.grid_sizes[lv]) for lv, cells_l in enumerate(cells) if cells_l.shape[1]]
        return _add_block_means(logits, groups, head)


def _add_block_means(out: torch.Tensor, groups: list[tuple[torch.Tensor, int, tuple[int, int, int]]],
                     compute: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``out`` ``[B, C, D, H, W]`` (a fresh tensor, not read again) plus ``compute(corners, side)`` ``[B k, C, side,
    side, side]`` for each group ``(cells [B, k], side, grid)``, each voxel's sum divided by the number of blocks
    covering it: where blocks overlap they hold the same values, so the voxel gets that value once."""
    shape = tuple(out.shape[2:])
    corners = [cell_corners(c, grid, side) for c, side, grid in groups]  # [B, k, 3] each
    flat = out.flatten(2)  # [B, C, D*H*W], written in place below
    count = torch.zeros_like(flat[:, :1])  # [B, 1, D*H*W]
    for (_, side, _), cor in zip(groups, corners, strict=True):
        count = block_count_(count, cor, side, shape)
    count = count.view(-1, 1, *shape)
    for (_, side, _), cor in zip(groups, corners, strict=True):
        values = compute(cor, side)  # [B k, C, side, side, side]
        flat = scatter_blocks_(flat, values / gather_blocks(count, cor, side).to(values.dtype), cor, shape)
    return flat.view(-1, flat.shape[1], *shape)
