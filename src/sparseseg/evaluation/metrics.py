"""Dice and HD95 per class and case, with empty masks reported explicitly: ``evaluate(pred_dir, label_dir, output)``.

For each case and class (or region) the status is one of

* ``ok``: prediction and reference both non-empty; Dice and HD95 (mm, spacing-aware, MONAI's symmetric 95th
  percentile surface distance) are computed;
* ``prediction_empty``: the reference has the class, the prediction does not: Dice = 0 (a miss is a real
  error), HD95 undefined (``null``);
* ``reference_empty``: the prediction has the class, the reference does not: Dice = 0 (false positive), HD95
  undefined;
* ``both_empty``: neither has it: Dice and HD95 undefined (``null``).

Undefined values are never turned into 0, 1 or inf: they are left out of the means and counted per status
(``n_dice`` / ``n_hd95`` say how many cases each mean covers).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from sparseseg.data.datasets import load_dataset
from sparseseg.data.formats import case_name, is_image_file
from sparseseg.data.io import atomic_write, load_label, read_grid
from sparseseg.errors import InputError

log = logging.getLogger(__name__)
STATUSES = ("ok", "prediction_empty", "reference_empty", "both_empty")


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Dice, HD95 and status of two boolean masks ``[X, Y, Z]`` with voxel ``spacing`` (mm)."""
    p_any, r_any = bool(pred.any()), bool(ref.any())
    if not p_any and not r_any:
        return {"dice": None, "hd95": None, "status": "both_empty"}
    if not (p_any and r_any):
        return {"dice": 0.0, "hd95": None, "status": "prediction_empty" if r_any else "reference_empty"}
    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None]  # [X, Y, Z] -> [1, 1, X, Y, Z]
    r = torch.from_numpy(np.ascontiguousarray(ref))[None, None]
    dice = float(compute_dice(p, r, include_background=True)[0, 0])
    with warnings.catch_warnings():  # MONAI 1.6 passes a deprecated argument to itself
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                spacing=[float(s) for s in spacing])[0, 0])
    return {"dice": dice, "hd95": hd95, "status": "ok"}


def _label_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{what} folder not found", folder)
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        name = case_name(f)
        if not (f.is_file() and is_image_file(f)) or name.endswith("_probabilities"):
            continue
        if name in files:
            raise InputError(f"case {name!r} appears twice (also {files[name].name})", f)
        files[name] = f
    return files


def _classes(dataset: str | Path | None, label_mode: str) -> tuple[dict[str, list[int]] | None, list[int] | None]:
    """(class name -> label values it covers, allowed label values); ``(None, None)`` without a dataset."""
    if dataset is None:
        if label_mode == "regions":
            raise InputError("region evaluation needs --dataset (it defines the regions)")
        return None, None
    ds = load_dataset(dataset, check_files=False, require_training=False)
    regions = ds.default_regions() if label_mode != "classes" else {}
    if label_mode == "regions" and not regions:
        raise InputError("the dataset defines no regions", ds.json_path)
    classes = regions or {ds.labels[v]: [v] for v in sorted(ds.labels) if v != 0}
    return classes, sorted(ds.labels)


