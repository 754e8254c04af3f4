"""Scoring predictions against reference labels: Dice and HD95 per class and case (:mod:`.metrics`)."""

from __future__ import annotations

from sparseseg.evaluation.metrics import evaluate, format_table

__all__ = ["evaluate", "format_table"]
