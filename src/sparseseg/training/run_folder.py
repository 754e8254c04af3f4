"""The run folder of ``sparseseg train``: never start over an existing run by mistake, move it aside on request,
and find the checkpoint to resume from when ``last.pt`` cannot be read.

A folder *holds a run* when it holds one of the trainer's checkpoints (:data:`CHECKPOINTS`); ``config.json`` and
``log.csv`` alone (a run stopped before its first checkpoint) hold nothing to lose.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import torch.nn as nn

from sparseseg.checkpoint import load_checkpoint
from sparseseg.errors import InputError, SparsesegError, format_size

log = logging.getLogger(__name__)

CHECKPOINTS = ("last.pt", "best.pt")
RUN_FILES = (*CHECKPOINTS, "log.csv", "config.json")
NOTHING_TO_RESUME = "nothing to resume: no checkpoint in this folder (start without --resume)"


def existing_checkpoints(run_dir: Path) -> list[str]:
    return [name for name in CHECKPOINTS if (run_dir / name).is_file()]


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before the data are read: without ``resume``, raise :class:`SparsesegError` when ``run_dir`` holds a run
    and ``overwrite`` does not say to move it aside; with ``resume``, raise :class:`InputError` when it holds no
    checkpoint at all."""
    found = existing_checkpoints(run_dir)
    if resume and not found and not any(run_dir.glob("*.pt")):
        raise InputError(NOTHING_TO_RESUME, run_dir)
    if not resume and found and not overwrite:
        raise SparsesegError(f"holds a training run ({', '.join(found)}); continue it with --resume, or start "
                             f"afresh with --overwrite (moves the old run to {run_dir.name}.YYYYmmdd-HHMMSS)", run_dir)


def aside_name(run_dir: Path) -> Path:
    """``runs/x`` -> ``runs/x.20250314-093000`` (``-2``, ``-3``, ... when that exists too)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.{stamp}")
    n = 2
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.{stamp}-{n}")
        n += 1
    return target


def move_aside(run_dir: Path) -> Path | None:
    """Rename a folder that holds a run to a dated sibling (nothing is deleted); returns the new path, or None when
    there was no run to move."""
    if not existing_checkpoints(run_dir):
        return None
    target = aside_name(run_dir)
    try:
        os.rename(run_dir, target)
    except OSError as err:
        raise SparsesegError(f"cannot move the old run aside to {target.name} ({os.strerror(err.errno).lower()}); "
                             "nothing was changed", run_dir) from err
    log.warning("moved the previous run in %s to %s", run_dir, target)
    return target


def warn_if_short_of_space(run_dir: Path, model: nn.Module) -> None:
    """Warn when the disk cannot hold the run's checkpoints: ``best.pt``, ``last.pt`` and the temporary of the next
    one (3 x the weights and AdamW's two moments), so that the run does not learn it only at its first checkpoint."""
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    size = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    held = sum((run_dir / name).stat().st_size for name in existing_checkpoints(run_dir))
    free = shutil.disk_usage(folder).free
    if free + held < 3 * size:
        log.warning("%s: %s free, the checkpoints need about %s (3 x %s): training stops at a checkpoint unless "
                    "space is freed", run_dir, format_size(free), format_size(3 * size - held), format_size(size))


def find_resumable(run_dir: Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The checkpoint ``--resume`` continues from, loaded: ``last.pt``, or when it is missing or cannot be read
    (cut short, corrupt), the newest other readable ``*.pt`` of ``run_dir`` (``best.pt``). Returns its path, the
    loaded checkpoint and ``"FILE: why"`` for each file skipped (for the caller's warning). None readable:
    :class:`InputError` naming the folder and why each file was refused."""
    last = run_dir / "last.pt"
    others = sorted((p for p in run_dir.glob("*.pt") if p.name != last.name and p.is_file()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if not last.is_file() and not others:
        raise InputError(NOTHING_TO_RESUME, run_dir)
    skipped = [] if last.is_file() else ["last.pt: not found"]
    for path in [last, *others] if last.is_file() else others:
        try:
            ckpt = load_checkpoint(path)
        except InputError as err:
            skipped.append(f"{path.name}: {str(err).removeprefix(f'{path}: ')}")
            continue
        return path, ckpt, skipped
    raise InputError(f"nothing to resume: no readable checkpoint ({'; '.join(skipped)})", run_dir)
