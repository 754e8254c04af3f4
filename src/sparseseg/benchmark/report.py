"""Writers for the records of :func:`sparseseg.benchmark.run.benchmark`: JSON, a Markdown table and a plot of
throughput and G MACs against the prune ratio (the axis of the paper's Table 3). All three come from the same
records and are written atomically."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparseseg.data.io import atomic_write

_COLUMNS = [
    ("model", "model", "{}"),
    ("r", "prune_ratio", "{:g}"),
    ("f", "refine_fraction", "{:g}"),
    ("params (M)", "params", None),
    ("GMACs", "gmacs", "{:.4g}"),
    ("encoder img/s", "encoder_throughput", "{:.3g}"),
    ("img/s", "throughput", "{:.3g}"),
    ("latency ms (median / p90)", None, None),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("train img/s", "train_throughput", "{:.3g}"),
    ("train peak MB", "train_peak_memory_mb", "{:.0f}"),
    ("speedup", "speedup", "{:.2f}"),
    ("encoder speedup", "encoder_speedup", "{:.2f}"),
    ("train speedup", "train_speedup", "{:.2f}"),
    ("memory ratio", "memory_ratio", "{:.2f}"),
]


def _cell(rec: dict[str, Any], key: str | None, fmt: str | None) -> str:
    if key is None:  # the latency pair
        return f"{rec['latency_ms_median']:.0f} / {rec['latency_ms_p90']:.0f}"
    value = rec.get(key)
    if value is None:
        return "-"
    if key == "params":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


def _allocator(record: dict[str, Any]) -> str:
    alloc = record.get("cpu_allocator")
    fast = record.get("cpu_fast_path")
    fast = "" if fast is None else f"CPU fast path {'on' if fast else 'off'}, "
    return (f"CPU allocator {alloc}, " if alloc else "") + fast


def _precision(record: dict[str, Any]) -> str:
    """", float16 autocast" and / or ", CUDA graphs" when the run used them, else ""."""
    return (", float16 autocast" if record.get("amp") else "") + (", CUDA graphs" if record.get("cuda_graphs") else "")


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per record, preceded by one line naming the run's conditions. Columns that
    are empty in every record (e.g. training without ``--train``) are left out."""
    if not records:
        return "(no records)\n"
    cols = [c for c in _COLUMNS if c[1] is None or any(r.get(c[1]) is not None for r in records)]
    first = records[0]
    amp = _precision(first)
    head = (f"preset `{first['preset']}`, device `{first['device']}`{amp}, {first['threads']} thread(s), "
            f"torch {first['torch_version']}, {_allocator(first)}batch {first['batch_size']}, "
            f"warm-up {first['warmup']}, repeats {first['repeats']}, baseline `{first.get('baseline')}`; "
            f"MACs: {first['macs_counter']}\n\n")
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for rec in records:
        lines.append("| " + " | ".join(_cell(rec, key, fmt) for _, key, fmt in cols) + " |")
    return head + "\n".join(lines) + "\n" + _profile_table(records)


def _profile_table(records: Sequence[dict[str, Any]]) -> str:
    """Seconds (and share) per part of one profiled forward pass, for the records that have ``profile_s``."""
    from sparseseg.benchmark.profile import PARTS

    recs = [r for r in records if r.get("profile_s")]
    if not recs:
        return ""
    parts = [*PARTS, "gather_scatter", "other"]
    lines = ["", "Profile of one forward pass (torch.profiler), seconds (share of the pass):", "",
             "| model | r | " + " | ".join(parts) + " | total |", "|---" * (len(parts) + 3) + "|"]
    for rec in recs:
        prof = rec["profile_s"]
        cells = [f"{prof[p]:.3g} ({100 * prof[p] / prof['total']:.0f}%)" for p in parts]
        r = "-" if rec["prune_ratio"] is None else f"{rec['prune_ratio']:g}"
        if rec.get("refine_fraction") is not None and rec["refine_fraction"] < 1:
            r += f", f = {rec['refine_fraction']:g}"
        lines.append(f"| {rec['model']} | {r} | " + " | ".join(cells) + f" | {prof['total']:.3g} |")
    return "\n".join(lines) + "\n"


def write_json(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(list(records), indent=2) + "\n"))


def write_markdown(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(markdown_table(records)))


def write_plot(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Two panels against the prune ratio: throughput (solid: end-to-end, dotted: encoder) and G MACs. Models
    measured at several ratios are lines (one per refine fraction); the others (dense models) are horizontal dashed
    lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["prune_ratio"] for r in records if r["prune_ratio"] is not None}) or [0.0]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    series = list(dict.fromkeys((r["model"], r.get("refine_fraction")) for r in records))
    for i, (model, fraction) in enumerate(series):
        color = f"C{i}"
        name = model if fraction is None or fraction == 1 else f"{model} f={fraction:g}"
        recs = sorted((r for r in records if (r["model"], r.get("refine_fraction")) == (model, fraction)),
                      key=lambda r: r["prune_ratio"] or 0.0)
        sparse = [r for r in recs if r["prune_ratio"] is not None]
        if len(sparse) >= 1 and len(recs) == len(sparse):
            xs = [r["prune_ratio"] for r in sparse]
            ax_t.plot(xs, [r["throughput"] for r in sparse], "o-", color=color, label=f"{name}")
            if all(r["encoder_throughput"] is not None for r in sparse):
                ax_t.plot(xs, [r["encoder_throughput"] for r in sparse], "s:", color=color,
                          label=f"{name} (encoder)")
            ax_m.plot(xs, [r["gmacs"] for r in sparse], "o-", color=color, label=name)
        else:
            rec = recs[0]
            ax_t.axhline(rec["throughput"], color=color, ls="--", label=f"{name} (dense)")
            if rec["encoder_throughput"] is not None:
                ax_t.axhline(rec["encoder_throughput"], color=color, ls=":", label=f"{name} (dense encoder)")
            ax_m.axhline(rec["gmacs"], color=color, ls="--", label=f"{name} (dense)")
    first = records[0]
    for ax, ylabel in ((ax_t, "throughput (img/s)"), (ax_m, "G MACs")):
        ax.set_xlabel("prune ratio r")
        ax.set_ylabel(ylabel)
        ax.set_xlim(min(ratios) - 0.05, max(ratios) + 0.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_yscale("log")
    fig.suptitle(f"preset {first['preset'] or '-'}, {first['device']}{_precision(first)}, "
                 f"{first['threads']} thread(s), batch {first['batch_size']}", fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
