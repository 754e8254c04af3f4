"""One registry of model names: ``create_model(name, preset=None, **overrides)`` and ``list_models()``.

Each model file registers a constructor (a class or a factory) with :func:`register_model`, together with the
keyword arguments each paper preset implies for it. The shared geometry of the presets lives here, so every
model of a preset sees the same ROI, channels and classes:

* ``btcv``: 96^3 CT crops, 1 channel, 14 classes (softmax), the paper's BTCV setting;
* ``brats``: 128^3 MRI crops, 4 channels, 3 sigmoid regions (TC, WT, ET), the paper's BraTS setting.

Keyword overrides always win over the preset. The name and the final arguments are attached to the model
(``model.model_name``, ``model.model_args``) so that checkpoints can rebuild it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

PRESET_GEOMETRY: dict[str, dict[str, Any]] = {
    "btcv": {"img_size": 96, "in_channels": 1, "out_channels": 14},
    "brats": {"img_size": 128, "in_channels": 4, "out_channels": 3},
}

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {}


def register_model(name: str, presets: dict[str, dict[str, Any]] | None = None):
    """Decorator registering ``fn`` under ``name``; ``presets`` maps a preset name to its extra arguments."""

    def decorator(fn: Callable[..., nn.Module]):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        extra = presets or {}
        _PRESETS[name] = {p: {**geometry, **extra.get(p, {})} for p, geometry in PRESET_GEOMETRY.items()}
        return fn

    return decorator


def _ensure_loaded() -> None:
    # Importing the model files runs their @register_model decorators.
    import sparseseg.models  # noqa: F401


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)


def list_presets(name: str | None = None) -> list[str]:
    _ensure_loaded()
    if name is None:
        return sorted(PRESET_GEOMETRY)
    _check_name(name)
    return sorted(_PRESETS[name])


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(_MODELS))}")


def model_arguments(name: str) -> list[str]:
    """The keyword arguments the constructor of ``name`` accepts."""
    _ensure_loaded()
    _check_name(name)
    params = inspect.signature(_MODELS[name]).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def resolve_model_args(name: str, preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The arguments ``create_model`` would pass to the constructor (preset filled in, overrides applied)."""
    _ensure_loaded()
    _check_name(name)
    args: dict[str, Any] = {}
    if preset is not None:
        if preset not in _PRESETS[name]:
            raise ValueError(f"unknown preset {preset!r} for {name!r}; valid presets: {', '.join(_PRESETS[name])}")
        args.update(_PRESETS[name][preset])
    valid = model_arguments(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for model {name!r}; valid arguments: {', '.join(valid)}")
    args.update(overrides)
    return args


def create_model(name: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Examples:
        >>> model = create_model("unetr", preset="btcv", hidden_size=64, num_layers=2)  # doctest: +SKIP
    """
    args = resolve_model_args(name, preset, **overrides)
    model = _MODELS[name](**args)
    model.model_name = name
    model.model_args = dict(args)
    return model
