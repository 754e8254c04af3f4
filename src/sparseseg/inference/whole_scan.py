"""One whole scan through the predictor with bounded memory: read, preprocess, sliding window (skipping
all-background windows), map back onto the input grid one output channel at a time, write; each stage timed.

Memory: the only multi-channel volume is the model's output on the *preprocessed* grid (``K`` channels, float32).
Probabilities are mapped back onto the input grid through the pipeline's MONAI inverse one channel at a time, and
folded into the label map as they come: a running maximum and argmax for softmax classes, a threshold painted in
:func:`~sparseseg.data.transforms.region_paint_order` for sigmoid regions. Every channel is resampled alone exactly
as it is within all channels (interpolation is per channel), so the labels equal those of mapping all channels back
and taking the argmax (first maximum on ties, as ``torch.argmax``) or thresholding. A ``[X, Y, Z, K]`` probability
volume on the input grid exists only when it is asked for (``save_probabilities``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    return MetaTensor(torch.empty(0), affine=image.affine, meta=dict(image.meta),
                      applied_operations=list(image.applied_operations))


def _activate_(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Logits ``[K, D, H, W]`` -> probabilities in place, a slab of the first spatial axis at a time."""
    for i in range(0, logits.shape[1], SLAB):
        part = logits[:, i:i + SLAB]
        part.copy_(torch.sigmoid(part) if sigmoid else torch.softmax(part, dim=0))
    return logits


def labels_on_input(probs: torch.Tensor, image: MetaTensor, pipeline, data_cfg: DataConfig,
                    save_probabilities: bool = False) -> tuple[torch.Tensor, np.ndarray | None]:
    """Probabilities ``[K, d, h, w]`` on the preprocessed grid -> the label map ``[X, Y, Z]`` (uint8, label values)
    on the input grid and, if asked, the probabilities ``[X, Y, Z, K]`` (float32), mapped back one channel at a
    time (see the module note)."""
    k_out = probs.shape[0]
    order = region_paint_order(data_cfg.regions) if data_cfg.regions else [(k, k) for k in range(k_out)]
    labels = best = probabilities = None
    for k, value in order:
        p = invert_to_input(probs[k:k + 1], image, pipeline)[0]  # [1, d, h, w] -> [X, Y, Z]
        if labels is None:
            labels = torch.zeros(p.shape, dtype=torch.uint8)
            if save_probabilities:
                probabilities = np.empty((*p.shape, k_out), dtype=np.float32)
        if probabilities is not None:
            probabilities[..., k] = p.numpy()
        if data_cfg.regions:
            labels[p > 0.5] = value
        elif best is None:
            shared = p.untyped_storage().data_ptr() == probs.untyped_storage().data_ptr()
            best = p.clone() if shared else p  # no spatial preprocessing: ``p`` is a view of ``probs``
        else:
            wins = p > best  # strict: a tie keeps the earlier class, as torch.argmax
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
        labels, probabilities = labels_on_input(probs, reference, pipeline, data_cfg, save_probabilities)
        del probs
    with timer("write"):
        out = write_prediction(output_dir, name, grid, labels.numpy(), probabilities, output_format,
                               data_cfg.segments)
    record = {"case": name, "shape": shape, "stages": {s: round(timer.seconds.get(s, 0.0), 3) for s in STAGES},
              "windows": {"run": counts.run, "skipped": counts.skipped}}
    log.info("%s -> %s  [%s; windows run %d, skipped %d]", paths[0].name, out,
             ", ".join(f"{s} {t:.1f} s" for s, t in record["stages"].items()), counts.run, counts.skipped)
    return out, record
