"""Building blocks of VeloxSeg: JL-guided convolution (JLC), paired window attention (PWA) and their pure helpers.

Layout conventions: feature maps are ``[B, C, D, H, W]``. The transformer stream keeps one feature map per
modality stacked along channels, ``[B, M * C, D, H, W]`` (modality-major), so per-modality linear maps are grouped
1x1 convolutions with ``groups = M``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseseg.models.common.context import eager_cpu
from sparseseg.models.common.norms import affine_instance_norm

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


def window_partition(x: torch.Tensor, window: Size3) -> torch.Tensor:
    """Cut a map into non-overlapping windows: ``[B, C, D, H, W] -> [B * nW, wd * wh * ww, C]``.

    Windows are ordered batch-major then in raster order; tokens inside a window in raster order.
    """
    b, c, d, h, w = x.shape
    wd, wh, ww = window
    x = x.view(b, c, d // wd, wd, h // wh, wh, w // ww, ww)  # [B, C, nD, wd, nH, wh, nW, ww]
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, nD, nH, nW, wd, wh, ww, C]
    return x.reshape(-1, wd * wh * ww, c)  # [B * nWin, wd*wh*ww, C]


def window_reverse(windows: torch.Tensor, window: Size3, spatial: Size3) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, wd * wh * ww, C] -> [B, C, D, H, W]``."""
    wd, wh, ww = window
    d, h, w = spatial
    c = windows.shape[-1]
    x = windows.view(-1, d // wd, h // wh, w // ww, wd, wh, ww, c)  # [B, nD, nH, nW, wd, wh, ww, C]
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, nD, wd, nH, wh, nW, ww]
    return x.reshape(-1, c, d, h, w)  # [B, C, D, H, W]


