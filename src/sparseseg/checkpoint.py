"""Checkpoints that rebuild themselves, hold only plain Python values and tensors, and load with
``torch.load(..., weights_only=True)``.

Contents (keys): ``format`` (``"sparseseg-checkpoint"``), ``format_version``, ``model_name``, ``model_args``,
``state_dict``, ``data`` (the :class:`~sparseseg.data.transforms.DataConfig` as a dict: intensity preset, spacing,
ROI, labels/regions, class names), ``config`` (the training config), ``epoch`` (epochs completed),
``iteration``, ``best_metric``, ``best_epoch``, ``elapsed`` (training seconds), ``optimizer``, ``scheduler``,
``scaler``, ``rng`` (python / numpy / torch / cuda states; ``rng_per_rank`` of every process), ``sampler`` and
``history`` (per-epoch log rows); a checkpoint written when a signal stopped training inside an epoch adds
``partial_epoch`` (:mod:`sparseseg.training.run_state`).

:func:`save_checkpoint` writes through :func:`~sparseseg.data.io.atomic_write`: a full disk or a read-only folder
raises :class:`~sparseseg.errors.WriteError` naming the file and the size it needed; the previous file is kept.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from sparseseg.data.io import atomic_write
from sparseseg.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "sparseseg-checkpoint"
# 2: ``unetr``'s default decoder taps became the authors' (outputs of blocks 4/7/10 for v2, 5/9 for v1, spread over
# other depths); a format-1 ``unetr`` without ``skip_layers`` was built with 3/6/9 (v2) and 4/8 (v1).
# 3: ``unetr`` and ``stp_mta_unetr`` carry the sparse-decoding fill (``sparse_decoding.*``), trained with them; an older
# checkpoint of them loads without it and decodes densely only.
FORMAT_VERSION = 3
_V1_UNETR_TAPS = {"v2": [3, 6, 9], "v1": [4, 8]}  # format-1 defaults ("original" was 4/7/10 then too)
REQUIRED_KEYS = ("model_name", "model_args", "state_dict", "data")


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) random states, as plain values and tensors."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | Path, model: nn.Module, data: dict[str, Any], **extra: Any) -> Path:
    """Write a checkpoint atomically (temporary file, then rename). ``model`` must come from ``create_model``
    (it carries ``model_name`` and ``model_args``); ``extra`` adds training state (optimizer, epoch, ...)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model.model_name,
        "model_args": dict(model.model_args),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data": data,
        **extra,
    }
    return atomic_write(path, lambda tmp: _save(ckpt, tmp), size=_estimated_size(ckpt))


def _save(ckpt: dict[str, Any], tmp: Path) -> None:
    # Through a Python file object: a full disk then raises OSError(ENOSPC), which torch chains to its own
    # RuntimeError; given a file name, torch's C++ writer loses the cause ("unexpected pos ...").
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)


def _estimated_size(obj: Any) -> int:
    """About the bytes ``torch.save(obj)`` writes: every tensor storage once, plus an archive record per storage
    and the pickled rest (small beside the weights of any real model)."""
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            stack += x.values()
        elif isinstance(x, (list, tuple)):
            stack += x
    return sum(storages.values()) + 192 * len(storages) + 4096


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; files that are not sparseseg checkpoints raise InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", path)
    if path.stat().st_size == 0:
        raise InputError("not a sparseseg checkpoint (empty file)", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if code:  # a pickle that would call or build arbitrary Python objects: refused, nothing ran
            raise InputError(f"not a sparseseg checkpoint (holds Python code or objects, {code[1]!r}, that "
                             "weights-only loading refuses to run)", path) from err
        raise InputError(f"not a sparseseg checkpoint ({_load_failure(err)})", path) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError("not a sparseseg checkpoint (no sparseseg format marker)", path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise InputError(f"incomplete sparseseg checkpoint (missing {', '.join(missing)})", path)
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"checkpoint format version {ckpt['format_version']} is newer than this sparseseg", path)
    _upgrade_model_args(ckpt)
    return ckpt


def _load_failure(err: Exception) -> str:
    """The gist of torch.load's error, without its paragraphs of advice."""
    text = str(err)
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if unpickler:  # not a pickle of tensors at all (a text file, another format)
        return f"cannot be unpickled: {unpickler[1].strip()}"
    gist = (text.split(". ")[0].splitlines() or [type(err).__name__])[0][:200]
    if "central directory" in text or isinstance(err, EOFError):
        return f"cut short or corrupt: {gist}"
    return f"cannot be loaded: {gist}"


def _upgrade_model_args(ckpt: dict[str, Any]) -> None:
    """Spell out, in memory, what a format-1 checkpoint left to defaults that have changed since (the file stays)."""
    args = ckpt["model_args"]
    if int(ckpt.get("format_version", 1)) >= 2 or ckpt["model_name"] != "unetr" or args.get("skip_layers"):
        return
    decoder = args.get("decoder") or ("original" if args.get("patch_size", 8) == 16 else "v2")
    if decoder in _V1_UNETR_TAPS:
        ckpt["model_args"] = {**args, "skip_layers": list(_V1_UNETR_TAPS[decoder])}


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path | None = None) -> nn.Module:
    """Rebuild the model of a loaded checkpoint (registered name + stored arguments) and load its weights."""
    from sparseseg.models.common.registry import create_model, list_models

    name = ckpt["model_name"]
    if name not in list_models():
        raise InputError(f"checkpoint model {name!r} is not registered in this sparseseg", path)
    model = create_model(name, **ckpt["model_args"])
    state = ckpt["state_dict"]
    try:
        if int(ckpt.get("format_version", 1)) < 3 and hasattr(model, "sparse_decoding"):
            _load_without_fill(model, state)
        else:
            model.load_state_dict(state)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__
        raise InputError(f"weights do not fit model {name!r} ({detail[:300]})", path) from err
    return model


def _load_without_fill(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A format-2 UNETR checkpoint has no sparse-decoding fill: load every other weight strictly and keep the model
    at dense decoding (its untrained fill cannot stand in for the full-resolution level)."""
    own = model.state_dict()
    fill = {k for k in own if k.startswith("sparse_decoding.")}
    missing = sorted(set(own) - set(state) - fill)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"Error(s) in loading state_dict:\n missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({**{k: own[k] for k in fill}, **state})
    model.sparse_decoding.fill_trained = False
    log.warning("checkpoint written before sparse decoding: it decodes densely (refine fraction 1) only")
