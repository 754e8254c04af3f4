"""One whole scan through the predictor with bounded memory: read, preprocess, sliding window (skipping
all-background windows), map back onto the input grid, write; each stage timed.

Memory: the only multi-channel volume is the model's output on the *preprocessed* grid (``K`` channels, float32).
Orientation, resampling and foreground crop are undone by :func:`inverse_plan` as three 1-D linear interpolations
(the grids are axis-parallel), a slab of input rows and one channel at a time, folded into the label map as they
come: a running maximum for softmax classes (ties keep the earlier class, as ``torch.argmax``), thresholds painted
in :func:`~sparseseg.data.transforms.region_paint_order` for sigmoid regions. MONAI's inverse of one channel of a
512 x 512 x 300 CT allocates about 4.4 GB (a float64 sampling grid and copies); other spatial transforms still go
through it (:func:`~sparseseg.data.transforms.invert_to_input`), one channel at a time. Interpolation is per
channel, so the labels equal those of mapping all channels back and then taking the argmax or thresholds (tests).
A ``[X, Y, Z, K]`` probability volume on the input grid exists only when it is asked for (``save_probabilities``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from sparseseg.data.io import read_grid
from sparseseg.data.outputs import write_prediction
from sparseseg.data.transforms import DataConfig, invert_to_input, region_paint_order, unwrap_input_errors
from sparseseg.inference.sliding_window import Network, WindowCounts, skipping_sliding_window

log = logging.getLogger(__name__)

STAGES = ("read", "preprocess", "sliding_window", "invert", "write")
SLAB = 16  # first-axis slices per in-place softmax/sigmoid step (bounds its temporary)


def background_value(data_cfg: DataConfig) -> float | None:
    """The preprocessed value of an empty voxel, or None when the preset has none: ``mri`` z-scores the non-zero
    voxels only, so zeros stay 0; ``ct`` clips air (below the window) to the window's lower output bound."""
    if data_cfg.intensity == "mri":
        return 0.0
    if data_cfg.intensity == "ct":
        return float(data_cfg.ct_window[2])
    return None


class StageTimer:
    """Wall-clock seconds per named stage: ``with timer("read"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _meta_only(image: MetaTensor) -> MetaTensor:
    """An empty MetaTensor with ``image``'s affine, meta and applied operations: all the inverse needs, so the
    preprocessed voxels can be freed before the mapping back."""
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    return MetaTensor(torch.empty(0), affine=image.affine, meta=meta, applied_operations=list(image.applied_operations))


def _activate_(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Logits ``[K, D, H, W]`` -> probabilities in place, a slab of the first spatial axis at a time."""
    for i in range(0, logits.shape[1], SLAB):
        part = logits[:, i:i + SLAB]
        part.copy_(torch.sigmoid(part) if sigmoid else torch.softmax(part, dim=0))
    return logits


SLAB_VOXELS = 2**23  # input-grid voxels mapped back per step (32 MB of float32 per intermediate)
_MAPPED_OPS = {"Orientation", "SpatialResample", "CropForeground"}


@dataclass
class _AxisLerp:
    """Linear interpolation along one input axis from the source axis ``src_axis`` of the preprocessed grid:
    output ``i`` = ``w_lo[i] * src[lo[i]] + w_hi[i] * src[hi[i]]`` (zero weight for a neighbour outside)."""

    src_axis: int
    lo: torch.Tensor
    hi: torch.Tensor
    w_lo: torch.Tensor
    w_hi: torch.Tensor


