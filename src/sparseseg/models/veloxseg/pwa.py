"""VeloxSeg's transformer stream: paired window attention (PWA), its window geometry and per-modality layers.

Layout: the stream keeps one token map per modality, channels last, ``[B, M, D, H, W, C]`` (a ViT's ``[B, N, C]``
per modality), so LayerNorms reduce over contiguous channels and the per-modality linear maps (the authors' 1x1
convolutions, one per modality) are one batched matmul (:class:`ModalLinear`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Size3 = tuple[int, int, int]
SPATIAL = (-4, -3, -2)  # the D, H, W axes of a token map [B, M, D, H, W, C]


# ----------------------------------------------------------------------------------------------- window geometry


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


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """``[L, L]`` index into a table of the ``(2 wd - 1)(2 wh - 1)(2 ww - 1)`` relative offsets of two tokens of a
    window of ``L = wd * wh * ww`` tokens (raster order), as in Swin Transformer."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in window), indexing="ij")).flatten(1)  # [3, L]
    offsets = coords[:, :, None] - coords[:, None, :]  # [3, L, L], each in [-(n - 1), n - 1]
    index = torch.zeros(offsets.shape[1:], dtype=torch.long)
    for offset, n in zip(offsets, window, strict=True):
        index = index * (2 * n - 1) + offset + n - 1
    return index  # [L, L]


# ------------------------------------------------------------------------------------------------ pure functions


