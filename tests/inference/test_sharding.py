"""Many scans on many processes: shares of the cases (torchrun or --shard), --skip-existing, stopping and resuming."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import sparseseg.inference.predictor as predictor_mod
from conftest import save, synthetic_case, tiny_checkpoint
from sparseseg.cli import main
from sparseseg.errors import InputError
from sparseseg.inference.predictor import predict
from sparseseg.inference.sharding import (
    Shard,
    current_shard,
    parse_shard,
    remove_temporaries,
    set_threads,
    shard_device,
    split_cases,
    usable_cores,
)

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"


def _cases(folder: Path, count: int, shape=(12, 12, 12)) -> Path:
    for i in range(count):
        save(synthetic_case(shape, seed=i)[0], folder / f"case_{i:02d}.nii.gz")
    return folder


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The names of the cases ``predict`` segments (each call of ``_predict_case``), in order."""
    calls: list[str] = []
    real = predictor_mod._predict_case

    def count(model, name, *args, **kwargs):
        calls.append(name)
        return real(model, name, *args, **kwargs)

    monkeypatch.setattr(predictor_mod, "_predict_case", count)
    return calls


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/2/3", "0/0"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


def test_current_shard_from_torchrun_or_the_flag():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert current_shard(None, env) == Shard(3, 4, 1, 2, "torchrun")
    assert current_shard(None, {}) == Shard() and current_shard(None, {"WORLD_SIZE": "1"}) == Shard()
    assert current_shard("1/3", {}) == Shard(1, 3, launcher="--shard")
    assert current_shard("1/3", {}).label == "[shard 1/3] " and current_shard(None, env).label == "[rank 3/4] "
    with pytest.raises(InputError, match="--shard 1/3 under torchrun"):
        current_shard("1/3", env)


def test_split_puts_every_case_in_exactly_one_share():
    rng = np.random.default_rng(0)
    sizes = {f"c{i:03d}": int(s) for i, s in enumerate(rng.integers(1, 1000, size=53))}
    for count in range(1, 9):
        shares = split_cases(sizes, count)
        flat = [n for s in shares for n in s]
        assert sorted(flat) == sorted(sizes) and len(flat) == len(set(flat))  # none lost, none twice
        assert all(s == sorted(s) for s in shares)
        assert shares == split_cases(dict(reversed(sizes.items())), count)  # the order given does not matter
        loads = [sum(sizes[n] for n in s) for s in shares]
        assert max(loads) - min(loads) <= max(sizes.values())  # largest first to the least loaded share
    assert split_cases({"a": 5, "b": 5, "c": 5}, 5) == [["a"], ["b"], ["c"], [], []]


def test_shards_by_hand_write_each_case_once(tmp_path, counted):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    inputs = _cases(tmp_path / "in", 4)
    written = [predict(ckpt, inputs, tmp_path / "out", shard=f"{i}/3", device="cpu") for i in range(3)]
    names = [p.name for w in written for p in w]
    assert sorted(names) == [f"case_{i:02d}.nii.gz" for i in range(4)]
    assert sorted(counted) == [f"case_{i:02d}" for i in range(4)]  # each case segmented once
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)


def test_a_broken_header_is_reported_by_the_first_share_only(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    inputs = _cases(tmp_path / "in", 2)
    (inputs / "broken.nii.gz").write_text("not an image")
    with pytest.raises(InputError, match="broken.nii.gz"):
        predict(ckpt, inputs, tmp_path / "out", shard="0/2", device="cpu")
    assert len(predict(ckpt, inputs, tmp_path / "out", shard="1/2", device="cpu")) == 1


def test_skip_existing_skips_done_cases_and_not_temporaries(tmp_path, counted, caplog):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    inputs, out = _cases(tmp_path / "in", 3), tmp_path / "out"
    predict(ckpt, inputs, out, device="cpu", save_probabilities=True)
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "case_01.nii.gz").unlink()  # as a killed run leaves it: the temporary, not the file
    (out / ".case_01.nii.gz.k9x2ab7q.nii.gz").write_bytes(b"\x1f\x8b cut short")
    (out / "case_02_probabilities.nii.gz").unlink()  # the label map alone is not a finished case
    counted.clear()
    caplog.set_level("INFO", logger="sparseseg")
    written = predict(ckpt, inputs, out, device="cpu", save_probabilities=True, skip_existing=True)
    assert counted == ["case_01", "case_02"] and [p.name for p in written] == ["case_01.nii.gz", "case_02.nii.gz"]
    assert "skipping 1 of 3 case(s) whose outputs exist" in caplog.text
    assert "removed 1 temporary file(s) left by a stopped run" in caplog.text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items() if n.startswith("case_00"))

    counted.clear()
    predict(ckpt, inputs, out, device="cpu")  # without the flag, existing outputs are replaced
    assert counted == ["case_00", "case_01", "case_02"]


