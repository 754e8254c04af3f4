"""Sparse encoding: a 3D ViT with token pruning between its blocks (paper section 2.1, Tables 1 and 4).

:class:`SparseViTEncoder` runs the blocks of a :class:`~sparseseg.models.common.vit.ViT3d` and, after each block
listed in ``prune_after`` (1-based: ``(3, 6, 9)`` = after the 3rd, 6th and 9th block), keeps ``K = floor((1 - r) L)``
of the ``L`` patch tokens still alive (:func:`~sparseseg.models.common.tokens.num_keep`; ``r`` compounds over the
stages). [CLS] is never scored and always kept. Only the kept tokens go on through the later blocks (a batched
gather, no attention masking); the pruned tokens of every stage are returned with their original positions for token
completion. Scores, Gumbel noise and the soft top-K run in float32, also under autocast (ties and a coarse noise in
float16 would change which tokens are kept).

Background tokens (inference only, ``background_value``; :mod:`~.background`): patch tokens whose input patch is
all background are dropped before the first block; they join the first stage's pruned group for token completion,
and each stage keeps ``floor((1 - r) L)`` of the ``L`` tokens it receives (fewer than without dropping).

Scorers (``scorer``):

* ``"mlp"`` (STP, the paper): a score network per stage (:class:`ScoreNet`) predicts ``log s``; training samples
  the straight-through Gumbel soft top-K of eq. 2 (``perturbation="none"``: straight-through top-K without noise),
  inference takes the plain top-K of ``log s`` (deterministic).
* ``"cls_attention"`` (EViT): the head-averaged attention of the [CLS] query to each patch token in the real
  attention of the block just before the stage; plain top-K in training and inference (no parameters).
* ``"dynamic"`` (DynamicViT): a score network per stage predicts keep/drop log-probabilities; training draws an
  independent straight-through Gumbel-softmax decision per token, keeps *all* tokens in memory and masks the
  attention of dropped ones in the later blocks, and adds the ratio loss ``2 * mean_s mean_b (kept_fraction -
  K_s / N)^2``; inference takes the plain top-K of the keep log-probability (same fixed K as STP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseseg.models.common.tokens import TopKSelection, gather_tokens, gumbel_like, num_keep, soft_topk
from sparseseg.models.common.vit import ViT3d
from sparseseg.models.stp_mta.background import foreground_patches, split_foreground

SCORERS = ("mlp", "cls_attention", "dynamic")
PERTURBATIONS = ("gumbel", "none")
RATIO_LOSS_WEIGHT = 2.0  # DynamicViT's lambda_ratio, as in the paper's comparison (section 3.3)


@dataclass
class TokenGroup:
    """Patch tokens of one MTA group: ``tokens`` ``[B, M, C]`` at original patch positions ``idx`` ``[B, M]``.

    ``weight`` ``[B, M]`` is the soft membership (values in {0, 1}, straight-through gradient) when every group holds
    all N tokens (DynamicViT training); None when the groups are disjoint subsets. ``mask`` ``[B, M]`` is the
    straight-through ``1 - M`` of the pruned tokens (exactly 1 in the forward pass, the soft top-K gradient
    backward) in STP training, for token completion to multiply in; None otherwise."""

    tokens: torch.Tensor
    idx: torch.Tensor
    weight: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class SparseEncoding:
    """What :class:`SparseViTEncoder` returns.

    ``final`` ``[B, 1 + K, C]``: [CLS] and the kept tokens after the final LayerNorm; ``keep_idx`` ``[B, K]`` their
    original positions; ``keep_weight`` ``[B, K]`` or None (see :class:`TokenGroup`); ``pruned``: one group per stage
    (raw block outputs, not normalised, their straight-through mask not yet applied); ``depth`` ``[B, N]`` (long):
    number of blocks each patch token went through (= the ``prune_after`` entry of the stage that dropped it,
    ``num_layers`` when kept to the end, 0 for a background token dropped before the first block)."""

    final: torch.Tensor
    keep_idx: torch.Tensor
    pruned: list[TokenGroup]
    depth: torch.Tensor
    keep_weight: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def with_cls(idx: torch.Tensor) -> torch.Tensor:
    """Positions in the ``[CLS] + patches`` layout of [CLS] and the patch tokens ``idx``: ``[B, K] -> [B, 1 + K]``."""
    return F.pad(idx + 1, (1, 0), value=0)


def float32_scope(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off on the device of ``x`` (nothing to switch off on devices without autocast, e.g. meta)."""
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class ScoreNet(nn.Module):
    """Token score network (paper eq. 1; SPEC "Score net"): ``[B, L, C] -> [B, L, out_dim]``.

    ``LayerNorm -> Linear(C, C) -> GELU``; the first half of the channels is the local feature, the (policy-weighted)
    mean of the second half over the tokens the global one; concatenated -> ``Linear(C, C/2) -> GELU ->
    Linear(C/2, C/4) -> GELU -> Linear(C/4, out_dim)``.
    """

    def __init__(self, dim: int, out_dim: int = 1):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, out_dim)
        )
        self.local_dim = dim // 2

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_conv(x)  # [B, L, C]
        local, glob = h[..., : self.local_dim], h[..., self.local_dim :]
        if policy is None:
            glob = glob.mean(1, keepdim=True)  # [B, L, C/2] -> [B, 1, C/2]
        else:
            w = policy.unsqueeze(-1)  # [B, L, 1]
            glob = (glob * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-6)  # [B, 1, C/2]
        h = torch.cat([local, glob.expand(-1, x.shape[1], -1)], dim=-1)  # [B, L, C]
        return self.out_conv(h)  # [B, L, out_dim]