def inverse_plan(image: MetaTensor, pre_shape: Sequence[int], input_affine: np.ndarray,
                 input_shape: Sequence[int]) -> list[_AxisLerp] | None:
    """The pipeline's inverse (crop -> zero pad, resampling -> trilinear with border clamp, orientation -> axis
    permutation and flips) as three 1-D interpolations, one per input axis; None when the applied operations are
    not only these or the grids are not axis-parallel (then :func:`invert_to_input` is used).

    Orientation permutes and flips axes and ``Spacing`` only rescales them, so the preprocessed grid is
    axis-parallel to the input grid and trilinear interpolation separates into one linear interpolation per axis.
    """
    ops = image.applied_operations
    if not ops or any(op["class"] not in _MAPPED_OPS for op in ops):
        return None
    crop, sp_shape = np.zeros(3), np.asarray(pre_shape, dtype=np.float64)
    if ops[-1]["class"] == "CropForeground":
        info = ops[-1]["extra_info"]
        if any(int(v) for pair in info["pad_info"]["extra_info"]["padded"] for v in pair):
            return None
        crop, sp_shape = np.asarray(info["cropped"][0::2], dtype=np.float64), np.asarray(ops[-1]["orig_size"])
    if any(op["class"] == "CropForeground" for op in ops[:-1]) or (
            any(op["class"] == "SpatialResample" and op["extra_info"].get("padding_mode") != "border" for op in ops)):
        return None
    shift = np.eye(4)
    shift[:3, 3] = -crop
    sp_affine = np.asarray(image.affine, dtype=np.float64) @ shift  # the resampled grid before the crop
    voxel = np.linalg.inv(sp_affine) @ np.asarray(input_affine, dtype=np.float64)  # input voxel -> resampled voxel
    lin, offset = voxel[:3, :3], voxel[:3, 3]
    src_of = [int(np.argmax(np.abs(lin[:, b]))) for b in range(3)]  # the source axis each input axis maps onto
    if sorted(src_of) != [0, 1, 2] or any(abs(lin[a, b]) > 1e-6 * abs(lin[src_of[b], b])
                                          for b in range(3) for a in range(3) if a != src_of[b]):
        return None
    plan = []
    for b, a in enumerate(src_of):
        pos = lin[a, b] * np.arange(int(input_shape[b])) + offset[a]
        pos = np.clip(pos, 0.0, sp_shape[a] - 1) - crop[a]  # border clamp on the resampled grid, then the crop
        lo = np.floor(pos)
        frac = pos - lo
        n = int(pre_shape[a])
        valid_lo, valid_hi = (lo >= 0) & (lo < n), (lo + 1 >= 0) & (lo + 1 < n)  # outside the crop: zeros
        plan.append(_AxisLerp(a, torch.from_numpy(np.clip(lo, 0, n - 1).astype(np.int64)),
                              torch.from_numpy(np.clip(lo + 1, 0, n - 1).astype(np.int64)),
                              torch.from_numpy(((1 - frac) * valid_lo).astype(np.float32)),
                              torch.from_numpy((frac * valid_hi).astype(np.float32))))
    return plan


def _lerp(x: torch.Tensor, dim: int, lerp: _AxisLerp, rows: slice = slice(None)) -> torch.Tensor:
    shape = [1, 1, 1]
    shape[dim] = -1
    at = (slice(None),) * dim
    out = x[(*at, lerp.lo[rows])].mul_(lerp.w_lo[rows].view(shape))  # advanced indexing: a copy, faster than
    return out.addcmul_(x[(*at, lerp.hi[rows])], lerp.w_hi[rows].view(shape))  # index_select on inner axes


def _map_back_rows(channel: torch.Tensor, plan: list[_AxisLerp], rows: slice) -> torch.Tensor:
    """Rows ``rows`` of the first input axis of one channel ``[d, h, w]`` mapped back onto the input grid."""
    src = channel.permute(*[p.src_axis for p in plan])  # source axes in input-axis order (a view)
    x = _lerp(src, 0, plan[0], rows)  # [d, h, w] -> [rows, h, w]
    x = _lerp(x, 2, plan[2])  # -> [rows, h, Z]
    return _lerp(x, 1, plan[1])  # -> [rows, Y, Z]


