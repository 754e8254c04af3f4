"""Building blocks of VeloxSeg: JL-guided convolution (JLC), paired window attention (PWA) and their pure helpers.

Layout conventions: feature maps are ``[B, C, D, H, W]``. The transformer stream keeps one feature map per
modality stacked along channels, ``[B, M * C, D, H, W]`` (modality-major), so per-modality linear maps are grouped
1x1 convolutions with ``groups = M`` (the same parameters as one convolution per modality).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Size3 = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------- pure functions


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """3-D pixel shuffle: ``[B, C * r^3, D, H, W] -> [B, C, D * r, H * r, W * r]`` with ``r = factor``."""
    b, cr3, d, h, w = x.shape
    c = cr3 // factor**3
    if c * factor**3 != cr3:
        raise ValueError(f"channels {cr3} are not divisible by factor^3 = {factor**3}")
    x = x.view(b, c, factor, factor, factor, d, h, w)  # [B, C, r, r, r, D, H, W]
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, C, D, r, H, r, W, r]
    return x.reshape(b, c, d * factor, h * factor, w * factor)  # [B, C, D*r, H*r, W*r]


def space_to_depth_3d(x: torch.Tensor, num_groups: int = 1) -> torch.Tensor:
    """Gather each 2^3 cell into channels, per group of channels (modality):
    ``[B, G * C, D, H, W] -> [B, G * 8 * C, D / 2, H / 2, W / 2]``; within a group the 8 offsets are major, the
    channels minor."""
    b, gc, d, h, w = x.shape
    x = x.view(b, num_groups, gc // num_groups, d // 2, 2, h // 2, 2, w // 2, 2)  # [B, G, C, D/2, 2, H/2, 2, W/2, 2]
    x = x.permute(0, 1, 4, 6, 8, 2, 3, 5, 7)  # [B, G, 2, 2, 2, C, D/2, H/2, W/2]
    return x.reshape(b, gc * 8, d // 2, h // 2, w // 2)  # [B, G * 8 * C, D/2, H/2, W/2]


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Cut a map into non-overlapping windows: ``[B, C, D, H, W] -> [B * nW, wd * wh * ww, C]``.

    Windows are ordered batch-major then in raster order; tokens inside a window in raster order.
    """
    b, c, d, h, w = x.shape
    wd, wh, ww = window
    x = x.view(b, c, d // wd, wd, h // wh, wh, w // ww, ww)  # [B, C, nD, wd, nH, wh, nW, ww]
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, nD, nH, nW, wd, wh, ww, C]
    return x.reshape(-1, wd * wh * ww, c)  # [B * nWin, wd*wh*ww, C]


