"""Plain 3D Vision Transformer (paper section 2, "Preliminary"; SPEC section 1, "Encoder").

Conv3d patch embedding (kernel = stride = patch size), a learnable [CLS] token, a learnable position embedding over
the ``1 + N`` tokens, pre-norm blocks (LayerNorm eps 1e-6, multi-head self-attention with qkv bias through
``torch.nn.functional.scaled_dot_product_attention``, MLP ratio 4 with GELU) and a final LayerNorm. Stochastic depth
(``drop_path_rate``, MONAI's ``DropPath`` on both residual branches) rises linearly from 0 at the first block to
``drop_path_rate`` at the last, as in timm's and the authors' ViT.

Token layout everywhere: ``[B, 1 + N, C]`` with [CLS] first and the N patch tokens in raster order of the patch
grid ``(D / p, H / p, W / p)``.

Two extras serve the pruning ablations (:mod:`sparseseg.models.stp_mta.pruning`):

* ``return_cls_attention=True`` also returns the [CLS] query row of the block's real attention (softmax of
  ``q_cls k^T / sqrt(d)``, averaged over heads), computed beside SDPA at the cost of one query row (EViT scorer);
* ``policy`` ``[B, 1 + N]`` (values in {0, 1} with a straight-through gradient) masks the attention keys of dropped
  tokens, each token still attending to itself (DynamicViT training). This path computes the attention matrix
  explicitly, which is exactly the training cost the paper criticises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath

LN_EPS = 1e-6


def as_3tuple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """``96 -> (96, 96, 96)``; a sequence must have three entries."""
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"{name} must be an int or three ints, got {value!r}")
    return out  # type: ignore[return-value]


def patch_grid(img_size: int | Sequence[int], patch_size: int) -> tuple[int, int, int]:
    """Grid of patches ``img_size / patch_size`` per axis; raises ValueError when a side is not divisible."""
    size = as_3tuple(img_size, "img_size")
    if patch_size < 1 or any(s % patch_size for s in size):
        raise ValueError(f"img_size {size} must be divisible by patch_size {patch_size}")
    return tuple(s // patch_size for s in size)  # type: ignore[return-value]


class Attention(nn.Module):
    """Multi-head self-attention ``[B, L, C] -> [B, L, C]`` through SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, dropout_rate: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout_rate = dropout_rate
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout_rate)

    def forward(
        self, x: torch.Tensor, policy: torch.Tensor | None = None, return_cls_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``[B, L, C]``; ``policy`` ``[B, L]`` key mask or None. Returns the output ``[B, L, C]`` and, when
        asked, the head-averaged attention of the [CLS] query (token 0) to the other tokens ``[B, L - 1]``."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)  # [B, L, 3C] -> [B, L, 3, h, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, d]
        dropout = self.dropout_rate if self.training else 0.0
        if policy is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # [B, h, L, d]
        else:
            out = _policy_attention(q, k, v, policy, dropout)
        cls_attn = None
        if return_cls_attention:
            logits = (q[:, :, :1] * self.head_dim**-0.5) @ k.transpose(-2, -1)  # [B, h, 1, L]
            cls_attn = logits.softmax(-1).mean(1)[:, 0, 1:]  # [B, h, 1, L] -> [B, L - 1]
        out = out.transpose(1, 2).reshape(b, n, c)  # [B, h, L, d] -> [B, L, C]
        return self.proj_drop(self.proj(out)), cls_attn


def _policy_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, dropout: float, eps: float = 1e-6
) -> torch.Tensor:
    """Attention whose weights to dropped keys are zero: ``exp(a_ij) p_j / sum_j exp(a_ij) p_j`` with ``p_ii = 1``.

    Differentiable in ``policy`` ``[B, L]`` (DynamicViT). ``q, k, v`` ``[B, h, L, d]`` -> ``[B, h, L, d]``.
    """
    n = q.shape[2]
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, h, L, L]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)  # [L, L]
    keys = policy[:, None, None, :].to(q.dtype)  # [B, 1, 1, L]
    weight = keys + (1.0 - keys) * eye  # [B, 1, L, L]: a token always sees itself
    logits = logits - logits.amax(-1, keepdim=True).detach()
    attn = logits.exp() * weight
    attn = (attn + eps / n) / (attn.sum(-1, keepdim=True) + eps)
    attn = F.dropout(attn, dropout, training=dropout > 0)
    return attn @ v


class Mlp(nn.Module):
    """``Linear(C, mlp_dim) -> GELU -> Dropout -> Linear(mlp_dim, C) -> Dropout``."""

    def __init__(self, dim: int, mlp_dim: int, dropout_rate: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``.
    ``[B, L, C] -> [B, L, C]``; ``drop_path`` is the probability of skipping a branch for a whole sample (training
    only, the kept branches scaled by ``1 / (1 - drop_path)``)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool = True, dropout_rate: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, dropout_rate)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim, dropout_rate)
        self.drop_path = DropPath(drop_path)  # no parameters: the state_dict does not depend on the rate

    def forward(
        self, x: torch.Tensor, policy: torch.Tensor | None = None, return_cls_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the block output ``[B, L, C]`` and the [CLS] attention row ``[B, L - 1]`` (or None)."""
        a, cls_attn = self.attn(self.norm1(x), policy, return_cls_attention)
        x = x + self.drop_path(a)
        return x + self.drop_path(self.mlp(self.norm2(x))), cls_attn


class ViT3d(nn.Module):
    """3D ViT encoder parts: :meth:`embed` (patches + [CLS] + position), ``blocks`` and the final ``norm``.

    The loop over the blocks belongs to the model that uses it (dense, or with pruning in between).

    Args:
        in_channels: image channels. img_size: int or three ints, divisible by ``patch_size``.
        patch_size: cubic patch side (8 in the paper, 16 in the original UNETR).
        hidden_size, mlp_dim, num_layers, num_heads: ViT-B = 768, 3072, 12, 12.
        dropout_rate: dropout in attention and MLP (training only). qkv_bias: bias of the qkv projection.
        drop_path_rate: stochastic depth of the last block; block ``i`` (0-based) of ``L`` gets
            ``drop_path_rate * i / (L - 1)``, the first none (training only; 0.1 in the authors' BTCV run).

    Examples:
        >>> vit = ViT3d(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=2,
        ...             num_heads=3)
        >>> vit(torch.zeros(2, 1, 32, 32, 32)).shape
        torch.Size([2, 65, 48])
    """

    def __init__(
        self,
        *,
        in_channels: int,
        img_size: int | Sequence[int],
        patch_size: int,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.grid_size = patch_grid(img_size, patch_size)
        self.num_tokens = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.hidden_size = hidden_size
        self.patch_embed = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, hidden_size))
        self.pos_drop = nn.Dropout(dropout_rate)
        rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]  # rising with depth
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, mlp_dim, qkv_bias, dropout_rate, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(hidden_size, eps=LN_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, D, H, W] -> [B, 1 + N, C]``: patch embedding, [CLS] prepended, position embedding added."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, C, d, h, w] -> [B, N, C]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, C]
        return self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)  # [B, 1 + N, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense encoding ``[B, C_in, D, H, W] -> [B, 1 + N, C]`` (after the final LayerNorm)."""
        z = self.embed(x)
        for blk in self.blocks:
            z, _ = blk(z)
        return self.norm(z)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def tokens_to_map(x: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """Patch tokens ``[B, N, C]`` (no [CLS]) to a feature map ``[B, C, d, h, w]``."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *grid_size)  # [B, N, C] -> [B, C, d, h, w]
