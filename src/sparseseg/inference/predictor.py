"""Sliding-window inference from a checkpoint alone: ``predict(checkpoint, inputs, output_dir)``.

The model (registered name + arguments) and the preprocessing (:class:`~sparseseg.data.transforms.DataConfig`)
are rebuilt from the checkpoint. Each case is preprocessed, segmented with MONAI's sliding window (Gaussian
blending), its probabilities are mapped back onto the input's exact grid (shape and affine) by inverting the
spatial preprocessing, and one label map is written per case in the input's format (nnU-Net naming:
``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` -> ``CASE.nii.gz``; see :mod:`sparseseg.data.outputs`).

Examples:
    >>> predict("runs/spleen/best.pt", "Task09_Spleen/imagesTs", "preds/")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint
from sparseseg.config import resolve_device
from sparseseg.data.cases import check_output_format, collect_cases
from sparseseg.data.io import check_writable, read_grid
from sparseseg.data.outputs import write_prediction
from sparseseg.data.transforms import (
    DataConfig,
    build_transforms,
    invert_to_input,
    regions_to_labels,
    unwrap_input_errors,
)
from sparseseg.errors import InputError
from sparseseg.inference.cuda_graphs import GraphedForward
from sparseseg.inference.fast_cpu import optimize_for_cpu_inference
from sparseseg.inference.sharding import case_outputs, current_shard, run_share, set_threads, shard_device
from sparseseg.inference.sliding_window import Network, sliding_window_logits

log = logging.getLogger(__name__)


def set_prune_ratio(model: nn.Module, prune_ratio: float, source: str | Path | None = None) -> None:
    """Test-time pruning ratio: ``model.set_prune_ratio(r)`` when the model has it, else the ``prune_ratio``
    attribute; a model without token pruning raises InputError."""
    if not 0.0 <= prune_ratio < 1.0:
        raise InputError(f"prune ratio must be in [0, 1), got {prune_ratio}", source)
    if callable(getattr(model, "set_prune_ratio", None)):
        model.set_prune_ratio(prune_ratio)
    elif hasattr(model, "prune_ratio"):
        model.prune_ratio = prune_ratio
    else:
        raise InputError(f"model {getattr(model, 'model_name', type(model).__name__)!r} has no pruning ratio",
                         source)


def set_refine_fraction(model: nn.Module, refine_fraction: float, source: str | Path | None = None) -> None:
    """Test-time sparse decoding: the ``refine_fraction`` attribute (share of the full-resolution blocks decoded,
    in (0, 1], 1 = dense); a model without sparse decoding raises InputError."""
    if not 0.0 < refine_fraction <= 1.0:
        raise InputError(f"refine fraction must be in (0, 1], got {refine_fraction}", source)
    if not hasattr(model, "refine_fraction"):
        raise InputError(f"model {getattr(model, 'model_name', type(model).__name__)!r} has no sparse decoding "
                         "(refine fraction)", source)
    try:
        model.refine_fraction = refine_fraction
    except ValueError as err:
        raise InputError(str(err), source) from err


def input_background_value(data_cfg: DataConfig) -> float:
    """The value background voxels have after the checkpoint's preprocessing: the CT window's ``b_min`` (air clipped
    to it) for ``ct``; 0 for ``mri`` (``NormalizeIntensity(nonzero=True)`` leaves the zeros around a skull-stripped
    scan at 0) and for ``none`` (values left alone)."""
    return float(data_cfg.ct_window[2]) if data_cfg.intensity == "ct" else 0.0


def set_drop_background(model: nn.Module, on: bool, background_value: float = 0.0,
                        source: str | Path | None = None) -> None:
    """Test-time background token dropping (``stp_mta_unetr``'s ``drop_background``: patch tokens whose input
    patch equals ``background_value`` everywhere skip the encoder); a model without it raises InputError."""
    if not hasattr(model, "drop_background"):
        raise InputError(f"model {getattr(model, 'model_name', type(model).__name__)!r} cannot drop background "
                         "tokens", source)
    try:
        model.background_value = background_value
    except ValueError as err:
        raise InputError(str(err), source) from err
    model.drop_background = on


def _check_output(output_dir: Path, inputs: str | Path | Sequence[str | Path], cases: dict[str, list[Path]]) -> None:
    out = output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise InputError("output must be a folder, not a file", output_dir)
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    for p in [Path(i).resolve() for i in items] + [f.resolve() for fs in cases.values() for f in fs]:
        if p == out or out in p.parents:
            raise InputError(f"output folder equals or contains the input {p}", output_dir)


class _Stopwatch:
    """Seconds per stage of one case (``lap(name)`` closes the stage that began at the previous lap) and the windows
    the network ran, for ``predict(..., timings=...)``."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.windows = 0
        self._start = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._start
        self._start = now

    def counting(self, model: Network) -> Network:
        def run(x: torch.Tensor) -> torch.Tensor:
            self.windows += x.shape[0]  # [B, C, *roi] -> B windows
            return model(x)

        return run


