"""``sparseseg demo``: the dense ``unetr`` against ``stp_mta_unetr`` (or, with ``--model``, ``veloxseg`` or
``tokenseg``) on real anatomy, end to end, on a small CPU.

Steps (all through the ordinary library: :func:`~sparseseg.training.train`, :func:`~sparseseg.inference.predict`,
:func:`~sparseseg.evaluation.evaluate`, :func:`~sparseseg.benchmark.benchmark`):

1. build the ICBM152 tissue dataset (:mod:`sparseseg.demo.data`): training = everything behind the anterior
   block, test = the anterior block;
2. train both models with the same seed, recipe and time budget, at the same time, each in its own process with
   an equal share of the CPU threads (two busy processes on two cores: one thread each);
3. predict the test block with each checkpoint, after padding its cut face by edge replication (zero padding
   there reads as the dark rim of the brain: the models paint a false CSF line along the cut), and crop back;
   with ``refine_fraction`` below 1, ``stp_mta_unetr`` is decoded twice: densely and with sparse decoding;
4. score both and a per-voxel intensity threshold fitted on the training case (these tissue labels are nearly
   thresholds, so it is the reference line any model must be read against);
5. time each model's inference over the whole test block in this process, one after the other;
6. benchmark one ROI of each model, draw the overlay, policy (token-pruning model only, with the blocks sparse
   decoding refined beside it), kept-token (TokenSeg only) and curve pictures, and write ``OUTPUT/report.md``. With
   TokenSeg the test block is also predicted with its tokens zeroed and with its skips removed (the ablation rows of
   the table), and its kept cells are scored against the boundary band.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import yaml
from tqdm import tqdm

from sparseseg.data.io import atomic_write, save_nifti
from sparseseg.demo.data import AP_AXIS, TEST_CASE, TRAIN_CASE, build_dataset, replicate_pad
from sparseseg.errors import InputError, SparsesegError
from sparseseg.models.stp_mta.completion import PRUNED_MASKS

log = logging.getLogger(__name__)
COMPARED = ("stp_mta_unetr", "veloxseg", "tokenseg")  # models the demo can set beside the dense unetr
SPARSE = "stp_mta_unetr_sparse"  # stp_mta_unetr decoded sparsely (refine_fraction below 1)
# Own arguments of the other compared models at the demo's sizes (the data fills in channels and img_size).
# VeloxSeg: the authors' model with a stride-2 stem (at 2 mm their stride-4 stem leaves 8 mm features and a 4x
# pixel-shuffle head: thin CSF is lost, docs/veloxseg.md), as UNETR here takes patch 8 instead of 16; 48^3 crops
# give 24, 12, 6, 3 maps, where the authors' windows fit as at 96^3. No deep supervision: the demo's UNETR has
# none, so both models train on the same loss. Quick: three stages, half the channels, 2^3 windows for the 32^3
# crops (maps 8, 4, 2).
OTHER_ARGS = {
    "full": {"veloxseg": {"stem_stride": 2, "deep_supervision": False},
             "tokenseg": {}},
    "quick": {"veloxseg": {"channels": [8, 16, 32], "num_heads": [1, 2, 2], "head_dim": [4, 4, 8],
                           "group_channels": [4, 4, 8], "ffn_expansion": [2, 2, 2], "window_size": [2, 2, 2]},
              "tokenseg": {"feature_size": 4, "token_size": 32, "num_candidates": 24, "num_keep": 12,
                           "codebook_size": 64, "mixer_depth": 1, "num_heads": 2}},
}


@dataclass
class DemoSettings:
    """Sizes and budgets of one demo run (``full`` or ``quick``)."""

    resolution: int  # mm per voxel of the template
    roi: int  # training crop and sliding window side
    model_args: dict[str, Any]  # shared by unetr and stp_mta_unetr
    dense_args: dict[str, Any]  # unetr only (none: its decoder taps follow the depth)
    sparse_args: dict[str, Any]  # stp_mta_unetr only
    model: str = "stp_mta_unetr"  # the model set beside unetr
    other_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # veloxseg / tokenseg arguments
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    refine_fraction: float | None = None  # sparse decoding of stp_mta_unetr, scored beside its dense decoding
    timing_repeats: int = 3
    benchmark_repeats: int = 3
    benchmark_memory: bool = True
    warmup: bool = True  # one untimed run before timing (inference and benchmark)

    @property
    def models(self) -> tuple[str, str]:
        """The dense baseline and the compared model, in that order."""
        return ("unetr", self.model)

    def decoded(self, checkpoints: dict[str, Path]) -> dict[str, tuple[Path, float | None]]:
        """Every prediction the demo scores: name -> (checkpoint, refine fraction or None). With sparse decoding
        the compared model is decoded twice, densely and as ``SPARSE`` at ``refine_fraction``."""
        runs: dict[str, tuple[Path, float | None]] = {name: (path, None) for name, path in checkpoints.items()}
        if self.refine_fraction is not None and self.model == "stp_mta_unetr":
            runs[self.model] = (checkpoints[self.model], 1.0)
            runs[SPARSE] = (checkpoints[self.model], self.refine_fraction)
        return runs

    def args_of(self, name: str) -> dict[str, Any]:
        """Constructor arguments of ``name`` in this demo (the data fills in channels and ``img_size``)."""
        if name == "unetr":
            return {**self.model_args, **self.dense_args}
        if name == "stp_mta_unetr":
            return {**self.model_args, **self.sparse_args}
        return dict(self.other_args[name])


def demo_settings(quick: bool, minutes: float | None, prune_ratio: float, seed: int, device: str,
                  model: str = "stp_mta_unetr", lr: float = 3e-3, pruned_mask: str = "before_norm",
                  model_args: dict[str, Any] | None = None, refine_fraction: float | None = None) -> DemoSettings:
    """The full demo (2 mm, 48^3 crops, ViT dim 192 x 6 blocks, patch 8, ``minutes`` of training, default 6) or the
    quick one (4 mm, 32^3 crops, dim 48 x 3 blocks, 3 steps, no warm-up runs); ``model`` is set beside unetr;
    ``lr`` is the peak learning rate of both; ``pruned_mask`` is stp_mta_unetr's (docs/models.md); ``model_args``
    override constructor arguments of ``model``.

    The dense decoder taps are unetr's default, spread over the depth like the authors' 4/7/10 of 12 blocks:
    blocks 2/4/5 of 6 (quick: 1/2/3 of 3); the pruning stages sit after blocks 2/4/5 (quick 1/2), the paper's
    3/6/9 of 12 scaled to 6 blocks."""
    if model not in COMPARED:
        raise InputError(f"--model must be one of {', '.join(COMPARED)}, got {model!r}")
    if not lr > 0:
        raise InputError(f"--lr must be > 0, got {lr}")
    if pruned_mask not in PRUNED_MASKS:
        raise InputError(f"--pruned-mask must be one of {', '.join(PRUNED_MASKS)}, got {pruned_mask!r}")
    if refine_fraction is not None and not 0.0 < refine_fraction <= 1.0:
        raise InputError(f"--refine-fraction must be in (0, 1], got {refine_fraction}")
    train = {"batch_size": 2, "lr": lr, "warmup_fraction": 0.05, "weight_decay": 0.05, "layer_decay": 1.0,
             "intensity": "none", "seed": seed, "device": device, "tensorboard": False, "val_every": 1000}
    if quick:
        s = DemoSettings(
            resolution=4, roi=32,
            model_args={"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 3, "num_heads": 3,
                        "feature_size": 8, "decoder": "v2"},
            dense_args={},
            sparse_args={"prune_ratio": prune_ratio, "prune_after": [1, 2], "completion_size": 48,
                         "completion_heads": 3, "pruned_mask": pruned_mask},
            train={**train, "epochs": 1, "iters_per_epoch": 3},
            timing_repeats=1, benchmark_repeats=1, benchmark_memory=False, warmup=False)
    else:
        s = DemoSettings(
            resolution=2, roi=48,
            model_args={"patch_size": 8, "hidden_size": 192, "mlp_dim": 768, "num_layers": 6, "num_heads": 6,
                        "feature_size": 16, "decoder": "v2"},
            dense_args={},
            sparse_args={"prune_ratio": prune_ratio, "prune_after": [2, 4, 5], "completion_size": 192,
                         "completion_heads": 6, "pruned_mask": pruned_mask},
            train={**train, "epochs": 100_000, "iters_per_epoch": 20})
        minutes = 6.0 if minutes is None else minutes
    if minutes is not None:
        if minutes <= 0:
            raise InputError(f"--minutes must be > 0, got {minutes}")
        s.train["time_budget"] = 60.0 * minutes
        if quick:
            s.train.update(epochs=100_000, iters_per_epoch=3)
    s.train["roi_size"] = [s.roi] * 3
    s.model = model
    s.other_args = {name: dict(args) for name, args in OTHER_ARGS["quick" if quick else "full"].items()}
    if model_args:
        (s.sparse_args if model == "stp_mta_unetr" else s.other_args[model]).update(model_args)
    s.refine_fraction = refine_fraction if refine_fraction is not None and refine_fraction < 1.0 else None
    return s


def _train_commands(data: Path, out: Path, s: DemoSettings) -> dict[str, tuple[list[str], Path]]:
    """One ``sparseseg train --config`` command per model; its YAML config is written under ``OUT/runs``."""
    cmds = {}
    for name in s.models:
        run_dir = out / "runs" / name
        cfg = {"dataset": str(data), "model": name, "output": str(run_dir), **s.train, "model_args": s.args_of(name)}
        cfg_path = out / "runs" / f"{name}.yaml"
        atomic_write(cfg_path, lambda tmp, cfg=cfg: tmp.write_text(yaml.safe_dump(cfg, sort_keys=False)))
        cmds[name] = ([sys.executable, "-m", "sparseseg", "train", "--config", str(cfg_path)], run_dir)
    return cmds


def train_concurrently(data: Path, out: Path, s: DemoSettings) -> dict[str, Path]:
    """Train both models at once in child processes sharing the CPU threads equally; returns their checkpoints.

    A child that fails stops the other and raises SparsesegError with the end of its log."""
    threads = max(1, (os.cpu_count() or 2) // len(s.models))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    budget = s.train.get("time_budget")
    try:
        for name, (cmd, run_dir) in _train_commands(data, out, s).items():
            run_dir.mkdir(parents=True, exist_ok=True)
            logf = (run_dir / "train.log").open("w")
            procs[name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), run_dir)
            logf.close()
        log.info("training %s at once, %d thread(s) each%s", " and ".join(procs), threads,
                 f", {budget:.0f} s each" if budget else "")
        start = time.perf_counter()
        with tqdm(total=int(budget) if budget else None, desc="training", unit="s", leave=False,
                  disable=None if budget else True) as bar:  # None: no bar when stderr is not a terminal
            while any(p.poll() is None for p, _ in procs.values()):
                time.sleep(1.0)
                if budget:
                    bar.n = min(int(time.perf_counter() - start), int(budget))
                    bar.refresh()
                for name, (p, run_dir) in procs.items():
                    if p.poll() not in (None, 0):
                        tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
                        raise SparsesegError(f"training {name} failed (exit {p.returncode}): {' | '.join(tail)}",
                                             run_dir / "train.log")
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    checkpoints = {}
    for name, (_, run_dir) in procs.items():
        best, last = run_dir / "best.pt", run_dir / "last.pt"
        checkpoints[name] = best if best.exists() else last
    return checkpoints


def fit_thresholds(image: np.ndarray, label: np.ndarray, num_classes: int = 4, bins: int = 128) -> list[float]:
    """Intensity thresholds ``t_1 <= t_2 <= t_3`` (class c = intensities in ``[t_c, t_{c+1})``) maximising the
    mean foreground Dice on the given voxels; exhaustive over ``bins`` histogram edges (classes ordered by
    intensity, as T1 tissue classes are: background < CSF < GM < WM)."""
    if num_classes != 4:
        raise ValueError("the threshold baseline is written for 4 ordered classes")
    edges = np.linspace(float(image.min()), float(image.max()) + 1e-6, bins + 1)
    hist = np.stack([np.histogram(image[label == c], bins=edges)[0] for c in range(num_classes)]).astype(np.float64)
    cum = np.concatenate([np.zeros((num_classes, 1)), hist.cumsum(1)], axis=1)  # [4, bins + 1]
    total = cum[:, -1]
    i, j, k = np.meshgrid(np.arange(bins + 1), np.arange(bins + 1), np.arange(bins + 1), indexing="ij")
    valid = (i <= j) & (j <= k)
    bounds = [(i, j), (j, k), (k, np.full_like(k, bins))]
    dice = np.zeros(i.shape)
    for c, (a, b) in enumerate(bounds, start=1):
        tp = cum[c][b] - cum[c][a]
        pred = cum.sum(0)[b] - cum.sum(0)[a]
        dice += 2 * tp / np.maximum(pred + total[c], 1.0)
    dice = np.where(valid, dice / 3, -1.0)
    best = np.unravel_index(int(dice.argmax()), dice.shape)
    return [float(edges[v]) for v in best]


def apply_thresholds(image: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Class index per voxel: the number of thresholds at or below its intensity."""
    return np.searchsorted(np.asarray(thresholds), image, side="right").astype(np.uint8)


