"""Medical Segmentation Decathlon and nnU-Net v2 raw datasets, read from their ``dataset.json``.

* **MSD**: ``training: [{"image": ..., "label": ...}]`` (an image is one 3-D/4-D file or a list of files),
  optional ``validation`` (MONAI data lists), ``test: [path | {"image": ...}]``, ``labels: {"0": "background",
  ...}``, ``modality: {"0": "CT"}``.
* **nnU-Net v2**: ``channel_names: {"0": "T1"}``, ``labels: {"background": 0, ...}`` (a list value is a
  region, e.g. ``"whole tumor": [1, 2, 3]``), ``file_ending``, ``numTraining``; cases are found on disk as
  ``imagesTr/CASE_0000{file_ending}`` ... and ``labelsTr/CASE{file_ending}``; ``imagesTs`` for test cases.

Images and labels may be NIfTI, NRRD or MetaImage files (``file_ending`` ``.nii.gz``, ``.nrrd``, ``.mha``, ...);
an MSD image may also be a folder holding one DICOM series (:mod:`sparseseg.data.io`).

Relative paths resolve against the folder of ``dataset.json``. Problems raise
:class:`~sparseseg.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseseg.data.formats import FILE_ENDINGS, case_name, file_format
from sparseseg.errors import InputError

# MSD Task01 (BrainTumour) labels: 1 = edema, 2 = non-enhancing tumour, 3 = enhancing tumour.
BRATS_REGIONS: dict[str, list[int]] = {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    """One case: its name, one image file per channel (or one 4-D file), and its label file if any."""

    name: str
    images: list[Path]
    label: Path | None = None


@dataclass
class Dataset:
    """A parsed ``dataset.json``. ``labels`` maps label value -> name; ``regions`` (sigmoid outputs) maps
    region name -> label values, and is empty for plain softmax classes."""

    root: Path
    json_path: Path
    format: str
    name: str
    channels: list[str]
    labels: dict[int, str]
    file_ending: str
    training: list[Case]
    validation: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    regions: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def modality(self) -> str:
        """``"CT"`` when every channel is CT, else ``"MRI"`` (drives the default intensity preset)."""
        return "CT" if self.channels and all(c.strip().upper() == "CT" for c in self.channels) else "MRI"

    def default_regions(self) -> dict[str, list[int]]:
        """Regions declared by the dataset (nnU-Net), TC/WT/ET for MSD Task01 label names, else none."""
        if self.regions:
            return dict(self.regions)
        names = {v: n.lower() for v, n in self.labels.items()}
        if set(names) == {0, 1, 2, 3} and "edema" in names[1] and "enhancing" in names[3]:
            return dict(BRATS_REGIONS)
        return {}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError("dataset.json not found", path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"not a valid JSON file ({type(err).__name__}: {err})", path) from err
    if not isinstance(data, dict):
        raise InputError("dataset.json must hold a JSON object", path)
    return data


def _channel_list(mapping: Any, key: str, path: Path) -> list[str]:
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"'{key}' must be a non-empty object like {{\"0\": \"CT\"}}", path)
    try:
        items = sorted((int(k), str(v)) for k, v in mapping.items())
    except ValueError as err:
        raise InputError(f"'{key}' keys must be channel indices 0, 1, ...", path) from err
    if [i for i, _ in items] != list(range(len(items))):
        raise InputError(f"'{key}' keys must be consecutive channel indices from 0", path)
    return [n for _, n in items]


def _check_consecutive(labels: dict[int, str], path: Path) -> None:
    if sorted(labels) != list(range(len(labels))):
        raise InputError(f"label values must be consecutive from 0 (background), got {sorted(labels)}", path)


def _resolve(root: Path, entry: Any, path: Path) -> Path:
    if not isinstance(entry, str) or not entry:
        raise InputError(f"expected a file path, got {entry!r}", path)
    p = Path(entry)
    return p if p.is_absolute() else (root / p).resolve()


def _msd_case(root: Path, entry: Any, path: Path, need_label: bool) -> Case:
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise InputError(f"each case needs an 'image' entry, got {entry!r}", path)
    raw = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    images = [_resolve(root, e, path) for e in raw]
    label = _resolve(root, entry["label"], path) if entry.get("label") is not None else None
    if need_label and label is None:
        raise InputError(f"training case {raw[0]} has no 'label'", path)
    name = case_name(images[0])
    return Case(name=name, images=images, label=label)


def _load_msd(root: Path, data: dict[str, Any], path: Path) -> Dataset:
    channels = _channel_list(data.get("modality", {"0": "unknown"}), "modality", path)
    try:
        labels = {int(k): str(v) for k, v in data.get("labels", {}).items()}
    except (ValueError, AttributeError) as err:
        raise InputError("'labels' must map label values to names, e.g. {\"0\": \"background\"}", path) from err
    if not labels:
        raise InputError("'labels' is missing or empty", path)
    _check_consecutive(labels, path)
    training = [_msd_case(root, e, path, need_label=True) for e in data.get("training") or []]
    validation = [_msd_case(root, e, path, need_label=True) for e in data.get("validation") or []]
    test = [_msd_case(root, e, path, need_label=False) for e in data.get("test") or []]
    return Dataset(root=root, json_path=path, format="msd", name=str(data.get("name", root.name)),
                   channels=channels, labels=labels, file_ending=".nii.gz",
                   training=training, validation=validation, test=test)


def _nnunet_cases(folder: Path, ending: str, num_channels: int, labels_folder: Path | None, path: Path) -> list[Case]:
    if not folder.is_dir():
        return []
    by_case: dict[str, dict[int, Path]] = {}
    for f in sorted(folder.iterdir()):
        if not f.name.endswith(ending):
            continue
        m = _CHANNEL_SUFFIX.match(f.name[: -len(ending)])
        if m is None:
            raise InputError(f"image file name must end with a 4-digit channel index, e.g. _0000{ending}", f)
        by_case.setdefault(m["case"], {})[int(m["channel"])] = f
    cases = []
    for name, files in by_case.items():
        missing = sorted(set(range(num_channels)) - set(files))
        if missing:
            raise InputError(f"case {name!r} lacks channel file(s) {missing} ({name}_{missing[0]:04d}{ending})", folder)
        extra = sorted(set(files) - set(range(num_channels)))
        if extra:
            raise InputError(f"case {name!r} has channel file(s) {extra} beyond the {num_channels} declared", folder)
        label = None if labels_folder is None else labels_folder / f"{name}{ending}"
        cases.append(Case(name=name, images=[files[c] for c in range(num_channels)], label=label))
    return cases


def _load_nnunet(root: Path, data: dict[str, Any], path: Path) -> Dataset:
    channels = _channel_list(data["channel_names"], "channel_names", path)
    ending = str(data.get("file_ending", ".nii.gz"))
    if file_format(f"x{ending}") is None:
        raise InputError(f"file_ending {ending!r} is not an image format sparseseg reads ({', '.join(FILE_ENDINGS)})",
                         path)
    labels: dict[int, str] = {}
    regions: dict[str, list[int]] = {}
    raw_labels = data.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise InputError("'labels' is missing or empty", path)
    for name, value in raw_labels.items():
        if isinstance(value, list):
            regions[str(name)] = sorted(int(v) for v in value)
            for v in value:
                labels.setdefault(int(v), str(name))
        elif isinstance(value, int) and not isinstance(value, bool):
            labels[value] = str(name)
        else:
            raise InputError(f"label {name!r} must be an integer or a list of integers, got {value!r}", path)
    labels.setdefault(0, "background")
    _check_consecutive(labels, path)
    if regions:  # a plain entry next to regions (e.g. "background": 0) is not an output
        order = data.get("regions_class_order")
        if order is not None and len(order) != len(regions):
            raise InputError("'regions_class_order' needs one label value per region", path)
    training = _nnunet_cases(root / "imagesTr", ending, len(channels), root / "labelsTr", path)
    test = _nnunet_cases(root / "imagesTs", ending, len(channels), None, path)
    expected = data.get("numTraining")
    if expected is not None and int(expected) != len(training):
        raise InputError(f"numTraining is {expected} but imagesTr holds {len(training)} case(s)", path)
    return Dataset(root=root, json_path=path, format="nnunet", name=str(data.get("name", root.name)),
                   channels=channels, labels=labels, file_ending=ending, training=training, test=test,
                   regions=regions)


def load_dataset(path: str | Path, check_files: bool = True, require_training: bool = True) -> Dataset:
    """Parse a ``dataset.json`` (or the folder holding it) and validate it.

    Checks: a non-empty training list (when ``require_training``), no case listed twice, every listed file present
    (when ``check_files``).
    File contents (shapes, values) are checked when the cases are loaded (:mod:`sparseseg.data.io`).

    Examples:
        >>> ds = load_dataset("Task09_Spleen/dataset.json")  # doctest: +SKIP
        >>> ds.modality, ds.labels, len(ds.training)  # doctest: +SKIP
        ('CT', {0: 'background', 1: 'spleen'}, 41)
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "dataset.json"
    path = path.resolve()
    data = _read_json(path)
    root = path.parent
    ds = _load_nnunet(root, data, path) if "channel_names" in data else _load_msd(root, data, path)
    if require_training and not ds.training:
        raise InputError("the training list is empty", path)
    _check_duplicates(ds, path)
    if check_files:
        for case in ds.training + ds.validation + ds.test:
            for f in case.images + ([case.label] if case.label is not None else []):
                if not (f.is_file() or (f.is_dir() and f in case.images)):  # an image may be a DICOM series folder
                    raise InputError(f"file of case {case.name!r} listed in {path.name} not found", f)
    return ds


def _check_duplicates(ds: Dataset, path: Path) -> None:
    seen: dict[Path, str] = {}
    for split, cases in (("training", ds.training), ("validation", ds.validation), ("test", ds.test)):
        for case in cases:
            key = case.images[0]
            if key in seen:
                raise InputError(f"case {case.name!r} is listed twice ({seen[key]} and {split}): {key}", path)
            seen[key] = split


def split_cases(ds: Dataset, fold: int = 0, num_folds: int = 5, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Training and validation cases: the dataset's own ``validation`` list if it has one, else fold ``fold`` of a
    seeded ``num_folds``-fold split of the training list (fewer folds when there are fewer cases; with a single
    case there is no validation)."""
    if ds.validation:
        return list(ds.training), list(ds.validation)
    cases = list(ds.training)
    folds = min(num_folds, len(cases))
    if folds < 2:
        return cases, []
    if not 0 <= fold < folds:
        raise InputError(f"fold {fold} out of range: {len(cases)} case(s) give {folds} folds (0..{folds - 1})",
                         ds.json_path)
    order = sorted(range(len(cases)), key=lambda i: cases[i].name)
    random.Random(seed).shuffle(order)
    val_idx = set(order[fold::folds])
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    return train, val
