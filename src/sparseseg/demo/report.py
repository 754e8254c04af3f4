"""Scoring, benchmark, pictures and ``report.md`` of ``sparseseg demo`` (see :mod:`sparseseg.demo.run`)."""

from __future__ import annotations

import logging
import math
import platform
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from sparseseg.data.io import atomic_write
from sparseseg.demo.data import AP_AXIS, CLASS_NAMES, TEST_CASE

log = logging.getLogger(__name__)
ZEROED, NO_SKIPS = "tokenseg_zeroed", "tokenseg_no_skips"
# TokenSeg's ablations at inference (constructor arguments that change no weight): what the token path carries, and
# what the encoder's skips carry
ABLATIONS = {ZEROED: {"zero_tokens": True}, NO_SKIPS: {"skips": "none"}}
LABELS = {"unetr": "UNETR (dense)", "stp_mta_unetr": "STP + MTA + UNETR", "veloxseg": "VeloxSeg",
          "tokenseg": "TokenSeg", ZEROED: "TokenSeg, tokens zeroed", NO_SKIPS: "TokenSeg, skips removed",
          "threshold": "intensity threshold", "stp_mta_unetr_sparse": "STP + MTA + UNETR, sparse decoding"}


def score(preds: dict[str, Path], dataset: Path, out: Path) -> dict[str, dict[str, Any]]:
    """:func:`sparseseg.evaluation.metrics.evaluate` of each prediction folder against ``labelsTs``; also writes
    ``OUT/metrics/NAME.json``."""
    from sparseseg.evaluation.metrics import evaluate

    return {name: evaluate(path.parent, dataset.parent / "labelsTs", out / "metrics" / f"{name}.json",
                           dataset=dataset) for name, path in preds.items()}


def run_benchmark(s, device: str) -> list[dict[str, Any]]:
    """:func:`sparseseg.benchmark.run.benchmark` of the two demo models on one ROI crop (the dense model is the
    baseline of the speed-up; with sparse decoding ``stp_mta_unetr`` at refine fractions 1 and the demo's); each
    model gets its own arguments (``MODEL:KEY`` overrides)."""
    from sparseseg.benchmark.run import benchmark

    args: dict[str, Any] = {"in_channels": 1, "out_channels": len(CLASS_NAMES), "img_size": s.roi}
    for name in s.models:
        args.update({f"{name}:{k}": v for k, v in s.args_of(name).items() if k != "prune_ratio"})
    ratios = [s.sparse_args["prune_ratio"]] if s.model == "stp_mta_unetr" else None
    fractions = [1.0, s.refine_fraction] if s.refine_fraction is not None and ratios else None
    return benchmark(list(s.models), None, ratios, device=device, repeats=s.benchmark_repeats,
                     warmup=int(s.warmup), model_args=args, memory=s.benchmark_memory, refine_fractions=fractions)


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def policy_summary(depth: np.ndarray, label: np.ndarray, patch_size: int, levels: list[int]) -> dict[str, float]:
    """Share of brain patches (at least half of their voxels inside the brain) among all tokens, among the tokens
    that pass the first pruning stage and among those kept to the last block (``levels``: the possible depths);
    ``label`` ``[X, Y, Z]`` is cut to whole patches."""
    g = depth.shape
    lab = label[: g[0] * patch_size, : g[1] * patch_size, : g[2] * patch_size] > 0
    lab = np.pad(lab, [(0, g[i] * patch_size - lab.shape[i]) for i in range(3)])
    frac = lab.reshape(g[0], patch_size, g[1], patch_size, g[2], patch_size).mean((1, 3, 5))  # -> [gx, gy, gz]
    brain = frac >= 0.5
    kept, passed = depth >= levels[-1], depth > levels[0]

    def share(mask: np.ndarray) -> float:
        return float(brain[mask].mean()) if mask.any() else float("nan")

    return {"tokens": int(depth.size), "brain_share_all": float(brain.mean()), "kept_share": float(kept.mean()),
            "brain_share_passed": share(passed), "brain_share_kept": share(kept)}


