"""Images in and predictions out with the geometry kept, and atomic writes.

NIfTI is read by nibabel; NRRD (``.nrrd``, 3D Slicer ``.seg.nrrd`` label maps), MetaImage (``.mha``, ``.mhd``) and
DICOM series (a folder holding one series) by SimpleITK (:mod:`sparseseg.data.itk_io`). Images are returned
channel-first, ``[C, D, H, W]`` in the voxel order of the file (no reorientation here: the preprocessing does that
and undoes it), with their :class:`~sparseseg.data.geometry.ImageGrid`. A multi-channel case is either one 4-D
image ``[X, Y, Z, C]`` (MSD) or one 3-D image per channel (nnU-Net ``CASE_0000``, ``CASE_0001``, ...).
Predictions are written on the input's grid in NIfTI, NRRD, MetaImage or as a DICOM SEG
(:func:`write_prediction`). Every problem with a file raises :class:`~sparseseg.errors.InputError` naming it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from sparseseg.data.formats import case_name, file_format, image_format
from sparseseg.data.geometry import ImageGrid
from sparseseg.data.itk_io import read_dicom_header, read_dicom_series, read_itk_file, read_itk_header
from sparseseg.errors import DISK_FULL, InputError, WriteError

log = logging.getLogger(__name__)

SLICER_SEGMENTATION = ".seg.nrrd"


@dataclass
class Volume:
    """A channel-first array ``[C, D, H, W]`` on the grid of the (first) file or DICOM series it came from."""

    array: np.ndarray
    grid: ImageGrid

    @property
    def affine(self) -> np.ndarray:
        """The RAS voxel-to-world affine (nibabel / MONAI convention)."""
        return self.grid.affine

    @property
    def header(self) -> nib.Nifti1Header | None:
        """The NIfTI header of a NIfTI input (its qform/sform codes are kept on output), else None."""
        return self.grid.nifti_header

    @property
    def path(self) -> Path:
        return self.grid.path

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))  # type: ignore[return-value]


def strip_nifti_ending(name: str) -> str:
    """``"case_01.nii.gz"`` -> ``"case_01"`` (any image ending: :func:`sparseseg.data.formats.case_name`)."""
    return case_name(name)


def is_nifti(path: str | Path) -> bool:
    return file_format(path) == "nifti"


def _existing_nifti(path: str | Path) -> Path:
    """``path`` as a Path if it names an existing .nii / .nii.gz file, else :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    if not is_nifti(path):
        raise InputError("not a NIfTI file (expected .nii or .nii.gz)", path)
    return path


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ").strip()


