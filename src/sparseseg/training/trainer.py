"""The training loop: ``train(config) -> best checkpoint path``.

Per epoch: ``iters_per_epoch`` steps on random ROI crops (seeded per epoch, so a resumed run sees the same
crops), a per-epoch log line, a row in ``RUN_DIR/log.csv`` (and TensorBoard when installed), sliding-window
validation every ``val_every`` epochs and at the end, then ``last.pt`` (and ``best.pt`` on a new best mean
Dice), each written atomically. ``resume=True`` restores model, optimizer, schedule, scaler, RNG states and
history from ``RUN_DIR/last.pt`` (or, when it cannot be read, the newest readable checkpoint of the folder) and
continues bit-for-bit where it stopped (same config, same device, same number of processes); a config that differs
from the checkpoint's in anything but :attr:`TrainConfig.RESUMABLE_CHANGES` (e.g. another recipe) is refused. A
folder that holds a run is refused without ``resume``; ``overwrite=True`` moves it aside first
(:mod:`sparseseg.training.run_folder`).

SIGTERM or SIGINT ends the current step, writes ``last.pt`` with the position inside the epoch (the steps done,
their losses, every process's random state: :mod:`sparseseg.training.run_state`) and raises
:class:`~sparseseg.errors.Interrupted`; resuming replays the epoch's seeded crops up to that step and goes on as if
never stopped. A signal during validation takes effect once validation and the epoch's checkpoints are done.

Under ``torchrun`` every process trains (DDP) and validates a shard of the validation cases (Dice sums
all-reduced); process 0 writes; the processes agree after every step whether to stop
(:mod:`sparseseg.training.distributed`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.data.utils import worker_init_fn
from torch.utils.data import RandomSampler, Subset
from tqdm import tqdm

from sparseseg.checkpoint import rng_state, set_rng_state
from sparseseg.config import TrainConfig
from sparseseg.data.datasets import Case, load_dataset, split_cases
from sparseseg.data.io import atomic_write, check_writable, remove_stale_temporaries
from sparseseg.data.transforms import build_transforms, unwrap_input_errors
from sparseseg.errors import Interrupted, WriteError
from sparseseg.signals import StopRequest
from sparseseg.training.distributed import (
    DistInfo,
    all_gather,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    max_over_processes,
    wrap_model,
)
from sparseseg.training.losses import SegmentationLoss
from sparseseg.training.optim import WarmupCosine, build_optimizer
from sparseseg.training.run_folder import (
    RUN_FILES,
    check_run_folder,
    find_resumable,
    move_aside,
    warn_if_short_of_space,
)
from sparseseg.training.run_state import restore, save_epoch, save_stop_point
from sparseseg.training.setup import build_data_config, build_model
from sparseseg.training.validation import validate

log = logging.getLogger(__name__)
BUDGET_SPENT = 1  # a stop code below every signal number: max over processes lets a signal win


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
                      generator=generator, drop_last=True, worker_init_fn=_loader_worker_init)


def _loader_worker_init(worker_id: int) -> None:
    # The main process decides when to stop; loader workers killed by the same SIGTERM / SIGINT (sent to the
    # whole process group by SLURM or a terminal) would fail the next batch before the stop is saved. They still
    # end with the main process (the DataLoader shuts them down; a watchdog ends them if it dies).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_init_fn(worker_id)


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
    if info.is_main:  # before minutes of reading data
        check_writable(run_dir)
        check_run_folder(run_dir, config.resume, config.overwrite)
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
        path, ckpt, skipped = find_resumable(run_dir)
        if skipped and info.is_main:
            log.warning("%s: cannot resume from %s; resuming from %s (epoch %s) instead", run_dir, "; ".join(skipped),
                        path.name, ckpt["epoch"])
        state = restore(path, model, optimizer, scheduler, scaler, config, info, ckpt)
        scheduler.total_iters = config.epochs * iters
    net = wrap_model(model, info, device)
    # Each process validates every world_size-th case; the Dice sums are added up across processes.
    val_loader = None if val_ds is None else DataLoader(Subset(val_ds, range(info.rank, len(val_ds), info.world_size)),
                                                        batch_size=1)

    run_log = None
    if info.is_main:
        if config.overwrite and not config.resume:
            move_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir, RUN_FILES)  # left by a process killed while writing
        meta = {"config": config.to_dict(), "model_name": model.model_name, "model_args": model.model_args,
                "data": data_cfg.to_dict(), "learning_rate": lr, "iters_per_epoch": iters,
                "world_size": info.world_size, "train_cases": [c.name for c in train_cases],
                "val_cases": [c.name for c in val_cases], "num_parameters": sum(p.numel() for p in model.parameters())}
        atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str)))
        run_log = _RunLog(run_dir, config.tensorboard)
        warn_if_short_of_space(run_dir, model)
        log.info("training %s (%.2f M parameters) on %d cases, validating on %d, %s x %d, lr %.3g",
                 model.model_name, meta["num_parameters"] / 1e6, len(train_cases), len(val_cases), device,
                 info.world_size, lr)

    start = time.perf_counter() - state["elapsed"]
    partial = state.pop("partial", None)  # a resumed run stopped inside this epoch
    # Ctrl-C reaches torchrun's workers twice (from the terminal and forwarded): only one process may escalate.
    with StopRequest(escalate=not info.enabled) as stop:
        try:
            for epoch in range(state["epoch"] + 1, config.epochs + 1):
                done = partial or {"steps": 0, "losses": [], "seconds": 0.0}
                partial = None
                t0 = time.perf_counter() - done["seconds"]
                batches = _epoch_batches(train_ds, config, iters, epoch, info.rank, done["steps"])
                if done["steps"]:
                    set_rng_state(done["rng"])  # the random state after the last finished step
                losses = list(done["losses"])
                code = _train_epoch(net, batches, losses, iters, loss_fn, optimizer, scheduler, scaler, config,
                                    data_cfg, info, device, start, stop, f"epoch {epoch}/{config.epochs}")
                if code > BUDGET_SPENT:
                    save_stop_point(run_dir, model, data_cfg, config, optimizer, scheduler, scaler, state, info,
                                    code, epoch, losses, time.perf_counter() - t0, time.perf_counter() - start)
                    raise _stopped(code, f"in epoch {epoch} after step {len(losses)}/{iters}", run_dir)
                loss_sum = all_reduce_sum(torch.tensor([sum(losses), len(losses)], dtype=torch.float64), info,
                                          device)
                row: dict[str, Any] = {"epoch": epoch, "iteration": scheduler.iteration,
                                       "train_loss": float(loss_sum[0] / loss_sum[1]),
                                       "lr": optimizer.param_groups[-1]["lr"]}
                if val_loader is not None and (epoch % config.val_every == 0 or code or epoch == config.epochs):
                    row.update(validate(model, val_loader, data_cfg, device, config.overlap, config.sw_batch_size,
                                        reduce=lambda t: all_reduce_sum(t, info, device)))
                rngs = all_gather(rng_state(), info)  # every process resumes with its own random state
                row["epoch_seconds"] = time.perf_counter() - t0
                row["elapsed"] = time.perf_counter() - start
                state["history"].append(row)
                if run_log is not None:
                    _write_epoch(run_dir, run_log, model, data_cfg, config, optimizer, scheduler, scaler, state, row,
                                 rngs)
                barrier(info)
                signum = max_over_processes(stop.signum or 0, info, device)  # arrived during validation or writing
                if signum and epoch < config.epochs and code != BUDGET_SPENT:
                    raise _stopped(signum, f"after epoch {epoch}/{config.epochs}", run_dir)
                if code == BUDGET_SPENT:
                    if info.is_main:
                        log.info("time budget of %.0f s spent after %d epoch(s)", config.time_budget, epoch)
                    break
        finally:
            if run_log is not None:
                run_log.close()
    best = run_dir / "best.pt"
    return best if best.exists() else run_dir / "last.pt"


def _stopped(signum: int, where: str, run_dir: Path) -> Interrupted:
    return Interrupted(f"{signal.Signals(signum).name} {where}; {run_dir / 'last.pt'} holds this point: rerun the "
                       "same command with --resume to continue", signum)


def _epoch_batches(train_ds: CacheDataset, config: TrainConfig, iters: int, epoch: int, rank: int,
                   done: int) -> Iterator[dict[str, Any]]:
    """The batches of epoch ``epoch`` after its first ``done`` steps (whose seeded crops are drawn again and
    dropped, so the random transforms stand where an uninterrupted run has them)."""
    if done >= iters:
        return iter(())
    batches = iter(_epoch_loader(train_ds, config, iters, epoch, rank))
    with unwrap_input_errors():
        for _ in range(done):
            next(batches)
    return batches


def _train_epoch(net, batches: Iterator[dict[str, Any]], losses: list[float], iters: int, loss_fn, optimizer,
                 scheduler, scaler, config: TrainConfig, data_cfg, info: DistInfo, device: torch.device, start: float,
                 stop: StopRequest, desc: str) -> int:
    """The remaining steps of an epoch, each loss appended to ``losses``. Returns 0 when the epoch is done, else
    the stop code all processes agreed on after the last step: :data:`BUDGET_SPENT` or a signal number."""
    use_amp = scaler.is_enabled()
    net.train()
    bar = tqdm(batches, total=iters, initial=len(losses), desc=desc, unit="it", leave=False,
               disable=not info.is_main)
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
            code = max_over_processes(stop.signum or (BUDGET_SPENT if spent else 0), info, device)
            if code:
                return code
    return 0


def _write_epoch(run_dir: Path, run_log: _RunLog, model, data_cfg, config: TrainConfig, optimizer, scheduler, scaler,
                 state: dict[str, Any], row: dict[str, Any], rngs: list[dict[str, Any]]) -> None:
    """The epoch's checkpoints and log; a full disk names the file and says how to go on."""
    resumable = (run_dir / "last.pt").exists()
    try:
        save_epoch(run_dir, model, data_cfg, config, optimizer, scheduler, scaler, state, row, rngs)
        run_log.write(state["history"])
    except WriteError as err:
        hint = "--resume continues from the checkpoint before" if resumable else "nothing to resume yet"
        raise err.with_hint(f"epoch {row['epoch']} is lost, {hint}") from err
    _log_epoch(row, state, config.epochs)


def _log_epoch(row: dict[str, Any], state: dict[str, Any], epochs: int) -> None:
    msg = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  lr {row['lr']:.3g}"
    if "mean_dice" in row:
        msg += f"  val dice {row['mean_dice']:.4f} (best {state['best_metric']:.4f} @ {state['best_epoch']})"
    log.info("%s  %.1f s", msg, row["epoch_seconds"])
