"""Training: ``train(config)``, the loss, the optimizer recipe and self-describing checkpoints."""

from __future__ import annotations

from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from sparseseg.training.losses import SegmentationLoss
from sparseseg.training.optim import WarmupCosine, build_optimizer, param_groups
from sparseseg.training.trainer import train

__all__ = [
    "SegmentationLoss",
    "WarmupCosine",
    "build_optimizer",
    "load_checkpoint",
    "model_from_checkpoint",
    "param_groups",
    "save_checkpoint",
    "train",
]
