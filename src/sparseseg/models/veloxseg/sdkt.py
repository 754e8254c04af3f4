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
    reconstruction: torch.Tensor,
    inputs: torch.Tensor,
    seg_gram: torch.Tensor,
    recon_grams: Sequence[torch.Tensor],
    recon_weight: float = 0.5,
    gram_weight: float = 2.0,
    detach_teacher: bool = False,
) -> dict[str, torch.Tensor]:
    """Weighted SDKT losses, as the authors compute them.

    * ``sdkt_recon``: MSE between the modalities' reconstructions, concatenated ``[B, in_channels, D, H, W]``,
      and the input.
    * ``sdkt_gram``: MSE between the segmentation Gram matrix ``[B, C, C]`` and each reconstruction decoder's,
      averaged over the modalities. The gradient flows into both sides; ``detach_teacher`` stops it on the
      reconstruction side (a one-way transfer from the self-supervised teacher).
    """
    recon = F.mse_loss(reconstruction, inputs)
    gram = torch.stack([F.mse_loss(seg_gram, g.detach() if detach_teacher else g) for g in recon_grams]).mean()
    return {"sdkt_recon": recon_weight * recon, "sdkt_gram": gram_weight * gram}
