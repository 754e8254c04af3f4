"""Sparse decoding: a UNETR decoder's full-resolution level computed only where it matters (coarse to fine).

Every level below full resolution is decoded densely (:meth:`~.decoders.UnetrDecoder.decode_coarse`). A 1x1x1
*coarse head* reads that half-resolution map and predicts coarse logits; upsampled (trilinear) they are the output
everywhere the decoder does not refine. The full-resolution level (``encoder1`` on the image, the last up block,
the head) runs only on ``K = ceil(refine_fraction x num_blocks)`` cubes of ``block`` voxels per image, each cut out
with the halo its convolutions need (4 voxels of the image, 1 of the half-resolution map), through the same
weights as the dense level, with unpadded convolutions; the refined logits overwrite the fill.

**Where to refine** (``refine_score``): ``"margin"`` ranks blocks by the largest uncertainty of the coarse
prediction inside them, 1 minus the margin between the two most probable classes (softmax) or 1 - |2p - 1| of the
least certain region (sigmoid); ``"entropy"`` by the largest normalised entropy; ``"depth"`` by the STP pruning
depth of the token under the block (kept longest first), ties broken by the margin (the dense ``unetr`` has no
depth: margin alone).

**Instance-norm statistics.** Instance norm normalises with the mean and variance of a channel over the *whole*
map, which gathered blocks do not see. Each norm here takes a weighted mean and variance over the interiors of the
refined blocks (their halos excluded, voxels outside the map excluded), per image and channel, in two passes. The
refined set always contains a regular lattice of blocks (every third block along each axis, a random offset in
training), and the lattice blocks that the score alone would not have chosen stand for the blocks left
unrefined: each gets the weight ``1 + unrefined / (such lattice blocks)``. The statistics are thus exact over the
refined region and a stratified estimate over the rest; at ``refine_fraction`` 1 every block has weight 1 and they
are the dense statistics, so the output equals dense decoding within float32 rounding. Only instance norm
(``"instance"``, with or without affine) is supported.

The dense path (``refine_fraction`` 1 at inference) does not run the coarse head, so its MACs are the paper
model's; in training the coarse logits are always returned for deep supervision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock

from sparseseg.models.common.blocks import block_grid, centre, gather_blocks, inside_mask, scatter_blocks
from sparseseg.models.common.decoders import UnetrDecoder
from sparseseg.models.common.norms import ChannelInstanceNorm3d

REFINE_SCORES = ("margin", "entropy", "depth")
STATISTICS = ("lattice", "refined")
LATTICE_STEP = 3  # every third block along each axis joins the refined set (1/27 of the blocks)
IMAGE_HALO = 4  # voxels around a block: two 3^3 convs in encoder1 and two in the last up block
COARSE_HALO = 1  # half-resolution voxels: the transposed conv doubles it to the 2 the up block's convs need


def uncertainty(logits: torch.Tensor, sigmoid: bool, kind: str = "margin") -> torch.Tensor:
    """Per-voxel uncertainty in [0, 1] of coarse logits ``[B, C, d, h, w] -> [B, d, h, w]``: ``margin`` = 1 - (p1 -
    p2) of the two most probable classes (softmax) or 1 - |2p - 1| of the least certain region (sigmoid);
    ``entropy`` = entropy / log(classes) (softmax) or the largest binary entropy / log 2 (sigmoid)."""
    logits = logits.float()
    if sigmoid:
        p = torch.sigmoid(logits)
        if kind == "entropy":
            h = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)) / math.log(2.0)
            return h.amax(1)
        return (1 - (2 * p - 1).abs()).amax(1)
    p = torch.softmax(logits, 1)
    if kind == "entropy":
        return -(p * torch.log_softmax(logits, 1)).sum(1) / math.log(max(logits.shape[1], 2))
    top = p.topk(min(2, p.shape[1]), dim=1).values  # [B, 2, d, h, w]
    return 1 - (top[:, 0] - top[:, -1]) if top.shape[1] == 2 else torch.zeros_like(top[:, 0])


def block_scores(coarse_logits: torch.Tensor, block: int, sigmoid: bool, kind: str = "margin",
                 depth: torch.Tensor | None = None, patch_size: int | None = None) -> torch.Tensor:
    """Score of every full-resolution block (larger = refine first): ``[B, num_blocks]``.

    ``coarse_logits`` ``[B, C, D/2, H/2, W/2]``; ``block`` the full-resolution block side (even). ``kind="depth"``
    needs the pruning depth ``[B, N]`` of the tokens on the patch grid (``patch_size``): a block scores the largest
    depth of the tokens it overlaps, plus half its margin score (ties)."""
    u = uncertainty(coarse_logits, sigmoid, "entropy" if kind == "entropy" else "margin")
    half = block // 2
    score = F.max_pool3d(u.unsqueeze(1), half, half, ceil_mode=True).flatten(1)  # [B, 1, *grid] -> [B, nb]
    if kind != "depth" or depth is None:
        return score
    full = [2 * s for s in coarse_logits.shape[2:]]
    grid = [s // patch_size for s in full]
    dmap = depth.to(score.dtype).view(depth.shape[0], 1, *grid)  # [B, N] -> [B, 1, gd, gh, gw]
    dmap = F.interpolate(dmap, size=full, mode="nearest")  # the depth of the token over every voxel
    return F.max_pool3d(dmap, block, block, ceil_mode=True).flatten(1) + 0.5 * score


@dataclass
class BlockSelection:
    """Refined blocks ``idx`` ``[B, K]`` (ascending block numbers) and the weight ``[B, K]`` of each in the norm
    statistics (1, or more for a lattice block standing for unrefined ones)."""

    idx: torch.Tensor
    weight: torch.Tensor


def lattice_blocks(grid: tuple[int, int, int], offset: tuple[int, int, int] = (1, 1, 1),
                   step: int = LATTICE_STEP) -> list[int]:
    """Block numbers of the regular lattice ``(offset + step * n)`` along each axis (at least one per axis)."""
    axes = [list(range(min(o, g - 1), g, step)) for o, g in zip(offset, grid, strict=True)]
    return [(i * grid[1] + j) * grid[2] + k for i in axes[0] for j in axes[1] for k in axes[2]]


def select_blocks(scores: torch.Tensor, num: int, lattice: list[int] | None = None) -> BlockSelection:
    """The ``num`` blocks to refine per image from ``scores`` ``[B, nb]``: the ``lattice`` blocks (when given and
    ``num`` holds them twice over) and the highest-scoring others; weights as in the module docstring."""
    b, nb = scores.shape
    num = max(1, min(int(num), nb))
    if not lattice or num < 2 * len(lattice) or num == nb:
        idx = scores.topk(num, dim=1).indices.sort(dim=1).values  # [B, K]
        return BlockSelection(idx, scores.new_ones(idx.shape))
    on_lattice = torch.zeros(nb, dtype=torch.bool, device=scores.device)
    on_lattice[lattice] = True
    ranked = scores.masked_fill(on_lattice, float("inf"))
    top = ranked.topk(num, dim=1)  # lattice first, then the best of the others
    threshold = top.values[:, -1:]  # [B, 1]: the weakest block chosen by its score
    idx, order = top.indices.sort(dim=1)  # [B, K]
    picked_lattice = on_lattice[idx]  # [B, K]
    stands_in = picked_lattice & (scores.gather(1, idx) < threshold)  # lattice blocks the score would not pick
    stands_in = stands_in | (picked_lattice & ~stands_in.any(1, keepdim=True))  # none of them: all lattice blocks
    weight = 1.0 + stands_in.to(scores.dtype) * (nb - num) / stands_in.sum(1, keepdim=True).to(scores.dtype)
    return BlockSelection(idx, weight)


def check_decoder(decoder: UnetrDecoder) -> None:
    """ValueError unless sparse decoding can run ``decoder``'s full-resolution level: instance norms, stride-1
    3^3 / 1^3 convolutions and a 2^3 stride-2 transposed convolution in the last up block."""
    blocks = (decoder.encoder1.layer, decoder.decoder2.conv_block)
    for norm in (getattr(blk, n) for blk in blocks for n in ("norm1", "norm2", "norm3") if hasattr(blk, n)):
        _instance_norm(norm)
    up = decoder.decoder2.transp_conv.conv
    if up.kernel_size != (2, 2, 2) or up.stride != (2, 2, 2):
        raise ValueError("sparse decoding needs the last up block to upsample with a 2^3, stride-2 transposed conv")


def _instance_norm(norm: nn.Module) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
    """eps, weight and bias of a supported norm; ValueError for any other."""
    if isinstance(norm, ChannelInstanceNorm3d):
        return norm.eps, None, None
    if isinstance(norm, nn.InstanceNorm3d) and not norm.track_running_stats:
        return norm.eps, norm.weight, norm.bias
    raise ValueError(f"sparse decoding needs instance norm in the decoder, got {type(norm).__name__}")


class _Blocks:
    """The gathered blocks of one decoding pass: their masks and the weighted instance-norm statistics."""

    def __init__(self, sel: BlockSelection, size: tuple[int, int, int], block: int, dtype: torch.dtype):
        self.sel, self.block = sel, block
        grid = block_grid(size, block)
        self.inside = inside_mask(sel.idx, grid, size, block, IMAGE_HALO, dtype)  # [N, 1, s, s, s]
        partial = any(s % block for s in size)  # only then do block interiors reach outside the map
        self.core_inside = centre(self.inside, IMAGE_HALO) if partial else None
        counts = block**3 if self.core_inside is None else self.core_inside.flatten(1).sum(1).view_as(sel.weight)
        self.count = (sel.weight * counts).sum(1, keepdim=True)  # [B, 1] voxels the statistics stand for

    def mask(self, x: torch.Tensor, halo: int) -> torch.Tensor:
        """Zero the voxels of ``x`` (halo ``halo``) outside the map, as the dense convolution's padding is."""
        return x * centre(self.inside, IMAGE_HALO - halo)

    def _block_sums(self, core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum and sum of squares of every block interior and channel, ``[N, C]`` each (voxels outside the map
        left out). One pass each: ``var_mean`` over the three inner axes of a channels-last block is several times
        slower than two sums."""
        if self.core_inside is not None:
            core = core * self.core_inside
        return core.sum((2, 3, 4)), core.square().sum((2, 3, 4))

    def norm(self, y: torch.Tensor, norm: nn.Module, halo: int, mask: bool = False) -> torch.Tensor:
        """Instance norm of ``y`` ``[N, C, s, s, s]`` (halo ``halo``) with the statistics of the module docstring;
        ``mask``: also zero the voxels outside the map."""
        eps, weight, bias = _instance_norm(norm)
        s1, s2 = self._block_sums(centre(y, halo))  # [N, C] each
        b, k = self.sel.weight.shape
        w = self.sel.weight.view(b, k, 1)
        img_mean = (s1.view(b, k, -1) * w).sum(1) / self.count  # [B, C]
        img_var = ((s2.view(b, k, -1) * w).sum(1) / self.count - img_mean.square()).clamp_min(0.0)
        scale = torch.rsqrt(img_var + eps)
        if weight is not None:
            scale = scale * weight
        shift = (bias if bias is not None else 0.0) - img_mean * scale
        y = torch.addcmul(shift.repeat_interleave(k, 0)[..., None, None, None], y,
                          scale.repeat_interleave(k, 0)[..., None, None, None])  # one pass: (y - mean) * rstd
        return y.mul_(centre(self.inside, IMAGE_HALO - halo)) if mask else y


def _conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MONAI ``Convolution``'s conv with its weights, unpadded: each 3^3 conv trims one voxel per side."""
    layer = conv.conv
    if layer.stride != (1, 1, 1) or layer.groups != 1:
        raise ValueError("sparse decoding needs stride-1 ungrouped convolutions in the full-resolution blocks")
    return F.conv3d(x, layer.weight, layer.bias)


def _res_block(blk: nn.Module, x: torch.Tensor, halo: int, blocks: _Blocks) -> torch.Tensor:
    """MONAI ``UnetResBlock`` on gathered blocks: ``x`` with halo ``halo`` -> output with halo ``halo - 2``."""
    slope = blk.lrelu.negative_slope
    y = F.leaky_relu_(blocks.norm(_conv(blk.conv1, x), blk.norm1, halo - 1, mask=True), slope)
    y = blocks.norm(_conv(blk.conv2, y), blk.norm2, halo - 2)
    residual = centre(x, 2)
    if hasattr(blk, "conv3"):
        residual = _conv(blk.conv3, residual)
    if hasattr(blk, "norm3"):
        residual = blocks.norm(residual, blk.norm3, halo - 2)
    return F.leaky_relu_(y.add_(residual), slope)


def refine_blocks(decoder: UnetrDecoder, x: torch.Tensor, coarse: torch.Tensor, sel: BlockSelection,
                  block: int) -> torch.Tensor:
    """The full-resolution level of ``decoder`` on the selected blocks: image ``x`` ``[B, C_in, D, H, W]``,
    half-resolution map ``coarse`` ``[B, 2F, D/2, H/2, W/2]`` -> logits ``[B * K, out_channels, b, b, b]``."""
    size = tuple(x.shape[2:])
    blocks = _Blocks(sel, size, block, x.dtype)
    image = gather_blocks(x, sel.idx, block, IMAGE_HALO)  # [N, C_in, b + 8, ...], zeros outside the map
    enc1 = blocks.mask(_res_block(decoder.encoder1.layer, image, IMAGE_HALO, blocks), IMAGE_HALO - 2)
    up = decoder.decoder2.transp_conv.conv
    low = gather_blocks(coarse, sel.idx, block // 2, COARSE_HALO)  # [N, 2F, b/2 + 2, ...]
    up = blocks.mask(F.conv_transpose3d(low, up.weight, up.bias, stride=2), 2 * COARSE_HALO)  # [N, F, b + 4, ...]
    y = _res_block(decoder.decoder2.conv_block, torch.cat([up, enc1], 1), 2 * COARSE_HALO, blocks)  # [N, F, b, ...]
    return _conv(decoder.out.conv, y)  # [N, out_channels, b, b, b]


class SparseDecoding(nn.Module):
    """The coarse head and the refinement settings of a UNETR decoder (module docstring).

    Args:
        coarse_channels: channels of the half-resolution map (``2 x feature_size``).
        out_channels: output channels.
        refine_fraction: share of the full-resolution blocks refined, in (0, 1]; 1 = dense decoding. A runtime
            attribute.
        refine_score: ``"margin"`` | ``"entropy"`` | ``"depth"``.
        block_size: full-resolution side of a refined block (even).
        sigmoid: the outputs are independent sigmoid regions (else softmax classes): how uncertainty is read.
        statistics: ``"lattice"`` (module docstring) or ``"refined"`` (the refined blocks alone, no lattice).
    """

    def __init__(self, coarse_channels: int, out_channels: int, *, refine_fraction: float = 1.0,
                 refine_score: str = "margin", block_size: int = 8, sigmoid: bool = False,
                 statistics: str = "lattice"):
        super().__init__()
        if refine_score not in REFINE_SCORES:
            raise ValueError(f"unknown refine_score {refine_score!r}; valid: {', '.join(REFINE_SCORES)}")
        if statistics not in STATISTICS:
            raise ValueError(f"unknown statistics {statistics!r}; valid: {', '.join(STATISTICS)}")
        if block_size < 2 or block_size % 2:
            raise ValueError(f"refine_block must be an even number >= 2, got {block_size}")
        self.coarse_head = UnetOutBlock(3, coarse_channels, out_channels)
        self.refine_fraction = refine_fraction
        self.refine_score, self.block_size, self.sigmoid = refine_score, block_size, sigmoid
        self.statistics = statistics

    @property
    def refine_fraction(self) -> float:
        return self._refine_fraction

    @refine_fraction.setter
    def refine_fraction(self, value: float) -> None:
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"refine_fraction must be in (0, 1], got {value}")
        self._refine_fraction = float(value)

    def num_refined(self, size: tuple[int, ...]) -> int:
        """Blocks refined per image of full-resolution ``size`` at the current fraction."""
        nb = math.prod(block_grid(size, self.block_size))
        return max(1, min(nb, math.ceil(self.refine_fraction * nb - 1e-9)))

    def _lattice(self, grid: tuple[int, int, int], device: torch.device) -> list[int] | None:
        if self.statistics != "lattice":
            return None
        if self.training:  # a random offset, so that every region meets the full-resolution level now and then
            offset = tuple(int(o) for o in torch.randint(0, LATTICE_STEP, (3,)))
            return lattice_blocks(grid, offset)
        return lattice_blocks(grid)

    def select(self, coarse_logits: torch.Tensor, size: tuple[int, ...], depth: torch.Tensor | None = None,
               patch_size: int | None = None) -> BlockSelection:
        """The blocks to refine for coarse logits ``[B, C, D/2, H/2, W/2]`` of a ``size`` output."""
        with torch.no_grad():
            scores = block_scores(coarse_logits, self.block_size, self.sigmoid, self.refine_score, depth,
                                  patch_size)
        grid = block_grid(size, self.block_size)
        return select_blocks(scores, self.num_refined(size), self._lattice(grid, scores.device))

    def forward(self, decoder: UnetrDecoder, x: torch.Tensor, skips: list[torch.Tensor], bottleneck: torch.Tensor,
                depth: torch.Tensor | None = None, patch_size: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, out_channels, D, H, W]`` (contiguous) and the coarse logits ``[B, out_channels, D/2, H/2,
        W/2]`` (None on the dense inference path)."""
        coarse = decoder.decode_coarse(skips, bottleneck)
        dense = self.refine_fraction >= 1.0
        coarse_logits = self.coarse_head(coarse) if self.training or not dense else None
        if dense:
            return decoder.decode_fine(x, coarse).contiguous(), coarse_logits
        size = tuple(x.shape[2:])
        sel = self.select(coarse_logits, size, depth, patch_size)
        refined = refine_blocks(decoder, x, coarse, sel, self.block_size)
        fill = F.interpolate(coarse_logits, scale_factor=2, mode="trilinear", align_corners=False)
        return scatter_blocks(fill, sel.idx, refined, self.block_size).contiguous(), coarse_logits

    def extra_repr(self) -> str:
        return (f"refine_fraction={self.refine_fraction}, refine_score={self.refine_score!r}, "
                f"block_size={self.block_size}, sigmoid={self.sigmoid}")
