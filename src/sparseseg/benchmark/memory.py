"""Peak CPU memory of one model, measured in a fresh child process (``python -m sparseseg.benchmark.memory``).

A process's peak resident set size never goes down, so one process can only tell the peak of everything it ever
did; the benchmark therefore spawns one child per model and reads the child's own peak (``VmHWM`` on Linux). The
child imports torch and the library (plus the module that defines the model's class, so models registered outside
the library are found), notes its peak resident set size, builds the model, notes it again, runs one forward pass
under ``torch.inference_mode()`` (through the CPU fast path when the benchmark times it so; or, with ``train``, one
training step: forward with the target, loss, backward, AdamW step) and prints one JSON line:

* ``import_mb``: peak RSS after the imports (interpreter + torch + MONAI + the library);
* ``model_mb``: peak RSS after building the model (adds the weights and whatever building them touched);
* ``peak_mb``: peak RSS of the whole process at the end: all of the above plus the activations, workspaces and
  allocator caches of the pass. Nothing is subtracted.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from sparseseg.errors import SparsesegError


def _maxrss_mb() -> float:
    """Peak RSS of this process's address space in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: that one survives fork + exec, so a child spawned
    by a process that once held 7 GB would report 7 GB from its first line. Elsewhere ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    scale = 1024.0**2 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def peak_memory_subprocess(spec: dict[str, Any], timeout: float | None = None) -> dict[str, float]:
    """Run :func:`_child` in a fresh interpreter with this process's ``sys.path``; return its three numbers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-m", "sparseseg.benchmark.memory", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SparsesegError(f"memory measurement of {spec['name']!r} failed: {tail}")
    return json.loads(lines[-1])


def _child(spec: dict[str, Any]) -> dict[str, float]:
    import torch

    import sparseseg.models  # noqa: F401  (registers the library's models)
    from sparseseg.benchmark.workload import make_inputs, train_step_fn
    from sparseseg.models.common.registry import create_model

    if spec.get("module"):
        importlib.import_module(spec["module"])
    if spec.get("cpu_allocator") == "glibc-keep":  # the same allocator setting as the benchmark's process
        from sparseseg.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    torch.set_num_threads(int(spec["threads"]))
    import_mb = _maxrss_mb()
    torch.manual_seed(0)
    model = create_model(spec["name"], spec["preset"], **spec["model_args"])
    x, y = make_inputs(model.model_args, int(spec["batch_size"]), bool(spec["sigmoid"]), torch.device("cpu"))
    model_mb = _maxrss_mb()
    if spec.get("train"):
        model.train()
        train_step_fn(model, x, y, bool(spec["sigmoid"]))()
    else:
        model.eval()
        if spec.get("cpu_fast_path"):  # as the benchmark times it
            from sparseseg.inference.fast_cpu import optimize_for_cpu_inference

            model = optimize_for_cpu_inference(model)
        with torch.inference_mode():
            model(x)
    return {"import_mb": import_mb, "model_mb": model_mb, "peak_mb": _maxrss_mb()}


def child_main(child: Callable[[dict[str, Any]], dict[str, Any]], argv: list[str] | None = None) -> int:
    """Entry point of a measuring child process: ``child(spec)`` on the JSON spec of ``argv[0]``, its record
    printed as one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    sys.stdout.write(json.dumps(child(json.loads(argv[0]))) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return child_main(_child, argv)


if __name__ == "__main__":
    raise SystemExit(main())
