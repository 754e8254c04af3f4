"""The training loop: ``train(config) -> best checkpoint path``.

Per epoch: ``iters_per_epoch`` steps on random ROI crops (seeded per epoch, so a resumed run sees the same
crops), a per-epoch log line, a row in ``RUN_DIR/log.csv`` (and TensorBoard when installed), sliding-window
validation every ``val_every`` epochs and at the end, then ``last.pt`` (and ``best.pt`` on a new best mean
Dice), each written atomically. ``resume=True`` restores model, optimizer, schedule, scaler, RNG states and
history from ``RUN_DIR/last.pt`` and continues bit-for-bit where it stopped (same config, same device, same
number of processes); a config that differs from the checkpoint's in anything but
:attr:`TrainConfig.RESUMABLE_CHANGES` (e.g. another recipe) is refused. Under ``torchrun`` every process trains
(DDP) and validates a shard of the validation cases (Dice sums all-reduced); process 0 writes
(:mod:`sparseseg.training.distributed`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from torch.utils.data import RandomSampler, Subset
from tqdm import tqdm

from sparseseg.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from sparseseg.config import TrainConfig
from sparseseg.data.datasets import Case, load_dataset, split_cases
from sparseseg.data.io import atomic_write, check_writable, remove_stale_temporaries
from sparseseg.data.transforms import build_transforms, unwrap_input_errors
from sparseseg.errors import InputError
from sparseseg.training.distributed import (
    DistInfo,
    all_gather,
    all_reduce_sum,
    any_process,
    barrier,
    cleanup,
    init_distributed,
    wrap_model,
)
from sparseseg.training.losses import SegmentationLoss
from sparseseg.training.optim import WarmupCosine, build_optimizer
from sparseseg.training.setup import build_data_config, build_model
from sparseseg.training.validation import validate

log = logging.getLogger(__name__)
RUN_FILES = ("last.pt", "best.pt", "log.csv", "config.json")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _items(cases: list[Case]) -> list[dict[str, Any]]:
    return [{"image": [str(p) for p in c.images], "label": str(c.label)} for c in cases]


class _RunLog:
    """``log.csv`` rewritten (atomically) from the full history each epoch, plus optional TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "log.csv"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:
                log.debug("tensorboard is not installed; logging to log.csv only")

    def write(self, history: list[dict[str, Any]]) -> None:
        fields: list[str] = []
        for row in history:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(history)
        atomic_write(self.path, lambda tmp: tmp.write_text(buf.getvalue()))
        if self.writer is not None and history:
            row = history[-1]
            for k, v in row.items():
                if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _loaders(config: TrainConfig, data_cfg, train_cases: list[Case], val_cases: list[Case]):
    with unwrap_input_errors():
        train_ds = CacheDataset(_items(train_cases), build_transforms(data_cfg, "train", config.num_samples),
                                cache_rate=config.cache_rate, num_workers=None, progress=False)
        val_ds = CacheDataset(_items(val_cases), build_transforms(data_cfg, "val"),
                              cache_rate=config.cache_rate, num_workers=None, progress=False) if val_cases else None
    return train_ds, val_ds


def _epoch_loader(train_ds: CacheDataset, config: TrainConfig, iters: int, epoch: int, rank: int = 0) -> DataLoader:
    # The crops and the case order of epoch e depend only on (seed, e, rank): resuming at an epoch boundary
    # replays them.
    epoch_seed = (config.seed * 1_000_003 + epoch * 1009 + rank) % 2**31
    train_ds.transform.set_random_state(seed=epoch_seed)
    generator = torch.Generator().manual_seed(epoch_seed)
    sampler = RandomSampler(train_ds, replacement=True, num_samples=iters * config.batch_size, generator=generator)
    return DataLoader(train_ds, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                      generator=generator, drop_last=True)


def train(config: TrainConfig) -> Path:
    """Train ``config.model`` on ``config.dataset`` into ``config.output``; returns the path of ``best.pt``
    (``last.pt`` when there are no validation cases).

    Examples:
        >>> cfg = TrainConfig(dataset="Task09_Spleen", model="unetr", output="runs/spleen", preset="btcv")
        >>> best = train(cfg)  # doctest: +SKIP
    """
    config.validate()
    info, device = init_distributed(config.device)
    try:
        return _train(config, info, device)
    finally:
        cleanup(info)