def make_pictures(checkpoints: dict[str, Path], data_root: Path, out: Path, padded: Path, pad: int, s
                  ) -> dict[str, Any]:
    """``overlay.png`` (coronal slices of the test block: image, reference, every prediction), ``policy.png`` (the
    token-pruning model's pruning depths over the padded test block, with the blocks sparse decoding refined beside
    them; only when ``stp_mta_unetr`` is in the run), ``tokens.png`` (TokenSeg's kept cells and their boundary
    fraction; only with ``tokenseg``) and ``curves.png`` (both training logs)."""
    from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint
    from sparseseg.visualize.plots import pick_slices, plot_curves, plot_overlay, plot_policy
    from sparseseg.visualize.policy import model_patch_size, policy_levels, policy_map, refinement_map

    image = _load(data_root / "imagesTs" / f"{TEST_CASE}.nii.gz").astype(np.float32)
    label = _load(data_root / "labelsTs" / f"{TEST_CASE}.nii.gz").astype(np.int64)
    preds = {LABELS[n]: _load(out / "predictions" / n / f"{TEST_CASE}.nii.gz") for n in s.decoded(checkpoints)}
    slices = pick_slices(label, AP_AXIS, 4)
    pics: dict[str, Any] = {}
    pics["overlay"] = plot_overlay(image, label, preds, output=out / "overlay.png", class_names=CLASS_NAMES,
                                   slices=slices, axis=AP_AXIS,
                                   title="held-out anterior block, coronal slices (posterior to anterior)")
    pics["overlay_axial"] = plot_overlay(image, label, preds, output=out / "overlay_axial.png",
                                         class_names=CLASS_NAMES, axis=2,
                                         title="held-out anterior block, axial slices (cut face at the bottom)")
    pics["curves"] = plot_curves([out / "runs" / n for n in checkpoints], out / "curves.png",
                                 labels=[LABELS[n] for n in checkpoints])
    pimg = _load(padded).astype(np.float32)
    plabel = np.pad(label, [(0, 0), (pad, 0), (0, 0)], mode="edge")  # on the padded grid (label of the copies)
    if "tokenseg" in checkpoints:
        pics.update(token_pictures(checkpoints["tokenseg"], pimg, plabel, out, [pad + i for i in slices], pad, s))
    if "stp_mta_unetr" not in checkpoints:
        return pics
    ckpt = load_checkpoint(checkpoints["stp_mta_unetr"])
    model = model_from_checkpoint(ckpt).eval()
    depth = policy_map(model, torch.from_numpy(pimg)[None], [s.roi] * 3)
    p, levels = model_patch_size(model), policy_levels(model)
    refine = {}
    if s.refine_fraction is not None:  # the blocks the sparse decoding refines, beside the pruning depths
        model.refine_fraction = s.refine_fraction
        refine = {"refined": refinement_map(model, torch.from_numpy(pimg)[None], [s.roi] * 3),
                  "block_size": model.sparse_decoding.block_size}
        pics["refined_share"] = float(refine["refined"].mean())
    pics["policy"] = plot_policy(pimg, depth, p, plabel, output=out / "policy.png", num_layers=model.num_layers,
                                 depths=levels, class_names=CLASS_NAMES, slices=[pad + i for i in slices],
                                 axis=AP_AXIS, title=f"STP + MTA + UNETR, test block with {pad} replicated slices "
                                                     f"in front: coronal slice = block slice + {pad}", **refine)
    pics["policy_axial"] = plot_policy(pimg, depth, p, plabel, output=out / "policy_axial.png",
                                       num_layers=model.num_layers, depths=levels, class_names=CLASS_NAMES, axis=2,
                                       title=f"axial slices; the bottom {pad} rows replicate the cut face", **refine)
    pics["policy_stats"] = policy_summary(depth, plabel, p, levels)
    return pics