def _padded_test_input(data_root: Path, work: Path, roi: int) -> tuple[Path, int]:
    """Write the test image padded in front of its cut face (the first slices along the A-P axis) by edge
    replication, to at least ``roi`` slices and by at least ``roi // 4``; returns the file and the pad."""
    img = nib.load(str(data_root / "imagesTs" / f"{TEST_CASE}.nii.gz"))
    array = np.asarray(img.dataobj, dtype=np.float32)
    pad = max(roi - array.shape[AP_AXIS], roi // 4)
    padded, affine = replicate_pad(array, img.affine, pad)
    path = save_nifti(padded, work / "padded" / f"{TEST_CASE}.nii.gz", affine, dtype=np.float32)
    return path, pad


def predict_test_block(runs: dict[str, tuple[Path, float | None]], data_root: Path, out: Path, roi: int,
                       device: str) -> tuple[dict[str, Path], Path, int]:
    """Predict the padded test block for each run (name -> checkpoint and refine fraction;
    :func:`sparseseg.inference.predict`), crop the prediction back onto the test block's grid and write
    ``OUT/predictions/NAME/CASE.nii.gz``."""
    from sparseseg.inference.predictor import predict

    work = out / "work"
    padded, pad = _padded_test_input(data_root, work, roi)
    ref = nib.load(str(data_root / "imagesTs" / f"{TEST_CASE}.nii.gz"))
    written = {}
    for name, (ckpt, fraction) in runs.items():
        raw = predict(ckpt, padded, work / f"pred_{name}", device=device, refine_fraction=fraction)[0]
        labels = np.asarray(nib.load(str(raw)).dataobj)[:, pad:, :]  # [X, pad + Y, Z] -> [X, Y, Z]
        written[name] = save_nifti(labels, out / "predictions" / name / f"{TEST_CASE}.nii.gz", ref.affine,
                                   ref.header, np.uint8)
    return written, padded, pad


def predict_ablations(checkpoint: Path, data_root: Path, out: Path, roi: int, device: str) -> dict[str, Path]:
    """TokenSeg's ablations (:data:`sparseseg.demo.report.ABLATIONS`): the checkpoint rebuilt with the tokens zeroed
    (``zero_tokens=True``) and with the encoder's skips removed (``skips="none"``; only when it had skips), each
    predicted like the others into ``OUT/predictions/NAME``."""
    from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from sparseseg.demo.report import ABLATIONS

    ckpt = load_checkpoint(checkpoint)
    rebuilt = {}
    for name, change in ABLATIONS.items():
        model = model_from_checkpoint(ckpt, checkpoint)
        if all(getattr(model.decoder if k == "skips" else model, k) == v for k, v in change.items()):
            continue  # trained that way: nothing to ablate
        model.model_args.update(change)
        rebuilt[name] = save_checkpoint(out / "work" / f"{name}.pt", model, ckpt["data"])
    return predict_test_block({k: (v, None) for k, v in rebuilt.items()}, data_root, out, roi, device)[0]


def time_inference(runs: dict[str, tuple[Path, float | None]], padded: Path, device: str, repeats: int,
                   warmup: bool = True) -> dict[str, float]:
    """Median seconds of sliding-window inference (overlap 0.5, Gaussian blending, 4 windows per call) over the
    padded test block, per run (name -> checkpoint and refine fraction), one after the other in this process,
    after one untimed run (``warmup``); on the CPU each model runs through
    :func:`~sparseseg.inference.fast_cpu.optimize_for_cpu_inference`, as in ``predict``."""
    from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint
    from sparseseg.config import resolve_device
    from sparseseg.data.transforms import DataConfig
    from sparseseg.inference.fast_cpu import optimize_for_cpu_inference
    from sparseseg.inference.sliding_window import sliding_window_logits

    dev = resolve_device(device)
    image = torch.from_numpy(np.asarray(nib.load(str(padded)).dataobj, dtype=np.float32))[None, None].to(dev)
    seconds = {}
    for name, (path, fraction) in runs.items():
        ckpt = load_checkpoint(path)
        roi = DataConfig.from_dict(ckpt["data"]).roi_size
        model = model_from_checkpoint(ckpt, path).to(dev).eval()
        if fraction is not None:
            model.refine_fraction = fraction
        if dev.type == "cpu":
            model = optimize_for_cpu_inference(model)
        times = []
        with torch.inference_mode():
            for rep in range(repeats + int(warmup)):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                sliding_window_logits(model, image, roi, 4, 0.5)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if rep or not warmup:
                    times.append(time.perf_counter() - t0)
        seconds[name] = statistics.median(times)
        log.info("%s: %.2f s per test block (median of %d)", name, seconds[name], repeats)
    return seconds


def threshold_baseline(data_root: Path, out: Path) -> tuple[Path, list[float]]:
    """Fit the thresholds on the training case, apply them to the test block, write the label map."""
    tr_img = np.asarray(nib.load(str(data_root / "imagesTr" / f"{TRAIN_CASE}.nii.gz")).dataobj, dtype=np.float32)
    tr_lab = np.asarray(nib.load(str(data_root / "labelsTr" / f"{TRAIN_CASE}.nii.gz")).dataobj)
    thresholds = fit_thresholds(tr_img, tr_lab)
    ts = nib.load(str(data_root / "imagesTs" / f"{TEST_CASE}.nii.gz"))
    pred = apply_thresholds(np.asarray(ts.dataobj, dtype=np.float32), thresholds)
    path = save_nifti(pred, out / "predictions" / "threshold" / f"{TEST_CASE}.nii.gz", ts.affine, ts.header,
                      np.uint8)
    return path, thresholds


def run_demo(output: str | Path = "sparseseg_demo", quick: bool = False, minutes: float | None = None,
             device: str = "cpu", prune_ratio: float = 0.75, seed: int = 0, model: str = "stp_mta_unetr",
             lr: float = 3e-3, pruned_mask: str = "before_norm", model_args: dict[str, Any] | None = None,
             refine_fraction: float | None = 0.25) -> Path:
    """Run the whole demo into ``output``; returns the path of ``report.md``. See the module docstring."""
    from sparseseg.demo.report import make_pictures, run_benchmark, score, write_report

    start = time.perf_counter()
    load_start = os.getloadavg()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError("the demo output must be a folder", out)
    if not 0.0 <= prune_ratio < 1.0:
        raise InputError(f"--prune-ratio must be in [0, 1), got {prune_ratio}")
    from sparseseg.config import resolve_device

    resolve_device(device)  # an unavailable device fails here, before any training starts
    s = demo_settings(quick, minutes, prune_ratio, seed, device, model, lr, pruned_mask, model_args, refine_fraction)
    data = build_dataset(out / "data", resolution=s.resolution)
    log.info("dataset: %s", data)
    t_train = time.perf_counter()
    checkpoints = train_concurrently(data, out, s)
    train_seconds = time.perf_counter() - t_train
    runs = s.decoded(checkpoints)
    preds, padded, pad = predict_test_block(runs, data.parent, out, s.roi, device)
    if s.model == "tokenseg":
        preds.update(predict_ablations(checkpoints["tokenseg"], data.parent, out, s.roi, device))
    preds["threshold"], thresholds = threshold_baseline(data.parent, out)
    metrics = score(preds, data, out)
    seconds = time_inference(runs, padded, device, s.timing_repeats, s.warmup)
    records = run_benchmark(s, device)
    pictures = make_pictures(checkpoints, data.parent, out, padded, pad, s)
    total = time.perf_counter() - start
    info = {"quick": quick, "settings": s, "train_seconds": train_seconds, "thresholds": thresholds,
            "threads": torch.get_num_threads(), "load_start": load_start, "load_end": os.getloadavg(),
            "total_seconds": total, "pad": pad, "device": device, "checkpoints": checkpoints}
    report = write_report(out, metrics, seconds, records, pictures, info)
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(
        {"metrics": {k: v["per_class"] for k, v in metrics.items()}, "mean_dice": {k: v["mean"]["dice"]
         for k, v in metrics.items()}, "inference_seconds": seconds, "total_seconds": total,
         "train_seconds": train_seconds}, indent=2)))
    log.info("demo finished in %.1f s (%.1f min); report: %s", total, total / 60, report)
    return report
