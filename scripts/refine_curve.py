"""Dice, HD95 and G MACs of sparse decoding against the refine fraction, from finished ``sparseseg demo`` folders
(docs/models.md, "Sparse decoding").

    python scripts/refine_curve.py demo_s0 demo_s1 demo_s2 --fractions 0.1,0.25,0.5,0.75,1 --output curve

For each demo folder the ``stp_mta_unetr`` checkpoint predicts the held-out block at every fraction (the demo's
own prediction path: padding, sliding window, crop), the predictions are scored with ``sparseseg evaluate`` and
one 48^3 window is counted with ``sparseseg.count_macs``; the dense UNETR of the same folder is the reference line.
Writes ``OUTPUT/refine_curve.json`` and ``OUTPUT/refine_curve.png`` (mean over the folders, each folder a dot).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from sparseseg import count_macs
from sparseseg.checkpoint import load_checkpoint, model_from_checkpoint
from sparseseg.data.transforms import DataConfig
from sparseseg.demo.report import score
from sparseseg.demo.run import predict_test_block


def _checkpoint(run: Path) -> Path:
    best = run / "best.pt"
    return best if best.exists() else run / "last.pt"


def measure(demo: Path, fractions: list[float], work: Path) -> dict:
    """Mean Dice / HD95 of the demo's stp_mta_unetr at every fraction and of its dense unetr; G MACs per window."""
    sparse, dense = _checkpoint(demo / "runs" / "stp_mta_unetr"), _checkpoint(demo / "runs" / "unetr")
    runs = {f"f{f:g}": (sparse, f) for f in fractions} | {"unetr": (dense, None)}
    ckpt = load_checkpoint(sparse)
    roi = DataConfig.from_dict(ckpt["data"]).roi_size
    preds, _, _ = predict_test_block(runs, demo / "data", work, roi[0], "cpu")
    metrics = score(preds, demo / "data" / "dataset.json", work)
    model = model_from_checkpoint(ckpt)
    out = {"unetr": {k: metrics["unetr"]["mean"][k] for k in ("dice", "hd95")}, "fractions": {}}
    for f in fractions:
        model.refine_fraction = f
        out["fractions"][f"{f:g}"] = {**{k: metrics[f"f{f:g}"]["mean"][k] for k in ("dice", "hd95")},
                                      "gmacs": count_macs(model, (1, 1, *roi))}
    return out


def plot(results: dict[str, dict], fractions: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    labels = ("mean Dice", "mean HD95 (mm)", "G MACs per window")
    for ax, key, label in zip(axes, ("dice", "hd95", "gmacs"), labels, strict=True):
        per = np.array([[r["fractions"][f"{f:g}"][key] for f in fractions] for r in results.values()])
        for row in per:
            ax.plot(fractions, row, "o", color="C0", alpha=0.35, ms=4)
        ax.plot(fractions, per.mean(0), "o-", color="C0", label="STP + MTA + UNETR, sparse decoding")
        if key != "gmacs":
            ax.axhline(np.mean([r["unetr"][key] for r in results.values()]), color="C1", ls="--",
                       label="UNETR (dense decoding)")
        ax.set_xlabel("refine fraction")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", nargs="+", type=Path, help="finished `sparseseg demo` output folders")
    parser.add_argument("--fractions", default="0.1,0.25,0.5,0.75,1")
    parser.add_argument("--output", type=Path, default=Path("refine_curve"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fractions = sorted(float(f) for f in args.fractions.split(","))
    args.output.mkdir(parents=True, exist_ok=True)
    results = {str(d): measure(d, fractions, args.output / f"work_{i}") for i, d in enumerate(args.demos)}
    (args.output / "refine_curve.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, fractions, args.output / "refine_curve.png")
    for f in fractions:
        dice = [r["fractions"][f"{f:g}"]["dice"] for r in results.values()]
        logging.info("f = %g: mean Dice %.4f (%s)", f, np.mean(dice), ", ".join(f"{d:.3f}" for d in dice))


if __name__ == "__main__":
    main()
