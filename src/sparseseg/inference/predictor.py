"""Sliding-window inference from a checkpoint alone: ``predict(checkpoint, inputs, output_dir)``.

The model (registered name + arguments) and the preprocessing (:class:`~sparseseg.data.transforms.DataConfig`)
are rebuilt from the checkpoint. Each case is preprocessed, segmented with MONAI's sliding-window positions and
Gaussian blending (all-background windows are not run; :mod:`sparseseg.inference.whole_scan`), its probabilities
are mapped back onto the input's exact grid (shape and affine), one channel at a time, by inverting the spatial
preprocessing, and one label map is written per case in the input's format (nnU-Net naming:
``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` -> ``CASE.nii.gz``; see :mod:`sparseseg.data.outputs`).

Examples:
    >>> predict("runs/spleen/best.pt", "Task09_Spleen/imagesTs", "preds/")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint
from sparseseg.config import resolve_device
from sparseseg.data.cases import check_output_format, collect_cases
from sparseseg.data.io import check_writable
from sparseseg.data.transforms import DataConfig, build_transforms
from sparseseg.errors import InputError
from sparseseg.inference.cuda_graphs import GraphedForward
from sparseseg.inference.fast_cpu import optimize_for_cpu_inference
from sparseseg.inference.sharding import case_outputs, current_shard, run_share, set_threads, shard_device
from sparseseg.inference.sliding_window import Network
from sparseseg.inference.whole_scan import background_value, predict_case

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
    _set_option(model, "refine_fraction", refine_fraction, "has no sparse decoding (refine fraction)", source)


def input_background_value(data_cfg: DataConfig) -> float:
    """The value background voxels have after the checkpoint's preprocessing
    (:func:`~sparseseg.inference.whole_scan.background_value`), 0 for ``none`` (values left alone)."""
    value = background_value(data_cfg)
    return 0.0 if value is None else value


def set_drop_background(model: nn.Module, on: bool, background_value: float = 0.0,
                        source: str | Path | None = None) -> None:
    """Test-time background token dropping (``stp_mta_unetr``'s ``drop_background``: patch tokens whose input
    patch equals ``background_value`` everywhere skip the encoder); a model without it raises InputError."""
    _set_option(model, "drop_background", on, "cannot drop background tokens", source)
    _set_option(model, "background_value", background_value, "cannot drop background tokens", source)


def _set_option(model: nn.Module, name: str, value: object, missing: str, source: str | Path | None) -> None:
    """``setattr(model, name, value)`` for a test-time option; InputError when the model lacks it (``missing``
    says what it cannot do) or refuses the value (its ValueError)."""
    if not hasattr(model, name):
        raise InputError(f"model {getattr(model, 'model_name', type(model).__name__)!r} {missing}", source)
    try:
        setattr(model, name, value)
    except ValueError as err:
        raise InputError(str(err), source) from err


def _check_output(output_dir: Path, inputs: str | Path | Sequence[str | Path], cases: dict[str, list[Path]]) -> None:
    out = output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise InputError("output must be a folder, not a file", output_dir)
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    for p in [Path(i).resolve() for i in items] + [f.resolve() for fs in cases.values() for f in fs]:
        if p == out or out in p.parents:
            raise InputError(f"output folder equals or contains the input {p}", output_dir)


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
            prune_ratio: float | None = None, overlap: float = 0.5, sw_batch_size: int | None = None,
            device: str = "auto", save_probabilities: bool = False, stitch_device: str = "auto",
            cuda_graphs: bool = False, output_format: str | None = None, cpu_fast_path: bool = True,
            refine_fraction: float | None = None, skip_existing: bool = False, shard: str | None = None,
            threads: int | None = None, drop_background_tokens: bool = False,
            skip_background: bool = True, crop_foreground: bool | None = None,
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
        sw_batch_size: windows per forward pass (None: 1 on the CPU, where a batch holds its activations several
            times over, see docs/pipeline.md "Whole scans"; 4 on a GPU).
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
        skip_background: do not run the model on windows whose preprocessed input is all background (MRI zeros,
            CT air); they get the model's output on a constant background window, so the result is the same
            (:func:`~sparseseg.inference.sliding_window.skipping_sliding_window`).
        timings: if given, one record per written case is appended: ``{"case", "shape": input spatial shape,
            "stages": seconds of read, preprocess, sliding_window, invert, write, "windows": {"run", "skipped"}}``.
        crop_foreground: crop each preprocessed case to its foreground (MONAI's ``CropForegroundd``: non-zero
            voxels for MRI, > 0 otherwise) before the sliding window and pad the result back (None: as the
            checkpoint was trained). Not exact: the windows move with the crop.

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
    if sw_batch_size is not None and sw_batch_size < 1:
        raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if refine_fraction is not None and not 0.0 < refine_fraction <= 1.0:
        raise InputError(f"refine fraction must be in (0, 1], got {refine_fraction}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
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
    if sw_batch_size is None:
        sw_batch_size = 1 if dev.type == "cpu" else 4
    if stitch_device != "auto":
        resolve_device(stitch_device)
    model = model_from_checkpoint(ckpt, checkpoint)
    del ckpt  # the loaded weights are copied into the model: do not hold them twice while the scans run
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
    if crop_foreground is not None:
        data_cfg.crop_foreground = crop_foreground
    pipeline = build_transforms(data_cfg, "infer")

    def stitch(spatial: Sequence[int]) -> torch.device:
        return _stitch_device(stitch_device, dev, data_cfg.out_channels, spatial)

    share = run_share(
        cases, lambda name: _predict_case(network, name, cases[name], data_cfg, pipeline, dev, output_dir, overlap,
                                          sw_batch_size, save_probabilities, stitch, output_format, skip_background,
                                          len(cases) == 1, timings),
        lambda name: case_outputs(name, cases[name], output_dir, output_format, save_probabilities), shard_info,
        skip_existing)
    failures += share.failures
    if failures:
        raise _failure_report(failures, len(share.written))
    return share.written


def _predict_case(model: Network, name: str, paths: list[Path], data_cfg: DataConfig, pipeline, dev: torch.device,
                  output_dir: Path, overlap: float, sw_batch_size: int, save_probabilities: bool,
                  stitch: Callable[[Sequence[int]], torch.device], output_format: str | None, skip_background: bool,
                  progress: bool, timings: list[dict[str, Any]] | None) -> list[Path]:
    """Segment one case and write its label map (and its probabilities); returns ``[label file]`` and appends
    the case's record to ``timings`` (:func:`sparseseg.inference.whole_scan.predict_case`)."""
    out, record = predict_case(model, name, paths, data_cfg, pipeline, dev, output_dir, overlap, sw_batch_size,
                               save_probabilities, stitch, output_format, skip_background, progress=progress)
    if timings is not None:
        timings.append(record)
    return [out]
