"""Whole-case benchmark: ``benchmark_cases(cases, checkpoints)`` times ``predict`` on whole scans, model by model.

A user's job is a whole scan: read it, preprocess it, slide the window over it, map the result back onto the
input's grid and write it. For every case (an image file, a DICOM series folder, or the channel files ``CASE_0000``,
``CASE_0001``, ... of one case; grouped by :func:`sparseseg.data.cases.collect_cases`) and every checkpoint, a
**fresh child process** (``python -m sparseseg.benchmark.case``) imports the library and calls
:func:`sparseseg.inference.predictor.predict` on that case alone, into a temporary folder removed afterwards. The
child reports:

* the seconds of each stage of ``predict`` (``read``, ``preprocess``, ``sliding_window``, ``invert``, ``write``;
  ``predict(..., timings=...)``) and the windows the network ran and skipped;
* ``wall_s``: the whole ``predict`` call (checkpoint loading and model building included);
* ``peak_rss_mb``: the child's peak resident set size (``VmHWM``; elsewhere ``ru_maxrss``), i.e. what the machine
  must hold to segment that case with that model, interpreter and libraries included; ``import_rss_mb`` is the
  part before ``predict`` (interpreter + torch + MONAI + the library).

A fresh process per model keeps each model's peak its own (a process's peak never goes down) and lets models run
one at a time on a machine without room for two. With ``repeats > 1`` the children run in rounds (every model once
per round, on the same case), so that a change of machine load hits all models alike; the record holds the median
of each time and the largest peak. ``speedup`` and ``memory_ratio`` compare each model with the first checkpoint of
the run on the same case (list the dense baseline first).

Without checkpoints, ``models`` + ``preset`` build untrained ones (``create_model(name, preset)``, seed 0) with the
preprocessing the preset's training recipe would store (:func:`preset_data_config`): speed and memory do not depend
on the weights, except for models whose work depends on the input (token pruning ranks tokens by learned scores).

Examples:
    >>> records = benchmark_cases(["BraTS_001_0000.nii.gz", "BraTS_001_0001.nii.gz", "BraTS_001_0002.nii.gz",
    ...                            "BraTS_001_0003.nii.gz"], models=["unetr", "stp_mta_unetr"],
    ...                           preset="brats")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparseseg.data.io import atomic_write
from sparseseg.errors import InputError, SparsesegError

log = logging.getLogger(__name__)

STAGES = ("read", "preprocess", "sliding_window", "invert", "write")
# The 13 organs of BTCV (Synapse multi-organ CT), label values 1..13 after the background.
BTCV_CLASSES = ("background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
                "aorta", "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
                "left adrenal gland")


def preset_data_config(preset: str) -> Any:
    """The :class:`~sparseseg.data.transforms.DataConfig` that ``sparseseg train --recipe PRESET`` stores for the
    preset's data (``btcv``: 1 CT channel, 14 classes, 96^3, the recipe's CT window, 1.5 x 1.5 x 2.0 mm, RAS,
    foreground crop; ``brats``: 4 MRI channels, sigmoid TC/WT/ET regions of labels 0..3, 128^3, 1 mm, RAS)."""
    from sparseseg.data.datasets import BRATS_REGIONS
    from sparseseg.data.transforms import DataConfig
    from sparseseg.models.common.registry import PRESET_GEOMETRY
    from sparseseg.recipes import RECIPES

    if preset not in PRESET_GEOMETRY or preset not in RECIPES:
        raise InputError(f"unknown preset {preset!r}; valid presets: {', '.join(sorted(PRESET_GEOMETRY))}")
    geometry, recipe = PRESET_GEOMETRY[preset], RECIPES[preset]
    if preset == "brats":
        labels = {"label_values": [0, 1, 2, 3], "class_names": list(BRATS_REGIONS),
                  "regions": [list(r) for r in BRATS_REGIONS.values()]}
    else:
        labels = {"label_values": list(range(geometry["out_channels"])),
                  "class_names": list(BTCV_CLASSES[:geometry["out_channels"]])}
    return DataConfig(in_channels=geometry["in_channels"], roi_size=[geometry["img_size"]] * 3,
                      intensity=recipe["intensity"], ct_window=list(recipe.get("ct_window", [-175.0, 250.0, 0.0, 1.0])),
                      target_spacing=recipe.get("target_spacing"), orientation=recipe.get("orientation"),
                      crop_foreground=bool(recipe.get("crop_foreground", False)), **labels)


def untrained_checkpoint(name: str, preset: str, path: str | Path, seed: int = 0, **model_args: Any) -> Path:
    """Write an untrained checkpoint of ``create_model(name, preset, **model_args)`` (seeded) with the preset's
    :func:`preset_data_config` to ``path``."""
    import torch

    from sparseseg.checkpoint import save_checkpoint
    from sparseseg.models.common.registry import create_model

    data = preset_data_config(preset)
    torch.manual_seed(seed)
    try:
        model = create_model(name, preset, **model_args)
    except ValueError as err:
        raise InputError(str(err)) from err
    return save_checkpoint(path, model, data.to_dict())


def _child_peak_mb() -> float:
    from sparseseg.benchmark.memory import _maxrss_mb

    return _maxrss_mb()


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child: import, then one ``predict`` of the case into ``spec["output"]``; the record of that run."""
    if spec.get("cpu_allocator") == "glibc-keep":  # what `sparseseg predict` does (sparseseg/runtime.py)
        from sparseseg.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    import torch

    from sparseseg.inference.predictor import predict

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    import_mb = _child_peak_mb()
    timings: list[dict[str, Any]] = []
    start = time.perf_counter()
    predict(spec["checkpoint"], spec["inputs"], spec["output"], timings=timings, **spec["predict"])
    wall = time.perf_counter() - start
    (case,) = timings
    return {**case, "wall_s": wall, "peak_rss_mb": _child_peak_mb(), "import_rss_mb": import_mb,
            "threads": torch.get_num_threads(), "torch_version": torch.__version__}


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh interpreter with this process's ``sys.path`` running :func:`_child`; its record, plus
    ``process_s`` (the child's whole life: start-up, imports, predict, exit)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sparseseg.benchmark.case", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    process_s = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SparsesegError(f"whole-case run of {Path(spec['checkpoint']).name} on {spec['case']} failed: {tail}")
    return {**json.loads(lines[-1]), "process_s": process_s}


def _checkpoint_info(path: Path) -> dict[str, Any]:
    from sparseseg.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    args = ckpt["model_args"]
    return {"model": ckpt["model_name"], "in_channels": int(ckpt["data"]["in_channels"]),
            "prune_ratio": args.get("prune_ratio")}


def _summarise(runs: list[dict[str, Any]], info: dict[str, Any], checkpoint: Path, prune_ratio: float | None,
               settings: dict[str, Any]) -> dict[str, Any]:
    first = runs[0]
    median = statistics.median
    return {
        "case": first["case"], "shape": first["shape"], "model": info["model"], "checkpoint": str(checkpoint),
        "prune_ratio": info["prune_ratio"] if prune_ratio is None else prune_ratio,
        "stages_s": {k: median(r["stages"].get(k, 0.0) for r in runs) for k in STAGES},
        "windows": first["windows"], "wall_s": median(r["wall_s"] for r in runs),
        "process_s": median(r["process_s"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "import_rss_mb": max(r["import_rss_mb"] for r in runs), "wall_s_all": [r["wall_s"] for r in runs],
        "threads": first["threads"], "torch_version": first["torch_version"], "repeats": len(runs), **settings,
    }


def _add_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``speedup`` (wall) and ``memory_ratio`` (peak RSS) against the first model's record of the same case."""
    for rec in records:
        base = next(r for r in records if r["case"] == rec["case"])
        rec["baseline"] = base["model"]
        rec["speedup"] = base["wall_s"] / rec["wall_s"]
        rec["memory_ratio"] = rec["peak_rss_mb"] / base["peak_rss_mb"]
    return records


def benchmark_cases(
    inputs: Sequence[str | Path],
    checkpoints: Sequence[str | Path] | None = None,
    models: Sequence[str] | None = None,
    preset: str | None = None,
    *,
    repeats: int = 1,
    threads: int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int | None = None,
    prune_ratio: float | None = None,
    device: str = "cpu",
    cpu_fast_path: bool = True,
    skip_background: bool = True,
    crop_foreground: bool | None = None,
    drop_background_tokens: bool = False,
) -> list[dict[str, Any]]:
    """Time ``predict`` on every case of ``inputs`` with every checkpoint, each run in a fresh child process
    (module docstring).

    Args:
        inputs: image files, DICOM series folders and/or folders of them; channel files ``CASE_0000``, ... form one
            case (as ``sparseseg predict --input``).
        checkpoints: the checkpoints to compare, the baseline first; or None with ``models`` and ``preset``.
        models: registered model names to build untrained checkpoints of (with ``preset``), the baseline first.
        preset: ``btcv`` or ``brats``: model preset and preprocessing of the untrained checkpoints.
        repeats: rounds of runs (every model once per case per round).
        threads: ``torch.set_num_threads`` in every child (None: torch's default).
        overlap, sw_batch_size, prune_ratio, device, cpu_fast_path, skip_background, crop_foreground,
            drop_background_tokens: passed to ``predict`` (None: its defaults); ``prune_ratio`` and
            ``drop_background_tokens`` only to the checkpoints of models that have them.

    Returns:
        One record per (case, checkpoint), in case order then checkpoint order; see docs/benchmark.md for the keys.
    """
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if checkpoints and models:
        raise InputError("give checkpoints or models (with a preset), not both")
    if not checkpoints and not (models and preset):
        raise InputError("whole-case benchmark needs --checkpoint FILE ... or --models with --preset")
    workdir = Path(tempfile.mkdtemp(prefix="sparseseg-case-"))
    try:
        if not checkpoints:
            checkpoints = [untrained_checkpoint(m, preset, workdir / f"{m}.pt") for m in models]
        options = {"skip_background": skip_background, "crop_foreground": crop_foreground,
                   "drop_background_tokens": drop_background_tokens}
        return _measure(inputs, [Path(c) for c in checkpoints], workdir, repeats, threads, overlap, sw_batch_size,
                        prune_ratio, device, cpu_fast_path, options)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(inputs: Sequence[str | Path], checkpoints: list[Path], workdir: Path, repeats: int,
             threads: int | None, overlap: float, sw_batch_size: int | None, prune_ratio: float | None, device: str,
             cpu_fast_path: bool, options: dict[str, Any]) -> list[dict[str, Any]]:
    from sparseseg.data.cases import collect_cases
    from sparseseg.models.common.registry import model_arguments
    from sparseseg.runtime import cpu_allocator

    infos = [_checkpoint_info(c) for c in checkpoints]
    channels = {i["in_channels"] for i in infos}
    if len(channels) != 1:
        raise InputError(f"the checkpoints expect different channel counts {sorted(channels)}: one case cannot "
                         "feed them all")
    cases = collect_cases(inputs, channels.pop())
    settings = {"overlap": overlap, "sw_batch_size": sw_batch_size, "device": device, "cpu_fast_path": cpu_fast_path,
                "cpu_allocator": cpu_allocator(), **options}
    records = []
    for name in sorted(cases):
        runs: list[list[dict[str, Any]]] = [[] for _ in checkpoints]
        for r in range(repeats):
            for i, (ckpt, info) in enumerate(zip(checkpoints, infos, strict=True)):
                accepts = model_arguments(info["model"])
                ratio = prune_ratio if "prune_ratio" in accepts else None
                drop = options["drop_background_tokens"] and "drop_background" in accepts
                out = workdir / f"out_{i}"
                spec = {"checkpoint": str(ckpt), "inputs": [str(p) for p in cases[name]], "output": str(out),
                        "case": name, "threads": threads, "cpu_allocator": settings["cpu_allocator"],
                        "predict": {"overlap": overlap, "sw_batch_size": sw_batch_size, "device": device,
                                    "cpu_fast_path": cpu_fast_path, "prune_ratio": ratio,
                                    "skip_background": options["skip_background"],
                                    "crop_foreground": options["crop_foreground"], "drop_background_tokens": drop}}
                log.info("[%s, round %d/%d] %s (%s)", name, r + 1, repeats, info["model"], ckpt.name)
                try:
                    run = _run_child(spec)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                log.info("  %.1f s, peak %.0f MB, %d window(s) run", run["wall_s"], run["peak_rss_mb"],
                         run["windows"]["run"])
                runs[i].append(run)
        for i, (ckpt, info) in enumerate(zip(checkpoints, infos, strict=True)):
            ratio = prune_ratio if "prune_ratio" in model_arguments(info["model"]) else None
            records.append(_summarise(runs[i], info, ckpt, ratio, settings))
    return _add_ratios(records)


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One line naming the run's conditions, then one row per (case, model): seconds per stage, windows, wall
    time, peak RSS and the ratios to the first model."""
    if not records:
        return "(no records)\n"
    first = records[0]
    head = (f"device `{first['device']}`, {first['threads']} thread(s), torch {first['torch_version']}, CPU allocator "
            f"{first['cpu_allocator']}, CPU fast path {'on' if first['cpu_fast_path'] else 'off'}, overlap "
            f"{first['overlap']:g}, window batch {first['sw_batch_size'] or 'default'}, background windows "
            f"{'skipped' if first.get('skip_background', True) else 'run'}, foreground crop "
            f"{ {None: 'as trained', True: 'on', False: 'off'}[first.get('crop_foreground')]}, background tokens "
            f"{'dropped' if first.get('drop_background_tokens') else 'kept'}, repeats {first['repeats']} (medians; "
            f"peak: largest), baseline `{first['baseline']}`; one fresh process per run\n\n")
    cols = ["case", "shape", "model", "r", "windows run / skipped", *(f"{s} s" for s in STAGES), "predict s",
            "process s", "peak RSS MB", "speedup", "memory ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in records:
        r = "-" if rec["prune_ratio"] is None else f"{rec['prune_ratio']:g}"
        cells = [rec["case"], " x ".join(str(s) for s in rec["shape"]), rec["model"], r,
                 f"{rec['windows']['run']} / {rec['windows']['skipped']}",
                 *(f"{rec['stages_s'][s]:.2f}" for s in STAGES), f"{rec['wall_s']:.1f}", f"{rec['process_s']:.1f}",
                 f"{rec['peak_rss_mb']:.0f}", f"{rec['speedup']:.2f}", f"{rec['memory_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def write_markdown(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(markdown_table(records)))


def main(argv: list[str] | None = None) -> int:
    from sparseseg.benchmark.memory import child_main

    return child_main(_child, argv)


if __name__ == "__main__":
    raise SystemExit(main())