def evaluate(pred_dir: str | Path, label_dir: str | Path, output: str | Path | None = None,
             dataset: str | Path | None = None, label_mode: str = "auto") -> dict[str, Any]:
    """Score every prediction ``pred_dir/CASE.nii.gz`` against ``label_dir/CASE.nii.gz``.

    Label maps may be NIfTI, NRRD (``.nrrd``, ``.seg.nrrd``) or MetaImage (``.mha``, ``.mhd``), in any mix: a
    prediction and its reference are paired by case name and compared on their RAS geometry.

    Args:
        pred_dir: folder of predicted label maps (``*_probabilities`` files are skipped).
        label_dir: folder of reference label maps; every prediction needs one.
        output: where to write ``metrics.json`` (atomically); None writes nothing.
        dataset: optional ``dataset.json`` for class names, allowed values and regions (BraTS TC/WT/ET).
        label_mode: ``auto`` (regions when the dataset has them), ``classes`` or ``regions``.

    Returns:
        ``{"classes": [...], "label_mode", "num_cases", "cases": [{"case", "prediction", "reference",
        "metrics": {class: {"dice", "hd95", "status"}}}], "per_class": {class: {"dice_mean", "dice_std",
        "n_dice", "hd95_mean", "hd95_std", "n_hd95", "status_counts"}}, "mean": {"dice", "hd95"}}``.
    """
    if label_mode not in ("auto", "classes", "regions"):
        raise InputError(f"label_mode must be auto, classes or regions, got {label_mode!r}")
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    preds, refs = _label_files(pred_dir, "prediction"), _label_files(label_dir, "label")
    if not preds:
        raise InputError("no predicted label maps found (.nii.gz, .nii, .seg.nrrd, .nrrd, .nhdr, .mha, .mhd)", pred_dir)
    if output is not None and Path(output).resolve() in {p.resolve() for p in [*preds.values(), *refs.values()]}:
        raise InputError("output would overwrite an input file", output)
    classes, allowed = _classes(dataset, label_mode)
    cases = []
    for name, pred_path in preds.items():
        if name not in refs:
            raise InputError(f"no reference label map {name} in {label_dir}", pred_path)
        cases.append(_score_case(name, pred_path, refs[name], classes, allowed))
    names = list(classes) if classes is not None else sorted({c for case in cases for c in case["metrics"]}, key=int)
    for case in cases:  # classes absent from a case (no dataset given) are both empty there
        case["metrics"] = {c: case["metrics"].get(c, {"dice": None, "hd95": None, "status": "both_empty"})
                           for c in names}
    mode = "regions" if classes is not None and _is_regions(classes) else "classes"
    results = {"classes": names, "label_mode": mode, "num_cases": len(cases), "cases": cases,
               "per_class": _summary(cases, names)}
    per = results["per_class"].values()
    results["mean"] = {k: _mean([c[f"{k}_mean"] for c in per]) for k in ("dice", "hd95")}
    if output is not None:
        atomic_write(output, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    return results


def _is_regions(classes: dict[str, list[int]]) -> bool:
    return any(len(v) > 1 for v in classes.values())


def _score_case(name: str, pred_path: Path, ref_path: Path, classes: dict[str, list[int]] | None,
                allowed: list[int] | None) -> dict[str, Any]:
    ref = load_label(ref_path, label_values=allowed, reference=read_grid(pred_path))  # Slicer blocks placed
    pred = load_label(pred_path, spatial_shape=ref.spatial_shape, label_values=allowed)
    if not np.allclose(pred.affine, ref.affine, atol=1e-3, rtol=1e-4):
        raise InputError(f"prediction grid (affine) differs from the reference {ref_path}", pred_path)
    p, r = pred.array[0], ref.array[0]
    if classes is None:
        values = sorted((set(np.unique(p).tolist()) | set(np.unique(r).tolist())) - {0})
        classes = {str(v): [v] for v in values if v != 0}
    metrics = {c: mask_metrics(np.isin(p, vals), np.isin(r, vals), ref.spacing) for c, vals in classes.items()}
    return {"case": name, "prediction": str(pred_path), "reference": str(ref_path), "metrics": metrics}


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _summary(cases: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for c in names:
        rows = [case["metrics"][c] for case in cases]
        entry: dict[str, Any] = {}
        for k in ("dice", "hd95"):
            vals = [r[k] for r in rows if r[k] is not None]
            entry[f"{k}_mean"] = float(np.mean(vals)) if vals else None
            entry[f"{k}_std"] = float(np.std(vals)) if vals else None
            entry[f"n_{k}"] = len(vals)
        entry["status_counts"] = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
        out[c] = entry
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the per-class summary (mean ± std, the number of cases each covers, statuses)."""

    def fmt(mean: float | None, std: float | None, n: int, digits: int) -> str:
        return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f} ({n})"

    header = ["class", "Dice mean ± std (n)", "HD95 mm mean ± std (n)", "ok", "pred empty", "ref empty",
              "both empty"]
    rows = []
    for c, s in results["per_class"].items():
        sc = s["status_counts"]
        rows.append([c, fmt(s["dice_mean"], s["dice_std"], s["n_dice"], 4),
                     fmt(s["hd95_mean"], s["hd95_std"], s["n_hd95"], 2), str(sc["ok"]), str(sc["prediction_empty"]),
                     str(sc["reference_empty"]), str(sc["both_empty"])])
    m = results["mean"]
    rows.append(["mean", "n/a" if m["dice"] is None else f"{m['dice']:.4f}",
                 "n/a" if m["hd95"] is None else f"{m['hd95']:.2f}", "", "", "", ""])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return f"{results['num_cases']} case(s)\n" + "\n".join(lines)