def _max_pool_axes(x: torch.Tensor, step: Size3) -> torch.Tensor:
    """Non-overlapping max pooling of ``[B, C, D, H, W]`` by ``step``, one axis at a time, as element-wise maxima of
    the strided sub-grids (exactly ``F.max_pool3d(x, step, step)``, NaN included)."""
    for axis, s in zip((2, 3, 4), step, strict=True):
        if s > 1:
            x = x.unflatten(axis, (x.shape[axis] // s, s))  # [..., n / s, s, ...]
            x = functools.reduce(torch.maximum, x.unbind(axis + 1))
    return x


def upsample_nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest upsampling of ``[B, C, D, H, W]`` by whole factors to ``size``, one axis at a time (last first) by
    broadcasting: exactly ``F.interpolate(x, size, mode="nearest")``, about 2.5x faster on the CPU (VeloxSeg's
    first stage at 96^3: 0.21 against 0.52 ms for its three upsampled scales, one thread)."""
    for axis in (4, 3, 2):
        factor = size[axis - 2] // x.shape[axis]
        if factor > 1:
            x = x.unsqueeze(axis + 1).expand(*x.shape[: axis + 1], factor, *x.shape[axis + 1 :]).flatten(axis, axis + 1)
    return x.contiguous()  # flattening a broadcast axis of length 1 is a view


def max_pool_pyramid(x: torch.Tensor, windows: Sequence[Size3]) -> list[torch.Tensor]:
    """``F.max_pool3d(x, w, w)`` for every window ``w`` (non-overlapping max pooling), each map pooled from the
    previous one where that window nests in the current one (the max of maxima is the max).

    On eager CPU PyTorch's channels-first kernel is ~10x slower than its channels-last one, so training pools a
    channels-last copy; inference, without autograd, pools with :func:`_max_pool_axes`, which needs no layout copy
    (VeloxSeg's ``[1, 32, 24^3]`` pyramid 2, 4, 8, one thread: 0.33 ms, against 0.85 ms channels-last). Its gradient
    would split ties between the maxima, where ``max_pool3d`` gives all to one, hence training keeps the latter.
    """
    maps, prev, prev_window = [], x, (1, 1, 1)
    for window in windows:
        if all(w % p == 0 for w, p in zip(window, prev_window, strict=True)):
            source, step = prev, tuple(w // p for w, p in zip(window, prev_window, strict=True))
        else:
            source, step = x, tuple(window)
        if step != (1, 1, 1) and eager_cpu(source) and not torch.is_grad_enabled():
            source = _max_pool_axes(source, step)
        elif step != (1, 1, 1):
            layout = torch.channels_last_3d if eager_cpu(source) else torch.contiguous_format
            source = F.max_pool3d(source.contiguous(memory_format=layout), step, step).contiguous()
        maps.append(source)
        prev, prev_window = source, tuple(window)
    return maps


ATTENTION_BLOCK_SCORES = 2**17  # scores per block of windows at CPU inference: 512 KiB, half a core's L2


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over ``[windows, heads, tokens, d]``.

    PyTorch's SDPA, except on eager CPU, where two batched matmuls and a softmax are faster for many short windows
    of narrow heads: the second product is taken as ``(v^T p^T)^T``, whose rows are ``tokens`` long instead of
    ``d``, and without autograd the windows run in blocks whose scores stay in the cache (VeloxSeg's first stage at
    96^3: 585 windows of 54 tokens with ``d = 4``; one thread, the product with ``v`` in blocks of 44 windows:
    0.08 against 0.21 ms a block; the attention 7.9 ms in SDPA, 6.7 in blocks before this transposition).
    MAC counting runs on the meta device and so goes through SDPA and its registered formula.
    """
    if not eager_cpu(q):
        return F.scaled_dot_product_attention(q, k, v)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)  # [windows, heads, tokens, tokens]
        return torch.matmul(v.transpose(-1, -2), p.transpose(-1, -2)).transpose(-1, -2)  # [windows, heads, tokens, d]

    q = q * q.shape[-1] ** -0.5
    per_window = q[0].numel() // q.shape[-1] * k.shape[-2]  # heads * tokens * tokens
    block = max(1, ATTENTION_BLOCK_SCORES // per_window)
    if torch.is_grad_enabled() or q.shape[0] <= block:
        return attend(q, k, v).contiguous()
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for qb, kb, vb, ob in zip(q.split(block), k.split(block), v.split(block), out.split(block), strict=True):
        ob.copy_(attend(qb, kb, vb))
    return out  # [windows, heads, tokens, d]


def _tiles(side: int, window: int) -> bool:
    """A local (non-global) window: it tiles the axis and is smaller than it."""
    return window < side and side % window == 0


def paired_windows(spatial: Sequence[int], num_scales: int, ratio: int = 3) -> list[tuple[Size3, Size3]]:
    """The (big window, small window) pair of every PWA scale on a map of size ``spatial`` (D, H, W).

    Per axis of length ``n``, scale ``k`` has big window ``ratio * 2^k`` while that window tiles the axis and is
    shorter than it, else the whole axis; the coarsest scale ``num_scales - 1`` is always global. The small window
    is ``big / ratio``: max-pooling a big window by its small window leaves ``ratio^3`` tokens (27 for the
    default), so every scale yields windows of the same length and all scales share one attention call.

    Raises:
        ValueError: when an axis is not a multiple of ``ratio`` (no window of ``ratio^3`` pooled tokens tiles it).
    """
    if num_scales < 1:
        raise ValueError(f"num_scales must be >= 1, got {num_scales}")
    if any(n < ratio or n % ratio != 0 for n in spatial):
        raise ValueError(
            f"a feature map of size {tuple(spatial)} cannot be tiled by PWA windows of {ratio}^3 pooled tokens: "
            f"each side must be a multiple of {ratio}"
        )
    pairs = []
    for k in range(num_scales):
        local = k < num_scales - 1
        big = tuple(ratio * 2**k if local and _tiles(n, ratio * 2**k) else n for n in spatial)
        small = tuple(wb // ratio for wb in big)
        pairs.append((big, small))  # type: ignore[arg-type]
    return pairs


def num_pwa_scales(side: int, ratio: int = 3) -> int:
    """Scales on an axis of ``side``: local windows ``ratio * 2^k`` double while they tile it, plus the global one."""
    if side < ratio or side % ratio != 0:
        raise ValueError(f"a feature map side of {side} is not a multiple of the PWA window ratio {ratio}")
    scales = 1
    while _tiles(side, ratio * 2 ** (scales - 1)):
        scales += 1
    return scales


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

    Three parallel grouped convolutions (kernels 1, 3, 5; ``group_channels`` channels per group, the JL lower
    bound on the width that preserves pairwise distances), each followed by InstanceNorm + GELU, are summed with
    the input; then a residual 1x1 feed-forward network with ``expansion``.
    """

    def __init__(self, channels: int, group_channels: int, expansion: int, kernels: Sequence[int] = (1, 3, 5)) -> None:
        super().__init__()
        if channels % group_channels != 0:
            raise ValueError(f"channels {channels} must be divisible by group_channels {group_channels}")
        groups = channels // group_channels
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(channels, channels, k, padding=k // 2, groups=groups, bias=False),
                affine_instance_norm(channels),
                nn.GELU(),
            )
            for k in kernels
        )
        self.ffn = nn.Sequential(
            affine_instance_norm(channels),
            nn.Conv3d(channels, channels * expansion, 1),
            nn.GELU(),
            nn.Conv3d(channels * expansion, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + sum(branch(x) for branch in self.branches)
        return x + self.ffn(x)


class PairedWindowAttention(nn.Module):
    """Paired window attention over the tokens of all modalities: ``[B, M * C, D, H, W] -> [B, M * C, D, H, W]``.

    Each scale ``k`` (see :func:`paired_windows`) max-pools the map by its small window, projects the pooled
    tokens to its own ``num_heads`` heads of width ``head_dim`` (its slice of the q/k/v channels), and cuts the
    pooled map into windows of ``ratio^3`` tokens. The windows of every modality are concatenated (joint, cross-
    modal attention over ``M * ratio^3`` tokens) and the windows of every scale are stacked along the batch, so
    one attention call (:func:`window_attention`) serves all scales. Each output token is copied back over its small
    window (nearest upsampling inside the big window); the scales' outputs are concatenated and mixed per
    modality by a 1x1 convolution.
    """

    def __init__(
        self, channels: int, num_modalities: int, num_scales: int, num_heads: int, head_dim: int, ratio: int = 3
    ) -> None:
        super().__init__()
        self.channels, self.num_modalities, self.num_scales = channels, num_modalities, num_scales
        self.num_heads, self.head_dim, self.ratio = num_heads, head_dim, ratio
        m, inner = num_modalities, num_heads * head_dim
        self.qkv = nn.ModuleList(nn.Conv3d(m * channels, m * 3 * inner, 1, groups=m) for _ in range(num_scales))
        self.proj = nn.Conv3d(m * num_scales * inner, m * channels, 1, groups=m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, spatial = x.shape[0], [int(n) for n in x.shape[2:]]  # window sizes are constants of an exported graph
        m, h, hd, r3 = self.num_modalities, self.num_heads, self.head_dim, self.ratio**3
        pairs = paired_windows(spatial, self.num_scales, self.ratio)
        queries, keys, values, layouts = [], [], [], []
        pooled_maps = max_pool_pyramid(x, [small for _, small in pairs])  # [B, M*C, P1, P2, P3] per scale
        for (_, small), pooled, qkv in zip(pairs, pooled_maps, self.qkv, strict=True):
            t = window_partition(qkv(pooled), (self.ratio,) * 3)  # [B*nW, r^3, M*3*h*hd]
            t = t.view(t.shape[0], r3, m, 3, h, hd).permute(3, 0, 4, 2, 1, 5)  # [3, B*nW, h, M, r^3, hd]
            t = t.reshape(3, -1, h, m * r3, hd)  # [3, B*nW, h, M*r^3, hd]
            queries.append(t[0])
            keys.append(t[1])
            values.append(t[2])
            layouts.append((t.shape[1], tuple(pooled.shape[2:]), small))
        # One attention call for every window of every scale: [sum of nW, h, M*r^3, hd].
        out = window_attention(torch.cat(queries), torch.cat(keys), torch.cat(values))
        scales = []
        for o, (n_win, pooled_size, small) in zip(out.split([lay[0] for lay in layouts]), layouts, strict=True):
            o = o.view(n_win, h, m, r3, hd).permute(0, 3, 2, 1, 4).reshape(n_win, r3, m * h * hd)  # [nW, r^3, M*h*hd]
            o = window_reverse(o, (self.ratio,) * 3, pooled_size)  # [B, M*h*hd, P1, P2, P3]
            if small != (1, 1, 1):  # F.interpolate where autograd records it, or off the CPU
                fast = eager_cpu(o) and not torch.is_grad_enabled()
                o = upsample_nearest(o, spatial) if fast else F.interpolate(o, size=tuple(spatial), mode="nearest")
            scales.append(o.view(b, m, h * hd, *spatial))  # [B, M, h*hd, D, H, W]
        return self.proj(torch.cat(scales, dim=2).flatten(1, 2))  # [B, M*S*h*hd, ...] -> [B, M*C, D, H, W]


class PWABlock(nn.Module):
    """Transformer-stream block: depthwise positional conv, pre-norm PWA and a pre-norm per-modality MLP.

    ``[B, M * C, D, H, W] -> [B, M * C, D, H, W]``; every linear map is per modality (grouped).
    """

    def __init__(
        self,
        channels: int,
        num_modalities: int,
        num_scales: int,
        num_heads: int,
        head_dim: int,
        mlp_ratio: int,
        ratio: int = 3,
    ) -> None:
        super().__init__()
        mc = num_modalities * channels
        # Attention inside 27-token windows is blind to token order; a depthwise conv gives it position.
        self.pos = nn.Conv3d(mc, mc, 3, padding=1, groups=mc)
        self.norm1 = ModalLayerNorm(num_modalities, channels)
        self.attn = PairedWindowAttention(channels, num_modalities, num_scales, num_heads, head_dim, ratio)
        self.norm2 = ModalLayerNorm(num_modalities, channels)
        self.mlp = nn.Sequential(
            nn.Conv3d(mc, mc * mlp_ratio, 1, groups=num_modalities),
            nn.GELU(),
            nn.Conv3d(mc * mlp_ratio, mc, 1, groups=num_modalities),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
