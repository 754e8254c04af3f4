"""``benchmark(...)``: parameters, MACs, encoder and end-to-end throughput, latency, peak memory and training
throughput of registered models, every sparse model against its dense baseline in the same run.

Every model is built, warmed up and timed in this process on the same seeded input ``[batch_size, in_channels,
*img_size]`` (one ROI crop per image). Inference is timed in rounds, each round calling every model once, one
after the other, so that a change of load on a shared machine affects all models of the run alike; training steps
are timed model by model (only one optimizer state exists at a time). Inference runs under
``torch.inference_mode()`` in eval mode; training steps (``train=True``) run forward (with the target) + loss +
backward + AdamW step in training mode. On CUDA every timed call is bracketed by ``torch.cuda.synchronize()``;
``amp=True`` (CUDA only) runs forward passes under float16 autocast and training steps with a gradient scaler,
the recipe of ``sparseseg train`` on a GPU; ``cuda_graphs=True`` (CUDA only) times inference as CUDA-graph
replays (:mod:`sparseseg.inference.cuda_graphs`), without the host's cost of launching every kernel. On the CPU
every model, the dense baseline included, is timed after the same explicit inference step
:func:`~sparseseg.inference.fast_cpu.optimize_for_cpu_inference` (``cpu_fast_path=False`` times the standard modules);
each record says which (``cpu_fast_path``). MACs are counted on the model as built (the step does not change them).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of the timed runs, less what the other models of the run
hold, plus the model's own weights and input (the training peak includes its AdamW state); on CPU the peak
resident set size (``ru_maxrss``) of a fresh child process that imports the library, builds only that model and
runs one forward pass (see :mod:`sparseseg.benchmark.memory`; it includes the interpreter, the libraries and the
weights, and the import-only footprint is reported beside it).

The dense baseline of the run is one model name (``unetr`` by default, the paper's dense UNETR with the same
ViT-B, patch size and decoder); ``speedup``, ``encoder_speedup``, ``train_speedup`` and ``memory_ratio`` of
every record are ratios to that model's record (so they are exactly 1 for the baseline itself). The baseline is
added to the run when it is not listed.

Examples:
    >>> records = benchmark(["stp_mta_unetr"], preset="brats", prune_ratios=[0.75], repeats=2)  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from sparseseg.benchmark.workload import autocast, make_inputs, train_step_fn
from sparseseg.config import resolve_device
from sparseseg.errors import InputError
from sparseseg.inference.fast_cpu import optimize_for_cpu_inference, uses_cpu_fast_path
from sparseseg.models.common.registry import create_model, list_models, model_arguments, resolve_model_args
from sparseseg.runtime import cpu_allocator, cuda_addmm

log = logging.getLogger(__name__)

DEFAULT_BASELINE = "unetr"
MACS_COUNTER = "torch.utils.flop_counter (matmul + conv multiply-accumulates, SDPA included)"
SIGMOID_PRESETS = ("brats",)  # presets whose outputs are sigmoid regions (multi-hot targets)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty sequence."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _macs_and_params(model: nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """G MACs of one image (``count_macs``, batch 1) and the number of parameters used at inference."""
    from sparseseg.benchmark.flops import count_macs, count_params

    return float(count_macs(model, tuple(x[:1].shape))), int(count_params(model, inference_only=True))


def _settings(name: str, key: str, values: Sequence[float] | None, baseline: str | None) -> list[float | None]:
    """The values of the runtime knob ``key`` (``prune_ratio``, ``refine_fraction``) to measure ``name`` at: the
    given ones for a model whose constructor takes it (the baseline excepted), else [None] (its own setting)."""
    if values and name != baseline and key in model_arguments(name):
        return list(values)
    return [None]


def _runs(name: str, prune_ratios: Sequence[float] | None, refine_fractions: Sequence[float] | None,
          baseline: str | None) -> list[tuple[float | None, float | None]]:
    """Every (prune ratio, refine fraction) to measure ``name`` at."""
    return [(r, f) for r in _settings(name, "prune_ratio", prune_ratios, baseline)
            for f in _settings(name, "refine_fraction", refine_fractions, baseline)]


def _knob(name: str, model: nn.Module, key: str) -> float | None:
    """The value of ``key`` a model was built with: its argument, else its attribute (None if it has none)."""
    if key not in model_arguments(name):
        return None
    return model.model_args.get(key, getattr(model, key, None))


def _model_overrides(name: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """The overrides ``name`` takes: plain keys it accepts, then its own ``name:key`` keys (which win)."""
    valid = set(model_arguments(name))
    shared = {k: v for k, v in model_args.items() if ":" not in k and k in valid}
    own = {k.partition(":")[2]: v for k, v in model_args.items() if k.partition(":")[0] == name}
    return {**shared, **own}


def _unused_model_args(models: Sequence[str], model_args: dict[str, Any]) -> list[str]:
    """Keys no benchmarked model takes: a plain key no model accepts, or ``model:key`` for a model not in the run
    or a key that model does not accept."""
    unused = []
    for key in model_args:
        name, sep, arg = key.partition(":")
        ok = (name in models and arg in model_arguments(name)) if sep else any(
            key in model_arguments(m) for m in models)
        if not ok:
            unused.append(key)
    return sorted(unused)


def _check_request(models: Sequence[str], preset: str | None, prune_ratios: Sequence[float] | None,
                   refine_fractions: Sequence[float] | None, model_args: dict[str, Any], batch_size: int,
                   warmup: int, repeats: int) -> None:
    known = list_models()
    for name in models:
        if name not in known:
            raise InputError(f"unknown model {name!r}; valid models: {', '.join(known)}")
    for r in prune_ratios or []:
        if not 0.0 <= r < 1.0:
            raise InputError(f"prune ratio must be in [0, 1), got {r}")
    for f in refine_fractions or []:
        if not 0.0 < f <= 1.0:
            raise InputError(f"refine fraction must be in (0, 1], got {f}")
    unused = _unused_model_args(models, model_args)
    if unused:
        raise InputError(f"no benchmarked model accepts the model argument(s) {unused}")
    if batch_size < 1 or warmup < 0 or repeats < 1:
        raise InputError("batch size and repeats must be >= 1 and warm-up >= 0")
    for name in models:
        try:
            resolve_model_args(name, preset, **_model_overrides(name, model_args))
        except ValueError as err:
            raise InputError(str(err)) from err


@dataclass
class _Run:
    """One (model, prune ratio) of a run: the built model (``infer``: the module inference is timed on, the model
    itself or its CPU fast path sharing its weights), its inputs and the timings collected so far."""

    name: str
    prune_ratio: float | None
    refine_fraction: float | None
    overrides: dict[str, Any]
    model: nn.Module
    infer: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    record: dict[str, Any]
    times: list[float] = field(default_factory=list)
    encoder_times: list[float] = field(default_factory=list)
    peak_bytes: int = 0


def _build(name: str, preset: str | None, prune_ratio: float | None, refine_fraction: float | None,
           device: torch.device, batch_size: int, model_args: dict[str, Any], cpu_fast_path: bool = True) -> _Run:
    overrides = _model_overrides(name, model_args)
    for key, value in (("prune_ratio", prune_ratio), ("refine_fraction", refine_fraction)):
        if value is not None:
            overrides[key] = value
    torch.manual_seed(0)
    model = create_model(name, preset, **overrides).to(device).eval()
    x, y = make_inputs(model.model_args, batch_size, preset in SIGMOID_PRESETS, device)
    gmacs, params = _macs_and_params(model, x)
    record = {"model": name, "preset": preset,
              "prune_ratio": _knob(name, model, "prune_ratio") if prune_ratio is None else prune_ratio,
              "refine_fraction": _knob(name, model, "refine_fraction") if refine_fraction is None else refine_fraction,
              "params": params, "gmacs": gmacs, "encoder_throughput": None, "throughput": None,
              "latency_ms_median": None, "latency_ms_p90": None, "peak_memory_mb": None, "train_throughput": None,
              "train_peak_memory_mb": None}
    infer = optimize_for_cpu_inference(model) if cpu_fast_path and device.type == "cpu" else model
    return _Run(name, prune_ratio, refine_fraction, overrides, model, infer, x, y, record)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _resident_bytes(run: _Run) -> int:
    """Bytes of the model's weights (buffers included) and its input and target."""
    tensors = [*run.model.state_dict().values(), run.x, run.y]
    return sum(t.numel() * t.element_size() for t in tensors)


