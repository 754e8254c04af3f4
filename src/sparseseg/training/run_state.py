"""The exact state of a training run in its checkpoints, and back: what :func:`sparseseg.training.train` writes
after each epoch (``best.pt`` then ``last.pt``) and when a signal stops it inside an epoch, and what ``resume``
restores.

A checkpoint written inside an epoch also holds ``partial_epoch``: ``{"epoch", "steps", "losses", "seconds"}``,
the steps finished in that epoch, each process's losses of those steps (for the epoch's mean loss) and the epoch's
seconds so far. With the random state of every process right after the last finished step and the sampler seeded
from (seed, epoch, rank), that is the whole position: the trainer replays the epoch's crops up to ``steps`` and
goes on. ``epoch`` stays the number of finished epochs, so older readers resume it from the epoch's start.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path
from typing import Any

from sparseseg.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from sparseseg.config import TrainConfig
from sparseseg.errors import InputError
from sparseseg.training.distributed import DistInfo, all_gather, barrier

log = logging.getLogger(__name__)


def training_state(config: TrainConfig, optimizer, scheduler, scaler, state: dict[str, Any],
                   rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything besides the model that a resumed run needs (the ``extra`` of :func:`save_checkpoint`)."""
    # The sampler is reseeded from (seed, epoch, rank) every epoch, so its whole state is this record.
    sampler = {"kind": "seeded-per-epoch", "seed": config.seed, "epoch": state["epoch"], "world_size": len(rngs)}
    return {"config": config.to_dict(), "epoch": state["epoch"], "iteration": scheduler.iteration,
            "best_metric": state["best_metric"], "best_epoch": state["best_epoch"], "elapsed": state["elapsed"],
            "history": state["history"], "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs[0], "rng_per_rank": rngs, "sampler": sampler}


def save_epoch(run_dir: Path, model, data_cfg, config: TrainConfig, optimizer, scheduler, scaler,
               state: dict[str, Any], row: dict[str, Any], rngs: list[dict[str, Any]]) -> None:
    """``last.pt`` after the epoch of ``row`` (and ``best.pt`` first when its mean Dice is a new best); updates
    ``state`` (epoch, elapsed, best)."""
    score = row.get("mean_dice", float("nan"))
    is_best = math.isfinite(score) and score > state["best_metric"]
    if is_best:
        state["best_metric"], state["best_epoch"] = score, row["epoch"]
    state["epoch"], state["elapsed"] = row["epoch"], row["elapsed"]
    extra = training_state(config, optimizer, scheduler, scaler, state, rngs)
    # best.pt first: a kill between the two writes leaves the older last.pt, whose resume redoes this epoch and
    # rewrites best.pt, never a last.pt that believes in a best.pt that was not written.
    if is_best:
        save_checkpoint(run_dir / "best.pt", model, data_cfg.to_dict(), **extra)
    save_checkpoint(run_dir / "last.pt", model, data_cfg.to_dict(), **extra)


def save_stop_point(run_dir: Path, model, data_cfg, config: TrainConfig, optimizer, scheduler, scaler,
                    state: dict[str, Any], info: DistInfo, signum: int, epoch: int, losses: list[float],
                    epoch_seconds: float, elapsed: float) -> None:
    """``last.pt`` at a step inside ``epoch`` (written by process 0 once every process has sent its random state
    and losses); ``best.pt`` and the log keep the last finished epoch."""
    rngs = all_gather(rng_state(), info)
    per_rank_losses = all_gather(losses, info)
    if info.is_main:
        log.info("%s: saving the state after step %d of epoch %d", signal.Signals(signum).name, len(losses), epoch)
        extra = training_state(config, optimizer, scheduler, scaler, {**state, "elapsed": elapsed}, rngs)
        extra["partial_epoch"] = {"epoch": epoch, "steps": len(losses), "losses": per_rank_losses,
                                  "seconds": epoch_seconds}
        save_checkpoint(run_dir / "last.pt", model, data_cfg.to_dict(), **extra)
    barrier(info)  # no process leaves (and makes torchrun stop the others) before last.pt is written


def restore(path: Path, model, optimizer, scheduler, scaler, config: TrainConfig, info: DistInfo,
            ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the checkpoint ``path`` (``ckpt`` when already loaded) into model, optimizer, schedule and scaler, set
    this process's random state; returns the run's progress (``epoch``, ``best_metric``, ``best_epoch``,
    ``elapsed``, ``history``, and ``partial`` for a checkpoint written inside an epoch)."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if ckpt["model_name"] != model.model_name or ckpt["model_args"] != model.model_args:
        raise InputError(f"cannot resume: the checkpoint holds {ckpt['model_name']} {ckpt['model_args']}, "
                         f"the config builds {model.model_name} {model.model_args}", path)
    for key in ("optimizer", "scheduler", "scaler", "rng", "epoch"):
        if key not in ckpt:
            raise InputError(f"cannot resume: the checkpoint has no training state ({key!r} missing)", path)
    changed = config.changed_settings(ckpt["config"]) if isinstance(ckpt.get("config"), dict) else []
    if changed:
        raise InputError(f"cannot resume: the config changes {'; '.join(changed)} (only "
                         f"{', '.join(TrainConfig.RESUMABLE_CHANGES)} may change on --resume)", path)
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    mine = info.rank % len(rngs)
    set_rng_state(rngs[mine])
    if len(rngs) != info.world_size and info.is_main:  # still correct, but the crops differ from an uninterrupted run
        log.warning("resuming %d-process training with %d process(es): the random crops change",
                    len(rngs), info.world_size)
    state = {"epoch": int(ckpt["epoch"]), "best_metric": float(ckpt["best_metric"]),
             "best_epoch": int(ckpt["best_epoch"]), "elapsed": float(ckpt["elapsed"]),
             "history": list(ckpt["history"])}
    partial = ckpt.get("partial_epoch")
    if partial:
        losses = partial["losses"]
        state["partial"] = {"steps": int(partial["steps"]), "losses": list(losses[info.rank % len(losses)]),
                            "seconds": float(partial["seconds"]), "rng": rngs[mine]}
    if info.is_main:
        where = f"step {partial['steps']} of epoch {partial['epoch']}" if partial else f"epoch {ckpt['epoch']}"
        log.info("resuming from %s after %s", path, where)
    return state
