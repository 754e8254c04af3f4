"""Token completion: from a sparse encoding back to all N patch tokens (paper section 2.2, Table 4b).

* :class:`MultiLayerTokenAssembly` (MTA, paper eq. 3; SPEC "MTA"): the groups are the pruned tokens of every stage
  (each after its own LayerNorm) and the final kept tokens with [CLS]; each group gets its own ``Linear(hidden ->
  C)`` and its own zero-initialised learnable [BLK_i] token; every token goes back to its original position, a
  fixed 3D sin-cos position embedding is added (zero row for [CLS]); ``depth`` Transformer blocks, LayerNorm,
  ``Linear(C -> hidden)``; [CLS] is dropped. In STP training each pruned token is multiplied by its
  straight-through ``1 - M`` (``pruned_mask``): ``"before_norm"`` (the authors' code) multiplies before the group's
  LayerNorm, which cancels a per-token scale, so that path gives the scorer almost no gradient (relative size
  ~1e-6) and only the kept tokens train it; ``"after_norm"`` multiplies the normalised token, so both paths do.
* :class:`MaskedTokenCompletion` (MIM baseline): only the final kept tokens are used, one learnable mask token fills
  every pruned position; the same position embedding, blocks, norm and projection follow.

Both return ``[B, N, hidden]`` in raster order of the patch grid; the decoder consumes that one map everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from sparseseg.models.common.vit import LN_EPS, Block, _init_weights
from sparseseg.models.stp_mta.pruning import SparseEncoding, TokenGroup, with_cls

COMPLETIONS = ("mta", "mim")
PRUNED_MASKS = ("before_norm", "after_norm")


def sincos_pos_embed_3d(grid_size: Sequence[int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding ``[(1 +) N, dim]`` in raster order (last axis fastest).

    Each axis gets ``dim / 3`` channels, half sines and half cosines of ``pos * 10000^(-i / (dim / 6))``; the
    [CLS] row (first, when ``cls_token``) is zero. ``dim`` must be divisible by 6."""
    if dim % 6:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 6, got {dim}")
    per_axis = dim // 3
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis // 2))  # [dim/6]
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid_size], indexing="ij")
    parts = []
    for pos in axes:
        angle = pos.reshape(-1, 1) * omega  # [N, 1] x [dim/6] -> [N, dim/6]
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1).float()  # [N, dim]
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)  # [1 + N, dim]
    return emb


def _check_pruned_mask(value: str) -> str:
    if value not in PRUNED_MASKS:
        raise ValueError(f"unknown pruned_mask {value!r}; valid: {', '.join(PRUNED_MASKS)}")
    return value


