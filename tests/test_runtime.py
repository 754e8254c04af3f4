from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import sparseseg.runtime as runtime


def test_tune_cpu_allocator_is_idempotent_and_reported(monkeypatch):
    monkeypatch.setattr(runtime, "_done", False)
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert runtime.tune_cpu_allocator() is on_glibc
    assert runtime.cpu_allocator() == ("glibc-keep" if on_glibc else "system")
    assert runtime.tune_cpu_allocator() is on_glibc


def test_environment_turns_it_off(monkeypatch):
    monkeypatch.setattr(runtime, "_done", False)
    monkeypatch.setenv("SPARSESEG_MALLOC", "system")
    assert runtime.tune_cpu_allocator() is False
    assert runtime.cpu_allocator() == "system"


def test_plain_cublas_addmm_respects_an_explicit_setting(monkeypatch):
    monkeypatch.delenv("DISABLE_ADDMM_CUDA_LT", raising=False)
    assert runtime.plain_cublas_addmm() and os.environ["DISABLE_ADDMM_CUDA_LT"] == "1"
    assert runtime.cuda_addmm() == "cublas"
    monkeypatch.setenv("DISABLE_ADDMM_CUDA_LT", "0")
    assert not runtime.plain_cublas_addmm() and os.environ["DISABLE_ADDMM_CUDA_LT"] == "0"
    assert runtime.cuda_addmm() == "cublaslt"


_REUSE_SCRIPT = """
import resource, torch, sparseseg.runtime as runtime
assert runtime.tune_cpu_allocator()
n = 2**28 // 4  # 256 MiB of float32
maps = [torch.ones(n) for _ in range(10)]  # 2.5 GiB (more than any finite trim threshold mallopt takes), touched
del maps  # and freed, as activations are at the end of a training step
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
maps = [torch.ones(n) for _ in range(10)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_memory_is_reused_without_page_faults():
    """2.5 GiB of freed blocks stay in the process: allocating them again faults few of their 655 360 pages (with
    a 2 GiB trim threshold: 590 000)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    env = {k: v for k, v in os.environ.items() if k != "SPARSESEG_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout.strip()) < 655_360 // 4
