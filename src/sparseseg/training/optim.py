"""AdamW with layer-wise lr decay and a warm-up + per-iteration cosine schedule (the paper's recipe, MAE style).

Layer ids: 0 = patch embedding, position embedding and [CLS]; ``b + 1`` = transformer block ``b`` (0-based);
``num_layers + 1`` = everything else (decoder, heads, scorers, final norm). A parameter's lr is
``lr * layer_decay ** (num_layers + 1 - layer_id)``: with 12 blocks and decay 0.75 the embeddings get 0.75^13,
block b gets 0.75^(12 - b) and the heads 1.0. A model tells its layer ids with a ``layer_id(param_name)`` method
(and ``num_layers``); otherwise the first sub-module holding a ``blocks`` ModuleList next to a patch/position
embedding is taken as the ViT encoder. Models without a ViT get no decay.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

_EMBED_WORDS = ("patch_embed", "pos_embed", "position_embed", "cls_token", "patch_embedding")
_NO_DECAY_WORDS = ("pos_embed", "position_embed", "cls_token")


def _find_vit(model: nn.Module) -> tuple[str, int] | None:
    """(prefix, number of blocks) of the first ViT-like sub-module, or None."""
    for prefix, module in model.named_modules():
        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        names = [n for n, _ in module.named_parameters()]
        if any(w in n for n in names for w in _EMBED_WORDS):
            return (prefix + "." if prefix else ""), len(blocks)
    return None


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every trainable parameter and the number of transformer blocks (0 when not a ViT)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if callable(getattr(model, "layer_id", None)):
        num_layers = int(model.num_layers)
        return {n: int(model.layer_id(n)) for n in names}, num_layers
    vit = _find_vit(model)
    if vit is None:
        return {n: 0 for n in names}, 0
    prefix, num_layers = vit
    block = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    ids = {}
    for n in names:
        m = block.match(n)
        if m:
            ids[n] = int(m.group(1)) + 1
        elif n.startswith(prefix) and any(w in n[len(prefix):] for w in _EMBED_WORDS):
            ids[n] = 0
        else:
            ids[n] = num_layers + 1
    return ids, num_layers


def param_groups(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay on biases, norms and other 1-D parameters, nor on position
    embeddings / [CLS]; each group carries ``lr_scale`` from the layer-wise decay."""
    ids, num_layers = layer_ids(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or any(w in name for w in _NO_DECAY_WORDS)
        lid = ids[name] if num_layers else 0
        scale = layer_decay ** (num_layers + 1 - lid) if num_layers else 1.0
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
                           "layer_id": lid}
        groups[key]["params"].append(p)
    if num_layers:
        log.debug("layer-wise lr decay %.2f over %d blocks", layer_decay, num_layers)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


class WarmupCosine:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``, stepped every iteration.

    Progress ``p`` is ``(iteration + 1) / total_iters``, or, with a ``time_budget`` in seconds, the larger of
    that and ``elapsed / time_budget``, so that the schedule ends when the time is spent. The first
    ``warmup_fraction`` of the progress ramps the lr up linearly. Every group's lr is set to
    ``base_lr * lr_scale * factor``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total_iters: int,
                 warmup_fraction: float = 0.05, min_lr_ratio: float = 0.0, time_budget: float | None = None):
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.total_iters = max(1, int(total_iters))
        self.warmup_fraction = warmup_fraction
        self.min_lr_ratio = min_lr_ratio
        self.time_budget = time_budget
        self.iteration = 0
        self.apply(0.0)

    def progress(self, elapsed: float = 0.0) -> float:
        p = (self.iteration + 1) / self.total_iters
        if self.time_budget:
            p = max(p, elapsed / self.time_budget)
        return min(1.0, p)

    def factor(self, elapsed: float = 0.0) -> float:
        p, w = self.progress(elapsed), self.warmup_fraction
        if p < w:
            return p / w
        q = (p - w) / (1 - w) if w < 1 else 1.0
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * q))

    def apply(self, elapsed: float) -> None:
        f = self.factor(elapsed)
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * g.get("lr_scale", 1.0) * f

    def step(self, elapsed: float = 0.0) -> None:
        """Advance one iteration; ``elapsed`` (seconds of training so far) matters only with a time budget."""
        self.iteration += 1
        self.apply(elapsed)

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "base_lr": self.base_lr, "total_iters": self.total_iters,
                "warmup_fraction": self.warmup_fraction, "min_lr_ratio": self.min_lr_ratio,
                "time_budget": self.time_budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