class ClsAttentionScorer(nn.Module):
    """EViT scorer: no parameters; the scores are the [CLS] attention row handed in by the encoder."""

    def forward(self, cls_attention: torch.Tensor) -> torch.Tensor:
        return torch.log(cls_attention.clamp_min(torch.finfo(cls_attention.dtype).tiny))  # [B, L]


def binary_decision(log_probs: torch.Tensor, tau: float, noise: bool) -> torch.Tensor:
    """Straight-through Gumbel-softmax keep decision from ``[B, L, 2]`` (keep, drop) log-probabilities.

    Returns ``[B, L]``: exactly 0 or 1 in the forward pass, the gradient of the soft keep probability backward."""
    logits = log_probs + gumbel_like(log_probs) if noise else log_probs
    soft = torch.softmax(logits / tau, dim=-1)[..., 0]  # [B, L]
    hard = (logits[..., 0] >= logits[..., 1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # the bracket is exactly 0 in the forward pass


class SparseViTEncoder(nn.Module):
    """ViT + token pruning after the blocks in ``prune_after`` (1-based, strictly increasing, in [1, num_layers)).

    Args:
        vit: the ViT whose blocks run. prune_after: block counts after which a stage prunes.
        scorer: "mlp" | "cls_attention" | "dynamic" (see module docstring). perturbation: "gumbel" | "none"
            (training noise of the mlp and dynamic scorers). tau: soft top-K / Gumbel-softmax temperature.
    """

    def __init__(self, vit: ViT3d, prune_after: Sequence[int], scorer: str = "mlp", perturbation: str = "gumbel",
                 tau: float = 1.0):
        super().__init__()
        num_layers = len(vit.blocks)
        prune_after = tuple(int(p) for p in prune_after)
        if not prune_after or any(not 1 <= p < num_layers for p in prune_after) or list(prune_after) != sorted(
            set(prune_after)
        ):
            raise ValueError(
                f"prune_after must be strictly increasing block counts in [1, {num_layers - 1}], got {prune_after}"
            )
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; valid scorers: {', '.join(SCORERS)}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {perturbation!r}; valid: {', '.join(PERTURBATIONS)}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.vit = vit
        self.prune_after = prune_after
        self.scorer = scorer
        self.perturbation = perturbation
        self.tau = float(tau)
        dim = vit.hidden_size
        if scorer == "mlp":
            self.scorers = nn.ModuleList(ScoreNet(dim, 1) for _ in prune_after)
        elif scorer == "dynamic":
            self.scorers = nn.ModuleList(ScoreNet(dim, 2) for _ in prune_after)
        else:
            self.scorers = nn.ModuleList(ClsAttentionScorer() for _ in prune_after)

    @property
    def num_layers(self) -> int:
        return len(self.vit.blocks)

    def num_kept(self, prune_ratio: float, num_tokens: int | None = None) -> list[int]:
        """Patch tokens kept by each stage, ``[K_1, K_2, ...]`` (compounding floor((1 - r) L)), starting from
        ``num_tokens`` tokens entering the first block (default all ``N``; fewer after background dropping)."""
        counts, alive = [], self.vit.num_tokens if num_tokens is None else int(num_tokens)
        for _ in self.prune_after:
            alive = num_keep(alive, prune_ratio)
            counts.append(alive)
        return counts

    def _log_scores(self, stage: int, patch: torch.Tensor, cls_attn: torch.Tensor | None) -> torch.Tensor:
        """Scores ``[B, L]`` (float32) of the patch tokens ``[B, L, C]`` at one stage (larger = keep)."""
        net = self.scorers[stage]
        with float32_scope(patch):
            if self.scorer == "cls_attention":
                return net(cls_attn.float())
            out = net(patch.float())  # [B, L, 1] or [B, L, 2]
            if self.scorer == "mlp":
                return F.logsigmoid(out.squeeze(-1))  # log s
            return out.log_softmax(-1)[..., 0]  # log P(keep)

    def forward(self, x: torch.Tensor, prune_ratio: float, stochastic: bool | None = None,
                background_value: float | None = None) -> SparseEncoding:
        """Encode ``x`` ``[B, C_in, D, H, W]``. ``stochastic`` (default: ``self.training``) selects the training
        behaviour (noise, straight-through masks, DynamicViT masking); False gives the deterministic policy.

        ``background_value`` (inference only): patch tokens whose input patch equals it everywhere are dropped
        before the first block (:mod:`~.background`; depth 0) and join the first stage's pruned group; each stage
        then keeps ``floor((1 - r) L)`` of the ``L`` tokens it receives, as the paper's STP does."""
        stochastic = self.training if stochastic is None else stochastic
        if stochastic and background_value is not None:
            raise ValueError("background dropping is an inference option: switch drop_background off to train")
        if stochastic and self.scorer == "dynamic":
            return self._forward_dynamic(x, prune_ratio)
        vit = self.vit
        z = vit.embed(x)  # [B, 1 + N, C]
        b, n = z.shape[0], vit.num_tokens
        alive = torch.arange(n, device=z.device).expand(b, n)  # original positions of the alive patch tokens
        depth = torch.full((b, n), self.num_layers, dtype=torch.long, device=z.device)
        background = None  # the dropped background tokens (embeddings) and their positions
        if background_value is not None:
            z, alive, background = self._drop_background(x, z, background_value)
            if background is not None:
                depth = depth.scatter(1, background.idx, 0)
        keep_counts = iter(self.num_kept(prune_ratio, alive.shape[1]))
        stages = {p: s for s, p in enumerate(self.prune_after)}
        pruned: list[TokenGroup] = []
        for i, blk in enumerate(vit.blocks):
            stage = stages.get(i + 1)
            z, cls_attn = blk(z, return_cls_attention=stage is not None and self.scorer == "cls_attention")
            if stage is None:
                continue
            patch = z[:, 1:]  # [B, L, C]
            log_s = self._log_scores(stage, patch, cls_attn)  # [B, L]
            learned = self.scorer != "cls_attention"
            sel: TopKSelection = soft_topk(
                log_s, next(keep_counts), tau=self.tau, noise=stochastic and learned and self.perturbation == "gumbel",
                differentiable=stochastic and learned,
            )
            dropped = gather_tokens(z, sel.drop_idx + 1)  # [B, 1 + L, C] -> [B, L - K, C]
            z = gather_tokens(z, with_cls(sel.keep_idx))  # [B, 1 + L, C] -> [B, 1 + K, C], [CLS] first
            drop_mask = None
            if stochastic and learned:  # straight-through masks (exactly 1 forward) carry the top-K gradient
                z = z * F.pad(sel.keep_mask, (1, 0), value=1.0).unsqueeze(-1).to(z.dtype)
                drop_mask = sel.drop_mask  # applied by token completion, before or after its group norm
            drop_pos = alive.gather(1, sel.drop_idx)  # [B, L - K]
            depth = depth.scatter(1, drop_pos, i + 1)
            if stage == 0 and background is not None:  # completed as tokens pruned by the first stage
                dropped = torch.cat([dropped, background.tokens], 1)  # [B, L - K + N - M, C]
                drop_pos = torch.cat([drop_pos, background.idx], 1)
            pruned.append(TokenGroup(dropped, drop_pos, mask=drop_mask))
            alive = alive.gather(1, sel.keep_idx)  # [B, K]
        return SparseEncoding(vit.norm(z), alive, pruned, depth)

    def _drop_background(self, x: torch.Tensor, z: torch.Tensor, background_value: float
                         ) -> tuple[torch.Tensor, torch.Tensor, TokenGroup | None]:
        """Embedded tokens ``z`` ``[B, 1 + N, C]`` -> ([CLS] + the ``M`` tokens that go on ``[B, 1 + M, C]``, their
        positions ``[B, M]``, the dropped background tokens as a group, None when nothing is dropped)."""
        b, n = z.shape[0], self.vit.num_tokens
        if x.is_meta:
            raise RuntimeError("drop_background keeps a number of tokens that depends on the input's values, which "
                               "meta tensors do not have: pass a real example input tensor")
        patch = self.vit.patch_embed.kernel_size[0]
        foreground = foreground_patches(x, patch, background_value)  # [B, N]
        keep_idx, drop_idx = split_foreground(foreground)  # [B, M], [B, N - M]
        if drop_idx.shape[1] == 0:  # no background token in the batch: the ordinary pass, bit for bit
            return z, torch.arange(n, device=z.device).expand(b, n), None
        dropped = gather_tokens(z, drop_idx + 1)  # [B, 1 + N, C] -> [B, N - M, C]
        z = gather_tokens(z, with_cls(keep_idx))  # [B, 1 + N, C] -> [B, 1 + M, C], [CLS] first
        return z, keep_idx, TokenGroup(dropped, drop_idx)

    def _forward_dynamic(self, x: torch.Tensor, prune_ratio: float) -> SparseEncoding:
        """DynamicViT training: all N tokens stay; a policy ``[B, N]`` masks the attention of dropped ones."""
        vit = self.vit
        z = vit.embed(x)  # [B, 1 + N, C]
        b, n = z.shape[0], vit.num_tokens
        all_idx = torch.arange(n, device=z.device).expand(b, n)
        policy = z.new_ones(b, n)  # [B, N], 1 = alive
        cls_keep = z.new_ones(b, 1)
        depth = torch.full((b, n), self.num_layers, dtype=torch.long, device=z.device)
        targets = [k / n for k in self.num_kept(prune_ratio)]
        stages = {p: s for s, p in enumerate(self.prune_after)}
        pruned: list[TokenGroup] = []
        ratio_loss = z.new_zeros(())
        masked = False
        for i, blk in enumerate(vit.blocks):
            z, _ = blk(z, policy=torch.cat([cls_keep, policy], 1) if masked else None)
            stage = stages.get(i + 1)
            if stage is None:
                continue
            with float32_scope(z):
                log_probs = self.scorers[stage](z[:, 1:].float(), policy.float()).log_softmax(-1)  # [B, N, 2]
                keep = binary_decision(log_probs, self.tau, noise=self.perturbation == "gumbel")  # [B, N]
            new_policy = policy * keep
            pruned.append(TokenGroup(z[:, 1:], all_idx, policy - new_policy))
            depth = torch.where((policy - new_policy).detach() > 0.5, i + 1, depth)
            policy, masked = new_policy, True
            ratio_loss = ratio_loss + (policy.mean(1) - targets[stage]).square().mean()
        aux = {"ratio": RATIO_LOSS_WEIGHT * ratio_loss / len(self.prune_after)}
        return SparseEncoding(vit.norm(z), all_idx, pruned, depth, keep_weight=policy, aux_losses=aux)
