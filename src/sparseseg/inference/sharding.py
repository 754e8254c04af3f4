"""Many scans on many processes: each process of a ``torchrun`` job (or of a shell loop given ``--shard I/N``)
predicts its own share of the cases, and a stopped run resumes with ``--skip-existing``.

No scheduler lives here: ``torchrun`` (one machine or several) or a plain loop / array job starts the processes.

* **Shares**: the cases are split once, before any work, from the inputs alone (never from what is already in the
  output folder, which other processes are filling), so every process computes the same split and each case
  belongs to exactly one process. The split balances the input bytes: largest case first, each to the process with
  the fewest bytes so far (ties: the lower process), so a share of large CTs is not left to one process.
* **Writing**: every output goes through :func:`sparseseg.data.io.atomic_write` (a hidden temporary, then a
  rename): a label file that exists is complete. A process removes the temporaries a killed run left for its own
  cases (never those of another process's cases, which may be in flight).
* **Stopping**: SIGTERM / SIGINT (:class:`~sparseseg.signals.StopRequest`) are checked between cases: the case under
  way is finished, then the process ends with :class:`~sparseseg.errors.Interrupted` (143 / 130); a SIGKILL at the
  end of a grace period leaves no partial file either. ``--skip-existing`` then continues with the cases not done.
* **torchrun**: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` pick the share, the GPU
  (``cuda:LOCAL_RANK``) and, on the CPU, the threads (the cores split between the processes of one machine). The
  processes join a Gloo group only to wait for each other at the end: a process whose share is done, or holds a
  broken file, does not exit early (torchrun would stop the others mid-share); process 0 logs the totals. The wait
  is a polled barrier, so a signal still stops a waiting process.

Examples:
    >>> split_cases({"a": 30, "b": 10, "c": 20, "d": 10}, 2)  # bytes of each case's input files
    [['a', 'd'], ['b', 'c']]
    >>> parse_shard("1/4")
    (1, 4)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sparseseg.config import resolve_device
from sparseseg.data.formats import image_format, output_format_for, prediction_path
from sparseseg.errors import InputError, Interrupted, SparsesegError
from sparseseg.signals import StopRequest

log = logging.getLogger(__name__)

# How long a process whose share is done waits for the slowest one (Gloo's timeout for the final barrier); a
# process that dies ends the job through torchrun instead, so this only bounds a stuck one.
WAIT_TIMEOUT = timedelta(days=30)
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Shard:
    """Which share of the cases this process predicts: ``index`` of ``count``; ``local_index`` of
    ``local_count`` processes on this machine; ``launcher``: ``"torchrun"``, ``"--shard"`` or ``""`` (one
    process, the whole job)."""

    index: int = 0
    count: int = 1
    local_index: int = 0
    local_count: int = 1
    launcher: str = ""

    @property
    def label(self) -> str:
        """``"[rank 1/4] "`` under torchrun, ``"[shard 1/4] "`` with ``--shard``, else empty."""
        if self.count == 1 and not self.launcher:
            return ""
        return f"[{'rank' if self.launcher == 'torchrun' else 'shard'} {self.index}/{self.count}] "


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; anything else raises :class:`InputError`."""
    parts = str(text).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"--shard takes I/N (this process's share I of N, counted from 0), got {text!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: needs 0 <= I < N")
    return index, count


def current_shard(shard: str | None = None, environ: Mapping[str, str] | None = None) -> Shard:
    """This process's share: ``--shard I/N`` when given, else torchrun's ``RANK`` / ``WORLD_SIZE`` /
    ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``, else the whole job. Both at once raise :class:`InputError`."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if shard is not None:
        if world > 1:
            raise InputError(f"--shard {shard} under torchrun (WORLD_SIZE={world}): the launcher already splits "
                             "the cases; give one or the other")
        index, count = parse_shard(shard)
        return Shard(index, count, launcher="--shard")
    if world <= 1:
        return Shard()
    local_count = int(env.get("LOCAL_WORLD_SIZE", "1"))
    return Shard(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")), local_count, "torchrun")


def input_bytes(paths: Sequence[Path]) -> int:
    """The bytes of a case's input files (a DICOM series folder counts its files)."""
    total = 0
    for p in paths:
        files = [f for f in p.iterdir() if f.is_file()] if p.is_dir() else [p]
        total += sum(f.stat().st_size for f in files)
    return total