def _train(config: TrainConfig, info: DistInfo, device: torch.device) -> Path:
    run_dir = Path(config.output)
    if info.is_main:
        check_writable(run_dir)  # before minutes of reading data
    seed_everything(config.seed + info.rank)
    ds = load_dataset(config.dataset)
    train_cases, val_cases = split_cases(ds, config.fold, config.num_folds, config.seed)
    data_cfg = build_data_config(config, ds)
    model = build_model(config, data_cfg)
    train_ds, val_ds = _loaders(config, data_cfg, train_cases, val_cases)  # reads every case: bad files fail here
    iters = config.iters_per_epoch or max(1, math.ceil(len(train_cases) / config.batch_size))

    model.to(device)
    lr = config.learning_rate() * info.world_size  # the global batch is batch_size per process
    optimizer = build_optimizer(model, lr, config.weight_decay, config.layer_decay, tuple(config.betas))
    scheduler = WarmupCosine(optimizer, lr, config.epochs * iters, config.warmup_fraction, config.min_lr_ratio,
                             config.time_budget)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    loss_fn = SegmentationLoss(sigmoid=data_cfg.sigmoid, squared_pred=config.squared_pred,
                               smooth_nr=config.smooth_nr, smooth_dr=config.smooth_dr)
    state = {"epoch": 0, "best_metric": float("-inf"), "best_epoch": 0, "elapsed": 0.0, "history": []}
    if config.resume:
        state = _resume(run_dir / "last.pt", model, optimizer, scheduler, scaler, config, info)
        scheduler.total_iters = config.epochs * iters
    net = wrap_model(model, info, device)
    # Each process validates every world_size-th case; the Dice sums are added up across processes.
    val_loader = None if val_ds is None else DataLoader(Subset(val_ds, range(info.rank, len(val_ds), info.world_size)),
                                                        batch_size=1)

    run_log = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir, RUN_FILES)  # left by a process killed while writing
        meta = {"config": config.to_dict(), "model_name": model.model_name, "model_args": model.model_args,
                "data": data_cfg.to_dict(), "learning_rate": lr, "iters_per_epoch": iters,
                "world_size": info.world_size, "train_cases": [c.name for c in train_cases],
                "val_cases": [c.name for c in val_cases], "num_parameters": sum(p.numel() for p in model.parameters())}
        atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str)))
        run_log = _RunLog(run_dir, config.tensorboard)
        log.info("training %s (%.2f M parameters) on %d cases, validating on %d, %s x %d, lr %.3g",
                 model.model_name, meta["num_parameters"] / 1e6, len(train_cases), len(val_cases), device,
                 info.world_size, lr)

    start = time.perf_counter() - state["elapsed"]
    try:
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            t0 = time.perf_counter()
            loader = _epoch_loader(train_ds, config, iters, epoch, info.rank)
            losses, stop = _train_epoch(net, loader, loss_fn, optimizer, scheduler, scaler, config, data_cfg, info,
                                        device, start, f"epoch {epoch}/{config.epochs}")
            loss_sum = all_reduce_sum(torch.tensor([sum(losses), len(losses)], dtype=torch.float64), info, device)
            row: dict[str, Any] = {"epoch": epoch, "iteration": scheduler.iteration,
                                   "train_loss": float(loss_sum[0] / loss_sum[1]),
                                   "lr": optimizer.param_groups[-1]["lr"]}
            if val_loader is not None and (epoch % config.val_every == 0 or stop or epoch == config.epochs):
                row.update(validate(model, val_loader, data_cfg, device, config.overlap, config.sw_batch_size,
                                    reduce=lambda t: all_reduce_sum(t, info, device)))
            rngs = all_gather(rng_state(), info)  # every process resumes with its own random state
            row["epoch_seconds"] = time.perf_counter() - t0
            row["elapsed"] = time.perf_counter() - start
            state["history"].append(row)
            if run_log is not None:
                _checkpoint(run_dir, model, data_cfg, config, optimizer, scheduler, scaler, state, row, rngs)
                run_log.write(state["history"])
                _log_epoch(row, state, config.epochs)
            barrier(info)
            if stop:
                if info.is_main:
                    log.info("time budget of %.0f s spent after %d epoch(s)", config.time_budget, epoch)
                break
    finally:
        if run_log is not None:
            run_log.close()
    best = run_dir / "best.pt"
    return best if best.exists() else run_dir / "last.pt"