def merge_cells(x: torch.Tensor) -> torch.Tensor:
    """Gather each 2^3 cell of a token map into channels: ``[B, M, D, H, W, C] -> [B, M, D/2, H/2, W/2, 8 * C]``,
    the 8 offsets major, the channels minor (Swin's patch merging order)."""
    b, m, d, h, w, c = x.shape
    x = x.view(b, m, d // 2, 2, h // 2, 2, w // 2, 2, c)  # [B, M, D/2, 2, H/2, 2, W/2, 2, C]
    x = x.permute(0, 1, 2, 4, 6, 3, 5, 7, 8)  # [B, M, D/2, H/2, W/2, 2, 2, 2, C]
    return x.reshape(b, m, d // 2, h // 2, w // 2, 8 * c)  # [B, M, D/2, H/2, W/2, 8C]


def max_pool(x: torch.Tensor, window: Sequence[int], axes: Sequence[int] = SPATIAL) -> torch.Tensor:
    """Non-overlapping max pooling of the three ``axes`` of ``x`` by ``window`` (``F.max_pool3d`` on those axes).

    Without autograd on the CPU it is taken one axis at a time as element-wise maxima of the strided sub-grids: the
    same values (NaN included), no layout copies, any strides. Under autograd ``max_pool3d`` itself: its gradient
    goes to one of tied maxima, ``torch.maximum``'s would split it.
    """
    if all(w == 1 for w in window):
        return x
    axes = [a % x.dim() for a in axes]
    if x.device.type != "cpu" or torch.is_grad_enabled():
        moved = x.movedim(axes, (-3, -2, -1))  # [..., D, H, W]
        y = F.max_pool3d(moved.reshape(-1, 1, *moved.shape[-3:]), tuple(window), tuple(window))  # [N, 1, d, h, w]
        return y.view(*moved.shape[:-3], *y.shape[-3:]).movedim((-3, -2, -1), axes)
    for axis, step in zip(axes, window, strict=True):
        if step > 1:
            x = x.unflatten(axis, (x.shape[axis] // step, step))  # [..., n / step, step, ...]
            x = functools.reduce(torch.maximum, x.unbind(axis + 1))
    return x


def upsample_in_windows(
    x: torch.Tensor, tokens: Sequence[int], window: Sequence[int], axes: Sequence[int] = SPATIAL
) -> torch.Tensor:
    """Trilinear upsampling (corners aligned) of every window of ``tokens`` on the three ``axes`` to ``window``, each
    window on its own: an axis of ``N * t`` becomes ``N * w``.

    The same values as ``F.interpolate(mode="trilinear", align_corners=True)`` applied to each window separately,
    computed one axis at a time as a weighted mean of two gathered neighbours (element-wise work only: no window
    partitioning, and nothing a MAC counter would see).
    """
    axes = [a % x.dim() for a in axes]
    for axis, n, size in zip(axes, tokens, window, strict=True):
        if size == n:
            continue
        position = torch.arange(size, device=x.device, dtype=torch.float32) * ((n - 1) / max(size - 1, 1))
        low = position.floor().clamp_(max=n - 1)
        after = x.dim() - axis - 1  # axes after this one, before the window axis is split
        weight = (position - low).to(x.dtype).view(size, *(1,) * after)
        low = low.long()
        high = (low + 1).clamp_(max=n - 1)
        x = x.unflatten(axis, (x.shape[axis] // n, n))  # [..., N, n, ...]
        x = torch.lerp(x.index_select(axis + 1, low), x.index_select(axis + 1, high), weight).flatten(axis, axis + 1)
    return x


ATTENTION_BLOCK_SCORES = 2**17  # scores per block of windows at CPU inference: 512 KiB, half a core's L2


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """``dropout(softmax(q k^T / sqrt(d) + bias)) v`` over ``[windows, heads, tokens, d]``; ``v`` may be wider than
    ``q`` and ``k``. ``bias`` (``[heads, L, L]``) is added to every ``L x L`` block of the scores (``tokens = M * L``:
    the same bias for every pair of modalities).

    On CUDA PyTorch's SDPA. Elsewhere (CPU, and the meta device used for MAC counting, so the count is that of these
    same products) two matmuls and a softmax, which are faster on the CPU for many short windows of narrow heads
    than SDPA with a mask (docs/veloxseg.md); without autograd the windows run in blocks whose scores stay in the
    cache.
    """
    tokens = q.shape[-2]
    if q.is_cuda:
        mask = None if bias is None else bias.to(q.dtype).repeat(1, tokens // bias.shape[-1], tokens // bias.shape[-1])
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
        return torch.matmul(p, v)  # [windows, heads, tokens, dv]

    q = q * q.shape[-1] ** -0.5
    per_window = q[0].numel() // q.shape[-1] * tokens  # heads * tokens * tokens
    block = max(1, ATTENTION_BLOCK_SCORES // per_window)
    if torch.is_grad_enabled() or torch.jit.is_tracing() or q.shape[0] <= block:
        return attend(q, k, v).contiguous()
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for qb, kb, vb, ob in zip(q.split(block), k.split(block), v.split(block), out.split(block), strict=True):
        ob.copy_(attend(qb, kb, vb))
    return out  # [windows, heads, tokens, dv]


# ------------------------------------------------------------------------------------------------------- modules


class ModalLayerNorm(nn.Module):
    """LayerNorm over the channels of each token, with an affine per modality: ``[B, M, ..., C] -> same``."""

    def __init__(self, num_modalities: int, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(num_modalities, channels))
        self.bias = nn.Parameter(torch.zeros(num_modalities, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One affine LayerNorm per modality: faster on the CPU than a plain one followed by the modalities' affine.
        parts = [F.layer_norm(x[:, i : i + 1], (self.channels,), w, b, self.eps)
                 for i, (w, b) in enumerate(zip(self.weight, self.bias, strict=True))]  # [B, 1, ..., C] each
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # [B, M, ..., C]


class ModalLinear(nn.Module):
    """One linear map per modality (the authors' per-modality 1x1 convolutions) as one batched matmul:
    ``[B, M, N, in_features] -> [B, M, N, out_features]``; ``weight`` is ``[M, out_features, in_features]``."""

    def __init__(self, num_modalities: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_modalities, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_modalities, out_features)) if bias else None
        for w in self.weight:  # nn.Linear's initialisation, per modality
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight.transpose(1, 2))  # [B, M, N, out]
        return y if self.bias is None else y + self.bias[:, None, :]


class ModalPatchMerging(nn.Module):
    """Transformer-stream 2x downsampling, per modality: each 2^3 cell's ``8 C`` channels, LayerNorm, then a linear
    map (no bias) to ``out_channels``: ``[B, M, D, H, W, C] -> [B, M, D / 2, H / 2, W / 2, out_channels]``."""

    def __init__(self, channels: int, out_channels: int, num_modalities: int) -> None:
        super().__init__()
        self.norm = ModalLayerNorm(num_modalities, 8 * channels)
        self.reduction = ModalLinear(num_modalities, 8 * channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = self.norm(merge_cells(x))  # [B, M, D/2, H/2, W/2, 8C]
        return self.reduction(cells.flatten(2, 4)).view(*cells.shape[:-1], -1)  # [B, M, D/2, H/2, W/2, C_out]


class PairedWindowAttention(nn.Module):
    """Paired window attention over the tokens of all modalities: ``[B, M, D, H, W, C] -> [B, M, D, H, W, C]``.

    Every scale ``s`` (a pair of :func:`paired_windows`) owns ``num_heads`` heads: a linear projection at full
    resolution to its queries and keys (``head_dim`` wide) and values (``value_dim`` wide), each then max-pooled by
    the scale's small window and cut into big windows of ``L`` pooled tokens. The windows of all modalities are
    concatenated (joint, cross-modal attention over ``M * L`` tokens) and those of all scales are stacked, so one
    attention call (:func:`window_attention`) with a learned relative position bias (one table per head, shared by
    the scales and by every pair of modalities) serves the stage. Each window's output is upsampled trilinearly
    (corners aligned) back over its big window, the scales are concatenated and mixed per modality linearly.

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
        self.num_heads, self.head_dim = num_heads, head_dim
        self.value_dim = math.ceil(channels / need) * need // (scales * num_heads)
        self.attn_dropout_rate = attn_dropout_rate
        # Per modality, scale-major: [scales, heads, (q: head_dim, k: head_dim, v: value_dim)].
        self.qkv = ModalLinear(m, channels, scales * num_heads * (2 * head_dim + self.value_dim))
        self.proj = ModalLinear(m, scales * num_heads * self.value_dim, channels)
        self.relative_position_bias = nn.Parameter(torch.zeros(math.prod(2 * n - 1 for n in self.tokens), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias, std=0.02)
        self.register_buffer("relative_index", relative_position_index(self.tokens), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """``[heads, L, L]``: the table's bias for every pair of tokens of a window."""
        length = self.relative_index.shape[0]
        bias = self.relative_position_bias[self.relative_index.view(-1)]  # [L * L, heads]
        return bias.view(length, length, -1).permute(2, 0, 1)  # [heads, L, L]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m, *spatial, c = x.shape
        h, dq, dv, scales = self.num_heads, self.head_dim, self.value_dim, len(self.windows)
        nd, nh, nw = self.tokens
        qkv = self.qkv(x.view(b, m, -1, c)).view(b, m, *spatial, scales, h, 2 * dq + dv)  # [B, M, D, H, W, S, h, e]
        queries, keys, values, grids = [], [], [], []
        for s, (_, small) in enumerate(self.windows):
            pooled = max_pool(qkv[..., s, :, :], small, axes=(2, 3, 4))  # [B, M, P1, P2, P3, h, 2dq+dv]
            grid = tuple(p // n for p, n in zip(pooled.shape[2:5], self.tokens, strict=True))  # windows per axis
            t = pooled.view(b, m, grid[0], nd, grid[1], nh, grid[2], nw, h, 2 * dq + dv)
            t = t.permute(0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # [B, N1, N2, N3, h, M, nd, nh, nw, 2dq+dv]
            t = t.reshape(-1, h, m * nd * nh * nw, 2 * dq + dv)  # [B*nWin, h, M*L, 2dq+dv]
            queries.append(t[..., :dq])
            keys.append(t[..., dq : 2 * dq])
            values.append(t[..., 2 * dq :])
            grids.append(grid)
        dropout_p = self.attn_dropout_rate if self.training else 0.0
        out = window_attention(torch.cat(queries), torch.cat(keys), torch.cat(values), self.position_bias(), dropout_p)
        scale_maps = []
        for o, grid, (big, _) in zip(out.split([math.prod(g) * b for g in grids]), grids, self.windows, strict=True):
            o = o.view(b, *grid, h, m, nd, nh, nw, dv).permute(0, 5, 1, 6, 2, 7, 3, 8, 4, 9)
            o = o.reshape(b, m, grid[0] * nd, grid[1] * nh, grid[2] * nw, h * dv)  # [B, M, P1, P2, P3, h*dv]
            scale_maps.append(upsample_in_windows(o, self.tokens, big))  # [B, M, D, H, W, h*dv]
        mixed = torch.cat(scale_maps, -1)  # [B, M, D, H, W, S*h*dv]
        return self.proj(mixed.view(b, m, -1, mixed.shape[-1])).view_as(x)  # [B, M, D, H, W, C]


class PWABlock(nn.Module):
    """One transformer-stream block (VeloxSeg) on ``[B, M, D, H, W, C]``: ``x + (x + Dropout(PWA(LN(x))))`` (the
    attention's own residual and the block's: the input counts twice), then ``x + FFN(LN(x))`` with
    ``FFN = Dropout(W2 Dropout(GELU(W1 .)))``, every map per modality.
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
            ModalLinear(m, channels, channels * expansion),
            nn.GELU(),
            nn.Dropout(dropout_rate),
            ModalLinear(m, channels * expansion, channels),
            nn.Dropout(dropout_rate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + (x + self.drop(self.attn(self.norm1(x))))
        b, m, *_, c = x.shape
        return x + self.mlp(self.norm2(x).view(b, m, -1, c)).view_as(x)