def _case_probabilities(model: Network, case: list[Path], data_cfg: DataConfig, pipeline, device: torch.device,
                        overlap: float, sw_batch_size: int, stitch_device: str = "auto",
                        watch: _Stopwatch | None = None) -> torch.Tensor:
    """Probabilities ``[K, X, Y, Z]`` (CPU) on the grid of the case's input file."""
    watch = watch or _Stopwatch()
    with unwrap_input_errors():
        d = pipeline({"image": [str(p) for p in case]}, end=1)  # the reader (LoadCased)
        watch.lap("read")
        d = pipeline(d, start=1)
    image = d["image"].as_tensor()[None]  # [C, d, h, w] -> [1, C, d, h, w]
    stitch = _stitch_device(stitch_device, device, data_cfg.out_channels, image.shape[2:])
    image = image.to(stitch)  # the whole volume stays where it is stitched; only the windows go to ``device``
    watch.lap("preprocess")
    logits = sliding_window_logits(watch.counting(model), image, data_cfg.roi_size, sw_batch_size, overlap,
                                   sw_device=device, device=stitch)  # [1, C, d, h, w] -> [1, K, d, h, w]
    probs = torch.sigmoid(logits[0]) if data_cfg.sigmoid else torch.softmax(logits[0], dim=0)
    del logits
    watch.lap("sliding_window")
    probs = invert_to_input(probs, d["image"], pipeline)  # [K, d, h, w] -> [K, X, Y, Z]
    watch.lap("invert")
    return probs


# Stitch on the GPU only while its whole-volume buffers (output and weight map, float32) stay below this size.
GPU_STITCH_LIMIT_BYTES = 2 * 2**30


def _stitch_device(choice: str, device: torch.device, out_channels: int, spatial: Sequence[int]) -> torch.device:
    """Where the whole-volume output of the sliding window is accumulated (MONAI's ``device`` argument):
    ``auto`` keeps it on ``device`` unless that is a GPU and the buffers would pass ``GPU_STITCH_LIMIT_BYTES``."""
    if choice != "auto":
        return resolve_device(choice)
    if device.type == "cpu":
        return device
    voxels = int(np.prod([int(s) for s in spatial]))
    return device if (out_channels + 1) * voxels * 4 <= GPU_STITCH_LIMIT_BYTES else torch.device("cpu")


def _failure_report(failures: list[InputError], written: int) -> InputError:
    """One error for all the cases that could not be segmented (the original one when there is only one)."""
    if len(failures) == 1 and written == 0:
        return failures[0]
    shown = "; ".join(str(e) for e in failures[:5]) + ("; ..." if len(failures) > 5 else "")
    return InputError(f"{len(failures)} case(s) failed, {written} written: {shown}")