def _time_inference(runs: list[_Run], device: torch.device, warmup: int, repeats: int, amp: bool = False,
                    cuda_graphs: bool = False) -> None:
    """Warm every model up, then time them in rounds (each round calls every model once), so that a change of
    machine load during the run hits all models alike instead of whichever model was running. With
    ``cuda_graphs`` every forward (and encoder) call replays a CUDA graph captured at the first warm-up call."""
    from sparseseg.inference.cuda_graphs import GraphedForward

    cuda = device.type == "cuda"
    graphs = cuda_graphs and cuda
    with torch.inference_mode(), autocast(device, amp):
        calls = []
        for run in runs:
            encode = getattr(run.infer, "forward_encoder", None)
            encode = encode if callable(encode) else None
            if graphs:
                encode = encode and GraphedForward(encode)
                calls.append((GraphedForward(run.infer), encode))
            else:
                calls.append((run.infer, encode))
        warmup_calls = max(warmup, 1) if graphs else warmup  # with graphs the first call captures
        for run, (forward, encode) in zip(runs, calls, strict=True):
            if graphs:  # the capture holds the whole pass's memory; replays allocate nothing
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            for _ in range(warmup_calls):
                forward(run.x)
            if graphs:
                run.peak_bytes = torch.cuda.max_memory_allocated(device) - before
            for _ in range(warmup_calls if encode else 0):
                encode(run.x)
        for _ in range(repeats):
            for run, (forward, _) in zip(runs, calls, strict=True):
                if cuda and not graphs:  # this model's own peak above what is already resident
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                run.times.append(_timed(partial(forward, run.x), device))
                if cuda and not graphs:
                    run.peak_bytes = max(run.peak_bytes, torch.cuda.max_memory_allocated(device) - before)
            for run, (_, encode) in zip(runs, calls, strict=True):
                if encode:
                    run.encoder_times.append(_timed(partial(encode, run.x), device))
    for run in runs:
        rec, bs = run.record, run.x.shape[0]
        rec.update(throughput=bs / statistics.median(run.times), latency_ms_median=1e3 * statistics.median(run.times),
                   latency_ms_p90=1e3 * _percentile(run.times, 90))
        if run.encoder_times:
            rec["encoder_throughput"] = bs / statistics.median(run.encoder_times)
        if cuda:  # + the model's weights and input, resident before the call
            rec["peak_memory_mb"] = (run.peak_bytes + _resident_bytes(run)) / 2**20


