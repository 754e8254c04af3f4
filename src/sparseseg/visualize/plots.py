"""Pictures: the pruning policy (the paper's Fig. 2), segmentation overlays and training curves.

Everything is drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed) and
written as PNG atomically. Figure sizes are fixed by the layout (``CELL_INCHES`` per panel and ``dpi``), never
cropped to content, so a picture's pixel size is known in advance.

Slices: volumes are ``[X, Y, Z]`` in the voxel order of their file; ``axis`` picks the axis that is held fixed
(2 = the third voxel axis: axial in RAS/LPS files, 1 = coronal, 0 = sagittal). Each panel shows the two other
axes, the first horizontal and the second vertical, with the origin at the bottom left.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from sparseseg.data.io import atomic_write
from sparseseg.errors import InputError

CELL_INCHES = 2.4  # side of one slice panel
LEGEND_INCHES = 0.6  # strip under the panels for the legend
TITLE_INCHES = 0.75  # strip above the panels for the title (two lines) and the column titles
DPI = 100
# Distinct colours for classes 1, 2, 3, ... (class 0, the background, is left transparent).
CLASS_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896")


def _as_volume(array: np.ndarray, name: str) -> np.ndarray:
    """``[X, Y, Z]`` or channel-first ``[C, X, Y, Z]`` (the first channel is shown) -> ``[X, Y, Z]``."""
    a = np.asarray(array)
    if a.ndim == 4:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3-D volume [X, Y, Z] (or [C, X, Y, Z]), got shape {a.shape}")
    return a


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")


def pick_slices(volume: np.ndarray, axis: int, num: int = 4) -> list[int]:
    """``num`` slice indices along ``axis`` spread over the non-zero extent of ``volume`` ``[X, Y, Z]``
    (the whole axis when it is all zero), avoiding the outermost slices."""
    _check_axis(axis)
    others = tuple(a for a in range(3) if a != axis)
    filled = np.flatnonzero(np.asarray(volume).any(axis=others))
    lo, hi = (int(filled[0]), int(filled[-1])) if filled.size else (0, volume.shape[axis] - 1)
    picks = np.linspace(lo, hi, num + 2)[1:-1] if hi > lo else np.full(num, lo)
    return sorted(dict.fromkeys(int(round(p)) for p in picks))


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2-D slice ``index`` along ``axis``, transposed for ``imshow(origin="lower")``: rows = second axis."""
    return np.take(volume, index, axis=axis).T


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range: 1st-99.5th percentile of the non-zero voxels (of all voxels when none is non-zero)."""
    values = image[image != 0] if np.any(image != 0) else image.ravel()
    lo, hi = np.percentile(values, [1.0, 99.5]) if values.size else (0.0, 1.0)
    lo = min(float(lo), 0.0) if image.min() >= 0 else float(lo)
    return lo, float(hi) if hi > lo else lo + 1.0


def _label_cmap(num_classes: int) -> ListedColormap:
    colors = [(0.0, 0.0, 0.0, 0.0)] + [to_rgba(CLASS_COLORS[(i - 1) % len(CLASS_COLORS)]) for i in
                                       range(1, max(num_classes, 2))]
    return ListedColormap(colors)


def _save(fig: Figure, output: str | Path, dpi: int) -> Path:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise InputError("pictures are written as PNG: the output name must end with .png", path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def panel_aspect(shape: Sequence[int], axis: int) -> float:
    """Height / width of a slice panel along ``axis`` of a volume ``shape``, bounded to [0.4, 1.6]."""
    width, height = (int(s) for i, s in enumerate(shape) if i != axis)
    return float(np.clip(height / width, 0.4, 1.6))


def figure_size(rows: int, cols: int, legend: bool, aspect: float = 1.0) -> tuple[float, float]:
    """Inches of a grid of slice panels: ``CELL_INCHES`` wide, ``CELL_INCHES * aspect`` high, plus the title and
    legend strips."""
    return cols * CELL_INCHES, rows * CELL_INCHES * aspect + TITLE_INCHES + (LEGEND_INCHES if legend else 0.0)


def _grid_figure(rows: int, cols: int, legend: bool, figsize: tuple[float, float] | None, aspect: float = 1.0):
    size = figsize or figure_size(rows, cols, legend, aspect)
    fig = Figure(figsize=size)
    bottom = ((LEGEND_INCHES if legend else 0.05) / size[1]) if figsize is None else (0.08 if legend else 0.02)
    top = 1.0 - TITLE_INCHES / size[1] if figsize is None else 0.9
    axes = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw={"left": 0.04, "right": 0.99, "top": top, "bottom": bottom,
                                     "wspace": 0.04, "hspace": 0.12})
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def plot_overlay(image: np.ndarray, label: np.ndarray | None,
                 preds: np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray] | None = None, *,
                 output: str | Path, class_names: Sequence[str] | None = None,
                 slices: Sequence[int] | None = None, axis: int = 2, num_slices: int = 4, title: str | None = None,
                 alpha: float = 0.55, figsize: tuple[float, float] | None = None, dpi: int = DPI) -> Path:
    """Slices of an image with the reference and one or more predictions painted over it, one colour per class.

    Args:
        image: ``[X, Y, Z]`` (or ``[C, X, Y, Z]``, first channel shown).
        label: reference label map ``[X, Y, Z]`` (class indices) or None.
        preds: one label map, a list of them, or ``{name: label map}`` (the names head the columns).
        output: PNG path (written atomically).
        class_names: names of classes 0, 1, ... for the legend (default: the numbers).
        slices: indices along ``axis``; default ``num_slices`` spread over the foreground.
        axis: the axis held fixed in each panel (see the module docstring).
        figsize: inches (width, height); default ``CELL_INCHES`` per panel plus a legend strip.

    Rows are slices; columns are the image, the reference (when given) and each prediction.
    """
    _check_axis(axis)
    img = _as_volume(image, "image").astype(np.float32)
    if isinstance(preds, Mapping):
        named = {str(k): _as_volume(v, f"prediction {k}") for k, v in preds.items()}
    elif preds is None:
        named = {}
    elif isinstance(preds, np.ndarray):
        named = {"prediction": _as_volume(preds, "prediction")}
    else:
        named = {f"prediction {i + 1}": _as_volume(p, "prediction") for i, p in enumerate(preds)}
    maps = ({"reference": _as_volume(label, "label")} if label is not None else {}) | named
    for name, m in maps.items():
        if m.shape != img.shape:
            raise ValueError(f"{name} shape {m.shape} differs from the image shape {img.shape}")
    num_classes = int(max([1] + [m.max() for m in maps.values()])) + 1
    if class_names is not None:
        num_classes = max(num_classes, len(class_names))
    cmap = _label_cmap(num_classes)
    idx = list(slices) if slices is not None else pick_slices(maps.get("reference", img), axis, num_slices)
    fig, axes = _grid_figure(len(idx), 1 + len(maps), legend=num_classes > 1, figsize=figsize,
                             aspect=panel_aspect(img.shape, axis))
    lo, hi = _window(img)
    for r, s in enumerate(idx):
        if not 0 <= s < img.shape[axis]:
            raise ValueError(f"slice {s} is outside the image along axis {axis} (size {img.shape[axis]})")
        for c, (name, m) in enumerate([("image", None), *maps.items()]):
            ax = axes[r, c]
            ax.imshow(_slice(img, axis, s), cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            if m is not None:
                ax.imshow(_slice(m, axis, s), cmap=cmap, vmin=-0.5, vmax=num_classes - 0.5, alpha=alpha,
                          origin="lower", interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=9)
        axes[r, 0].set_ylabel(f"slice {s}", fontsize=8)
    if num_classes > 1:
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        handles = [Patch(color=cmap(i), label=names[i] if i < len(names) else str(i)) for i in range(1, num_classes)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title or f"axis {axis} slices", fontsize=9, y=1 - 0.05 / fig.get_figheight(), va="top")
    return _save(fig, output, dpi)


def policy_volume(policy: np.ndarray, grid_size: Sequence[int], patch_size: int,
                  shape: Sequence[int]) -> np.ndarray:
    """Per-token depths (``[N]`` in raster order of ``grid_size``, or ``[d, h, w]``) -> a voxel map ``shape``:
    every voxel of a patch gets its token's depth (edges beyond the grid keep the nearest patch's value)."""
    grid = tuple(int(g) for g in grid_size)
    p = np.asarray(policy).reshape(grid)  # [N] -> [d, h, w]
    vol = p.repeat(patch_size, 0).repeat(patch_size, 1).repeat(patch_size, 2)  # [d, h, w] -> [d p, h p, w p]
    pad = [(0, max(0, int(s) - v)) for s, v in zip(shape, vol.shape, strict=True)]
    vol = np.pad(vol, pad, mode="edge")
    return vol[: shape[0], : shape[1], : shape[2]]


def plot_policy(image: np.ndarray, policy: np.ndarray, patch_size: int, label: np.ndarray | None = None, *,
                output: str | Path, num_layers: int | None = None, depths: Sequence[int] | None = None,
                class_names: Sequence[str] | None = None, slices: Sequence[int] | None = None, axis: int = 2,
                num_slices: int = 4, title: str | None = None, figsize: tuple[float, float] | None = None,
                dpi: int = DPI, refined: np.ndarray | None = None, block_size: int | None = None) -> Path:
    """The pruning policy over image slices (paper Fig. 2): each patch shaded by the depth at which its token left
    the encoder. Tokens dropped by the first pruning stage are not shaded; the longer a token was kept, the darker
    its red; tokens kept to the last block are the darkest; background tokens dropped before the first block
    (depth 0, ``drop_background``) are blue. With ``refined`` a column beside it shows where sparse
    decoding computed the full-resolution level (blue blocks; the rest came from the coarse fill).

    Args:
        image: ``[X, Y, Z]`` (or ``[C, X, Y, Z]``) whose sides are covered by the patch grid.
        policy: per-token depth, ``[d, h, w]`` or ``[N]`` in raster order, ``d = ceil(X / patch_size)``, ...: the
            number of blocks each token went through (``model.pruning_policy`` of the STP models).
        patch_size: patch side in voxels.
        label: optional reference ``[X, Y, Z]`` shown in a third column.
        num_layers: the encoder depth (a token kept to the end has depth ``num_layers``); default the largest
            depth present.
        depths: every depth a token can have (0 with background dropping, the ``prune_after`` blocks and
            ``num_layers``), so the shades keep
            their meaning when a stage dropped nothing in view; default the depths present.
        output, class_names, slices, axis, num_slices, title, figsize, dpi: as in :func:`plot_overlay`.
        refined: optional per-block flags ``[d, h, w]`` (``d = ceil(X / block_size)``, ...) of the blocks sparse
            decoding refined (``model.refined_blocks``).
        block_size: side of those blocks in voxels.
    """
    _check_axis(axis)
    img = _as_volume(image, "image").astype(np.float32)
    if refined is not None:
        if block_size is None:
            raise ValueError("refined blocks need their block_size")
        bgrid = tuple(math.ceil(s / block_size) for s in img.shape)
        if np.asarray(refined).size != math.prod(bgrid):
            raise ValueError(f"refined has {np.asarray(refined).size} blocks, the image {img.shape} with blocks of "
                             f"{block_size} has {math.prod(bgrid)} ({bgrid})")
        refine_shade = policy_volume(np.asarray(refined, dtype=np.int64), bgrid, block_size, img.shape)
    grid = tuple(math.ceil(s / patch_size) for s in img.shape)
    pol = np.asarray(policy)
    if pol.size != math.prod(grid):
        raise ValueError(f"policy has {pol.size} tokens, the image {img.shape} with patch {patch_size} has "
                         f"{math.prod(grid)} ({grid})")
    levels = sorted(set(int(v) for v in (depths if depths is not None else np.unique(pol))))
    top = int(num_layers) if num_layers is not None else max(levels)
    levels = sorted(set(levels) | {top})
    rank = np.searchsorted(levels, pol)  # 0 = dropped by the first stage, len(levels) - 1 = kept to the end
    shade = policy_volume(rank, grid, patch_size, img.shape)
    reds = [to_rgba(c) for c in ("#fcbba1", "#fb6a4a", "#cb181d", "#67000d")]
    background = 0 in levels  # depth 0: background tokens dropped before the first block (drop_background)
    n = len(levels) - 1 - int(background)
    if n == 0:  # no token was dropped (a dense model): everything kept to the end, the darkest shade
        colors = [reds[-1]]
    else:
        colors = [(0.0, 0.0, 0.0, 0.0)] + [reds[round((i - 1) * (len(reds) - 1) / max(n - 1, 1))]
                                           for i in range(1, n + 1)]
    if background:
        colors = [to_rgba("#4eb3d3")] + colors
    cmap = ListedColormap(colors)
    lab = _as_volume(label, "label") if label is not None else None
    if lab is not None and lab.shape != img.shape:
        raise ValueError(f"label shape {lab.shape} differs from the image shape {img.shape}")
    idx = list(slices) if slices is not None else pick_slices(lab if lab is not None else img, axis, num_slices)
    names = ["image", "pruning depth"] + (["refined blocks"] if refined is not None else []) + (
        ["reference"] if lab is not None else [])
    cols = len(names)
    fig, axes = _grid_figure(len(idx), cols, legend=True, figsize=figsize, aspect=panel_aspect(img.shape, axis))
    blue = ListedColormap([(0.0, 0.0, 0.0, 0.0), to_rgba("#2171b5")])
    lo, hi = _window(img)
    num_classes = int(lab.max()) + 1 if lab is not None else 0
    if class_names is not None:
        num_classes = max(num_classes, len(class_names))
    for r, s in enumerate(idx):
        if not 0 <= s < img.shape[axis]:
            raise ValueError(f"slice {s} is outside the image along axis {axis} (size {img.shape[axis]})")
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(_slice(img, axis, s), cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
        axes[r, 1].imshow(_slice(shade, axis, s), cmap=cmap, vmin=-0.5, vmax=len(levels) - 0.5, alpha=0.6,
                          origin="lower", interpolation="nearest")
        h, w = _slice(img, axis, s).shape
        for k in range(patch_size, w, patch_size):
            axes[r, 1].axvline(k - 0.5, color="white", lw=0.3, alpha=0.5)
        for k in range(patch_size, h, patch_size):
            axes[r, 1].axhline(k - 0.5, color="white", lw=0.3, alpha=0.5)
        if refined is not None:
            axes[r, 2].imshow(_slice(refine_shade, axis, s), cmap=blue, vmin=-0.5, vmax=1.5, alpha=0.5,
                              origin="lower", interpolation="nearest")
        if lab is not None:
            axes[r, cols - 1].imshow(_slice(lab, axis, s), cmap=_label_cmap(num_classes), vmin=-0.5,
                              vmax=num_classes - 0.5, alpha=0.55, origin="lower", interpolation="nearest")
        axes[r, 0].set_ylabel(f"slice {s}", fontsize=8)
    for c, name in enumerate(names):
        axes[0, c].set_title(name, fontsize=9)
    handles = [Patch(facecolor=colors[i], edgecolor="0.5",
                     label=("background, dropped before block 1" if d == 0 else
                            f"dropped after block {d}" if d < top else f"kept to block {d}"))
               for i, d in enumerate(levels)]
    if refined is not None:
        handles.append(Patch(facecolor=blue(1), edgecolor="0.5", label="refined at full resolution"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    kept = float(np.mean(pol >= top))
    summary = f"pruning policy: {100 * kept:.0f}% of the tokens kept to the last block"
    if refined is not None:
        summary += f"; decoder: {100 * float(np.mean(np.asarray(refined))):.0f}% of the blocks refined"
    fig.suptitle(f"{title}\n{summary}" if title else summary, fontsize=9, y=1 - 0.05 / fig.get_figheight(),
                 va="top")
    return _save(fig, output, dpi)


def read_log(path: str | Path) -> dict[str, list[float]]:
    """Columns of a ``log.csv`` as floats (empty cells -> NaN)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("training log not found", path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError("training log has no rows", path)
    out: dict[str, list[float]] = {}
    for key in rows[0]:
        values = []
        for row in rows:
            try:
                values.append(float(row.get(key) or "nan"))
            except ValueError:
                values.append(float("nan"))
        out[key] = values
    return out


def plot_curves(run_dir: str | Path | Sequence[str | Path], output: str | Path | None = None, *,
                labels: Sequence[str] | None = None, figsize: tuple[float, float] | None = None,
                dpi: int = DPI) -> Path:
    """Training loss, validation Dice (mean and per class) and learning rate from ``RUN_DIR/log.csv``.

    Several run folders can be drawn on the same axes (one colour per run). The x axis is the iteration when the
    log has it, else the epoch. Runs without validation leave the Dice panel empty, saying so.
    Default output: ``RUN_DIR/curves.png`` of the first run.
    """
    runs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(r) for r in run_dir]
    if not runs:
        raise ValueError("plot_curves needs at least one run folder")
    names = list(labels) if labels is not None else [r.name for r in runs]
    logs = [read_log(r / "log.csv") for r in runs]
    fig = Figure(figsize=figsize or (12.0, 3.6))
    axes = fig.subplots(1, 3, gridspec_kw={"left": 0.06, "right": 0.98, "top": 0.82, "bottom": 0.15,
                                           "wspace": 0.28})
    any_dice = False
    for i, (name, log) in enumerate(zip(names, logs, strict=True)):
        x = log.get("iteration") or log.get("epoch") or list(range(1, len(next(iter(log.values()))) + 1))
        color = f"C{i}"
        if "train_loss" in log:
            axes[0].plot(x, log["train_loss"], color=color, label=name)
        dice_cols = [k for k in log if k.startswith("dice_")]
        if "mean_dice" in log and np.isfinite(log["mean_dice"]).any():
            any_dice = True
            xs, ys = zip(*[(a, b) for a, b in zip(x, log["mean_dice"], strict=True) if math.isfinite(b)],
                         strict=True)
            axes[1].plot(xs, ys, color=color, marker="o", ms=3, label=f"{name} mean")
            for j, k in enumerate(dice_cols):
                pts = [(a, b) for a, b in zip(x, log[k], strict=True) if math.isfinite(b)]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    axes[1].plot(xs, ys, color=color, ls=(0, (1, 1 + j)), lw=1, label=f"{name} {k[5:]}")
        if "lr" in log:
            axes[2].plot(x, log["lr"], color=color, label=name)
    xlabel = "iteration" if "iteration" in logs[0] else "epoch"
    for ax, t in zip(axes, ("training loss", "validation Dice", "learning rate"), strict=True):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.tick_params(labelsize=8)
        if ax.get_lines():
            ax.legend(fontsize=7)
    if not any_dice:
        axes[1].text(0.5, 0.5, "no validation in this run", ha="center", va="center", transform=axes[1].transAxes)
    axes[0].set_yscale("log" if all(v > 0 for lg in logs for v in lg.get("train_loss", []) if math.isfinite(v))
                       else "linear")
    fig.suptitle(", ".join(str(r) for r in runs), fontsize=9, y=0.98)
    return _save(fig, output or runs[0] / "curves.png", dpi)


def load_overlay_inputs(image: str | Path, label: str | Path | None, preds: Sequence[str],
                        dataset: str | Path | None = None
                        ) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray], list[str] | None]:
    """Read the files of ``sparseseg visualize overlay``: the image ``[C, X, Y, Z]``, the reference and the
    predictions ``[X, Y, Z]`` (``NAME=FILE`` or ``FILE``, named after the file), class names from ``dataset``.
    A label map whose shape differs from the image raises InputError naming it."""
    from sparseseg.data.io import load_image, load_label, strip_nifti_ending

    img = load_image([image])
    ref = load_label(label, spatial_shape=img.spatial_shape).array[0] if label is not None else None
    named: dict[str, np.ndarray] = {}
    for item in preds:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = strip_nifti_ending(Path(item).name), item
        named[name] = load_label(path, spatial_shape=img.spatial_shape).array[0]
    names = None
    if dataset is not None:
        from sparseseg.data.datasets import load_dataset

        ds = load_dataset(dataset, check_files=False, require_training=False)
        names = [ds.labels[v] for v in sorted(ds.labels)]
    return img.array, ref, named, names
