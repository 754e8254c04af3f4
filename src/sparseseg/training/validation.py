"""Sliding-window Dice on the validation cases (preprocessed grid), used to pick ``best.pt``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.metrics import compute_dice

from sparseseg.data.transforms import DataConfig
from sparseseg.inference.sliding_window import sliding_window_logits


def binarise(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Logits ``[B, K, D, H, W]`` -> one-hot / multi-hot masks ``[B, K, D, H, W]`` (float)."""
    if sigmoid:
        return (logits > 0).float()
    k = logits.shape[1]
    return F.one_hot(logits.argmax(1), k).permute(0, 4, 1, 2, 3).float()  # [B, D, H, W, K] -> [B, K, D, H, W]


def target_masks(label: torch.Tensor, num_classes: int, sigmoid: bool) -> torch.Tensor:
    """Training target (``[B, 1, ...]`` indices or ``[B, R, ...]`` regions) -> masks ``[B, K, D, H, W]``."""
    if sigmoid:
        return (label > 0.5).float()
    idx = label[:, 0].long()
    return F.one_hot(idx, num_classes).permute(0, 4, 1, 2, 3).float()  # [B, D, H, W, K] -> [B, K, D, H, W]


@torch.inference_mode()
def dice_sums(model: nn.Module, batches: Iterable[dict], data_cfg: DataConfig, device: torch.device,
              overlap: float = 0.5, sw_batch_size: int = 4) -> torch.Tensor:
    """Per output class (background excluded for softmax), the sum of the case Dice scores and the number of
    cases where the class is present in the reference: ``[2, classes]`` float64 (sums can be added across DDP
    processes that each validated a shard of the cases)."""
    was_training = model.training
    model.eval()
    # The functional form: each process scores its own cases and the caller adds the sums up.
    k = data_cfg.out_channels
    sums = torch.zeros(2, k if data_cfg.sigmoid else k - 1, dtype=torch.float64)
    for batch in batches:
        image = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
        logits = sliding_window_logits(model, image.to(device), data_cfg.roi_size, sw_batch_size, overlap)
        label = batch["label"].to(device)
        scores = compute_dice(binarise(logits, data_cfg.sigmoid), target_masks(label, k, data_cfg.sigmoid),
                              include_background=data_cfg.sigmoid, ignore_empty=True).double().cpu()  # [B, classes]
        present = torch.isfinite(scores)
        sums[0] += torch.where(present, scores, 0.0).sum(0)
        sums[1] += present.sum(0)
    model.train(was_training)
    return sums


def summarise_dice(sums: torch.Tensor, data_cfg: DataConfig) -> dict[str, float]:
    """``[2, classes]`` Dice sums and counts -> ``{"dice_<class>": mean, ..., "mean_dice": mean over classes}``
    (NaN for a class absent from every reference; the mean over classes skips those)."""
    names = data_cfg.class_names if data_cfg.sigmoid else data_cfg.class_names[1:]
    per_class = [float(s / n) if n > 0 else float("nan") for s, n in zip(sums[0].tolist(), sums[1].tolist(),
                                                                          strict=True)]
    result = {f"dice_{n}": v for n, v in zip(names, per_class, strict=True)}
    finite = [v for v in per_class if np.isfinite(v)]
    result["mean_dice"] = float(np.mean(finite)) if finite else float("nan")
    return result


def validate(model: nn.Module, batches: Iterable[dict], data_cfg: DataConfig, device: torch.device,
             overlap: float = 0.5, sw_batch_size: int = 4,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean Dice per output class (background excluded for softmax) over the validation cases, and their mean
    under ``"mean_dice"``. Cases where a class is absent from the reference are left out of that class's mean
    (NaN when a class is absent everywhere). ``reduce`` (e.g. a DDP all-reduce sum) combines the
    :func:`dice_sums` of processes that each saw a shard of the cases, so every process gets the full result."""
    sums = dice_sums(model, batches, data_cfg, device, overlap, sw_batch_size)
    return summarise_dice(reduce(sums) if reduce is not None else sums, data_cfg)
