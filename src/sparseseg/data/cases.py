"""The cases of a prediction's inputs: image files, DICOM series folders, and folders of them.

An input is an image file (:data:`sparseseg.data.formats.FILE_ENDINGS`), a folder holding one DICOM series (one
image, named after the folder), or a folder of image files and DICOM series sub-folders. nnU-Net channel names
group images into one case: ``CASE_0000.nii.gz, CASE_0001.nii.gz`` (or folders ``CASE_0000/``, ``CASE_0001/``
of DICOM series) are the channels of case ``CASE``; any other image is one case (a 4-D image holds all channels).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from sparseseg.data.formats import (
    FILE_ENDINGS,
    case_name,
    image_format,
    is_dicom_folder,
    is_image_file,
    output_format_for,
)
from sparseseg.data.io import read_header_shape
from sparseseg.errors import InputError

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_EXPECTED = f"{', '.join(FILE_ENDINGS)} or a DICOM series folder"


def _images_of(item: Path) -> list[Path]:
    """The images an input names: itself (a file or a DICOM series folder), or a folder's images and series."""
    if item.is_dir():
        if is_dicom_folder(item):
            return [item]
        found = sorted(f for f in item.iterdir() if (f.is_file() and is_image_file(f)) or is_dicom_folder(f))
        if not found:
            raise InputError(f"folder holds no images ({_EXPECTED})", item)
        return found
    if item.is_file():
        if not is_image_file(item):
            raise InputError(f"not an image file (expected {_EXPECTED})", item)
        return [item]
    raise InputError("input not found", item)


def collect_cases(inputs: str | Path | Sequence[str | Path], in_channels: int,
                  failures: list[InputError] | None = None) -> dict[str, list[Path]]:
    """Group the input images (files, DICOM series folders, folders of them) into cases ``{name: [channels]}``.

    The channel count of every case is checked against ``in_channels`` from the headers. With a ``failures``
    list, a case whose header is unreadable or wrong is appended there and left out instead of raising (problems
    of the inputs as a whole, such as a missing folder, still raise).
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    images = [image for item in items for image in _images_of(Path(item))]
    grouped: dict[str, dict[int, Path]] = {}
    for f in images:
        stem = case_name(f)
        m = _CHANNEL_SUFFIX.match(stem)
        name, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        if channel in grouped.setdefault(name, {}):
            raise InputError(f"case {name!r} appears twice (also {grouped[name][channel]})", f)
        grouped[name][channel] = f
    cases = {}
    for name, chans in list(grouped.items()):
        paths = [chans[c] for c in sorted(chans)]
        if len(paths) == 1 and 0 not in chans:  # e.g. scan_2019.nii.gz: a date, not a channel index
            name = case_name(paths[0])
        elif sorted(chans) != list(range(len(chans))):
            raise InputError(f"case {name!r}: channel files must be numbered _0000, _0001, ...", paths[0])
        try:
            _check_channels(name, paths, in_channels)
        except InputError as err:
            if failures is None:
                raise
            failures.append(err)
            continue
        cases[name] = paths
    return cases


def _check_channels(name: str, paths: list[Path], in_channels: int) -> None:
    shapes = [read_header_shape(p) for p in paths]
    count = sum(s[3] if len(s) == 4 else 1 for s in shapes)
    if count != in_channels:
        raise InputError(f"case {name!r} has {count} channel(s), the checkpoint expects {in_channels}", paths[0])


def check_output_format(cases: dict[str, list[Path]], output_format: str | None) -> None:
    """Refuse, before any work, an output format that some case cannot be written in (a DICOM SEG of a NIfTI
    input, an unknown name) or whose package is missing (highdicom for DICOM SEG)."""
    for paths in cases.values():
        output_format_for(image_format(paths[0]), output_format, paths[0])
    if output_format == "dicom-seg":
        from sparseseg.data.dicom_seg import check_dicom_seg_available

        check_dicom_seg_available()
