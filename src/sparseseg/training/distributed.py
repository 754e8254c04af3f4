"""Multi-GPU (or multi-process CPU) training through ``torchrun`` and PyTorch DDP.

``torchrun --nproc_per_node N -m sparseseg train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; each process
then trains on its own crops (batch ``batch_size`` per process, so the learning rate scales with
``batch_size * N / 256``); every process validates its share of the validation cases and the Dice sums are
all-reduced, so every process sees the same metrics; process 0 writes logs and checkpoints, which hold the random
state of every process. Without those variables training runs in one process and nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sparseseg.config import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the ``torchrun`` process group if there is one (NCCL on CUDA, Gloo on CPU) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP around ``model`` when distributed (parameters broadcast from rank 0), else the model itself.

    ``find_unused_parameters`` is on because some ablations (e.g. a scorer skipped at a ratio of 0) leave
    parameters without a gradient in a step.
    """
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def any_process(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on at least one."""
    return max_over_processes(int(flag), info, device) > 0


def max_over_processes(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest ``value`` of all processes, on every process (keeps stops by time budget or by signal in step:
    every process leaves the loop after the same step)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    """The element-wise sum of ``t`` over all processes (``t`` itself in one process), on ``t``'s device."""
    if not info.enabled:
        return t
    out = t.to(device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_gather(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of process 0, obj of process 1, ...]`` on every process (``[obj]`` in one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