def test_remove_temporaries_keeps_other_files(tmp_path):
    names = [".a.nii.gz.x1.nii.gz", ".a_probabilities.nii.gz.x2.nii.gz", ".b.nii.gz.x3.nii.gz", "a.nii.gz",
             ".sparseseg-probe.x4"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert remove_temporaries([tmp_path / "a.nii.gz", tmp_path / "nowhere" / "c.nii.gz"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {".a.nii.gz.x1.nii.gz"})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_between_cases_then_resume(tmp_path, capsys, monkeypatch, counted, signum):
    """A signal while a case is predicted: that case is written, the run stops (128 + signal) with no temporary,
    and the same command with --skip-existing writes the rest; every case segmented once."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    inputs, out = _cases(tmp_path / "in", 3), tmp_path / "out"
    counting = predictor_mod._predict_case

    def signalled(*args, **kwargs):
        if not counted:
            os.kill(os.getpid(), signum)
        return counting(*args, **kwargs)

    monkeypatch.setattr(predictor_mod, "_predict_case", signalled)
    argv = ["predict", "--checkpoint", str(ckpt), "--input", str(inputs), "--output", str(out), "--device", "cpu"]
    assert main(argv) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"sparseseg predict: stopped: {signal.Signals(signum).name} after 1 of 3 case(s) to do (1 written, "
                   "0 skipped, 0 failed; every file written is complete): rerun the same command with "
                   "--skip-existing to continue")
    assert [p.name for p in out.iterdir()] == ["case_00.nii.gz"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone with the run

    assert main([*argv, "--skip-existing"]) == 0
    assert counted == [f"case_{i:02d}" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == [f"case_{i:02d}.nii.gz" for i in range(3)]


def test_threads_split_between_the_processes_of_a_machine():
    threads, cpu = torch.get_num_threads(), torch.device("cpu")
    try:
        torchrun = Shard(5, 8, 1, 4, "torchrun")
        assert set_threads(None, torchrun, cpu) == max(1, usable_cores() // 4) == torch.get_num_threads()
        assert set_threads(3, torchrun, cpu) == 3 == torch.get_num_threads()
        torch.set_num_threads(threads)
        assert set_threads(None, Shard(1, 4, launcher="--shard"), cpu) is None and torch.get_num_threads() == threads
        assert shard_device("cpu", torchrun) == cpu
    finally:
        torch.set_num_threads(threads)


def test_threads_and_bad_flags(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    inputs = _cases(tmp_path / "in", 1)
    threads = torch.get_num_threads()
    try:
        predict(ckpt, inputs, tmp_path / "out", device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(InputError, match="threads must be >= 1"):
        predict(ckpt, inputs, tmp_path / "out", device="cpu", threads=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="under torchrun"):
        predict(ckpt, inputs, tmp_path / "out", device="cpu", shard="0/2")


# ---- two processes under torchrun (Gloo) ----------------------------------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# Each process, after writing its first case, waits until the launcher's forwarded SIGTERM has reached it (the
# handler of sparseseg's StopRequest has set its flag), so exactly one case per process is written before the stop.
HOOKED = """
import os, signal, sys, time
from pathlib import Path
import sparseseg.inference.predictor as predictor
from sparseseg.cli import main

real = predictor._predict_case
rank = os.environ["RANK"]
log = Path({log!r})


def first_then_wait(model, name, *args, **kwargs):
    out = real(model, name, *args, **kwargs)
    with open(log, "a") as f:
        f.write(name + "\\n")
    marker = log.with_name("first_" + rank)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not signal.getsignal(signal.SIGTERM).__self__.requested and time.monotonic() < deadline:
            time.sleep(0.01)
    return out


predictor._predict_case = first_then_wait
sys.exit(main({argv!r}))
"""


def _unet_checkpoint(path: Path) -> Path:
    """A tiny untrained library ``unetr`` (the launcher's ``-m sparseseg`` does not know the tests' models)."""
    from sparseseg.checkpoint import save_checkpoint
    from sparseseg.data.transforms import DataConfig
    from sparseseg.models.common.registry import create_model

    torch.manual_seed(0)
    model = create_model("unetr", in_channels=1, out_channels=3, img_size=16, hidden_size=32, mlp_dim=64,
                         num_layers=2, num_heads=2, feature_size=4, patch_size=8, decoder="v1", skip_layers=(1, 2))
    data = DataConfig(in_channels=1, label_values=[0, 1, 2], class_names=["bg", "a", "b"], roi_size=[16, 16, 16])
    return save_checkpoint(path, model, data.to_dict())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_torchrun_two_processes_stopped_then_resumed_write_each_case_once(tmp_path):
    ckpt = _unet_checkpoint(tmp_path / "tiny.pt")
    inputs, out, log = _cases(tmp_path / "in", 6, (20, 20, 20)), tmp_path / "out", tmp_path / "segmented"
    argv = ["predict", "--checkpoint", str(ckpt), "--input", str(inputs), "--output", str(out), "--device", "cpu"]
    script = tmp_path / "hooked.py"
    script.write_text(HOOKED.format(log=str(log), argv=argv))
    proc = subprocess.Popen([*TORCHRUN, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    timer = threading.Timer(300, proc.kill)
    timer.start()
    try:
        while not all((tmp_path / f"first_{r}").exists() for r in "01") and proc.poll() is None:
            threading.Event().wait(0.05)
        proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both processes
        stderr = proc.communicate()[1]
    finally:
        timer.cancel()
    assert proc.returncode != 0
    for rank in "01":
        assert f"sparseseg predict: stopped: [rank {rank}/2] SIGTERM after 1 of 3 case(s) to do" in stderr, stderr
    first = log.read_text().split()
    assert len(first) == 2 and sorted(p.name for p in out.iterdir()) == sorted(f"{n}.nii.gz" for n in first)
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    done = subprocess.run([*TORCHRUN, "-m", "sparseseg", *argv, "--skip-existing"], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    second = re.findall(r"^\[rank [01]/2\] case \d/\d (\S+) written", done.stderr, flags=re.M)
    assert sorted(first + second) == [f"case_{i:02d}" for i in range(6)]  # none lost, none twice
    assert "2 process(es): 6 case(s), 4 written, 2 skipped, 0 failed" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"case_{i:02d}.nii.gz" for i in range(6)]
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # the first run's files are not rewritten
