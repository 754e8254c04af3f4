"""From a :class:`~sparseseg.config.TrainConfig` and a dataset to the preprocessing config and the model.

* intensity preset: ``config.intensity`` if given, else ``ct`` for CT datasets and ``mri`` otherwise;
* outputs: softmax classes, or sigmoid regions when ``label_mode`` is ``regions``, or ``auto`` with the
  ``brats`` preset or a dataset that declares regions (nnU-Net) / has the MSD Task01 labels (TC/WT/ET);
* ROI: ``config.roi_size``, else the model's ``img_size`` (preset or ``--model-arg``), else 96^3;
* the model gets ``in_channels``, ``out_channels``, ``img_size`` and ``sigmoid`` (sigmoid regions or softmax
  classes) from the data, and ``prune_ratio`` from the config, whenever its constructor takes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from sparseseg.config import TrainConfig
from sparseseg.data.datasets import BRATS_REGIONS, Dataset
from sparseseg.data.transforms import DataConfig
from sparseseg.errors import InputError
from sparseseg.models.common.registry import create_model, list_models, model_arguments, resolve_model_args


def _as_roi(size: Any) -> list[int]:
    if isinstance(size, int):
        return [size] * 3
    if isinstance(size, Sequence) and len(size) == 3:
        return [int(s) for s in size]
    raise InputError(f"img_size/roi_size must be an int or 3 ints, got {size!r}")


def _check_model(config: TrainConfig) -> dict[str, Any]:
    if config.model not in list_models():
        raise InputError(f"unknown model {config.model!r}; valid models: {', '.join(list_models())}")
    try:
        return resolve_model_args(config.model, config.preset, **config.model_args)
    except ValueError as err:
        raise InputError(str(err)) from err


def _regions(config: TrainConfig, ds: Dataset) -> dict[str, list[int]]:
    if config.label_mode == "classes":
        return {}
    regions = ds.default_regions()
    if not regions and (config.label_mode == "regions" or config.preset == "brats"):
        if sorted(ds.labels) != [0, 1, 2, 3]:
            raise InputError(f"BraTS regions need labels 0..3 (MSD Task01), the dataset has {sorted(ds.labels)}",
                             ds.json_path)
        regions = dict(BRATS_REGIONS)
    return regions


def build_data_config(config: TrainConfig, ds: Dataset) -> DataConfig:
    """The preprocessing of this run (stored in every checkpoint)."""
    args = _check_model(config)
    regions = _regions(config, ds)
    roi = config.roi_size or args.get("img_size") or 96
    return DataConfig(
        in_channels=ds.num_channels,
        label_values=sorted(ds.labels),
        class_names=list(regions) if regions else [ds.labels[v] for v in sorted(ds.labels)],
        regions=list(regions.values()) or None,
        roi_size=_as_roi(roi),
        intensity=config.intensity or ("ct" if ds.modality == "CT" else "mri"),
        ct_window=[float(v) for v in config.ct_window],
        target_spacing=None if config.target_spacing is None else [float(v) for v in config.target_spacing],
        orientation=config.orientation,
        crop_foreground=config.crop_foreground,
    )


def build_model(config: TrainConfig, data_cfg: DataConfig) -> nn.Module:
    """``create_model`` with the data geometry filled in; conflicting explicit arguments raise InputError."""
    args = _check_model(config)
    valid = model_arguments(config.model)
    roi = data_cfg.roi_size
    geometry = {"in_channels": data_cfg.in_channels, "out_channels": data_cfg.out_channels,
                "img_size": roi[0] if len(set(roi)) == 1 and not isinstance(args.get("img_size"), Sequence)
                else tuple(roi), "sigmoid": data_cfg.sigmoid}
    for key, value in geometry.items():
        if key not in valid:
            continue
        given = config.model_args.get(key)
        same = _as_roi(given) == _as_roi(value) if key == "img_size" and given is not None else given == value
        if given is not None and not same:
            raise InputError(f"model argument {key}={given!r} conflicts with the data ({key}={value!r})")
        args[key] = value
    if config.prune_ratio is not None:
        if "prune_ratio" not in valid:
            raise InputError(f"model {config.model!r} has no prune_ratio argument")
        args["prune_ratio"] = config.prune_ratio
    try:
        return create_model(config.model, **args)
    except (TypeError, ValueError) as err:
        raise InputError(f"cannot build model {config.model!r}: {err}") from err

