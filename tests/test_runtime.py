from __future__ import annotations

import os
import platform

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
