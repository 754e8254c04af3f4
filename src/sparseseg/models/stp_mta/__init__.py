"""STP + MTA + UNETR (the paper's sparse pipeline) and the dense UNETR baseline it is measured against.

:mod:`.pruning` (sparse encoding: STP and the EViT / DynamicViT scorers), :mod:`.completion` (token completion: MTA,
MIM) and :mod:`.unetr` (the registered ``unetr`` and ``stp_mta_unetr`` models)."""

from __future__ import annotations

from sparseseg.models.stp_mta.unetr import STPMTAUNETR, UNETR

__all__ = ["STPMTAUNETR", "UNETR"]
