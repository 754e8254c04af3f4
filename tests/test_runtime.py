from __future__ import annotations

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
