"""Nothing lost under faults (docs/robustness.md): a run folder that holds a run, a full disk, a read-only folder,
SIGTERM / SIGINT during training, an unreadable ``last.pt`` at ``--resume``.

Each fault is injected as close to the operating system as a test can: a file object whose ``write`` raises
ENOSPC under ``torch.save`` (the real chain torch builds), ``os.open`` raising EROFS / EACCES for one folder (the
call ``tempfile.mkstemp`` makes), real signals sent from another process, and, where this machine lets the tests
mount file systems (root), a real full tmpfs and a real read-only remount.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import sparseseg.checkpoint as checkpoint_mod
from conftest import write_msd_dataset
from sparseseg.checkpoint import load_checkpoint
from sparseseg.cli import main
from sparseseg.data.io import atomic_write
from sparseseg.errors import WriteError
from sparseseg.signals import StopRequest
from sparseseg.training import trainer as trainer_mod

TESTS = Path(__file__).parent


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_msd_dataset(tmp_path / "data", num_cases=4, shape=(16, 16, 16), num_test=0)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child processes: the same floating-point sums
    yield
    torch.set_num_threads(threads)


def _train_argv(dataset: Path, run: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["train", "--dataset", str(dataset), "--model", "tiny_seg", "--output", str(run), "--epochs", str(epochs),
            "--iters-per-epoch", "3", "--batch-size", "2", "--roi-size", "8", "--lr", "3e-3", "--seed", "3",
            "--model-arg", "feature_size=4", *extra]


def _one_line(capsys, code: int, expected_code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code, err
    line = err[-1]
    assert line.startswith(("sparseseg train: ", "sparseseg evaluate: ")), line
    for needle in needles:
        assert needle in line, line
    return line


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _same_training(a: Path, b: Path) -> None:
    ref, other = load_checkpoint(a), load_checkpoint(b)
    assert ref["iteration"] == other["iteration"] and ref["epoch"] == other["epoch"]
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, other["state_dict"][key]), key
    for key in ("optimizer", "scheduler"):
        assert str(ref[key]) == str(other[key]), key
    assert [r["train_loss"] for r in ref["history"]] == [r["train_loss"] for r in other["history"]]
    assert "partial_epoch" not in other


# ---- a folder that holds a run ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_existing_run_is_refused_then_moved_aside(tmp_path, dataset, capsys):
    run = tmp_path / "runs" / "x"
    assert main(_train_argv(dataset, run, epochs=1)) == 0
    before = _snapshot(run)

    line = _one_line(capsys, main(_train_argv(dataset, run, epochs=1)), 2,
                     f"{run}: holds a training run (last.pt, best.pt)", "--resume", "--overwrite", "x.YYYYmmdd-HHMMSS")
    assert _snapshot(run) == before, line

    code = main(_train_argv(dataset, run, "--resume", "--overwrite"))
    _one_line(capsys, code, 2, "resume and overwrite exclude each other")

    assert main(_train_argv(dataset, run, "--overwrite", epochs=1)) == 0
    moved = [p for p in run.parent.iterdir() if p.name.startswith("x.")]
    assert len(moved) == 1 and _snapshot(moved[0]) == before  # the old run, whole, beside the new one
    assert load_checkpoint(run / "last.pt")["epoch"] == 1

    (run.parent / "y").mkdir()
    (run.parent / "y" / "config.json").write_text("{}")  # no checkpoint: nothing to lose, no refusal
    assert main(_train_argv(dataset, run.parent / "y", epochs=1)) == 0


# ---- a full disk ----------------------------------------------------------------------------------------------------

class _FillingFile:
    """A binary file that accepts ``room`` bytes, then fails as a full disk does (ENOSPC from ``write``)."""

    def __init__(self, path, mode: str, room: int):
        self.f = open(path, mode)  # closed by __exit__
        self.room = room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_while_checkpointing(tmp_path, dataset, capsys, monkeypatch):
    """torch.save writes into a file whose ``write`` fails with ENOSPC from the epoch-2 ``last.pt`` on: torch
    raises ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...`` (with the OSError as its
    context); the user reads one line instead."""
    run = tmp_path / "run"
    real_open = open

    def open_filling(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(".last.pt.") and (run / "last.pt").exists():
            return _FillingFile(path, mode, room=1000)  # from the second last.pt on
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "open", open_filling, raising=False)
    _one_line(capsys, main(_train_argv(dataset, run)), 74,
              f"{run / 'last.pt'}: cannot write: no space left on device (needs about ", " kB, ",
              " free); the previous file is intact; epoch 2 is lost, --resume continues from the checkpoint before")
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the previous file, whole
    assert _temporaries(run) == []
    assert (run / "log.csv").read_text().count("\n") == 2  # header + epoch 1


def test_write_error_names_the_file_and_the_size(tmp_path):
    target = tmp_path / "out" / "report.json"
    atomic_write(target, lambda tmp: tmp.write_text("old"))

    def fill(tmp: Path) -> None:
        with _FillingFile(tmp, "wb", room=10) as f:
            f.write(b"0123456789")
            f.write(b"more than the disk holds")

    with pytest.raises(WriteError) as info:
        atomic_write(target, fill, size=34)
    err = info.value
    assert err.disk_full and err.errno == errno.ENOSPC and err.needed == 34 and err.free > 0 and err.previous_kept
    assert str(err).startswith(f"{target}: cannot write: no space left on device (needs about 34 bytes, ")
    assert str(err).endswith("free); the previous file is intact")
    assert target.read_text() == "old" and _temporaries(target.parent) == []

    with pytest.raises(WriteError, match="no space left on device.*; nothing was written$"):
        atomic_write(tmp_path / "out" / "new.json", fill)
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_torch_writer_failure_without_its_cause(tmp_path, monkeypatch):
    """``torch.save(obj, FILE_NAME)`` on a full disk loses the errno in C++; the free space tells."""
    import sparseseg.data.io as io_mod

    def torch_fails(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(WriteError, match=r"no space left on device \(needs about 2.0 MB, 4.1 kB free\)"):
        atomic_write(tmp_path / "model.pt", torch_fails, size=2_000_000)
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: usage._replace(free=10**10))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # space is left: some other failure, not hidden
        atomic_write(tmp_path / "model.pt", torch_fails, size=2_000_000)
    assert list(tmp_path.iterdir()) == []


def test_writer_that_ignores_a_full_disk(tmp_path, monkeypatch):
    """ITK's NRRD / MetaImage writers leave an empty file on a full disk and raise nothing: a file that leaves the
    disk without a free block is not put in place (``os.statvfs`` reports the full disk here)."""
    import sparseseg.data.io as io_mod

    target = tmp_path / "case.nrrd"
    target.write_text("previous")
    full = os.statvfs(tmp_path)
    monkeypatch.setattr(io_mod.os, "statvfs", lambda p: os.statvfs_result((*full[:3], 0, 0, *full[5:])))
    with pytest.raises(WriteError, match="case.nrrd: cannot write: no space left on device.*previous file is intact"):
        atomic_write(target, lambda tmp: tmp.write_bytes(b""))  # what the silent writer leaves
    assert target.read_text() == "previous" and _temporaries(tmp_path) == []


# ---- a read-only folder ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only", "permission"])
def test_read_only_folder_while_writing(tmp_path, capsys, monkeypatch, code):
    """``os.open`` (what ``tempfile.mkstemp`` calls) fails for the output folder as on a read-only mount (EROFS) or
    a folder of another user (EACCES); permission bits would not stop root. ``evaluate`` rewrites its report."""
    from conftest import save, synthetic_case

    for folder in ("pred", "label"):
        save(synthetic_case((8, 8, 8))[1], tmp_path / folder / "case.nii.gz")
    report = tmp_path / "reports" / "metrics.json"
    argv = ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label"), "--output", str(report)]
    assert main(argv) == 0
    before = report.read_bytes()
    capsys.readouterr()

    real_os_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if Path(path).parent == report.parent and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    reason = os.strerror(code).lower()
    _one_line(capsys, main(argv), 74, f"{report}: cannot write: {reason}; the previous file is intact")
    assert report.read_bytes() == before and _temporaries(report.parent) == []


# ---- the real thing: a small tmpfs, full, then read-only (root only) ----------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the patched tests above cover the same paths)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.slow
def test_full_then_read_only_tmpfs(tmp_path, dataset, capsys, small_disk):
    run = small_disk / "run"
    assert main(_train_argv(dataset, run, epochs=1)) == 0
    before = _snapshot(run)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 12_288))  # room for config.json, not for a checkpoint

    line = _one_line(capsys, main(_train_argv(dataset, run, "--resume")), 74, "no space left on device (needs about ",
                     "; the previous file is intact")
    assert line.split(": cannot write")[0].endswith((f"{run / 'last.pt'}", f"{run / 'best.pt'}")), line
    assert {k: v for k, v in _snapshot(run).items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"}
    assert _temporaries(run) == []
    with pytest.raises(WriteError, match="no space left on device"):  # torch.save given a file name
        atomic_write(run / "plain.pt", lambda tmp: torch.save({"w": torch.zeros(100_000)}, tmp))
    assert _temporaries(run) == [] and not (run / "plain.pt").exists()
    with pytest.raises(OSError), open(small_disk / "filler2", "wb") as f:  # every block taken
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    small = sitk.GetImageFromArray(np.zeros((20, 20, 20), np.uint8))  # ITK writes 0 bytes and raises nothing
    for name in ("label.nrrd", "label.mha"):
        with pytest.raises(WriteError, match=f"{name}: cannot write: no space left on device"):
            atomic_write(run / name, lambda tmp: sitk.WriteImage(small, str(tmp), useCompression=True))
    assert _temporaries(run) == []

    (small_disk / "filler").unlink()
    (small_disk / "filler2").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    _one_line(capsys, main(_train_argv(dataset, run, "--resume")), 2, f"{run}: output folder is not writable")
    with pytest.raises(WriteError, match="last.pt: cannot write: read-only file system; the previous file is intact"):
        atomic_write(run / "last.pt", lambda tmp: tmp.write_text("new"))
    assert _snapshot(run) == {**before, "config.json": _snapshot(run)["config.json"]}


# ---- SIGTERM / SIGINT -----------------------------------------------------------------------------------------------

STOPPED_SCRIPT = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import conftest  # registers tiny_seg
import torch
from sparseseg.cli import main
from sparseseg.training.optim import WarmupCosine

torch.set_num_threads(1)
real_step = WarmupCosine.step
marker, go = Path({marker!r}), Path({go!r})


def step_then_wait(self, elapsed=0.0):  # after step {after}: tell the parent, wait until it has sent the signal
    real_step(self, elapsed)
    if self.iteration == {after} and os.environ.get("RANK", "0") == "0":
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        marker.with_suffix(".tmp").rename(marker)
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


WarmupCosine.step = step_then_wait
sys.exit(main({argv!r}))
"""