def split_cases(sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """The case names of each of ``count`` shares, each list sorted: the largest case first goes to the share with
    the fewest bytes so far (ties: the lower index, then the case name), so the split depends only on the names and
    sizes and every case lands in exactly one share."""
    shares: list[list[str]] = [[] for _ in range(count)]
    load = [0] * count
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        i = min(range(count), key=lambda k: (load[k], k))
        shares[i].append(name)
        load[i] += sizes[name]
    return [sorted(s) for s in shares]


def shard_device(device: str, shard: Shard) -> torch.device:
    """``resolve_device(device)``; under torchrun, ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` (modulo the GPUs
    of the machine), made the current device. An explicit ``cuda:N`` is kept."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and shard.launcher == "torchrun":
        dev = torch.device("cuda", shard.local_index % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int | None, shard: Shard, device: torch.device) -> int | None:
    """``torch.set_num_threads``: ``threads`` when given; on the CPU under torchrun, the cores split between the
    machine's processes (torchrun itself sets ``OMP_NUM_THREADS=1``); otherwise torch's choice is left alone.
    Returns the count set, or None."""
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    if threads is None and device.type == "cpu" and shard.launcher == "torchrun":
        threads = max(1, usable_cores() // shard.local_count)
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


def case_outputs(name: str, paths: Sequence[Path], output_dir: Path, output_format: str | None,
                 save_probabilities: bool) -> list[Path]:
    """The files a finished case has in ``output_dir``: its label map, and its probabilities when asked for."""
    fmt = output_format_for(image_format(paths[0]), output_format, paths[0])
    files = [prediction_path(output_dir, name, fmt)]
    if save_probabilities:
        files.append(prediction_path(output_dir, name, fmt, probabilities=True))
    return files


def remove_temporaries(files: Sequence[Path]) -> int:
    """Delete the hidden temporaries (``.NAME.<random>...``) that a killed atomic write of these files left;
    returns how many. One listing per folder."""
    removed = 0
    by_folder: dict[Path, set[str]] = {}
    for f in files:
        by_folder.setdefault(f.parent, set()).add(f.name)
    for folder, names in by_folder.items():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(".") and any(entry.name.startswith(f".{n}.") for n in names):
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


@dataclass
class ShareResult:
    """What one process did with its share."""

    written: list[Path]
    skipped: list[str]
    failures: list[InputError]
    cases: int


def run_share(cases: Mapping[str, Sequence[Path]], predict_case: Callable[[str], list[Path]],
              outputs: Callable[[str], list[Path]], shard: Shard, skip_existing: bool = False) -> ShareResult:
    """Predict this process's share of ``cases`` with ``predict_case(name) -> written files``, one case at a time.

    Cases whose ``outputs(name)`` all exist are skipped with ``skip_existing`` (else predicted and replaced). A
    case raising :class:`InputError` (a broken file) is recorded and the share goes on. SIGTERM / SIGINT stop the
    share between cases with :class:`Interrupted`. Under torchrun every process then waits for the others (a
    polled Gloo barrier) and process 0 logs the totals.
    """
    sizes = {name: input_bytes(paths) for name, paths in cases.items()}
    names = split_cases(sizes, shard.count)[shard.index]
    files = {name: outputs(name) for name in names}
    removed = remove_temporaries([f for fs in files.values() for f in fs])
    if removed:
        log.info("%sremoved %d temporary file(s) left by a stopped run", shard.label, removed)
    exists = {n for n in names if skip_existing and all(f.exists() for f in files[n])}
    done, todo = [n for n in names if n in exists], [n for n in names if n not in exists]
    for name in done:
        log.debug("%sskipping %s: %s exists", shard.label, name, files[name][0])
    if done:
        log.info("%sskipping %d of %d case(s) whose outputs exist (--skip-existing)", shard.label, len(done),
                 len(names))
    result = ShareResult([], done, [], len(names))
    group = _join_group(shard)
    try:
        with StopRequest(escalate=shard.launcher != "torchrun") as stop:
            _predict_share(todo, predict_case, shard, result, stop)
            _wait_for_the_others(group, shard, result, stop)
    finally:
        if group == "joined":
            dist.destroy_process_group()
    return result


def _predict_share(todo: list[str], predict_case: Callable[[str], list[Path]], shard: Shard, result: ShareResult,
                   stop: StopRequest) -> None:
    bar = tqdm(total=len(todo), desc=f"{shard.label}predict".strip(), unit="case",
               disable=len(todo) < 2 or shard.local_index != 0 or not sys.stderr.isatty())
    with bar, (nullcontext() if bar.disable else logging_redirect_tqdm()):  # log lines above the bar
        for i, name in enumerate(todo):
            if stop.requested:
                raise _stopped(stop, shard, result, f"after {i} of {len(todo)} case(s) to do")
            start = time.perf_counter()
            try:
                result.written += predict_case(name)
            except InputError as err:  # a broken file: go on with the other cases, report it at the end
                log.info("%scase %d/%d %s failed: %s", shard.label, i + 1, len(todo), name, err)
                result.failures.append(err)
            else:
                log.info("%scase %d/%d %s written (%.1f s)", shard.label, i + 1, len(todo), name,
                         time.perf_counter() - start)
            bar.update()


def _stopped(stop: StopRequest, shard: Shard, result: ShareResult, where: str) -> Interrupted:
    return Interrupted(f"{shard.label}{stop.signal_name} {where} ({len(result.written)} written, "
                       f"{len(result.skipped)} skipped, {len(result.failures)} failed; every file written is "
                       "complete): rerun the same command with --skip-existing to continue", stop.signum)


def _join_group(shard: Shard) -> str:
    """``"joined"`` when this call joined torchrun's process group (Gloo), ``"present"`` when the caller had one,
    ``""`` when there is none to join (one process, or ``--shard``)."""
    if shard.launcher != "torchrun" or not dist.is_available():
        return ""
    if dist.is_initialized():
        return "present"
    try:
        dist.init_process_group("gloo", timeout=WAIT_TIMEOUT)
    except (RuntimeError, ValueError) as err:  # e.g. RANK set by hand without MASTER_ADDR
        raise SparsesegError(f"cannot join the torchrun process group ({err}); start the processes with torchrun, "
                             "or give each one --shard I/N") from err
    return "joined"


def _wait_for_the_others(group: str, shard: Shard, result: ShareResult, stop: StopRequest) -> None:
    """Under torchrun: wait (a signal still stops the wait) until every process has done its share, then process 0
    logs the totals."""
    if not group:
        return
    counts = [None] * shard.count
    try:
        work = dist.barrier(async_op=True)
        while not work.is_completed():
            if stop.requested:
                raise _stopped(stop, shard, result, "while waiting for the other processes, all of its cases done")
            time.sleep(POLL_SECONDS)
        work.wait()  # raises when another process ended instead of arriving
        dist.all_gather_object(counts, (len(result.written), len(result.skipped), len(result.failures), result.cases))
    except RuntimeError as err:  # Gloo: "Connection closed by peer" and the like
        log.debug("%s%s", shard.label, err)
        raise SparsesegError(f"{shard.label}another process ended before finishing its share (its own error says "
                             f"why); this process's cases are done ({len(result.written)} written, "
                             f"{len(result.skipped)} skipped, {len(result.failures)} failed): rerun with "
                             "--skip-existing to finish the rest") from err
    if shard.index == 0:
        written, skipped, failed, total = (sum(c[k] for c in counts) for k in range(4))
        log.info("%d process(es): %d case(s), %d written, %d skipped, %d failed", shard.count, total, written,
                 skipped, failed)
