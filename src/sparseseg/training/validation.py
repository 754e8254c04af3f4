"""Sliding-window Dice on the validation cases (preprocessed grid), used to pick ``best.pt``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice

from sparseseg.data.transforms import DataConfig


def sliding_window_logits(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int = 4,
                          overlap: float = 0.5, sw_device: torch.device | None = None,
                          device: torch.device | None = None) -> torch.Tensor:
    """Logits ``[B, K, D, H, W]`` of an eval-mode model over a whole volume ``[B, C, D, H, W]`` (Gaussian
    blending of ROI windows; a volume smaller than the ROI is padded and the result cropped back). AMP on CUDA.

    As in MONAI, ``sw_device`` is where the windows run (the model's device; default: the image's) and ``device``
    where the whole-volume output is stitched (default: the image's): a large volume can stay on the CPU while
    its windows run on the GPU, so only ``sw_batch_size`` windows ever occupy GPU memory.
    """
    sw_device = sw_device or image.device
    with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=sw_device.type == "cuda"):
        logits = sliding_window_inference(image, list(roi_size), sw_batch_size, model, overlap=overlap,
                                          mode="gaussian", sw_device=sw_device, device=device or image.device)
    return logits.float()


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
def validate(model: nn.Module, batches: Iterable[dict], data_cfg: DataConfig, device: torch.device,
             overlap: float = 0.5, sw_batch_size: int = 4) -> dict[str, float]:
    """Mean Dice per output class (background excluded for softmax) over the validation cases, and their mean
    under ``"mean_dice"``. Cases where a class is absent from the reference are left out of that class's mean
    (NaN when a class is absent everywhere)."""
    was_training = model.training
    model.eval()
    # The functional form: DiceMetric.aggregate would all-gather across DDP processes, only process 0 validates.
    k = data_cfg.out_channels
    rows = []
    for batch in batches:
        image = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
        logits = sliding_window_logits(model, image.to(device), data_cfg.roi_size, sw_batch_size, overlap)
        label = batch["label"].to(device)
        rows.append(compute_dice(binarise(logits, data_cfg.sigmoid), target_masks(label, k, data_cfg.sigmoid),
                                 include_background=data_cfg.sigmoid, ignore_empty=True).float().cpu())
    scores = torch.cat(rows).numpy()  # [cases, classes]
    model.train(was_training)
    names = data_cfg.class_names if data_cfg.sigmoid else data_cfg.class_names[1:]
    with np.errstate(all="ignore"):
        per_class = [float(np.nanmean(scores[:, i])) if np.isfinite(scores[:, i]).any() else float("nan")
                     for i in range(scores.shape[1])]
    result = {f"dice_{n}": v for n, v in zip(names, per_class, strict=True)}
    finite = [v for v in per_class if np.isfinite(v)]
    result["mean_dice"] = float(np.mean(finite)) if finite else float("nan")
    return result