def labels_on_input(probs: torch.Tensor, image: MetaTensor, pipeline, data_cfg: DataConfig,
                    save_probabilities: bool = False, input_affine: np.ndarray | None = None,
                    input_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Probabilities ``[K, d, h, w]`` on the preprocessed grid -> the label map ``[X, Y, Z]`` (uint8, label values)
    on the input grid and, if asked, the probabilities ``[X, Y, Z, K]`` (float32), folded in one channel at a time.

    With the input's ``input_affine`` and ``input_shape`` the mapping back runs in slabs of the first input axis
    (:func:`inverse_plan`); otherwise, or for other spatial transforms, each channel goes through the pipeline's
    MONAI inverse (:func:`~sparseseg.data.transforms.invert_to_input`).
    """
    k_out = probs.shape[0]
    order = region_paint_order(data_cfg.regions) if data_cfg.regions else [(k, k) for k in range(k_out)]
    plan = None
    if input_affine is not None and input_shape is not None:
        plan = inverse_plan(image, probs.shape[1:], input_affine, input_shape)
    if plan is None:
        return _fold(lambda k, rows: invert_to_input(probs[k:k + 1], image, pipeline)[0], order, data_cfg.sigmoid,
                     k_out, None, save_probabilities)
    shape = tuple(int(s) for s in input_shape)
    step = max(1, SLAB_VOXELS // (shape[1] * shape[2]))
    labels = torch.zeros(shape, dtype=torch.uint8)
    probabilities = np.empty((*shape, k_out), dtype=np.float32) if save_probabilities else None
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        part, _ = _fold(lambda k, r: _map_back_rows(probs[k], plan, r), order, data_cfg.sigmoid, k_out, rows,
                        False, probabilities)
        labels[rows] = part
    return labels, probabilities


def _fold(channel, order: list[tuple[int, int]], sigmoid: bool, k_out: int, rows: slice | None,
          save_probabilities: bool, probabilities: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Labels from channels ``channel(k, rows)`` taken one at a time: thresholds painted in ``order`` (regions) or
    a running maximum (classes; a tie keeps the earlier class, as ``torch.argmax``)."""
    labels = best = None
    for k, value in order:
        p = channel(k, rows)
        if labels is None:
            labels = torch.zeros(p.shape, dtype=torch.uint8)
            if save_probabilities:
                probabilities = np.empty((*p.shape, k_out), dtype=np.float32)
        if probabilities is not None:
            probabilities[(rows if rows is not None else slice(None), slice(None), slice(None), k)] = p.numpy()
        if sigmoid:
            labels[p > 0.5] = value
        elif best is None:
            best = p.clone()  # ``p`` may be a view of the probabilities
        else:
            wins = p > best
            labels[wins] = value
            best = torch.maximum(best, p, out=best)
    assert labels is not None
    return labels, probabilities


def predict_case(model: Network, name: str, paths: list[Path], data_cfg: DataConfig, pipeline, dev: torch.device,
                 output_dir: Path, overlap: float, sw_batch_size: int, save_probabilities: bool,
                 stitch: torch.device | str, output_format: str | None = None, skip_background: bool = True,
                 progress: bool = False) -> tuple[Path, dict[str, Any]]:
    """Segment one case and write its label map (and probabilities). Returns the label file and its timing record
    ``{"case", "shape", "stages": {read, preprocess, sliding_window, invert, write}, "windows": {run, skipped}}``.

    ``stitch`` is where the preprocessed-grid output is accumulated: a device, or a callable
    ``(spatial shape) -> device``.
    """
    timer = StageTimer()
    with timer("read"), unwrap_input_errors():
        d = pipeline({"image": [str(p) for p in paths]}, end=1)  # LoadCased
        grid = read_grid(paths[0])
        shape = [int(s) for s in d["image"].shape[1:]]
        input_affine = np.asarray(d["image"].affine, dtype=np.float64)
    with timer("preprocess"), unwrap_input_errors():
        d = pipeline(d, start=1)
    with timer("sliding_window"):
        image = d["image"].as_tensor()[None]  # [C, d, h, w] -> [1, C, d, h, w]
        where = stitch(image.shape[2:]) if callable(stitch) else torch.device(stitch)
        reference = _meta_only(d["image"])
        del d
        counts = WindowCounts()
        logits = skipping_sliding_window(model, image.to(where), data_cfg.roi_size, sw_batch_size, overlap,
                                         background_value(data_cfg) if skip_background else None, sw_device=dev,
                                         device=where, counts=counts, progress=progress)
        del image
    with timer("invert"):
        probs = _activate_(logits[0].float().cpu(), data_cfg.sigmoid)  # [K, d, h, w]
        del logits
        labels, probabilities = labels_on_input(probs, reference, pipeline, data_cfg, save_probabilities,
                                                input_affine, shape)
        del probs
    with timer("write"):
        out = write_prediction(output_dir, name, grid, labels.numpy(), probabilities, output_format,
                               data_cfg.segments)
    record = {"case": name, "shape": shape, "stages": {s: round(timer.seconds.get(s, 0.0), 3) for s in STAGES},
              "windows": {"run": counts.run, "skipped": counts.skipped}}
    log.info("%s -> %s  [%s; windows run %d, skipped %d]", paths[0].name, out,
             ", ".join(f"{s} {t:.1f} s" for s, t in record["stages"].items()), counts.run, counts.skipped)
    return out, record