def _time_training(run: _Run, device: torch.device, warmup: int, repeats: int, memory: bool,
                   sigmoid: bool, amp: bool = False) -> None:
    """Training steps of one model (its optimizer state exists only meanwhile); restores eval mode."""
    run.model.train()
    if device.type == "cuda":  # what the other models of the run hold stays out of this model's peak
        others = torch.cuda.memory_allocated(device) - _resident_bytes(run)
        torch.cuda.reset_peak_memory_stats(device)
    step = train_step_fn(run.model, run.x, run.y, sigmoid, amp)
    times = time_calls(step, device, warmup, repeats)
    run.record["train_throughput"] = run.x.shape[0] / statistics.median(times)
    if memory and device.type == "cuda":
        run.record["train_peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) - others) / 2**20
    run.model.zero_grad(set_to_none=True)
    run.model.eval()


def _cpu_memory(run: _Run, preset: str | None, train: bool) -> None:
    from sparseseg.benchmark.memory import peak_memory_subprocess

    spec = {"name": run.name, "preset": preset, "model_args": run.overrides, "batch_size": run.x.shape[0],
            "threads": torch.get_num_threads(), "sigmoid": preset in SIGMOID_PRESETS,
            "module": type(run.model).__module__, "cpu_allocator": cpu_allocator(),
            "cpu_fast_path": run.infer is not run.model}
    child = peak_memory_subprocess(spec)
    run.record.update(peak_memory_mb=child["peak_mb"], memory_import_mb=child["import_mb"],
                      memory_model_mb=child["model_mb"])
    if train:
        run.record["train_peak_memory_mb"] = peak_memory_subprocess({**spec, "train": True})["peak_mb"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def add_ratios(records: list[dict[str, Any]], baseline: str | None) -> list[dict[str, Any]]:
    """Fill ``speedup``, ``encoder_speedup``, ``train_speedup`` and ``memory_ratio`` against the first record
    of model ``baseline`` (all None when there is none)."""
    base = next((r for r in records if r["model"] == baseline), None) if baseline else None
    for r in records:
        r["baseline"] = base["model"] if base else None
        for key, value in (("speedup", "throughput"), ("encoder_speedup", "encoder_throughput"),
                           ("train_speedup", "train_throughput")):
            r[key] = 1.0 if r is base and r[value] is not None else _ratio(r[value], base and base[value])
        # lower is better for memory: the ratio of the model's peak to the baseline's
        r["memory_ratio"] = 1.0 if r is base and r["peak_memory_mb"] else _ratio(
            r["peak_memory_mb"], base and base["peak_memory_mb"])
    return records


def benchmark(
    models: Sequence[str],
    preset: str | None = None,
    prune_ratios: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    train: bool = False,
    model_args: dict[str, Any] | None = None,
    *,
    baseline: str | None = DEFAULT_BASELINE,
    memory: bool = True,
    profile: bool = False,
    amp: bool = False,
    cuda_graphs: bool = False,
    cpu_fast_path: bool = True,
    refine_fractions: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Measure every model (each sparse one at every prune ratio and refine fraction) in this process: all are
    built and warmed up, then timed in rounds (one call of each model per round); training steps, profiles and
    memory follow model by model.

    Args:
        models: registered model names; ``baseline`` is measured first (added when missing).
        preset: ``btcv`` or ``brats`` (the paper's geometry), or None for the models' own defaults.
        prune_ratios: ratios for models whose constructor takes ``prune_ratio``; None = their default.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        threads: ``torch.set_num_threads`` for the run (and the memory child); None keeps the current setting.
        batch_size: images per forward pass; throughputs are images per second.
        warmup, repeats: untimed and timed calls of each measurement.
        train: also time training steps (forward with the target + loss + backward + AdamW step).
        model_args: constructor overrides, passed to every model that accepts the key; a ``MODEL:KEY`` key goes
            to that model only and wins over a plain ``KEY``.
        baseline: the dense model every ratio refers to; None disables the ratios.
        memory: measure peak memory (a child process per model on CPU).
        profile: add ``profile_s``, the seconds per part of one profiled forward pass
            (:func:`sparseseg.benchmark.profile.profile_breakdown`).
        amp: float16 autocast (and a gradient scaler in training steps), as ``sparseseg train`` on a GPU;
            CUDA only.
        cuda_graphs: time inference as replays of a CUDA graph captured per model
            (:class:`sparseseg.inference.cuda_graphs.GraphedForward`); CUDA only; training steps run as they are.
        cpu_fast_path: on the CPU, time every model's inference (and its memory child and profile) after
            :func:`~sparseseg.inference.fast_cpu.optimize_for_cpu_inference`; training steps run the model as built.
        refine_fractions: sparse-decoding fractions for models whose constructor takes ``refine_fraction``
            (measured at every prune ratio); None = their default.

    Returns:
        One record (dict) per (model, prune ratio); see docs/benchmark.md for the keys.
    """
    model_args = dict(model_args or {})
    names = list(dict.fromkeys(models))
    if baseline is not None and baseline not in names:
        names.insert(0, baseline)
    _check_request(names, preset, prune_ratios, refine_fractions, model_args, batch_size, warmup, repeats)
    dev = resolve_device(device)
    if amp and dev.type != "cuda":
        raise InputError(f"mixed precision (amp) is measured on CUDA only, not on {dev}")
    if cuda_graphs and dev.type != "cuda":
        raise InputError(f"CUDA graphs need a CUDA device, not {dev}")
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    todo = [(name, r, f) for name in names for r, f in _runs(name, prune_ratios, refine_fractions, baseline)]
    runs = []
    for i, (name, r, f) in enumerate(todo, 1):
        log.info("[%d/%d] %s%s%s: building", i, len(todo), name, "" if r is None else f" r={r:g}",
                 "" if f is None else f" f={f:g}")
        runs.append(_build(name, preset, r, f, dev, batch_size, model_args, cpu_fast_path))
    log.info("timing inference of %d model(s) in %d round(s) after %d warm-up call(s)", len(runs), repeats, warmup)
    _time_inference(runs, dev, warmup, repeats, amp, cuda_graphs)
    for i, run in enumerate(runs, 1):
        if profile:
            from sparseseg.benchmark.profile import profile_breakdown

            with autocast(dev, amp):
                run.record["profile_s"] = profile_breakdown(run.infer, run.x)
        if train:
            _time_training(run, dev, warmup, repeats, memory, preset in SIGMOID_PRESETS, amp)
        if memory and dev.type == "cpu":
            _cpu_memory(run, preset, train)
        run.record.update(device=_device_name(dev), amp=amp, cuda_graphs=cuda_graphs,
                          cuda_addmm=cuda_addmm() if dev.type == "cuda" else None,
                          threads=torch.get_num_threads(), torch_version=torch.__version__,
                          cpu_allocator=cpu_allocator() if dev.type == "cpu" else None,
                          cpu_fast_path=uses_cpu_fast_path(run.infer) if dev.type == "cpu" else None,
                          batch_size=batch_size, warmup=warmup, repeats=repeats, macs_counter=MACS_COUNTER)
        log.info("[%d/%d] %s", i, len(runs), _summary(run.record))
    records = [run.record for run in runs]
    del runs
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return add_ratios(records, baseline)


def _device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:N (GPU name)``."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _summary(rec: dict[str, Any]) -> str:
    parts = [f"{rec['model']}" + ("" if rec["prune_ratio"] is None else f" r={rec['prune_ratio']:g}")
             + ("" if rec.get("refine_fraction") is None else f" f={rec['refine_fraction']:g}"),
             f"{rec['gmacs']:.1f} GMACs", f"{rec['throughput']:.3g} img/s",
             f"latency {rec['latency_ms_median']:.0f} ms"]
    if rec["encoder_throughput"] is not None:
        parts.append(f"encoder {rec['encoder_throughput']:.3g} img/s")
    if rec["train_throughput"] is not None:
        parts.append(f"train {rec['train_throughput']:.3g} img/s")
    if rec["peak_memory_mb"] is not None:
        parts.append(f"peak {rec['peak_memory_mb']:.0f} MB")
    return ", ".join(parts)