def _train_epoch(net, loader, loss_fn, optimizer, scheduler, scaler, config: TrainConfig, data_cfg, info: DistInfo,
                 device: torch.device, start: float, desc: str) -> tuple[list[float], bool]:
    """One epoch of steps; returns the step losses and whether the time budget is spent (on any process)."""
    use_amp = scaler.is_enabled()
    losses: list[float] = []
    stop = False
    net.train()
    bar = tqdm(loader, total=len(loader), desc=desc, unit="it", leave=False, disable=not info.is_main)
    with unwrap_input_errors():
        for batch in bar:
            x = batch["image"].as_tensor().to(device)
            y = batch["label"].as_tensor().to(device)
            target = y if data_cfg.sigmoid else y.long()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                out = net(x, target=target)
            loss, _ = loss_fn(out, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step(time.perf_counter() - start)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            spent = bool(config.time_budget) and time.perf_counter() - start >= config.time_budget
            if any_process(spent, info, device):
                stop = True
                break
    return losses, stop


def _checkpoint(run_dir, model, data_cfg, config, optimizer, scheduler, scaler, state, row, rngs) -> None:
    score = row.get("mean_dice", float("nan"))
    is_best = math.isfinite(score) and score > state["best_metric"]
    if is_best:
        state["best_metric"], state["best_epoch"] = score, row["epoch"]
    state["epoch"], state["elapsed"] = row["epoch"], row["elapsed"]
    # The sampler is reseeded from (seed, epoch, rank) every epoch, so its whole state is this record.
    sampler = {"kind": "seeded-per-epoch", "seed": config.seed, "epoch": state["epoch"], "world_size": len(rngs)}
    extra = {"config": config.to_dict(), "epoch": state["epoch"], "iteration": scheduler.iteration,
             "best_metric": state["best_metric"], "best_epoch": state["best_epoch"], "elapsed": state["elapsed"],
             "history": state["history"], "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": rngs[0], "rng_per_rank": rngs, "sampler": sampler}
    # best.pt first: a kill between the two writes leaves the older last.pt, whose resume redoes this epoch and
    # rewrites best.pt, never a last.pt that believes in a best.pt that was not written.
    if is_best:
        save_checkpoint(run_dir / "best.pt", model, data_cfg.to_dict(), **extra)
    save_checkpoint(run_dir / "last.pt", model, data_cfg.to_dict(), **extra)


def _resume(path: Path, model, optimizer, scheduler, scaler, config: TrainConfig, info: DistInfo) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
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
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    else:  # still correct, but the crops differ from an uninterrupted run with the old process count
        set_rng_state(rngs[info.rank % len(rngs)])
        if info.is_main:
            log.warning("resuming %d-process training with %d process(es): the random crops change",
                        len(rngs), info.world_size)
    if info.is_main:
        log.info("resuming from %s after epoch %d", path, ckpt["epoch"])
    return {"epoch": int(ckpt["epoch"]), "best_metric": float(ckpt["best_metric"]),
            "best_epoch": int(ckpt["best_epoch"]), "elapsed": float(ckpt["elapsed"]),
            "history": list(ckpt["history"])}


def _log_epoch(row: dict[str, Any], state: dict[str, Any], epochs: int) -> None:
    msg = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  lr {row['lr']:.3g}"
    if "mean_dice" in row:
        msg += f"  val dice {row['mean_dice']:.4f} (best {state['best_metric']:.4f} @ {state['best_epoch']})"
    log.info("%s  %.1f s", msg, row["epoch_seconds"])
