"""Image formats by name: which files and folders are images, their case names, and the files predictions go to.

=========  =======================================  ===========================  ======================
format     read from                                read by                      predictions written as
=========  =======================================  ===========================  ======================
nifti      ``.nii.gz``, ``.nii``                    nibabel                      ``CASE.nii.gz``
nrrd       ``.nrrd``, ``.seg.nrrd``, ``.nhdr``      SimpleITK (``NrrdImageIO``)  ``CASE.seg.nrrd``
mha        ``.mha``, ``.mhd`` (MetaImage)           SimpleITK (``MetaImageIO``)  ``CASE.mha``
dicom      a folder holding one DICOM image series  SimpleITK (GDCM)             (input only)
dicom-seg  (output only)                            highdicom                    ``CASE.dcm``
=========  =======================================  ===========================  ======================

Predictions keep the input's format by default (a DICOM series gives NIfTI, see :data:`DEFAULT_OUTPUT`). Nothing
here reads pixels: only names, and the 4-byte ``DICM`` marker of files that may be DICOM.
"""

from __future__ import annotations

from pathlib import Path

from sparseseg.errors import InputError

# Longest ending first, so "x.seg.nrrd" is case "x" and not "x.seg".
FILE_ENDINGS: dict[str, str] = {
    ".nii.gz": "nifti", ".nii": "nifti",
    ".seg.nrrd": "nrrd", ".nrrd": "nrrd", ".nhdr": "nrrd",
    ".mha": "mha", ".mhd": "mha",
}
FORMAT_NAMES = {"nifti": "NIfTI", "nrrd": "NRRD", "mha": "MetaImage", "dicom": "DICOM", "dicom-seg": "DICOM SEG"}
OUTPUT_FORMATS = ("nifti", "nrrd", "mha", "dicom-seg")
OUTPUT_ENDINGS = {"nifti": ".nii.gz", "nrrd": ".seg.nrrd", "mha": ".mha", "dicom-seg": ".dcm"}
# Probabilities ([X, Y, Z, K] float32) of a DICOM SEG prediction go to NIfTI: a SEG holds label masks.
PROBABILITY_ENDINGS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".nii.gz"}
# A DICOM series gives NIfTI by default: it needs no extra package, every research tool and `sparseseg evaluate`
# read it, and a DICOM SEG (``--output-format dicom-seg``) is the opt-in for PACS viewers.
DEFAULT_OUTPUT = {"nifti": "nifti", "nrrd": "nrrd", "mha": "mha", "dicom": "nifti"}
DICOM_ENDING = ".dcm"


def file_format(path: str | Path) -> str | None:
    """The format of an image file from its name (``"nifti"``, ``"nrrd"``, ``"mha"``), None for other files."""
    name = Path(path).name.lower()
    return next((fmt for ending, fmt in FILE_ENDINGS.items() if name.endswith(ending)), None)


def is_image_file(path: str | Path) -> bool:
    return file_format(path) is not None


def case_name(path: str | Path) -> str:
    """``case_01.nii.gz`` / ``case_01.seg.nrrd`` / ``case_01.mha`` -> ``case_01``; a DICOM folder is its name."""
    name = Path(path).name
    ending = next((e for e in FILE_ENDINGS if name.lower().endswith(e)), "")
    return name[: len(name) - len(ending)]


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM part-10 marker ``DICM`` after its 128-byte preamble."""
    if path.name.lower().endswith(DICOM_ENDING):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def is_dicom_folder(path: str | Path) -> bool:
    """A folder holding DICOM files itself (not only in sub-folders): one DICOM series to read as a case."""
    path = Path(path)
    return path.is_dir() and any(f.is_file() and is_dicom_file(f) for f in path.iterdir())


def image_format(path: str | Path) -> str:
    """The format of an image file or DICOM series folder; anything else raises :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    if path.is_dir():
        if is_dicom_folder(path):
            return "dicom"
        raise InputError("folder holds no DICOM files (a DICOM series folder is read as one image)", path)
    fmt = file_format(path)
    if fmt is None:
        raise InputError(f"not an image file (expected {', '.join(FILE_ENDINGS)} or a DICOM series folder)", path)
    return fmt


def output_format_for(input_format: str, requested: str | None, source: str | Path | None = None) -> str:
    """The format a prediction is written in: ``requested``, or by default the input's (NIfTI for DICOM)."""
    if requested is None:
        return DEFAULT_OUTPUT[input_format]
    if requested not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {requested!r} (expected one of {', '.join(OUTPUT_FORMATS)})")
    if requested == "dicom-seg" and input_format != "dicom":
        raise InputError(f"a DICOM SEG references a DICOM series; this input is {FORMAT_NAMES[input_format]}",
                         source)
    return requested


def prediction_path(output_dir: str | Path, case: str, output_format: str, probabilities: bool = False) -> Path:
    """``OUTPUT/CASE.nii.gz`` (``.seg.nrrd``, ``.mha``, ``.dcm``), or ``OUTPUT/CASE_probabilities.<ending>``."""
    if probabilities:
        return Path(output_dir) / f"{case}_probabilities{PROBABILITY_ENDINGS[output_format]}"
    return Path(output_dir) / f"{case}{OUTPUT_ENDINGS[output_format]}"
