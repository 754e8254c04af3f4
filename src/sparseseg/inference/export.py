"""Export a checkpoint's network in inference mode to ONNX or TorchScript: ``export(checkpoint, output, format)``.

The exported graph maps one ROI window ``[B, in_channels, *roi_size]`` to logits ``[B, out_channels, *roi_size]``
(the batch axis is dynamic); sliding-window stitching stays outside it. Sparse models export their test-time
token selection as it runs in PyTorch: the top-K of the scores becomes an ONNX ``TopK`` and the gathers and
scatters of tokens ``GatherElements`` / ``ScatterElements``, with K fixed by the pruning ratio at export time
(``prune_ratio`` overrides the trained one, as in ``predict``).

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17),
which needs no package beyond torch; checking the file needs ``onnx`` and comparing outputs ``onnxruntime``
(``pip install sparseseg[export]``). The graph is traced on the checkpoint's ROI size, so a model's sizes (token
counts, window sizes) are constants of the graph, while the batch axis stays free. A model that cannot be exported
raises :class:`~sparseseg.errors.InputError` with one line naming the model, the format and the cause; nothing is
written then.

Examples:
    >>> export("runs/brats/best.pt", "stp.onnx", format="onnx", prune_ratio=0.75)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint
from sparseseg.data.io import atomic_write, check_writable
from sparseseg.data.transforms import DataConfig
from sparseseg.errors import InputError, SparsesegError

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


class InferenceGraph(nn.Module):
    """An eval-mode segmentation model as a plain ``logits = f(image)`` module (no ``target`` argument)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> logits ``[B, K, D, H, W]``."""
        return self.model(image)


def load_for_export(checkpoint: str | Path, prune_ratio: float | None = None,
                    refine_fraction: float | None = None) -> tuple[InferenceGraph, torch.Tensor]:
    """The checkpoint's model wrapped for export, and an example window ``[1, C, *roi_size]`` (zeros)."""
    from sparseseg.inference.predictor import set_prune_ratio, set_refine_fraction

    ckpt = load_checkpoint(checkpoint)
    data_cfg = DataConfig.from_dict(ckpt["data"])
    model = model_from_checkpoint(ckpt, checkpoint)
    if prune_ratio is not None:
        set_prune_ratio(model, prune_ratio, checkpoint)
    if refine_fraction is not None:
        set_refine_fraction(model, refine_fraction, checkpoint)
    example = torch.zeros(1, data_cfg.in_channels, *data_cfg.roi_size)
    return InferenceGraph(model).eval(), example


def export(checkpoint: str | Path, output: str | Path, format: str = "onnx", prune_ratio: float | None = None,
           opset: int = ONNX_OPSET, refine_fraction: float | None = None) -> Path:
    """Write the checkpoint's network as ``format`` (``onnx`` or ``torchscript``) to ``output`` (atomically).

    Args:
        checkpoint: a ``best.pt``/``last.pt`` of ``sparseseg train``.
        output: the file to write (``.onnx`` / ``.pt``).
        format: ``onnx`` or ``torchscript`` (a traced module: ``torch.jit.load(output)``).
        prune_ratio: test-time pruning ratio of a sparse model (None keeps the trained one).
        opset: ONNX opset version.
        refine_fraction: share of the full-resolution blocks a model with sparse decoding computes (None keeps the
            trained one): the block selection is exported as ``TopK``, the block gathers and the scatter of the
            refined logits as ``Gather`` / ``ScatterElements``, with the number of blocks fixed.

    Returns:
        ``output``.
    """
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r} (choose {' or '.join(FORMATS)})")
    output = Path(output)
    if output.is_dir():
        raise InputError("output must be a file, not a folder", output)
    check_writable(output.parent)
    graph, example = load_for_export(checkpoint, prune_ratio, refine_fraction)
    name = getattr(graph.model, "model_name", type(graph.model).__name__)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python int it records (token counts, grid sizes): they are fixed by the
        # ROI size and the pruning ratio, which is exactly what the exported graph is meant to hold.
        warnings.simplefilter("ignore")
        try:
            if format == "onnx":
                atomic_write(output, lambda tmp: _write_onnx(graph, example, tmp, opset))
            else:
                traced = torch.jit.trace(graph, example, check_trace=False)
                atomic_write(output, lambda tmp: _write_torchscript(traced, tmp))
        except SparsesegError:  # bad input, or a WriteError of a full disk: already one line
            raise
        except Exception as err:  # the exporters fail in many types (AssertionError, SymbolicValueError, ...)
            cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise InputError(f"cannot export model {name!r} as {format}: {type(err).__name__}: {cause}",
                             checkpoint) from err
    log.info("exported %s as %s to %s", name, format, output)
    return output


def _write_torchscript(traced: torch.jit.ScriptModule, path: Path) -> None:
    # Through a Python file object: given a file name, torch.jit.save aborts the process on a full disk
    # ("terminate called after throwing an instance of 'c10::Error' ... unexpected pos"); a file object's write
    # raises OSError(ENOSPC), which atomic_write reports in one line.
    with open(path, "wb") as f:
        torch.jit.save(traced, f)


def _write_onnx(graph: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    try:
        import onnx
    except ImportError:
        return
    onnx.checker.check_model(onnx.load(str(path)))
