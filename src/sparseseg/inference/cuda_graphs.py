"""Inference on a GPU without the per-operator launch cost: replay a captured CUDA graph of the forward pass.

At batch 1 a forward pass of these models launches hundreds of kernels, many of them tiny once tokens are pruned,
and the host spends longer issuing them than the GPU spends running them: on an H100 the brats
``stp_mta_unetr`` r = 0.75 forward took 26 ms to issue and 32 ms in all, of which 25 ms of GPU time (docs/benchmark.md).
Every shape in these models is fixed by the input shape (the number of kept tokens K is ``floor((1 - r) L)``, not
data-dependent), so one capture per input shape replays the whole pass with one launch.

:class:`GraphedForward` wraps any ``fn(x)`` (a model, ``model.forward_encoder``): on a CUDA input it captures
``fn`` once per (shape, dtype, autocast, inference mode) after a few warm-up calls on a side stream, then copies
each input into the captured input buffer and replays. All graphs of one wrapper share one memory pool. CPU inputs
go straight to ``fn``.

Rules of use (those of CUDA graphs): inference only, under ``torch.inference_mode()`` or ``torch.no_grad()``; the
model's weights and settings (``prune_ratio``) must not change after capture; the returned tensors are the graph's
own outputs and are overwritten by the next call (``clone_outputs=True`` returns copies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Warm-up calls before a capture: cuDNN / cuBLAS choose their kernels and workspaces outside the graph.
CAPTURE_WARMUP = 3


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(o) for o in out)
    return out


class GraphedForward:
    """``fn(x)`` replayed from a CUDA graph captured per input shape (see the module docstring).

    Examples:
        >>> model = torch.nn.Conv3d(1, 2, 3).eval()
        >>> with torch.inference_mode():
        ...     GraphedForward(model)(torch.zeros(1, 1, 8, 8, 8)).shape  # a CPU input runs ``model`` itself
        torch.Size([1, 2, 6, 6, 6])
    """

    def __init__(self, fn: Callable[[torch.Tensor], Any], clone_outputs: bool = False):
        self.fn = fn
        self.clone_outputs = clone_outputs
        self._graphs: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, Any]] = {}
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """Graphs captured so far (one per distinct input shape / dtype / autocast / inference mode)."""
        return len(self._graphs)

    def __call__(self, x: torch.Tensor) -> Any:
        if not x.is_cuda:
            return self.fn(x)
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedForward is for inference: call it under torch.inference_mode() or no_grad()")
        key = (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"), torch.is_inference_mode_enabled())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x)
        static_in, graph, out = entry
        static_in.copy_(x)
        graph.replay()
        return _clone(out) if self.clone_outputs else out

    def _capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.CUDAGraph, Any]:
        static_in = x.clone()
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP):
                self.fn(static_in)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(static_in)
        if self._pool is None:
            self._pool = graph.pool()
        return static_in, graph, out