def token_pictures(checkpoint: Path, pimg: np.ndarray, plabel: np.ndarray, out: Path, slices: list[int], pad: int, s
                   ) -> dict[str, Any]:
    """TokenSeg's kept cells over the padded test block (``tokens.png``) and, in ``token_stats``, their boundary
    fraction against the reference (radius 2, both measures, beside chance), tokens kept per level and tile, and
    the share of live codebook codes."""
    from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint
    from sparseseg.visualize.plots import plot_overlay
    from sparseseg.visualize.tokens import cell_levels_legend, token_map

    model = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    tm = token_map(model, torch.from_numpy(pimg)[None], [s.roi] * 3, torch.from_numpy(plabel))
    picture = plot_overlay(pimg, None, {"kept cells": tm.cells}, output=out / "tokens.png",
                           class_names=cell_levels_legend(model.strides), slices=slices, axis=AP_AXIS,
                           title=f"TokenSeg's kept cells (finest level)\ncoronal slice = block slice + {pad}")
    stats = {**tm.report, "tiles": tm.tiles, "kept_per_level": tm.kept_per_level,
             "codebook_usage": model.vq.codebook_usage()}
    return {"tokens": picture, "token_stats": stats}


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def results_table(metrics: dict[str, dict[str, Any]], seconds: dict[str, float]) -> str:
    """Markdown: Dice per class, mean Dice, HD95, CPU inference seconds and speed-up per method."""
    classes = metrics[next(iter(metrics))]["classes"]
    head = ["method", *[f"Dice {c}" for c in classes], "mean Dice", "mean HD95 (mm)", "inference (s)", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base = seconds.get("unetr")
    for name, m in metrics.items():
        t = seconds.get(name)
        row = [LABELS.get(name, name), *[_fmt(m["per_class"][c]["dice_mean"]) for c in classes],
               _fmt(m["mean"]["dice"]), _fmt(m["mean"]["hd95"], 2), _fmt(t, 2) if t is not None else "-",
               f"{base / t:.2f}x" if t and base else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, metrics: dict[str, dict[str, Any]], seconds: dict[str, float],
                 records: list[dict[str, Any]], pictures: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write ``OUT/report.md``."""
    from sparseseg.benchmark.report import markdown_table

    s = info["settings"]
    budget = s.train.get("time_budget")
    steps = {n: _last_iteration(out / "runs" / n / "log.csv") for n in info["checkpoints"]}
    lines = [
        f"# sparseseg demo{' (quick)' if info['quick'] else ''}: dense UNETR vs {LABELS[s.model]} on ICBM152",
        "",
        f"Total wall time **{info['total_seconds'] / 60:.1f} min** ({info['total_seconds']:.0f} s), of which "
        f"training {info['train_seconds']:.0f} s; device `{info['device']}`, {info['threads']} inference thread(s), "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}. Load average "
        f"{info['load_start'][0]:.1f} at the start, {info['load_end'][0]:.1f} at the end (other work on the "
        f"machine slows every number below).",
        "",
        "## Held-out anterior block",
        "",
        results_table(metrics, seconds),
        f"Inference: sliding window ({s.roi}^3, overlap 0.5, Gaussian blending) over the test block padded with "
        f"{info['pad']} replicated slices in front of its cut face, median of {s.timing_repeats} run(s)"
        f"{' after one untimed run' if s.warmup else ''}, both models in the same process. The threshold line "
        f"assigns each voxel by its T1 intensity alone, with thresholds "
        f"{', '.join(f'{t:.3f}' for t in info['thresholds'])} fitted on the training case.",
        "",
        "## Setup",
        "",
        f"* data: ICBM152 2009 T1 template at {s.resolution} mm (nilearn package data); classes "
        f"{', '.join(CLASS_NAMES)} by argmax of the tissue maps inside the brain mask; training = the posterior "
        f"part, test = the anterior 30 % of the brain (`data/dataset.json`, `data/labelsTs`).",
        f"* models: patch {s.model_args['patch_size']}, ViT dim {s.model_args['hidden_size']} x "
        f"{s.model_args['num_layers']} blocks, decoder `{s.model_args['decoder']}` (feature size "
        f"{s.model_args['feature_size']}); " + _compared_line(s),
        f"* training: same seed ({s.train['seed']}), {s.roi}^3 crops, batch {s.train['batch_size']}, AdamW lr "
        f"{s.train['lr']}, warm-up {s.train['warmup_fraction']:.0%} then cosine"
        + (f" tied to a {budget:.0f} s budget per model" if budget else f", {s.train['epochs']} x "
           f"{s.train['iters_per_epoch']} steps")
        + "; both trained at once, one process each. Steps done: "
        + ", ".join(f"{LABELS[n]} {v}" for n, v in steps.items()) + ".",
        "",
        "## Pictures",
        "",
        "![overlay](overlay.png)",
        "",
        "![overlay, axial](overlay_axial.png)",
        "",
        *_policy_lines(pictures),
        *_token_lines(pictures, metrics),
        "![training curves](curves.png)",
        "",
        "## Benchmark (one ROI crop, `sparseseg.benchmark.run`)",
        "",
        markdown_table(records),
        _speed_note(records),
    ]
    path = out / "report.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return path


def _compared_line(s) -> str:
    """The settings of the model set beside unetr, for the report's setup list."""
    if s.model == "stp_mta_unetr":
        where = "after" if s.sparse_args.get("pruned_mask") == "after_norm" else "before (as the authors)"
        decoding = ("" if s.refine_fraction is None else
                    f" Sparse decoding: the same checkpoint with refine fraction {s.refine_fraction:g} (the "
                    "full-resolution level on that share of the blocks, the rest from the coarse fill).")
        return (f"sparse: prune ratio {s.sparse_args['prune_ratio']}, stages after blocks "
                f"{s.sparse_args['prune_after']}, pruned tokens masked by 1 - M {where} their MTA group norm."
                f"{decoding}")
    own = s.args_of(s.model)
    return f"{LABELS[s.model]}: " + (", ".join(f"{k} {v}" for k, v in own.items()) or "default arguments") + "."


def _policy_lines(pictures: dict[str, Any]) -> list[str]:
    """The policy pictures and their reading, when the run has a token-pruning model."""
    ps = pictures.get("policy_stats")
    if ps is None:
        return []
    refined = pictures.get("refined_share")
    return [
        "Pruning policy of STP + MTA + UNETR over the padded test block (no red: dropped by the first stage; "
        "darkest red: kept to the last block)"
        + ("" if refined is None else f", and beside it the blocks its sparse decoding computed at full "
           f"resolution (blue, {refined:.0%} of the blocks; the rest is the coarse fill)") + ". "
        f"Brain patches (at least half inside the brain mask) are {ps['brain_share_all']:.0%} of the "
        f"{ps['tokens']} tokens, {_fmt(ps['brain_share_passed'] * 100, 0)}% of those that pass the first stage and "
        f"{_fmt(ps['brain_share_kept'] * 100, 0)}% of those kept to the last block"
        + (" (the scorer keeps background tokens more often than brain ones)."
           if ps["brain_share_kept"] < ps["brain_share_all"] else
           " (the scorer keeps brain tokens longer than background ones)."),
        "",
        "![policy](policy.png)",
        "",
        "![policy, axial](policy_axial.png)",
        "",
    ]


def _token_lines(pictures: dict[str, Any], metrics: dict[str, dict[str, Any]]) -> list[str]:
    """TokenSeg's kept cells, their boundary fraction beside chance, and the zeroed-token ablation."""
    ts = pictures.get("token_stats")
    if ts is None:
        return []
    lines = [
        f"Cells of TokenSeg's kept tokens over the padded test block ({ts['tiles']} ROI tiles, "
        f"{'/'.join(map(str, ts['kept_per_level']))} tokens kept per tile from the finest to the coarsest level; "
        f"{ts['codebook_usage']:.0%} of the codebook alive). Boundary fraction against the reference at radius 2: "
        f"**{_fmt(ts.get('touches'))}** of the kept cells touch the band (chance, random cells in the same number "
        f"per level: {_fmt(ts.get('touches_chance'))}); on average **{_fmt(ts.get('share'))}** of a kept cell lies "
        f"inside the band (chance: the band's share of the volume, {_fmt(ts.get('share_chance'))}).",
        "",
    ]
    full = metrics.get("tokenseg", {}).get("mean", {}).get("dice")
    if ZEROED in metrics and full is not None:
        zero = metrics[ZEROED]["mean"]["dice"]
        lines += [f"Tokens zeroed at inference (the decoder gets zeros for the kept tokens; their cells still choose "
                  f"where it refines and where the skips enter): mean Dice {_fmt(zero)} against {_fmt(full)}, a drop "
                  f"of {_fmt(100 * (full - zero), 1)} points carried by the tokens' content.", ""]
    if NO_SKIPS in metrics and full is not None:
        bare = metrics[NO_SKIPS]["mean"]["dice"]
        lines += [f"Skips removed at inference (the decoder gets the tokens alone): mean Dice {_fmt(bare)}, a drop "
                  f"of {_fmt(100 * (full - bare), 1)} points carried by the encoder's detail inside the kept cells.",
                  ""]
    return [*lines, "![kept token cells](tokens.png)", ""]


def _speed_note(records: list[dict[str, Any]]) -> str:
    """One sentence on where the time goes, from the benchmark records (dense first, then the other model)."""
    if len(records) < 2:
        return ""
    dense, other = records[0], records[1]
    if other["prune_ratio"] is None:
        return (f"\nPer crop {LABELS.get(other['model'], other['model'])} needs {other['gmacs']:.2f} G MACs and "
                f"the dense UNETR {dense['gmacs']:.2f}. Measured here: end to end "
                f"{_fmt(other.get('speedup'), 2)}x.\n")
    sparse = other
    note = (f"\nPer crop the sparse model needs {sparse['gmacs']:.2f} G MACs and the dense one "
            f"{dense['gmacs']:.2f}: at this size most of the work is the full-resolution convolutions of the "
            f"decoder, which pruning {100 * sparse['prune_ratio']:.0f} % of the tokens does not touch. Measured "
            f"here: encoder speed-up {_fmt(sparse.get('encoder_speedup'), 2)}x, end to end "
            f"{_fmt(sparse.get('speedup'), 2)}x.")
    decoded = [r for r in records[2:] if (r.get("refine_fraction") or 1.0) < 1.0]
    for rec in decoded:
        note += (f" With sparse decoding (refine fraction {rec['refine_fraction']:g}): {rec['gmacs']:.2f} G MACs, "
                 f"end to end {_fmt(rec.get('speedup'), 2)}x (the refined blocks carry a halo of 4 voxels each "
                 "side, so the full-resolution level costs more than the fraction per block).")
    return note + "\n"


def _last_iteration(path: Path) -> int | None:
    from sparseseg.visualize.plots import read_log

    try:
        it = read_log(path).get("iteration")
    except Exception:  # a missing log reads as unknown
        return None
    return int(it[-1]) if it else None
