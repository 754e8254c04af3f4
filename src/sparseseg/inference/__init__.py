"""Inference from a checkpoint: :mod:`.predict` (whole volumes, sliding window, written on the input's grid),
:mod:`.sliding_window`, :mod:`.export` (ONNX / TorchScript) and :mod:`.cuda_graphs`."""

from __future__ import annotations

from sparseseg.inference.predictor import collect_cases, predict, set_prune_ratio, set_refine_fraction

__all__ = ["collect_cases", "predict", "set_prune_ratio", "set_refine_fraction"]
