"""Spatially decoupled knowledge transfer (SDKT, VeloxSeg): Gram matrices and the two training-only losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Channel Gram matrix with the spatial positions summed out: ``[B, C, D, H, W] -> [B, C, C]``.

    ``G[b, i, j] = sum_p f[b, i, p] f[b, j, p] / (C * D * H * W)``: it keeps which channels co-occur (texture)
    and forgets where, so a segmentation decoder can borrow it from a reconstruction decoder.
    """
    b, c = features.shape[:2]
    f = features.reshape(b, c, -1)  # [B, C, N]
    return torch.bmm(f, f.transpose(1, 2)) / (c * f.shape[-1])  # [B, C, C]


def sdkt_losses(
    reconstructions: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    seg_gram: torch.Tensor,
    recon_grams: Sequence[torch.Tensor],
    recon_weight: float = 0.5,
    gram_weight: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Weighted SDKT losses, each averaged over the modalities.

    * ``sdkt_recon``: MSE between each modality's reconstruction ``[B, m_i, D, H, W]`` and its input.
    * ``sdkt_gram``: MSE between the segmentation Gram matrix ``[B, C, C]`` and each reconstruction decoder's Gram
      matrix. The reconstruction side is the teacher (detached): the transfer moves the segmentation decoder
      towards the self-supervised texture statistics, not the other way round.
    """
    recon = torch.stack([F.mse_loss(r, x) for r, x in zip(reconstructions, inputs, strict=True)]).mean()
    gram = torch.stack([F.mse_loss(seg_gram, g.detach()) for g in recon_grams]).mean()
    return {"sdkt_recon": recon_weight * recon, "sdkt_gram": gram_weight * gram}
