"""What the benchmark runs: a seeded input and target for a model's arguments, and one training step of the
project's recipe. Shared by :mod:`sparseseg.benchmark.run` and the memory child :mod:`sparseseg.benchmark.memory`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from sparseseg.training.losses import SegmentationLoss
from sparseseg.training.optim import build_optimizer


def _img_size(args: dict[str, Any]) -> tuple[int, int, int]:
    size = args.get("img_size", 96)
    return (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)


def make_inputs(args: dict[str, Any], batch_size: int, sigmoid: bool, device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded image ``[B, in_channels, D, H, W]`` and a training target: multi-hot regions
    ``[B, out_channels, D, H, W]`` (float) when ``sigmoid`` else class indices ``[B, 1, D, H, W]`` (long)."""
    gen = torch.Generator().manual_seed(seed)
    size = _img_size(args)
    in_ch, out_ch = int(args.get("in_channels", 1)), int(args.get("out_channels", 2))
    x = torch.randn(batch_size, in_ch, *size, generator=gen)
    if sigmoid:
        y = torch.randint(0, 2, (batch_size, out_ch, *size), generator=gen).float()
    else:
        y = torch.randint(0, out_ch, (batch_size, 1, *size), generator=gen)
    return x.to(device), y.to(device)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """float16 autocast on CUDA when ``amp`` (the trainer's mixed precision), else a disabled context."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigmoid: bool,
                  amp: bool = False) -> Callable[[], None]:
    """One training step of the project's recipe as a closure: forward in training mode with the target, the
    segmentation loss (+ deep supervision + the model's auxiliary losses), backward, AdamW step; with ``amp``
    (CUDA) the forward and loss under float16 autocast and the step through a gradient scaler, as in training."""
    loss_fn = SegmentationLoss(sigmoid=sigmoid).to(x.device)
    optimizer = build_optimizer(model, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and x.is_cuda)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            out = model(x, target=y)
            loss, _ = loss_fn(out, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step