def window_reverse(windows: torch.Tensor, window: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, wd * wh * ww, C] -> [B, C, D, H, W]``."""
    wd, wh, ww = window
    d, h, w = spatial
    c = windows.shape[-1]
    x = windows.view(-1, d // wd, h // wh, w // ww, wd, wh, ww, c)  # [B, nD, nH, nW, wd, wh, ww, C]
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, nD, wd, nH, wh, nW, ww]
    return x.reshape(-1, c, d, h, w)  # [B, C, D, H, W]


def max_pool(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Non-overlapping max pooling of the last three axes of ``[..., D, H, W]`` by ``window`` (``F.max_pool3d``).

    Without autograd on the CPU it is taken one axis at a time as element-wise maxima of the strided sub-grids: the
    same values (NaN included), no layout copies, any strides, and several times faster than PyTorch's
    channels-first CPU kernel (docs/veloxseg.md). Under autograd ``max_pool3d`` is kept: its gradient goes to one
    of tied maxima, ``torch.maximum``'s would split it.
    """
    if all(w == 1 for w in window):
        return x
    if x.device.type != "cpu" or torch.is_grad_enabled():
        y = F.max_pool3d(x.reshape(-1, 1, *x.shape[-3:]), tuple(window), tuple(window))  # [N, 1, d, h, w]
        return y.view(*x.shape[:-3], *y.shape[-3:])
    for axis, step in zip((-3, -2, -1), window, strict=True):
        if step > 1:
            x = x.unflatten(axis, (x.shape[axis] // step, step))  # [..., n / step, step, ...]
            x = functools.reduce(torch.maximum, x.unbind(axis))
    return x


def upsample_in_windows(x: torch.Tensor, tokens: Sequence[int], window: Sequence[int]) -> torch.Tensor:
    """Trilinear upsampling (corners aligned) of every window of ``tokens`` on the last three axes to ``window``,
    each window on its own: ``[..., N1 * t1, N2 * t2, N3 * t3] -> [..., N1 * w1, N2 * w2, N3 * w3]``.

    The same values as ``F.interpolate(mode="trilinear", align_corners=True)`` applied to each window separately,
    computed one axis at a time as a weighted mean of two gathered neighbours (element-wise work only: no window
    partitioning, and nothing a MAC counter would see).
    """
    for axis, n, size in zip((-3, -2, -1), tokens, window, strict=True):
        if size == n:
            continue
        position = torch.arange(size, device=x.device, dtype=torch.float32) * ((n - 1) / max(size - 1, 1))
        low = position.floor().clamp_(max=n - 1)
        weight = (position - low).to(x.dtype).view(size, *(1,) * (-axis - 1))  # broadcasts over later axes
        low = low.long()
        high = (low + 1).clamp_(max=n - 1)
        x = x.unflatten(axis, (x.shape[axis] // n, n))  # [..., N, n, ...]
        x = torch.lerp(x.index_select(axis, low), x.index_select(axis, high), weight).flatten(axis - 1, axis)
    return x


ATTENTION_BLOCK_SCORES = 2**17  # scores per block of windows at CPU inference: 512 KiB, half a core's L2


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """``dropout(softmax(q k^T / sqrt(d) + bias)) v`` over ``[windows, heads, tokens, d]``; ``v`` may be wider than
    ``q`` and ``k``. ``bias`` (``[heads, L, L]``) is added to every ``L x L`` block of the scores (``tokens = M * L``:
    the same bias for every pair of modalities).

    On CUDA PyTorch's SDPA. Elsewhere (CPU, and the meta device used for MAC counting, so the count is that of these
    same products) two matmuls and a softmax, which are faster on the CPU for many short windows of narrow heads: the
    second product is taken as ``(v^T p^T)^T``, whose rows are ``tokens`` long instead of ``d``, and without autograd
    the windows run in blocks whose scores stay in the cache.
    """
    tokens = q.shape[-2]
    if q.is_cuda:
        mask = None if bias is None else bias.repeat(1, tokens // bias.shape[-1], tokens // bias.shape[-1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2))  # [windows, heads, tokens, tokens]
        if bias is not None:
            n, length = tokens // bias.shape[-1], bias.shape[-1]
            scores = scores.view(*scores.shape[:2], n, length, n, length)  # [windows, heads, M, L, M, L]
            scores = scores.add_(bias[:, None, :, None, :]).view(*scores.shape[:2], tokens, tokens)
        p = scores.softmax(-1)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        return torch.matmul(v.transpose(-1, -2), p.transpose(-1, -2)).transpose(-1, -2)  # [windows, heads, tokens, dv]

    q = q * q.shape[-1] ** -0.5
    per_window = q[0].numel() // q.shape[-1] * tokens  # heads * tokens * tokens
    block = max(1, ATTENTION_BLOCK_SCORES // per_window)
    if torch.is_grad_enabled() or torch.jit.is_tracing() or q.shape[0] <= block:
        return attend(q, k, v).contiguous()
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for qb, kb, vb, ob in zip(q.split(block), k.split(block), v.split(block), out.split(block), strict=True):
        ob.copy_(attend(qb, kb, vb))
    return out  # [windows, heads, tokens, dv]


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """``[L, L]`` index into a table of the ``(2 wd - 1)(2 wh - 1)(2 ww - 1)`` relative offsets of two tokens of a
    window of ``L = wd * wh * ww`` tokens (raster order), as in Swin Transformer."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in window), indexing="ij")).flatten(1)  # [3, L]
    offsets = coords[:, :, None] - coords[:, None, :]  # [3, L, L], each in [-(n - 1), n - 1]
    index = torch.zeros(offsets.shape[1:], dtype=torch.long)
    for offset, n in zip(offsets, window, strict=True):
        index = index * (2 * n - 1) + offset + n - 1
    return index  # [L, L]


def paired_windows(
    spatial: Sequence[int], window_size: Sequence[int], small_window_size: Sequence[int] = (1, 1, 1)
) -> list[tuple[Size3, Size3]]:
    """The (big window, small window) pair of every PWA scale on a map of size ``spatial`` (D, H, W).

    Scale 0 is ``(window_size, small_window_size)``; both double at every further scale while the big window still
    fits the map along some axis. Max-pooling a big window by its small window leaves ``window_size /
    small_window_size`` tokens per axis at every scale, so all scales share one attention call.

    Raises:
        ValueError: when a big window does not tile the map or a small window does not tile its big window.
    """
    big, small = tuple(window_size), tuple(small_window_size)
    if any(b % s for b, s in zip(big, small, strict=True)) or min(small) < 1:
        raise ValueError(f"the small window {small} must tile the window {big}")
    pairs = []
    while any(b <= n for b, n in zip(big, spatial, strict=True)):
        pairs.append((big, small))
        big, small = tuple(2 * b for b in big), tuple(2 * s for s in small)
    check_windows(spatial, pairs)
    return pairs  # type: ignore[return-value]


def check_windows(spatial: Sequence[int], pairs: Sequence[tuple[Size3, Size3]]) -> None:
    """Raise ValueError unless every big window of ``pairs`` tiles a map of size ``spatial``."""
    bad = [big for big, _ in pairs if any(n % b for n, b in zip(spatial, big, strict=True))]
    if not pairs or bad:
        raise ValueError(
            f"a feature map of size {tuple(spatial)} cannot be tiled by the PWA windows "
            f"{[big for big, _ in pairs] or 'of this stage'}: each side must be a multiple of every window"
        )


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm without affine (``nn.InstanceNorm3d(channels)``, VeloxSeg's norm) as ``GroupNorm`` with one group
    per channel: the same result and eps, no parameters either, faster on contiguous CPU maps."""
    return nn.GroupNorm(channels, channels, affine=False)


def conv_norm(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Convolution (padding ``kernel_size // 2``) + instance norm: VeloxSeg's stem, downsampling and adapters."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
        instance_norm(out_channels),
    )


# --------------------------------------------------------------------------------------------------------- modules


class ModalLayerNorm(nn.Module):
    """LayerNorm over the ``C`` channels of each token of each modality of a ``[B, M * C, D, H, W]`` map."""

    def __init__(self, num_modalities: int, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_modalities, self.channels, self.eps = num_modalities, channels, eps
        self.weight = nn.Parameter(torch.ones(num_modalities * channels))
        self.bias = nn.Parameter(torch.zeros(num_modalities * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.view(x.shape[0], self.num_modalities, self.channels, -1)  # [B, M, C, D*H*W]
        # Two plain reductions: torch.var_mean over a middle dimension is ~10x slower on CPU.
        centered = y - y.mean(2, keepdim=True)
        rstd = torch.rsqrt(centered.square().mean(2, keepdim=True) + self.eps)
        y = centered * rstd if torch.is_grad_enabled() else centered.mul_(rstd)  # autograd keeps `centered`
        weight, bias = (p.view(1, self.num_modalities, self.channels, 1) for p in (self.weight, self.bias))
        return torch.addcmul(bias, y, weight).view_as(x)  # [B, M * C, D, H, W]


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


class ModalPatchMerging(nn.Module):
    """Transformer-stream 2x downsampling, per modality: each 2^3 cell's ``8 C`` channels, LayerNorm, then a linear
    map (no bias) to ``out_channels``: ``[B, M * C, D, H, W] -> [B, M * out_channels, D / 2, H / 2, W / 2]``."""

    def __init__(self, channels: int, out_channels: int, num_modalities: int) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.norm = ModalLayerNorm(num_modalities, 8 * channels)
        self.reduction = nn.Conv3d(num_modalities * 8 * channels, num_modalities * out_channels, 1,
                                   groups=num_modalities, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(space_to_depth_3d(x, self.num_modalities)))


class PairedWindowAttention(nn.Module):
    """Paired window attention over the tokens of all modalities: ``[B, M * C, D, H, W] -> [B, M * C, D, H, W]``.

    Every scale ``s`` (a pair of :func:`paired_windows`) owns ``num_heads`` heads: a 1x1 projection at full
    resolution to its queries and keys (``head_dim`` wide) and values (``value_dim`` wide), each then max-pooled by
    the scale's small window and cut into big windows of ``L`` pooled tokens. The windows of all modalities are
    concatenated (joint, cross-modal attention over ``M * L`` tokens) and those of all scales are stacked, so one
    attention call (:func:`window_attention`) with a learned relative position bias (one table per head, shared by
    the scales and by every pair of modalities) serves the stage. Each window's output is upsampled trilinearly
    (corners aligned) back over its big window, the scales are concatenated and mixed per modality by a 1x1 conv.

    ``value_dim``: the value channels ``ceil(C / n) * n`` with ``n = scales * num_heads * head_dim``, split over the
    scales and heads, so the values keep at least the input width (4, 8, 16, 32 per head in the authors' setting).
    """

    def __init__(
        self, channels: int, num_modalities: int, windows: Sequence[tuple[Size3, Size3]], num_heads: int,
        head_dim: int, attn_dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.windows = [(tuple(big), tuple(small)) for big, small in windows]
        self.tokens = tuple(b // s for b, s in zip(*self.windows[0], strict=True))  # per window side, every scale
        if any(tuple(b // s for b, s in zip(big, small, strict=True)) != self.tokens for big, small in self.windows):
            raise ValueError(f"every scale must pool its window to the same tokens, got {self.windows}")
        m, scales = num_modalities, len(self.windows)
        need = scales * num_heads * head_dim
        self.num_modalities, self.num_heads, self.head_dim = m, num_heads, head_dim
        self.value_dim = math.ceil(channels / need) * need // (scales * num_heads)
        self.attn_dropout_rate = attn_dropout_rate
        # Per modality, scale-major: [scales, heads, (q: head_dim, k: head_dim, v: value_dim)].
        self.qkv = nn.Conv3d(m * channels, m * scales * num_heads * (2 * head_dim + self.value_dim), 1, groups=m)
        self.proj = nn.Conv3d(m * scales * num_heads * self.value_dim, m * channels, 1, groups=m)
        self.relative_position_bias = nn.Parameter(torch.zeros(math.prod(2 * n - 1 for n in self.tokens), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias, std=0.02)
        self.register_buffer("relative_index", relative_position_index(self.tokens), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """``[heads, L, L]``: the table's bias for every pair of tokens of a window."""
        length = self.relative_index.shape[0]
        bias = self.relative_position_bias[self.relative_index.view(-1)]  # [L * L, heads]
        return bias.view(length, length, -1).permute(2, 0, 1)  # [heads, L, L]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        m, h, dq, dv, scales = self.num_modalities, self.num_heads, self.head_dim, self.value_dim, len(self.windows)
        nd, nh, nw = self.tokens
        qkv = self.qkv(x).view(b, m, scales, h, 2 * dq + dv, *spatial)  # [B, M, S, h, 2dq+dv, D, H, W]
        queries, keys, values, grids = [], [], [], []
        for s, (_, small) in enumerate(self.windows):
            pooled = max_pool(qkv[:, :, s], small)  # [B, M, h, 2dq+dv, P1, P2, P3]
            grid = tuple(p // n for p, n in zip(pooled.shape[-3:], self.tokens, strict=True))  # windows per axis
            t = pooled.view(b, m, h, 2 * dq + dv, grid[0], nd, grid[1], nh, grid[2], nw)
            t = t.permute(0, 4, 6, 8, 2, 1, 5, 7, 9, 3)  # [B, N1, N2, N3, h, M, nd, nh, nw, 2dq+dv]
            t = t.reshape(-1, h, m * nd * nh * nw, 2 * dq + dv)  # [B*nWin, h, M*L, 2dq+dv]
            queries.append(t[..., :dq])
            keys.append(t[..., dq : 2 * dq])
            values.append(t[..., 2 * dq :])
            grids.append(grid)
        dropout_p = self.attn_dropout_rate if self.training else 0.0
        out = window_attention(torch.cat(queries), torch.cat(keys), torch.cat(values), self.position_bias(), dropout_p)
        scale_maps = []
        for o, grid, (big, _) in zip(out.split([math.prod(g) * b for g in grids]), grids, self.windows, strict=True):
            o = o.view(b, *grid, h, m, nd, nh, nw, dv).permute(0, 5, 4, 9, 1, 6, 2, 7, 3, 8)
            o = o.reshape(b, m, h * dv, grid[0] * nd, grid[1] * nh, grid[2] * nw)  # [B, M, h*dv, P1, P2, P3]
            scale_maps.append(upsample_in_windows(o, self.tokens, big))  # [B, M, h*dv, D, H, W]
        mixed = torch.stack(scale_maps, 2)  # [B, M, S, h*dv, D, H, W]
        return self.proj(mixed.view(b, -1, *spatial))  # [B, M*S*h*dv, D, H, W] -> [B, M*C, D, H, W]


class PWABlock(nn.Module):
    """One transformer-stream block (VeloxSeg), per modality of a ``[B, M * C, D, H, W]`` map:
    ``x + (x + Dropout(PWA(LN(x))))`` (the attention's own residual and the block's: the input counts twice), then
    ``x + FFN(LN(x))`` with ``FFN = Dropout(W2 Dropout(GELU(W1 .)))``.
    """

    def __init__(
        self, channels: int, num_modalities: int, windows: Sequence[tuple[Size3, Size3]], num_heads: int,
        head_dim: int, expansion: int, dropout_rate: float = 0.0, attn_dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        m = num_modalities
        self.norm1 = ModalLayerNorm(m, channels)
        self.attn = PairedWindowAttention(channels, m, windows, num_heads, head_dim, attn_dropout_rate)
        self.drop = nn.Dropout(dropout_rate)
        self.norm2 = ModalLayerNorm(m, channels)
        self.mlp = nn.Sequential(
            nn.Conv3d(m * channels, m * channels * expansion, 1, groups=m),
            nn.GELU(),
            nn.Dropout(dropout_rate),
            nn.Conv3d(m * channels * expansion, m * channels, 1, groups=m),
            nn.Dropout(dropout_rate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (x + self.drop(self.attn(self.norm1(x))))
        return x + self.mlp(self.norm2(x))