@torch.inference_mode()
def predict(checkpoint: str | Path, inputs: str | Path | Sequence[str | Path], output_dir: str | Path,
            prune_ratio: float | None = None, overlap: float = 0.5, sw_batch_size: int = 4, device: str = "auto",
            save_probabilities: bool = False, stitch_device: str = "auto", cuda_graphs: bool = False,
            output_format: str | None = None, cpu_fast_path: bool = True,
            refine_fraction: float | None = None, skip_existing: bool = False, shard: str | None = None,
            threads: int | None = None, drop_background_tokens: bool = False,
            timings: list[dict[str, Any]] | None = None) -> list[Path]:
    """Segment every case of ``inputs`` (files and/or folders) and write ``output_dir/CASE.nii.gz`` (or the
    input's format).

    Args:
        checkpoint: a ``best.pt``/``last.pt`` written by :func:`sparseseg.training.train`.
        inputs: image files (NIfTI, NRRD, MetaImage), DICOM series folders, and/or folders of them; channel
            images ``CASE_0000``, ... form one case.
        output_dir: folder for the label maps (created); must not equal or contain an input.
        prune_ratio: test-time token pruning ratio of a sparse model (None keeps the trained one).
        overlap: sliding-window overlap in [0, 1).
        sw_batch_size: windows per forward pass.
        device: where the model and its windows run (MONAI's ``sw_device``): ``auto``, ``cpu``, ``cuda``, ...
        save_probabilities: also write ``CASE_probabilities.nii.gz`` (``[X, Y, Z, K]`` float32; ``.nrrd`` /
            ``.mha`` in those formats).
        stitch_device: where each whole volume is stitched (MONAI's ``device``): ``auto`` (``device``, or the
            CPU for volumes too large for the GPU), ``cpu``, ``cuda``, ...
        cuda_graphs: on a CUDA ``device``, run the windows as replays of CUDA graphs captured per window-batch
            shape (:class:`sparseseg.inference.cuda_graphs.GraphedForward`); no effect on the CPU.
        output_format: ``nifti``, ``nrrd`` (``CASE.seg.nrrd``), ``mha`` or ``dicom-seg`` (``CASE.dcm``, DICOM series
            inputs only); None writes each case in its input's format (NIfTI for a DICOM series).
        cpu_fast_path: on the CPU, run the model through
            :func:`~sparseseg.inference.fast_cpu.optimize_for_cpu_inference` (same output to float32 rounding).
        refine_fraction: test-time share of the full-resolution blocks decoded by a model with sparse decoding
            (None keeps the checkpoint's; 1 = dense decoding).
        skip_existing: leave a case whose outputs (label map; probabilities too with ``save_probabilities``)
            exist in ``output_dir`` as it is (resumes a stopped run); without it they are predicted and replaced.
        shard: ``"I/N"``: predict only share I (from 0) of N, for N processes started by hand or by an array job;
            under ``torchrun`` the shares come from ``RANK`` / ``WORLD_SIZE`` (:mod:`sparseseg.inference.sharding`).
        threads: ``torch.set_num_threads``; None: under torchrun on the CPU the cores split between the machine's
            processes, else torch's choice.
        drop_background_tokens: a token-pruning model drops the patch tokens whose window patch is all
            background (:func:`input_background_value`) before its first block (docs/models.md, "Background
            tokens"); not exact: the other tokens no longer attend to them.
        timings: a list to which one record per written case is appended: ``{"case", "shape"`` (the input
            ``[C, X, Y, Z]``), ``"stages"`` (seconds of ``read``, ``preprocess``, ``sliding_window``, ``invert``
            (mapping back, resampling included) and ``write``), ``"windows"`` (``run``: windows the network ran,
            ``skipped``: 0)``}`` (:mod:`sparseseg.benchmark.case`).

    Returns:
        The label files this process wrote, one per case, in case-name order (cases skipped or in another
        process's share excluded). Labels are the dataset's label values
        (regions are painted back into label values, e.g. BraTS TC/WT/ET -> MSD labels 1/2/3).

    Raises:
        InputError: bad arguments, checkpoint or output folder (before anything is written); or, after every
            other case was written, the case(s) whose file is broken (one error naming them all).
        Interrupted: SIGTERM / SIGINT, after the case under way was written.
    """
    shard_info = current_shard(shard)
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if refine_fraction is not None and not 0.0 < refine_fraction <= 1.0:
        raise InputError(f"refine fraction must be in (0, 1], got {refine_fraction}")
    ckpt = load_checkpoint(checkpoint)
    data_cfg = DataConfig.from_dict(ckpt["data"])
    failures: list[InputError] = []
    cases = collect_cases(inputs, data_cfg.in_channels, failures)
    if not cases:
        raise _failure_report(failures, 0)
    if shard_info.index != 0:
        failures.clear()  # a case whose header is broken is reported once, by the first share
    check_output_format(cases, output_format)
    output_dir = Path(output_dir)
    _check_output(output_dir, inputs, cases)
    check_writable(output_dir)
    dev = shard_device(device, shard_info)
    set_threads(threads, shard_info, dev)
    if stitch_device != "auto":
        resolve_device(stitch_device)
    model = model_from_checkpoint(ckpt, checkpoint)
    if prune_ratio is not None:
        set_prune_ratio(model, prune_ratio, checkpoint)
    if refine_fraction is not None:
        set_refine_fraction(model, refine_fraction, checkpoint)
    if drop_background_tokens:
        set_drop_background(model, True, input_background_value(data_cfg), checkpoint)
    model.to(dev).eval()
    network = GraphedForward(model, clone_outputs=True) if cuda_graphs and dev.type == "cuda" else model
    if cpu_fast_path and dev.type == "cpu":
        network = optimize_for_cpu_inference(model)
    pipeline = build_transforms(data_cfg, "infer")
    share = run_share(
        cases, lambda name: _predict_case(network, name, cases[name], data_cfg, pipeline, dev, output_dir, overlap,
                                          sw_batch_size, save_probabilities, stitch_device, output_format,
                                          timings),
        lambda name: case_outputs(name, cases[name], output_dir, output_format, save_probabilities), shard_info,
        skip_existing)
    failures += share.failures
    if failures:
        raise _failure_report(failures, len(share.written))
    return share.written


def _predict_case(model: Network, name: str, paths: list[Path], data_cfg: DataConfig, pipeline, dev: torch.device,
                  output_dir: Path, overlap: float, sw_batch_size: int, save_probabilities: bool,
                  stitch_device: str, output_format: str | None = None,
                  timings: list[dict[str, Any]] | None = None) -> list[Path]:
    """Segment one case and write its label map (and its probabilities); returns ``[label file]``."""
    watch = _Stopwatch()
    probs = _case_probabilities(model, paths, data_cfg, pipeline, dev, overlap, sw_batch_size, stitch_device, watch)
    if data_cfg.regions:
        labels = regions_to_labels(probs > 0.5, data_cfg.regions)
    else:
        labels = probs.argmax(0).to(torch.uint8)  # [K, X, Y, Z] -> [X, Y, Z]
    probabilities = probs.permute(1, 2, 3, 0).numpy() if save_probabilities else None  # [K, X, Y, Z] -> [X, Y, Z, K]
    out = write_prediction(output_dir, name, read_grid(paths[0]), labels.numpy(), probabilities, output_format,
                           data_cfg.segments)
    watch.lap("write")
    if timings is not None:
        timings.append({"case": name, "shape": [data_cfg.in_channels, *probs.shape[1:]], "stages": watch.stages,
                        "windows": {"run": watch.windows, "skipped": 0}})
    log.info("%s -> %s", paths[0].name, out)
    return [out]