def _stop_child(tmp_path: Path, argv: list[str], signum: int, after: int, launcher: list[str]) -> tuple[int, str]:
    """Run ``argv`` in a child; when it has finished step ``after``, send it ``signum``, then let it go on.
    Returns the exit code and the standard error."""
    marker, go = tmp_path / "stepped", tmp_path / "go"
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED_SCRIPT.format(tests=str(TESTS), marker=str(marker), go=str(go), after=after,
                                            argv=argv))
    proc = subprocess.Popen([*launcher, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiter = threading.Timer(300, proc.kill)
    waiter.start()
    try:
        while not marker.exists() and proc.poll() is None:
            threading.Event().wait(0.05)
        assert marker.exists(), proc.communicate()[1][-3000:]
        os.kill(int(marker.read_text()), signum)  # pending before the child looks for `go`
        go.touch()
        err = proc.communicate()[1]
    finally:
        waiter.cancel()
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_then_resume(tmp_path, dataset, one_thread, signum):
    run = tmp_path / "run"
    code, stderr = _stop_child(tmp_path, _train_argv(dataset, run), signum, after=1, launcher=[sys.executable])
    err = stderr.strip().splitlines()
    assert code == 128 + signum, "\n".join(err[-30:])
    name = signal.Signals(signum).name
    assert err[-1] == (f"sparseseg train: stopped: {name} in epoch 1 after step 1/3; {run / 'last.pt'} holds this "
                       "point: rerun the same command with --resume to continue")
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "last.pt"]  # no log row, no best.pt yet
    stopped = load_checkpoint(run / "last.pt")
    assert stopped["epoch"] == 0 and stopped["iteration"] == 1
    assert stopped["partial_epoch"]["epoch"] == 1 and stopped["partial_epoch"]["steps"] == 1

    assert main(_train_argv(dataset, run, "--resume")) == 0  # replays step 1's crops, goes on with step 2
    assert main(_train_argv(dataset, tmp_path / "uninterrupted")) == 0
    _same_training(tmp_path / "uninterrupted" / "last.pt", run / "last.pt")
    assert (run / "log.csv").read_text().count("\n") == 3


def test_signal_during_validation_stops_after_the_epoch(tmp_path, dataset, capsys, one_thread, monkeypatch):
    """SIGTERM while validating: validation and the epoch's checkpoints finish, then the run stops."""
    real_validate = trainer_mod.validate

    def validate_and_get_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "validate", validate_and_get_signalled)
    run = tmp_path / "run"
    _one_line(capsys, main(_train_argv(dataset, run)), 143,
              f"sparseseg train: stopped: SIGTERM after epoch 1/2; {run / 'last.pt'} holds this point")
    stopped = load_checkpoint(run / "last.pt")
    assert stopped["epoch"] == 1 and "partial_epoch" not in stopped and "mean_dice" in stopped["history"][0]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run

    monkeypatch.setattr(trainer_mod, "validate", real_validate)
    assert main(_train_argv(dataset, run, "--resume")) == 0
    assert main(_train_argv(dataset, tmp_path / "uninterrupted")) == 0
    _same_training(tmp_path / "uninterrupted" / "last.pt", run / "last.pt")