def read_nifti(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a NIfTI file fully; missing, unreadable or corrupt files raise :class:`InputError`."""
    path = _existing_nifti(path)
    try:
        img = _load(path)
        data = np.asarray(img.dataobj)
    except InputError:
        raise
    except Exception as err:  # nibabel raises many types for truncated or corrupt files
        raise InputError(f"cannot read NIfTI ({_one_line(err)})", path) from err
    if data.ndim not in (3, 4):
        raise InputError(f"expected a 3-D or 4-D volume, got shape {data.shape}", path)
    return data, img


class _HeaderRepairs(logging.Filter):
    """Catches (and silences) nibabel's notes that it repaired a header, e.g. a zero pixdim read as 1 mm."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


def _load(path: Path) -> nib.Nifti1Image:
    """``nib.load`` plus the header checks; a header nibabel had to repair is refused, not guessed at."""
    nib_log = logging.getLogger("nibabel.global")
    repairs = _HeaderRepairs()
    nib_log.addFilter(repairs)
    try:
        img = nib.load(str(path))
    finally:
        nib_log.removeFilter(repairs)
    if any("pixdim" in m for m in repairs.messages):
        raise InputError("invalid voxel spacing (zero in the header's pixdim)", path)
    _check_geometry(img, path)
    return img


def _check_geometry(img: nib.Nifti1Image, path: Path) -> None:
    """Refuse a header whose dimensions or voxel spacing cannot describe a 3-D volume (before reading voxels)."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) not in (3, 4):
        raise InputError(f"expected a 3-D or 4-D volume, got {len(shape)}-D shape {shape}", path)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if not np.isfinite(zooms).all() or (zooms <= 0).any():
        raise InputError(f"invalid voxel spacing {tuple(float(z) for z in zooms)} in the header (must be finite "
                         "and > 0)", path)
    affine = np.asarray(img.affine, dtype=np.float64)
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(0)) if np.isfinite(affine).all() else np.full(3, np.nan)
    if not np.isfinite(sizes).all() or (sizes <= 1e-9).any():
        raise InputError(f"invalid voxel spacing {tuple(round(float(z), 6) for z in sizes)} in the affine (must be "
                         "finite and > 0)", path)


def _nifti_header(path: Path) -> nib.Nifti1Image:
    try:
        return _load(path)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"cannot read NIfTI header ({_one_line(err)})", path) from err


def read_header_shape(path: str | Path) -> tuple[int, ...]:
    """The array shape ``[X, Y, Z(, C)]`` from the header only (cheap), for up-front checks."""
    path = Path(path)
    fmt = image_format(path)
    if fmt == "nifti":
        return tuple(int(s) for s in _nifti_header(_existing_nifti(path)).shape)
    if fmt == "dicom":
        return read_dicom_header(path)
    return read_itk_header(path, fmt)[0]


def read_grid(path: str | Path) -> ImageGrid:
    """The grid of an image file (from its header) or DICOM series folder (the series is read and checked)."""
    path = Path(path)
    fmt = image_format(path)
    if fmt == "nifti":
        img = _nifti_header(_existing_nifti(path))
        return ImageGrid.from_affine(path, fmt, img.shape, img.affine, img.header)
    if fmt == "dicom":
        return read_dicom_series(path)[1]
    return read_itk_header(path, fmt)[1]


def read_image(path: str | Path) -> tuple[np.ndarray, ImageGrid]:
    """Read any supported image fully: the array as stored (``[X, Y, Z]`` or ``[X, Y, Z, C]``) and its grid."""
    path = Path(path)
    fmt = image_format(path)
    if fmt == "nifti":
        data, img = read_nifti(path)
        return data, ImageGrid.from_affine(path, fmt, data.shape, img.affine, img.header)
    if fmt == "dicom":
        return read_dicom_series(path)
    return read_itk_file(path, fmt)


# Integers above 2^24 are no longer exact in float32, and no scanner writes them: such a file is mis-typed or corrupt.
MAX_INTEGER_INTENSITY = 2**24


def _check_finite(data: np.ndarray, path: Path) -> None:
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(f"contains {bad} NaN/Inf voxel(s)", path)
    if np.issubdtype(data.dtype, np.integer) and data.size:
        peak = max(abs(int(data.min())), abs(int(data.max())))
        if peak > MAX_INTEGER_INTENSITY:
            raise InputError(f"integer intensities up to {peak} exceed 2^24 (not exact in float32; a mis-typed or "
                             "corrupt image?)", path)


def load_image(paths: Sequence[str | Path]) -> Volume:
    """Load one case: a single 3-D/4-D image or one 3-D image per channel. Returns ``[C, D, H, W]`` float32."""
    if not paths:
        raise InputError("a case has no image files")
    channels: list[np.ndarray] = []
    first: ImageGrid | None = None
    for p in paths:
        p = Path(p)
        data, grid = read_image(p)
        _check_finite(data, p)
        if data.ndim == 3:
            data = data[None]  # [X, Y, Z] -> [1, X, Y, Z]
        elif data.ndim == 4:
            data = np.moveaxis(data, -1, 0)  # [X, Y, Z, C] -> [C, X, Y, Z]
        else:
            raise InputError(f"expected a 3-D or 4-D volume, got shape {data.shape}", p)
        if first is None:
            first = grid
        elif data.shape[1:] != channels[0].shape[1:]:
            raise InputError(
                f"channel shape {data.shape[1:]} differs from {channels[0].shape[1:]} of {paths[0]}", p
            )
        elif not np.allclose(grid.affine, first.affine, atol=1e-3):
            log.warning("%s: affine differs from the first channel %s; using the first channel's", p, paths[0])
        channels.append(data.astype(np.float32, copy=False))
    array = channels[0] if len(channels) == 1 else np.concatenate(channels, axis=0)
    assert first is not None
    return Volume(array=array, grid=first)


def load_label(path: str | Path, spatial_shape: Sequence[int] | None = None,
               label_values: Iterable[int] | None = None, reference: ImageGrid | None = None) -> Volume:
    """Load a label map ``[1, D, H, W]`` int64, checking shape, integrality and the allowed values.

    With the image's ``reference`` grid, a 3D Slicer ``.seg.nrrd`` stored on a block of that grid (Slicer saves the
    extent of the segments) is placed into the whole grid.
    """
    path = Path(path)
    data, grid = read_image(path)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]  # [X, Y, Z, 1] -> [X, Y, Z]
    slicer = path.name.lower().endswith(SLICER_SEGMENTATION)
    if data.ndim == 4 and slicer:
        raise InputError(f"3D Slicer segmentation with {data.shape[-1]} layers (overlapping segments); a label map "
                         "needs one layer (in Slicer: export the segments to a label map)", path)
    if data.ndim != 3:
        raise InputError(f"a label map must be 3-D, got shape {data.shape}", path)
    if slicer and reference is not None and tuple(data.shape) != reference.shape:
        data, grid = _onto_grid(data, grid, reference)
    if spatial_shape is not None and tuple(data.shape) != tuple(spatial_shape):
        raise InputError(f"label shape {tuple(data.shape)} differs from image shape {tuple(spatial_shape)}", path)
    if np.issubdtype(data.dtype, np.floating):
        _check_finite(data, path)
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise InputError("label map holds non-integer values", path)
        data = rounded
    labels = data.astype(np.int64)
    if label_values is not None:
        allowed = np.asarray(sorted(set(label_values)))
        unexpected = np.setdiff1d(np.unique(labels), allowed)
        if unexpected.size:
            raise InputError(
                f"label value(s) {unexpected.tolist()} not in the dataset labels {allowed.tolist()}", path
            )
    return Volume(array=labels[None], grid=grid)


def _onto_grid(block: np.ndarray, grid: ImageGrid, reference: ImageGrid) -> tuple[np.ndarray, ImageGrid]:
    """``block`` ``[x, y, z]`` placed into zeros on ``reference`` ``[X, Y, Z]`` when its voxels are voxels of the
    reference (same axes and spacing, a whole-voxel offset, inside); else returned unchanged."""
    to_reference = np.linalg.inv(reference.affine) @ grid.affine  # block voxel -> reference voxel
    offset = to_reference[:3, 3]
    start = np.rint(offset).astype(int)
    end = start + np.asarray(block.shape)
    if (not np.allclose(to_reference[:3, :3], np.eye(3), atol=1e-4) or not np.allclose(offset, start, atol=1e-3)
            or (start < 0).any() or (end > np.asarray(reference.shape)).any()):
        return block, grid
    whole = np.zeros(reference.shape, dtype=block.dtype)
    whole[start[0]:end[0], start[1]:end[1], start[2]:end[2]] = block
    return whole, replace(reference, path=grid.path, format=grid.format, nifti_header=None, files=())


def atomic_write(path: str | Path, write, *, size: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, flush it to disk, then rename it into place.

    A process killed at any moment leaves either the previous ``path`` or the new one, never a partial file (at
    worst a hidden ``.NAME.<random>`` temporary, see :func:`remove_stale_temporaries`). A folder that cannot be
    created raises :class:`InputError` naming ``path``. A full disk, a read-only file system or a refused
    permission, while creating the temporary or writing it, raises :class:`~sparseseg.errors.WriteError` naming
    ``path`` (with the bytes it needed, ``size`` when the caller knows it, and the bytes free), after the
    temporary is removed: the previous ``path`` is intact. So does a write that leaves the disk without a free
    block: some writers ignore a full disk (ITK's NRRD and MetaImage writers leave an empty or cut file and raise
    nothing), so such a file is not trusted.
    """
    path = Path(path)
    previous = path.exists()
    suffix = "".join(path.suffixes) or ".tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:
        if err.errno in WRITE_FAULTS:
            raise _write_error(path, err.errno, size, previous) from err
        raise InputError(f"cannot write here ({_one_line(err)})", path) from err
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp creates 0600; a written file gets what open() would give it
    finally:
        os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if _no_free_block(path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
        os.replace(tmp, path)
    except BaseException as err:
        code = _write_fault(err, path.parent, size)
        try:
            Path(tmp).unlink(missing_ok=True)
        except OSError as unlink_err:
            log.warning("%s: could not remove the temporary (%s)", tmp, _one_line(unlink_err))
        if code is not None:
            raise _write_error(path, code, size, previous) from err
        raise
    return path


def _file_mode(path: Path) -> int:
    """Permission bits for ``path``: those of the file it replaces, else 0666 less the process umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


# Errors of the file system, not of the data: a full disk or quota, a file too large, a read-only mount, a refused
# permission, a failing device.
WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EIO})
# Writers in C++ that lose the errno of a full disk raise their own error instead (torch.save to a file name:
# "[enforce fail at inline_container.cc] . unexpected pos ..."; ITK: "Write: Error writing ..."): a RuntimeError
# while the disk has less than this left (or less than the file needed) is taken for a full disk.
NEARLY_FULL = 1 << 20


def _write_fault(err: BaseException, folder: Path, size: int | None) -> int | None:
    """The errno of the file-system fault behind ``err`` (its own, or one it was raised from), else None."""
    seen: list[BaseException] = []
    while err is not None and len(seen) < 16:
        seen.append(err)
        if isinstance(err, OSError) and err.errno in WRITE_FAULTS:
            return err.errno
        err = err.__cause__ or err.__context__
    if isinstance(seen[0], RuntimeError):  # what C++ writers raise
        free = _free_bytes(folder)  # the partial temporary still fills the disk here
        if free is not None and free < max(size or 0, NEARLY_FULL):
            return errno.ENOSPC
    return None


def _no_free_block(folder: Path) -> bool:
    """The file system of ``folder`` has no block left for this process (root may use the blocks reserved for it)."""
    if not hasattr(os, "statvfs"):  # Windows
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_error(path: Path, code: int, size: int | None, previous: bool) -> WriteError:
    disk_full = code in DISK_FULL
    return WriteError(path, code, os.strerror(code).lower(), needed=size if disk_full else None,
                      free=_free_bytes(path.parent) if disk_full else None, previous_kept=previous)


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> None:
    """Delete the temporaries that a killed :func:`atomic_write` of ``folder/NAME`` left behind."""
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*"):
            tmp.unlink(missing_ok=True)


def check_writable(folder: str | Path) -> None:
    """Raise :class:`InputError` unless ``folder`` (existing or not yet created) can receive files; leaves nothing
    behind. A probe file is used because permission bits say nothing when running as root."""
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise InputError(f"cannot create an output folder: {probe_dir} is a file", folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sparseseg-probe.", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise InputError(f"output folder is not writable ({_one_line(err)})", folder) from err


def save_nifti(array: np.ndarray, path: str | Path, affine: np.ndarray,
               header: nib.Nifti1Header | None = None, dtype: np.dtype | type | None = None) -> Path:
    """Write ``array`` (``[X, Y, Z]`` or ``[X, Y, Z, C]``) atomically with the given geometry.

    When ``header`` is given (the input's), its qform/sform codes and units are kept so viewers show the
    prediction exactly on top of the image.
    """
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(array, affine, header=hdr)
    img.set_data_dtype(array.dtype)
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
