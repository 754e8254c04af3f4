"""Pure, batched token operations shared by every sparse-token model.

Shapes: ``x`` tokens ``[B, N, C]``; ``scores`` ``[B, N]``; ``keep_idx`` ``[B, K]`` and ``drop_idx`` ``[B, N - K]``
(indices into the N tokens, ascending, so the kept tokens stay in their spatial order). Every selection
returns its indices so that it can be undone with :func:`scatter_tokens`. No Python loop over the batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def num_keep(num_tokens: int, prune_ratio: float) -> int:
    """K = floor((1 - r) * L) tokens kept out of L (at least one). Paper section 2.1."""
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    return max(1, int(math.floor((1.0 - prune_ratio) * num_tokens + 1e-6)))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens ``x[b, idx[b, k]]``: ``[B, N, C], [B, K] -> [B, K, C]``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, N, C] -> [B, K, C]


def scatter_tokens(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Out-of-place inverse of :func:`gather_tokens`: ``dst`` with ``dst[b, idx[b, k]] = src[b, k]``."""
    return dst.scatter(1, idx.unsqueeze(-1).expand(-1, -1, dst.shape[-1]), src)  # [B, N, C]


def gumbel_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples of Gumbel(0, 1) with the shape, dtype and device of ``x`` (``-log(-log u)``)."""
    u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    eps = torch.finfo(x.dtype).tiny
    return -torch.log((-torch.log(u.clamp_min(eps))).clamp_min(eps))


class TopKSelection(NamedTuple):
    keep_idx: torch.Tensor  # [B, K] ascending
    drop_idx: torch.Tensor  # [B, N - K] ascending
    keep_mask: torch.Tensor  # [B, K]: exactly 1 in the forward pass, carries the soft top-K gradient
    drop_mask: torch.Tensor  # [B, N - K]: exactly 1 in the forward pass (1 - mask at the pruned tokens)


def split_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` largest and of the remaining entries of ``logits`` ``[B, N]``, each ascending."""
    order = logits.argsort(dim=1, descending=True)  # [B, N]
    keep_idx = order[:, :k].sort(dim=1).values  # [B, K]
    drop_idx = order[:, k:].sort(dim=1).values  # [B, N - K]
    return keep_idx, drop_idx


def soft_topk(
    log_scores: torch.Tensor,
    k: int,
    *,
    tau: float = 1.0,
    noise: bool = True,
    differentiable: bool = True,
    generator: torch.Generator | None = None,
) -> TopKSelection:
    """Straight-through (Gumbel) soft top-K of paper eq. 2.

    Forward: the hard top-K of ``log_scores + g`` (``g ~ Gumbel(0, 1)`` when ``noise``). Backward: the gradient of
    ``softmax((log_scores + g) / tau)``. The returned masks equal exactly 1 in the forward pass (``hard + soft -
    soft.detach()``); multiply the kept tokens by ``keep_mask`` and the pruned ones by ``drop_mask`` (= 1 - M).
    Whether the pruned path then carries gradient depends on what follows: a per-token LayerNorm right after the
    product cancels it (the scale of a token does not survive its normalisation). With ``differentiable=False``
    (inference) no softmax is computed and the masks are plain ones.

    The noise, the selection and the softmax run in float32 whatever the dtype of ``log_scores`` (float16 scores
    tie and float16 noise is coarse); the masks come back in the dtype of ``log_scores``.
    """
    scores = log_scores.float()  # [B, N]
    perturbed = scores + gumbel_like(scores, generator) if noise else scores  # [B, N]
    keep_idx, drop_idx = split_topk(perturbed.detach(), k)
    if not differentiable:
        ones = log_scores.new_ones(keep_idx.shape)
        return TopKSelection(keep_idx, drop_idx, ones, log_scores.new_ones(drop_idx.shape))
    soft = torch.softmax(perturbed / tau, dim=1)  # [B, N]
    st = soft - soft.detach()  # zero in the forward pass, the soft gradient in the backward pass
    keep_mask = (1.0 + st.gather(1, keep_idx)).to(log_scores.dtype)  # [B, K]   M = 1 at kept tokens
    drop_mask = (1.0 - st.gather(1, drop_idx)).to(log_scores.dtype)  # [B, N - K]   1 - M = 1 at pruned tokens
    return TopKSelection(keep_idx, drop_idx, keep_mask, drop_mask)
