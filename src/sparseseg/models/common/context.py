"""How a forward pass runs: eagerly on the CPU or captured into a graph; autocast switched off where it exists.

Some models choose among public PyTorch formulations of the same computation by where they run (a memory layout,
attention as matmuls instead of SDPA, max-pooling as element-wise maxima): the choice is made per call from the
tensor alone, keeps no state, and every counter sees the operations it runs. A captured graph (tracing, scripting,
ONNX export, ``torch.compile``) takes the standard formulation: it has to run anywhere, and ONNX has no memory
formats.
"""

from __future__ import annotations

import contextlib

import torch


def capturing() -> bool:
    """Whether the current call is being traced, scripted, exported to ONNX or compiled."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling())


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU tensor in an eager run (not one being captured into a graph)."""
    return x.device.type == "cpu" and not capturing()


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context without autocast on ``device_type`` (for work that must stay in float32); nothing to switch off
    where autocast does not exist, such as the ``meta`` device that MAC counting runs on."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
