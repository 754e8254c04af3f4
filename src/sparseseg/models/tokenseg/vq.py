"""VQ-VAE vector quantisation of tokens (van den Oord et al. 2017), the first half of TokenSeg's tokenizer.

* Nearest code by L2 distance; straight-through gradient ``z + (e - z).detach()`` to the encoder.
* Loss-based codebook learning (not EMA): codebook loss ``||sg[z] - e||^2`` and commitment loss
  ``beta * ||z - sg[e]||^2`` (beta = 0.25 as in the VQ-VAE paper), both returned unweighted by the caller's weight.
* Dead codes: an exponential moving average of each code's use per step (``usage``, a buffer) is kept in training;
  every ``reinit_every`` training steps the codes whose average use fell below ``dead_threshold`` are re-initialised
  to randomly drawn tokens of the current batch (plus a little noise). The first training step initialises the
  whole codebook from the batch the same way (data-dependent initialisation, which avoids a codebook that starts
  far from the tokens and mostly dies). Under DistributedDataParallel the counts are summed over ranks and the
  codebook is broadcast from rank 0 after a re-initialisation, so every rank keeps the same codebook.
* Reporting: :meth:`VectorQuantizer.codebook_usage` (fraction of live codes) and ``last_perplexity`` (of the code
  assignments of the last training batch; ``exp`` of their entropy, at most ``num_codes``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Quantized(NamedTuple):
    tokens: torch.Tensor  # [B, N, C] straight-through quantised tokens
    codes: torch.Tensor  # [B, N] code index of each token
    codebook_loss: torch.Tensor  # scalar ||sg[z] - e||^2
    commitment_loss: torch.Tensor  # scalar ||z - sg[e]||^2 (not yet multiplied by beta)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the L2-nearest code for every token: ``[B, N, C], [K, C] -> [B, N]``."""
    # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 does not change the argmin. In float32 even under autocast:
    # half-precision distances would tie and flip nearby codes. (Meta tensors, used to count MACs, have no autocast.)
    device = z.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        z, codebook = z.float(), codebook.float()
        dist2 = codebook.square().sum(1) - 2.0 * z @ codebook.t()  # [B, N, K]
    return dist2.argmin(dim=-1)  # [B, N]


class VectorQuantizer(nn.Module):
    """Codebook of ``num_codes`` vectors of width ``dim``; ``forward(z [B, N, dim]) -> Quantized``.

    Examples:
        >>> vq = VectorQuantizer(num_codes=16, dim=8)
        >>> vq(torch.randn(2, 5, 8)).tokens.shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        num_codes: int = 4096,
        dim: int = 128,
        *,
        usage_decay: float = 0.99,
        dead_threshold: float = 1e-3,
        reinit_every: int = 50,
    ) -> None:
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {num_codes}")
        if not 0.0 < usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in (0, 1), got {usage_decay}")
        if reinit_every < 1:
            raise ValueError(f"reinit_every must be >= 1, got {reinit_every}")
        self.num_codes = num_codes
        self.usage_decay = usage_decay
        self.dead_threshold = dead_threshold
        self.reinit_every = reinit_every
        self.codebook = nn.Parameter(torch.randn(num_codes, dim))
        self.register_buffer("usage", torch.zeros(num_codes))  # EMA of uses per training step
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps seen
        self.last_perplexity: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> Quantized:
        if self.training:
            self._maybe_reinit(z.detach())
        codes = nearest_code(z.detach(), self.codebook.detach())  # [B, N]
        e = F.embedding(codes, self.codebook)  # [B, N, C]
        codebook_loss = F.mse_loss(e, z.detach())
        commitment_loss = F.mse_loss(z, e.detach())
        if self.training:
            self._update_usage(codes)
        return Quantized(z + (e - z).detach(), codes, codebook_loss, commitment_loss)

    @torch.no_grad()
    def codebook_usage(self) -> float:
        """Fraction of codes alive (average use per step above ``dead_threshold``)."""
        return float((self.usage > self.dead_threshold).float().mean())

    @torch.no_grad()
    def _update_usage(self, codes: torch.Tensor) -> None:
        counts = torch.bincount(codes.flatten(), minlength=self.num_codes).to(self.usage.dtype)  # [K]
        if _distributed():
            dist.all_reduce(counts)
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)
        p = counts / counts.sum().clamp_min(1.0)
        self.last_perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        self.steps.add_(1)

    @torch.no_grad()
    def _maybe_reinit(self, z: torch.Tensor) -> None:
        step = int(self.steps)
        if step == 0:
            dead = torch.ones(self.num_codes, dtype=torch.bool, device=z.device)
        elif step % self.reinit_every == 0:
            dead = self.usage <= self.dead_threshold
        else:
            return
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        flat = z.reshape(-1, z.shape[-1])  # [B*N, C]
        pick = torch.randint(flat.shape[0], (n_dead,), device=z.device)
        noise = 0.01 * flat.std() * torch.randn(n_dead, flat.shape[1], dtype=flat.dtype, device=flat.device)
        self.codebook.data[dead] = (flat[pick] + noise).to(self.codebook.dtype)
        self.usage[dead] = self.dead_threshold * 10.0  # a grace period before they can be declared dead again
        if _distributed():
            dist.broadcast(self.codebook.data, src=0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
