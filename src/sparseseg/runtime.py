"""Process-level settings for fast runs: keep freed tensor memory in the process instead of returning it to the
operating system (CPU), and bias-fused matrix products through plain cuBLAS (GPU).

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so each large feature map (a 16 x 96^3 float32 map is
56 MiB) is page-faulted and zeroed by the kernel again at every layer of every forward pass. In a 3-D decoder at full
resolution that costs about a third of the forward pass on this project's 2-core machine (the btcv
``stp_mta_unetr`` forward: 2.9-3.1 s as it is, 1.9-2.1 s with the setting below, ``/usr/bin/time``: 6.5 M minor
page faults in 40 s).

:func:`tune_cpu_allocator` switches glibc to serving all blocks from its heap (``M_MMAP_MAX = 0``) and to never
returning the free top of the heap to the system (``M_TRIM_THRESHOLD = -1``), so a freed map's pages are reused
without a fault. A finite threshold is not enough for training: with the largest one ``mallopt`` takes (2 GiB) a
brats training step of ``stp_mta_unetr`` (6.6 GB peak) handed its activations back after every step and page-faulted
490 k pages (about 2 GB) again in the next one; with trimming off, 0-6 faults per step (``resource.getrusage``, two
threads). The price is that the resident memory stays near its peak until the process ends. The CLI calls it once at
start (``SPARSESEG_MALLOC=system`` in the environment turns it off); library users may call it themselves. It does
nothing where the C library is not glibc (macOS, Windows, musl).

:func:`plain_cublas_addmm` sets PyTorch's ``DISABLE_ADDMM_CUDA_LT=1`` unless the environment already sets it:
every ``nn.Linear`` on a GPU then runs as a cuBLAS GEMM over the bias instead of a cuBLASLt GEMM with a bias
epilogue, whose host-side set-up cost about 0.2 ms per call on an H100 with torch 2.11 (``aten::addmm`` self CPU
time). At batch 1 these models are bound by the host issuing kernels, so this shows in the end-to-end time:
the brats ``stp_mta_unetr`` r = 0.75 forward with float16 autocast took 25.6-30.2 ms without and 17.1-26.9 ms
with the setting, the dense ``unetr`` one 22.4-24.7 against 11.8-15.8 ms (three processes of each, interleaved;
docs/benchmark.md). PyTorch reads the variable at the first such product, so the CLI sets it at start; library
users set it in their environment or call this first.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = -1  # mallopt(3): -1 disables trimming
_done = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (see the module docstring); returns whether the setting is in effect.

    Idempotent; a no-op (returns False) off glibc or with ``SPARSESEG_MALLOC=system`` in the environment.
    """
    global _done
    if _done:
        return True
    if os.environ.get("SPARSESEG_MALLOC", "").lower() == "system" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _done = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc malloc keeps freed memory: %s", _done)
    return _done


def cpu_allocator() -> str:
    """``"glibc-keep"`` after :func:`tune_cpu_allocator` took effect in this process, else ``"system"``."""
    return "glibc-keep" if _done else "system"


def plain_cublas_addmm() -> bool:
    """Run CUDA ``addmm`` (``nn.Linear``) through plain cuBLAS (see the module docstring); returns whether the
    setting is in effect. An explicit ``DISABLE_ADDMM_CUDA_LT`` in the environment wins."""
    os.environ.setdefault("DISABLE_ADDMM_CUDA_LT", "1")
    return cuda_addmm() == "cublas"


def cuda_addmm() -> str:
    """How ``nn.Linear`` runs on CUDA in this process: ``cublas`` (:func:`plain_cublas_addmm` in effect) or
    ``cublaslt``."""
    return "cublas" if os.environ.get("DISABLE_ADDMM_CUDA_LT") == "1" else "cublaslt"
