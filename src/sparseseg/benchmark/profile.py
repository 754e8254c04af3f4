"""Where the time of one forward pass goes: ``torch.profiler`` with one labelled range per part of the model.

The parts are found by module name, so any model built like the UNETR family is covered:

* ``patch_embed``: the patch embedding convolution;
* ``encoder_blocks``: the ViT's transformer blocks (``...vit.blocks.N``);
* ``scorers``: the token score networks of the pruning stages (``...scorers.N``);
* ``completion``: token completion (MTA / MIM), its own scatter of the groups included;
* ``decoder``: the convolutional decoder, sparse decoding (``sparse_decoding``: its coarse head, block selection
  and refined blocks) included;
* ``gather_scatter``: token selection and movement outside those modules (``gather``, ``scatter``, ``sort``,
  ``argsort``, ``topk``, ``index_select``, ``cat`` of the kept tokens: self CPU time of those operators);
* ``other``: the rest of the measured wall time (embedding additions, final LayerNorm, reshapes, Python).

Times are seconds of one profiled inference pass (profiling adds a little overhead): CPU time of each range on
the CPU; on CUDA the GPU time of the kernels launched inside it (``device_time_total``), since the CPU only
queues them there.
"""

from __future__ import annotations

import re
import time
from contextlib import ExitStack

import torch
import torch.nn as nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

PARTS = ("patch_embed", "encoder_blocks", "scorers", "completion", "decoder")
TOKEN_OPS = {"aten::gather", "aten::scatter", "aten::scatter_", "aten::sort", "aten::argsort", "aten::topk",
             "aten::index_select", "aten::cat"}
_PATTERNS = [
    ("patch_embed", re.compile(r"(^|\.)patch_embed$")),
    ("encoder_blocks", re.compile(r"(^|\.)vit\.blocks\.\d+$")),
    ("scorers", re.compile(r"(^|\.)scorers\.\d+$")),
    ("completion", re.compile(r"^completion$")),
    ("decoder", re.compile(r"^(decoder|sparse_decoding)$")),
]
_LABEL = "sparseseg::"


def _part(name: str) -> str | None:
    for part, pattern in _PATTERNS:
        if pattern.search(name):
            return part
    return None


def _label_modules(model: nn.Module, stack: ExitStack) -> list:
    """Forward hooks that open a ``record_function`` range named after the part when a labelled module runs."""
    handles, open_ranges = [], []

    for name, module in model.named_modules():
        part = _part(name)
        if part is None:
            continue

        def pre(mod, args, part=part):
            rf = record_function(_LABEL + part)
            rf.__enter__()
            open_ranges.append(rf)

        def post(mod, args, out):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    stack.callback(lambda: [h.remove() for h in handles])
    return handles


def _inside_label(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_LABEL):
            return True
        parent = parent.cpu_parent
    return False


def profile_breakdown(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds per part (see the module docstring) of one ``model(x)`` under ``torch.inference_mode()``, plus
    ``total`` (wall time of the profiled pass). Run a warm-up pass before calling this."""
    with ExitStack() as stack:
        _label_modules(model, stack)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
        with torch.inference_mode(), profile(activities=activities) as prof:
            start = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            total = time.perf_counter() - start
    out = {part: 0.0 for part in PARTS}
    out["gather_scatter"] = 0.0
    for event in prof.events():
        if event.device_type != DeviceType.CPU:  # a range's GPU-side copy: its kernels are counted below
            continue
        if event.name.startswith(_LABEL) and not _inside_label(event):
            total_us = event.device_time_total if x.is_cuda else event.cpu_time_total
            out[event.name[len(_LABEL):]] += total_us / 1e6
        elif event.name in TOKEN_OPS and not _inside_label(event):
            out["gather_scatter"] += (event.self_device_time_total if x.is_cuda else event.self_cpu_time_total) / 1e6
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out
