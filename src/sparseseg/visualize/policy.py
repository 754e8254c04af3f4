"""The pruning policy of a token-pruning model over a whole volume, for :func:`sparseseg.visualize.plots.plot_policy`.

A model sees one ROI window at a time and prunes within it, so the volume is cut into non-overlapping ROI tiles
(padded by edge replication up to a whole number of tiles) and ``model.pruning_policy`` is called on each tile;
the per-token depths are stitched into one patch grid over the volume. :func:`refinement_map` does the same for
the blocks sparse decoding refines (``model.refined_blocks``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PolicyMap:
    """Per-token depths ``depth`` ``[gx, gy, gz]`` over an image ``[C, X, Y, Z]`` (``g = ceil(X / patch_size)``),
    with the encoder depth ``num_layers`` and every depth a token can have (``levels``: prune stages + end)."""

    image: np.ndarray
    depth: np.ndarray
    patch_size: int
    num_layers: int
    levels: list[int]
    label: np.ndarray | None = None


def model_patch_size(model: nn.Module) -> int:
    """Patch side of a ViT-based model (``model.vit.patch_embed`` kernel, else the ``patch_size`` argument)."""
    vit = getattr(model, "vit", None)
    if vit is not None and hasattr(vit, "patch_embed"):
        return int(vit.patch_embed.kernel_size[0])
    return int(getattr(model, "model_args", {}).get("patch_size", 16))


def policy_levels(model: nn.Module) -> list[int]:
    """The depths a token of ``model`` can reach: 0 when it drops background tokens before the first block, the
    blocks after which it prunes, and ``num_layers``."""
    encoder = getattr(model, "encoder", None)
    stages = [int(p) for p in getattr(encoder, "prune_after", ())]
    background = [0] if getattr(model, "drop_background", False) else []
    return sorted(set(stages + background) | {int(model.num_layers)})


def roi_tiles(volume: torch.Tensor, roi_size: Sequence[int], batch_size: int = 4
              ) -> Iterator[tuple[list[tuple[int, int, int]], torch.Tensor]]:
    """Non-overlapping ROI tiles of ``volume`` ``[C, X, Y, Z]``, padded by edge replication to whole tiles: yields
    ``(tile indices (i, j, k), batch [b, C, *roi])`` with up to ``batch_size`` tiles in raster order."""
    roi = [int(r) for r in roi_size]
    tiles = [math.ceil(s / r) for s, r in zip(volume.shape[1:], roi, strict=True)]
    pad = [t * r - s for t, r, s in zip(tiles, roi, volume.shape[1:], strict=True)]
    x = F.pad(volume[None].float(), (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")  # [1, C, tX, tY, tZ]
    corners = [(i, j, k) for i in range(tiles[0]) for j in range(tiles[1]) for k in range(tiles[2])]
    for start in range(0, len(corners), batch_size):
        chunk = corners[start:start + batch_size]
        yield chunk, torch.cat([x[:, :, i * roi[0]:(i + 1) * roi[0], j * roi[1]:(j + 1) * roi[1],
                                  k * roi[2]:(k + 1) * roi[2]] for i, j, k in chunk])  # [b, C, *roi]


@torch.inference_mode()
def policy_map(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], batch_size: int = 4) -> np.ndarray:
    """Stitched pruning depths ``[gx, gy, gz]`` of an eval-mode model over ``image`` ``[C, X, Y, Z]``.

    The image is padded by edge replication to whole ROI tiles; each tile's ``model.pruning_policy`` ``[1, N]``
    fills its block of the patch grid. Raises ValueError for a model without ``pruning_policy``.
    """
    if not callable(getattr(model, "pruning_policy", None)):
        raise ValueError(f"model {getattr(model, 'model_name', type(model).__name__)!r} has no pruning_policy")
    return _stitched(model.pruning_policy, model, image, roi_size, model_patch_size(model), batch_size)


@torch.inference_mode()
def refinement_map(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], batch_size: int = 4
                   ) -> np.ndarray:
    """Stitched flags ``[bx, by, bz]`` (blocks of ``model.sparse_decoding.block_size`` voxels) of the blocks an
    eval-mode model's sparse decoding refines at its current ``refine_fraction``, over ``image`` ``[C, X, Y, Z]``
    cut into ROI tiles as in :func:`policy_map`. Raises ValueError for a model without sparse decoding."""
    if not callable(getattr(model, "refined_blocks", None)):
        raise ValueError(f"model {getattr(model, 'model_name', type(model).__name__)!r} has no sparse decoding")
    return _stitched(model.refined_blocks, model, image, roi_size, model.sparse_decoding.block_size, batch_size)


def _stitched(fn, model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], unit: int,
              batch_size: int) -> np.ndarray:
    """``fn`` of every ROI tile of ``image`` (``[b, C, *roi] -> [b, ...]`` values per ``unit``-sided cell,
    raster order) stitched into one grid over the image (edge-replicated up to whole tiles, cut back)."""
    roi = [int(r) for r in roi_size]
    if any(r % unit for r in roi):
        raise ValueError(f"roi_size {roi} must be divisible by {unit} (patch or block side)")
    shape = image.shape[1:]
    tg = [r // unit for r in roi]  # cells of one tile
    grid = np.zeros([math.ceil(s / r) * g for s, r, g in zip(shape, roi, tg, strict=True)], dtype=np.int64)
    dev = next(model.parameters()).device
    for chunk, batch in roi_tiles(image, roi, batch_size):
        values = fn(batch.to(dev)).long().cpu().numpy().reshape(len(chunk), *tg)  # [b, ...] -> [b, *tg]
        for (i, j, k), d in zip(chunk, values, strict=True):
            grid[i * tg[0]:(i + 1) * tg[0], j * tg[1]:(j + 1) * tg[1], k * tg[2]:(k + 1) * tg[2]] = d
    return grid[: math.ceil(shape[0] / unit), : math.ceil(shape[1] / unit), : math.ceil(shape[2] / unit)]


def policy_from_checkpoint(checkpoint: str | Path, inputs: str | Path | Sequence[str | Path],
                           label: str | Path | None = None, prune_ratio: float | None = None,
                           device: str = "auto", drop_background: bool = False) -> PolicyMap:
    """Load a checkpoint, preprocess one case as inference does and compute its pruning policy.

    ``inputs``: the case's image file(s) (one file or the ``CASE_0000``, ... channel files); ``label``: its reference
    map, brought onto the same preprocessed grid. ``prune_ratio`` overrides the trained ratio; ``drop_background``
    drops the all-background patch tokens before the first block, as ``predict --drop-background-tokens`` does.
    """
    from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint
    from sparseseg.config import resolve_device
    from sparseseg.data.transforms import DataConfig, build_transforms, regions_to_labels, unwrap_input_errors
    from sparseseg.errors import InputError
    from sparseseg.inference.predictor import (
        collect_cases,
        input_background_value,
        set_drop_background,
        set_prune_ratio,
    )

    ckpt = load_checkpoint(checkpoint)
    data_cfg = DataConfig.from_dict(ckpt["data"])
    cases = collect_cases(inputs, data_cfg.in_channels)
    if len(cases) != 1:
        raise InputError(f"the policy picture takes one case, got {len(cases)}: {', '.join(sorted(cases))}",
                         Path(inputs if isinstance(inputs, (str, Path)) else inputs[0]))
    paths = next(iter(cases.values()))
    model = model_from_checkpoint(ckpt, checkpoint)
    if not callable(getattr(model, "pruning_policy", None)):
        raise InputError(f"model {ckpt['model_name']!r} has no pruning policy to draw", checkpoint)
    if prune_ratio is not None:
        set_prune_ratio(model, prune_ratio, checkpoint)
    if drop_background:
        set_drop_background(model, True, input_background_value(data_cfg), checkpoint)
    model.to(resolve_device(device)).eval()
    item = {"image": [str(p) for p in paths]}
    if label is not None:
        item["label"] = str(label)
    with unwrap_input_errors():
        d = build_transforms(data_cfg, "val" if label is not None else "infer")(item)
    image = d["image"].as_tensor()  # [C, X, Y, Z] on the preprocessed grid
    lab = None
    if label is not None:
        lab_t = d["label"].as_tensor()
        lab_t = regions_to_labels(lab_t > 0.5, data_cfg.regions) if data_cfg.regions else lab_t[0]
        lab = lab_t.numpy().astype(np.int64)  # [X, Y, Z]
    depth = policy_map(model, image, data_cfg.roi_size)
    return PolicyMap(image=image.numpy(), depth=depth, patch_size=model_patch_size(model),
                     num_layers=int(model.num_layers), levels=policy_levels(model), label=lab)