def _put(dst: torch.Tensor, pos: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """In-place ``dst[b, pos[b, m]] = src[b, m]`` on a freshly allocated ``dst`` ``[B, 1 + N, C]``."""
    return dst.scatter_(1, pos.unsqueeze(-1).expand(-1, -1, dst.shape[-1]), src)


class _Completion(nn.Module):
    """The shared tail: position embedding, Transformer blocks, LayerNorm, projection back, [CLS] dropped."""

    def __init__(self, *, hidden_size: int, grid_size: Sequence[int], width: int, depth: int, num_heads: int,
                 qkv_bias: bool = True, dropout_rate: float = 0.0):
        super().__init__()
        if width % 6:
            raise ValueError(f"completion width must be divisible by 6 (3D sin-cos embedding), got {width}")
        if width % num_heads:
            raise ValueError(f"completion width {width} must be divisible by its number of heads {num_heads}")
        if depth < 0:
            raise ValueError(f"completion depth must be >= 0, got {depth}")
        self.grid_size = tuple(grid_size)
        self.num_tokens = math.prod(self.grid_size)
        self.width = width
        self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid_size, width)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(width, num_heads, 4 * width, qkv_bias, dropout_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.head = nn.Linear(width, hidden_size)

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, C] -> [B, N, hidden]``."""
        z = z + self.pos_embed.to(z.dtype)
        for blk in self.blocks:
            z, _ = blk(z)
        return self.head(self.norm(z[:, 1:]))  # [B, N, C] -> [B, N, hidden]


class MultiLayerTokenAssembly(_Completion):
    """MTA over ``num_groups`` groups (pruning stages + 1): ``SparseEncoding -> [B, N, hidden]``.

    ``pruned_mask``: where the straight-through ``1 - M`` of a pruned group multiplies its tokens, ``"before_norm"``
    (the authors') or ``"after_norm"`` (module docstring). Both are the identity in the forward pass."""

    def __init__(self, *, num_groups: int, hidden_size: int, grid_size: Sequence[int], width: int = 768,
                 depth: int = 1, num_heads: int = 12, qkv_bias: bool = True, dropout_rate: float = 0.0,
                 pruned_mask: str = "before_norm"):
        super().__init__(hidden_size=hidden_size, grid_size=grid_size, width=width, depth=depth,
                         num_heads=num_heads, qkv_bias=qkv_bias, dropout_rate=dropout_rate)
        self.pruned_mask = _check_pruned_mask(pruned_mask)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size, eps=LN_EPS) for _ in range(num_groups - 1))
        self.embeds = nn.ModuleList(nn.Linear(hidden_size, width) for _ in range(num_groups))
        self.blk_tokens = nn.Parameter(torch.zeros(num_groups, width))  # [BLK_i], zero-initialised
        self.apply(_init_weights)

    def _normed(self, g: int, grp: TokenGroup) -> torch.Tensor:
        """Pruned group ``g`` after its LayerNorm, its straight-through mask multiplied in: ``[B, M, hidden]``."""
        if grp.mask is None:
            return self.norms[g](grp.tokens)
        mask = grp.mask.unsqueeze(-1).to(grp.tokens.dtype)  # [B, M, 1]
        if self.pruned_mask == "before_norm":
            return self.norms[g](grp.tokens * mask)  # the norm cancels the per-token scale, and its gradient
        return self.norms[g](grp.tokens) * mask

    def forward(self, enc: SparseEncoding) -> torch.Tensor:
        if len(enc.pruned) != len(self.norms):
            raise ValueError(f"MTA was built for {len(self.norms)} pruned groups, got {len(enc.pruned)}")
        b, c = enc.final.shape[0], self.width
        final = self.embeds[-1](enc.final) + self.blk_tokens[-1]  # [B, 1 + K, hidden] -> [B, 1 + K, C]
        groups = [self.embeds[g](self._normed(g, grp)) + self.blk_tokens[g] for g, grp in enumerate(enc.pruned)]
        if enc.keep_weight is None:  # disjoint groups: each position written once
            z = final.new_empty(b, 1 + self.num_tokens, c)
            _put(z, with_cls(enc.keep_idx), final)
            for grp, feats in zip(enc.pruned, groups, strict=True):
                _put(z, grp.idx + 1, feats)
        else:  # every group holds all N tokens in order; memberships weight them (DynamicViT training)
            cls_w = enc.keep_weight.new_ones(b, 1)
            z = final * torch.cat([cls_w, enc.keep_weight], 1).unsqueeze(-1)  # [B, 1 + N, C]
            for grp, feats in zip(enc.pruned, groups, strict=True):
                z = z + torch.cat([feats.new_zeros(b, 1, c), feats * grp.weight.unsqueeze(-1)], 1)
        return self._finish(z)


class MaskedTokenCompletion(_Completion):
    """MIM-style completion: final kept tokens + one learnable mask token elsewhere: ``-> [B, N, hidden]``."""

    def __init__(self, *, hidden_size: int, grid_size: Sequence[int], width: int = 768, depth: int = 1,
                 num_heads: int = 12, qkv_bias: bool = True, dropout_rate: float = 0.0):
        super().__init__(hidden_size=hidden_size, grid_size=grid_size, width=width, depth=depth,
                         num_heads=num_heads, qkv_bias=qkv_bias, dropout_rate=dropout_rate)
        self.embed = nn.Linear(hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, enc: SparseEncoding) -> torch.Tensor:
        b, c = enc.final.shape[0], self.width
        final = self.embed(enc.final)  # [B, 1 + K, hidden] -> [B, 1 + K, C]
        mask = self.mask_token.to(final.dtype).expand(b, 1 + self.num_tokens, c)  # [B, 1 + N, C]
        if enc.keep_weight is None:
            pos = with_cls(enc.keep_idx)
            z = mask.scatter(1, pos.unsqueeze(-1).expand(-1, -1, c), final)  # [B, 1 + N, C]
        else:
            w = torch.cat([enc.keep_weight.new_ones(b, 1), enc.keep_weight], 1).unsqueeze(-1)  # [B, 1 + N, 1]
            z = final * w + mask * (1.0 - w)
        return self._finish(z)


def build_completion(kind: str, *, num_groups: int, hidden_size: int, grid_size: Sequence[int], width: int,
                     depth: int, num_heads: int, qkv_bias: bool = True, dropout_rate: float = 0.0,
                     pruned_mask: str = "before_norm") -> _Completion:
    """``"mta"`` or ``"mim"`` (which reads no pruned tokens, so ``pruned_mask`` does not apply to it); raises
    ValueError naming an unknown kind or ``pruned_mask``."""
    _check_pruned_mask(pruned_mask)
    common = dict(hidden_size=hidden_size, grid_size=grid_size, width=width, depth=depth, num_heads=num_heads,
                  qkv_bias=qkv_bias, dropout_rate=dropout_rate)
    if kind == "mta":
        return MultiLayerTokenAssembly(num_groups=num_groups, pruned_mask=pruned_mask, **common)
    if kind == "mim":
        return MaskedTokenCompletion(**common)
    raise ValueError(f"unknown completion {kind!r}; valid completions: {', '.join(COMPLETIONS)}")
