"""The training configuration: one dataclass, loadable from YAML, overridable from the command line.

Precedence: dataclass defaults < recipe (``--recipe NAME`` or the key ``recipe``, :mod:`sparseseg.recipes`) <
``--config FILE`` (YAML mapping of field names) < command-line flags. ``model_args`` from the recipe, the file and
``--model-arg KEY=VALUE`` are merged per key in that order; values are parsed with ``yaml.safe_load`` (``96`` ->
int, ``[96, 96, 64]`` -> list, ``true`` -> bool, ``evit`` -> str).

Examples:
    >>> cfg = TrainConfig(dataset="Task09_Spleen/dataset.json", model="unetr", output="runs/spleen")
    >>> round(cfg.learning_rate(), 8)  # base_lr * batch_size / 256
    0.00013
    >>> cfg = TrainConfig.from_recipe("btcv", dataset="BTCV/dataset.json", model="stp_mta_unetr", output="runs/b")
    >>> cfg.num_samples, cfg.target_spacing, cfg.model_args
    (4, [1.5, 1.5, 2.0], {'drop_path_rate': 0.1})
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from sparseseg.errors import InputError
from sparseseg.recipes import recipe_values

PAPER_BASE_LR = 1.664e-2  # the paper's 1.3e-4 at batch 2, as base * batch / 256


@dataclass
class TrainConfig:
    """Every knob of ``sparseseg train``; the field names are the YAML keys and (with ``-``) the CLI flags."""

    dataset: str = ""  # dataset.json (MSD or nnU-Net v2) or its folder
    model: str = ""  # registered model name (sparseseg.list_models())
    output: str = ""  # run directory: config.json, log.csv, last.pt, best.pt
    recipe: str | None = field(default=None, init=False)  # recipe applied under the values (set by from_dict)
    preset: str | None = None  # model preset (btcv, brats): geometry + the model's preset extras
    model_args: dict[str, Any] = field(default_factory=dict)  # constructor overrides
    roi_size: list[int] | None = None  # training crop / sliding window; default: the model's img_size
    epochs: int = 100
    iters_per_epoch: int | None = None  # default: one pass over the training cases
    batch_size: int = 2  # volumes per step (per process); the learning rate scales with it
    num_samples: int = 1  # random crops per volume per step: batch_size * num_samples crops per step
    lr: float | None = None  # a plain learning rate; default base_lr * batch_size / 256
    base_lr: float = PAPER_BASE_LR
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    warmup_fraction: float = 0.05  # of all iterations (or of the time budget)
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # layer-wise lr decay of ViT encoders (1.0 = off)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    prune_ratio: float | None = None  # passed to the model as prune_ratio
    squared_pred: bool = False  # Dice loss: squared predictions and targets in the denominator (MONAI)
    smooth_nr: float = 1e-5  # Dice loss: added to the numerator
    smooth_dr: float = 1e-5  # Dice loss: added to the denominator
    fold: int = 0
    num_folds: int = 5
    val_every: int = 1  # epochs between validations
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    amp: bool = True  # mixed precision, used on CUDA only
    intensity: str | None = None  # ct, mri or none; default from the dataset modality (CT -> ct)
    ct_window: list[float] = field(default_factory=lambda: [-958.0, 326.0, -1.0, 1.0])
    target_spacing: list[float] | None = None  # mm; None keeps the native spacing
    orientation: str | None = None  # e.g. RAS; None keeps the file's voxel order
    crop_foreground: bool = False  # crop to the non-zero image region
    label_mode: str = "auto"  # classes (softmax), regions (sigmoid), auto: regions for brats/region datasets
    overlap: float = 0.5  # sliding-window overlap during validation
    sw_batch_size: int = 4
    time_budget: float | None = None  # seconds of steps + validations; training and the schedule end on it
    resume: bool = False  # continue from OUTPUT/last.pt
    overwrite: bool = False  # OUTPUT holds a run: move it to a dated sibling folder and start afresh
    num_workers: int = 0
    cache_rate: float = 1.0  # fraction of preprocessed cases kept in memory
    tensorboard: bool = True  # write TensorBoard events when tensorboard is installed

    # Fields a resumed run may change; any other difference from the checkpoint's config would silently change the
    # run (the recipe, the crops, the loss, the schedule...).
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        "dataset", "output", "epochs", "time_budget", "resume", "overwrite", "device", "val_every", "overlap",
        "sw_batch_size", "num_workers", "cache_rate", "tensorboard")

    def changed_settings(self, stored: dict[str, Any]) -> list[str]:
        """``"name: stored -> now"`` for every field outside :attr:`RESUMABLE_CHANGES` whose value differs from
        ``stored`` (a checkpoint's config; a field it lacks counts as its default)."""
        changed = []
        for f in dataclasses.fields(self):
            if f.name in self.RESUMABLE_CHANGES:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            before, now = _plain(stored.get(f.name, default)), _plain(getattr(self, f.name))
            if before != now:
                changed.append(f"{f.name}: {before!r} -> {now!r}")
        return changed

    def learning_rate(self) -> float:
        """``lr``, else ``base_lr * batch_size / 256``: scaled by the volumes per step, not by ``num_samples``
        (as the authors' trainer does)."""
        return float(self.lr) if self.lr is not None else self.base_lr * self.batch_size / 256

    def validate(self, source: str | Path | None = None) -> TrainConfig:
        """Raise :class:`InputError` (naming ``source`` when given) for a missing or out-of-range value."""
        for name in ("dataset", "model", "output"):
            if not getattr(self, name):
                raise InputError(f"'{name}' is required (--{name} or the config file)", source)
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.iters_per_epoch is None or self.iters_per_epoch >= 1, "iters_per_epoch must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.num_samples >= 1, "num_samples must be >= 1"),
            (self.smooth_nr >= 0 and self.smooth_dr >= 0, "smooth_nr and smooth_dr must be >= 0"),
            (self.val_every >= 1, "val_every must be >= 1"),
            (self.num_folds >= 1 and self.fold >= 0, "fold must be >= 0 and num_folds >= 1"),
            (self.prune_ratio is None or 0.0 <= self.prune_ratio < 1.0, "prune_ratio must be in [0, 1)"),
            (0.0 <= self.overlap < 1.0, "overlap must be in [0, 1)"),
            (self.intensity in (None, "ct", "mri", "none"), "intensity must be ct, mri or none"),
            (self.label_mode in ("auto", "classes", "regions"), "label_mode must be auto, classes or regions"),
            (self.roi_size is None or (len(self.roi_size) == 3 and min(self.roi_size) >= 1),
             "roi_size must be 3 positive integers"),
            (self.time_budget is None or self.time_budget > 0, "time_budget must be > 0 seconds"),
            (0.0 <= self.warmup_fraction < 1.0, "warmup_fraction must be in [0, 1)"),
            (self.learning_rate() > 0, "the learning rate must be > 0"),
            (not (self.resume and self.overwrite), "resume and overwrite exclude each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message, source)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
        """A config from field values; ``values["recipe"]`` names a recipe whose values lie under the given ones
        (``model_args`` merged per key). The only way to set ``recipe``, so that it is always applied."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(known))}", source)
        values = dict(values)
        if values.get("model_args") is not None and not isinstance(values["model_args"], dict):
            raise InputError("model_args must be a mapping", source)
        name = values.pop("recipe", None)
        if name is not None:
            try:
                recipe = recipe_values(str(name))
            except ValueError as err:
                raise InputError(str(err), source) from err
            values = {**recipe, **values, "model_args": {**recipe["model_args"], **(values.get("model_args") or {})}}
        if isinstance(values.get("roi_size"), int):
            values["roi_size"] = [values["roi_size"]] * 3
        if isinstance(values.get("target_spacing"), (int, float)):
            values["target_spacing"] = [float(values["target_spacing"])] * 3
        config = cls(**values)
        config.recipe = None if name is None else str(name)
        return config

    @classmethod
    def from_recipe(cls, name: str, **values: Any) -> TrainConfig:
        """Recipe ``name`` (:data:`sparseseg.recipes.RECIPES`) with ``values`` on top."""
        return cls.from_dict({**values, "recipe": name})


def _plain(value: Any) -> Any:
    """Tuples as lists (a checkpoint stores lists), recursively, so equal settings compare equal."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields."""
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise InputError(f"not a valid YAML file ({type(err).__name__})", path) from err
    if not isinstance(data, dict):
        raise InputError("the config file must hold a mapping of config keys", path)
    return data


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["hidden_size=192", "decoder=v1"]`` -> ``{"hidden_size": 192, "decoder": "v1"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise InputError(f"--model-arg {key}: cannot parse value {value!r}") from err
    return out


def build_config(overrides: dict[str, Any], config_file: str | Path | None = None,
                 model_arg_items: list[str] | None = None) -> TrainConfig:
    """Merge defaults, the recipe, the YAML file and command-line overrides (only the flags actually given)."""
    values = load_yaml_config(config_file) if config_file else {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    model_args = dict(values.get("model_args") or {})
    model_args.update(parse_model_args(model_arg_items))
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["model_args"] = model_args
    return TrainConfig.from_dict(values, source=config_file).validate(config_file)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device`` understands it."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return device
