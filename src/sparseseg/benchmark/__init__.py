"""Measuring models side by side: :mod:`.run` (``benchmark(...)``: timings against the dense baseline in one run),
:mod:`.workload` (the inputs and the training step timed), :mod:`.flops` (MACs and parameters), :mod:`.memory`
(peak CPU memory in a child process), :mod:`.profile` (time per part) and :mod:`.report` (JSON, Markdown, plot)."""

from __future__ import annotations

from sparseseg.benchmark.run import benchmark

__all__ = ["benchmark"]