@pytest.mark.slow
def test_torchrun_sigterm_to_one_process_stops_both(tmp_path, dataset, one_thread):
    """SIGTERM reaches process 0 only: after the same step both stop, process 0 writes last.pt holding both random
    states and loss lists, and the resumed two-process run ends with the weights of an uninterrupted one."""
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = [*_train_argv(dataset, run), "--batch-size", "1", "--device", "cpu"]
    code, stderr = _stop_child(tmp_path, argv, signal.SIGTERM, after=2, launcher=torchrun)
    assert code != 0
    # Each process says so (unless torchrun, seeing one end, terminates the other after last.pt was written).
    assert "sparseseg train: stopped: SIGTERM in epoch 1 after step 2/3" in stderr, stderr[-3000:]
    stopped = load_checkpoint(run / "last.pt")
    assert stopped["partial_epoch"]["steps"] == 2 and len(stopped["partial_epoch"]["losses"]) == 2
    assert len(stopped["rng_per_rank"]) == 2

    for name, args in (("resume", [*argv, "--resume"]), ("reference", [*argv, "--output", str(tmp_path / "ref")])):
        script = tmp_path / f"{name}.py"
        script.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport conftest, torch\n"
                          f"from sparseseg.cli import main\ntorch.set_num_threads(1)\nsys.exit(main({args!r}))\n")
        done = subprocess.run([*torchrun, str(script)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    _same_training(tmp_path / "ref" / "last.pt", run / "last.pt")


# ---- --resume when last.pt cannot be read ---------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, dataset, capsys, caplog, one_thread):
    run = tmp_path / "run"
    assert main(_train_argv(dataset, run, "--val-every", "2", epochs=3)) == 0  # best.pt at epoch 2, last.pt at 3
    assert load_checkpoint(run / "best.pt")["epoch"] == 2
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # cut short
    assert main(_train_argv(dataset, run, "--resume", "--val-every", "2", epochs=3)) == 0
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{run}: cannot resume from last.pt: not a sparseseg checkpoint" in w
               and "resuming from best.pt (epoch 2) instead" in w for w in warning), warning
    assert main(_train_argv(dataset, tmp_path / "uninterrupted", "--val-every", "2", epochs=3)) == 0
    _same_training(tmp_path / "uninterrupted" / "last.pt", run / "last.pt")

    for name in ("last.pt", "best.pt"):
        (run / name).write_bytes(b"not a checkpoint")
    before = _snapshot(run)
    _one_line(capsys, main(_train_argv(dataset, run, "--resume")), 2,
              f"{run}: nothing to resume: no readable checkpoint (last.pt: not a sparseseg checkpoint",
              "; best.pt: not a sparseseg checkpoint")
    assert _snapshot(run) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line(capsys, main(_train_argv(dataset, empty, "--resume")), 2,
              f"{empty}: nothing to resume: no checkpoint in this folder (start without --resume)")


# ---- the stop request ------------------------------------------------------------------------------------------------

def test_stop_request_sets_a_flag_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: abandon at once
    assert {s: signal.getsignal(s) for s in before} == before

    with StopRequest(escalate=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy of the same Ctrl-C
        assert stop.signum == signal.SIGINT

    seen = []
    thread = threading.Thread(target=lambda: seen.append(StopRequest().__enter__()._previous))
    thread.start()
    thread.join()
    assert seen == [{}]  # handlers can only be set from the main thread: inert elsewhere
