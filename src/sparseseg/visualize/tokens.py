"""The cells TokenSeg keeps over a whole volume and their boundary fraction against a reference label.

As for the pruning policy (:mod:`.policy`), the volume is cut into non-overlapping ROI tiles padded by edge
replication; ``model.select_tokens`` runs on each tile and the kept cells are stitched into one map. The boundary
measures of :func:`sparseseg.models.tokenseg.boundary.boundary_report` (and their chance levels) are averaged over
the tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from sparseseg.models.tokenseg.boundary import boundary_report
from sparseseg.visualize.policy import roi_tiles


@dataclass
class TokenMap:
    """``cells`` ``[X, Y, Z]``: 1 + the finest level of a kept token covering the voxel (1 = 1/2 ... 4 = 1/16), 0
    where none was kept; ``report``: the boundary measures and chance levels averaged over ``tiles`` ROI tiles
    (empty without a label); ``kept_per_level``: kept tokens per level and tile."""

    cells: np.ndarray
    report: dict[str, float]
    tiles: int
    kept_per_level: list[int]


@torch.inference_mode()
def token_map(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], label: torch.Tensor | None = None,
              radius: int = 2, batch_size: int = 4) -> TokenMap:
    """Kept cells of a TokenSeg model over ``image`` ``[C, X, Y, Z]`` and, with ``label`` ``[X, Y, Z]`` (class
    indices on the same grid), their boundary fraction at ``radius`` beside its chance level."""
    if not callable(getattr(model, "select_tokens", None)):
        raise ValueError(f"model {getattr(model, 'model_name', type(model).__name__)!r} has no select_tokens")
    roi = [int(r) for r in roi_size]
    shape = image.shape[1:]
    cells = np.zeros([math.ceil(s / r) * r for s, r in zip(shape, roi, strict=True)], dtype=np.int64)
    dev = next(model.parameters()).device
    lab = None if label is None else label[None].long()
    labels = None if lab is None else roi_tiles(lab, roi, batch_size)
    sums: dict[str, float] = {}
    counts = np.zeros(len(model.strides), dtype=np.int64)
    tiles = 0
    for chunk, batch in roi_tiles(image, roi, batch_size):
        sel = model.select_tokens(batch.to(dev))
        counts += np.bincount(sel.levels.flatten().cpu().numpy(), minlength=len(model.strides))
        for (i, j, k), v in zip(chunk, sel.voxel_map().cpu().numpy(), strict=True):
            cells[i * roi[0]:(i + 1) * roi[0], j * roi[1]:(j + 1) * roi[1], k * roi[2]:(k + 1) * roi[2]] = v
        if labels is not None:
            _, target = next(labels)
            for key, value in boundary_report(sel, target.round().long().to(dev), radius).items():
                sums[key] = sums.get(key, 0.0) + float(value.sum())
        tiles += len(chunk)
    report = {key: value / tiles for key, value in sums.items()}
    return TokenMap(cells[: shape[0], : shape[1], : shape[2]], report, tiles, (counts // max(tiles, 1)).tolist())


def cell_levels_legend(strides: Sequence[int]) -> list[str]:
    """Names of the values of :attr:`TokenMap.cells`: ``["none", "1/2 (2^3 cell)", ...]``."""
    return ["none"] + [f"1/{s} ({s}^3 cell)" for s in strides]
