"""``sparseseg demo``: :mod:`.data` (the ICBM152 dataset), :mod:`.run` (train, predict, score, time) and
:mod:`.report` (benchmark, pictures, ``report.md``)."""

from __future__ import annotations

from sparseseg.demo.run import run_demo

__all__ = ["run_demo"]
