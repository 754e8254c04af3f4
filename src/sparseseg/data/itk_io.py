"""NRRD, MetaImage and DICOM series through SimpleITK, with the geometry exactly as the file states it.

Arrays come back in the file's voxel order ``[X, Y, Z]`` (ITK's i, j, k; SimpleITK's numpy view is ``[Z, Y, X]``),
with a trailing channel axis ``[X, Y, Z, C]`` for multi-component or 4-D images, like nibabel's NIfTI arrays. The
grid (:class:`~sparseseg.data.geometry.ImageGrid`) keeps ITK's LPS origin, spacing and direction as read. Every
problem raises :class:`~sparseseg.errors.InputError` naming the file or folder, in one line. Nothing here writes a
final file: :func:`itk_image` builds the image and ``sparseseg.data.io`` writes it atomically.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sparseseg.data.formats import FORMAT_NAMES
from sparseseg.data.geometry import ImageGrid
from sparseseg.errors import InputError

IMAGE_IO = {"nrrd": "NrrdImageIO", "mha": "MetaImageIO"}
IMAGE_POSITION = "0020|0032"  # DICOM Image Position (Patient): the LPS position of a slice's first voxel
# Slices further from the series' spacing than this share of it are a missing slice or uneven spacing.
SLICE_TOLERANCE = 0.01


@contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK prints warnings (e.g. "Non uniform sampling") to stderr; sparseseg checks and reports them itself."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def itk_message(err: BaseException) -> str:
    """The last informative line of an ITK exception (ITK's are many lines long, with paths and addresses)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")] or [str(err).strip()]
    line = re.sub(r"^\[\w+\]\s*", "", lines[-1])  # "[nrrd] _nrrdRead...: ..." -> "_nrrdRead...: ..."
    line = re.sub(r"^(?:sitk|itk)::ERROR:\s*|^ITK ERROR:\s*", "", line)
    return re.sub(r"\w+\(0x[0-9a-f]+\):\s*", "", line)  # "NrrdImageIO(0x5606...): " -> ""


def _array(image: sitk.Image) -> np.ndarray:
    """SimpleITK image -> numpy in ITK voxel order: ``[X, Y, Z]``, ``[X, Y, Z, C]`` (components or a 4th axis)."""
    data = sitk.GetArrayFromImage(image)  # [(T,) Z, Y, X(, C)]
    if image.GetNumberOfComponentsPerPixel() > 1:
        return np.transpose(data, (2, 1, 0, 3))  # [Z, Y, X, C] -> [X, Y, Z, C]
    return np.transpose(data, tuple(range(data.ndim - 1, -1, -1)))  # [(T,) Z, Y, X] -> [X, Y, Z(, T)]


def _shape(size: tuple[int, ...], components: int) -> tuple[int, ...]:
    return tuple(size) + ((components,) if components > 1 else ())


def _grid(path: Path, fmt: str, shape: tuple[int, ...], origin, spacing, direction,
          files: tuple[Path, ...] = ()) -> ImageGrid:
    """Check the header geometry of a 3-D or 4-D image and build its grid (the first three axes)."""
    if len(shape) not in (3, 4):
        raise InputError(f"expected a 3-D or 4-D volume, got {len(shape)}-D shape {tuple(shape)}", path)
    n = round(len(direction) ** 0.5)  # the image's axes: 3, or 4 for a 4-D image
    direction3 = np.asarray(direction, dtype=np.float64).reshape(n, n)[:3, :3]  # [N, N] -> [3, 3]
    spacing3 = np.asarray(spacing[:3], dtype=np.float64)
    if not np.isfinite(spacing3).all() or (spacing3 <= 0).any():
        raise InputError(f"invalid voxel spacing {tuple(float(s) for s in spacing3)} in the header (must be finite "
                         "and > 0)", path)
    if not np.isfinite(direction3).all() or abs(np.linalg.det(direction3)) < 1e-6:
        raise InputError(f"invalid axis directions {direction3.round(6).tolist()} in the header (must span 3-D "
                         "space)", path)
    return ImageGrid.from_itk(path, fmt, shape, origin[:3], spacing3, direction3.ravel(), files)


def _file_reader(path: Path, fmt: str) -> sitk.ImageFileReader:
    """A reader with the header read (the ImageIO is the format's own, whatever the file holds)."""
    if not path.is_file():
        raise InputError("file not found", path)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(IMAGE_IO[fmt])
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(f"cannot read {FORMAT_NAMES[fmt]} header ({itk_message(err)})", path) from err
    return reader


def _file_grid(reader: sitk.ImageFileReader, path: Path, fmt: str) -> ImageGrid:
    shape = _shape(reader.GetSize(), reader.GetNumberOfComponents())
    return _grid(path, fmt, shape, reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())


def read_itk_file(path: Path, fmt: str) -> tuple[np.ndarray, ImageGrid]:
    """Read a NRRD or MetaImage file: the array ``[X, Y, Z(, C)]`` and its grid."""
    reader = _file_reader(path, fmt)
    grid = _file_grid(reader, path, fmt)
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"cannot read {FORMAT_NAMES[fmt]} ({itk_message(err)})", path) from err
    return _array(image), grid


def read_itk_header(path: Path, fmt: str) -> tuple[tuple[int, ...], ImageGrid]:
    """The array shape ``[X, Y, Z(, C)]`` and grid of a NRRD or MetaImage file, from its header alone."""
    reader = _file_reader(path, fmt)
    return _shape(reader.GetSize(), reader.GetNumberOfComponents()), _file_grid(reader, path, fmt)


# -- DICOM series ------------------------------------------------------------------------------------------------


def dicom_series_files(folder: Path) -> list[Path]:
    """The slice files of the one DICOM series in ``folder``, in slice order (GDCM sorts them along the normal)."""
    try:
        with _quiet_itk():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]) if len(ids) == 1 else ()
    except RuntimeError as err:
        raise InputError(f"cannot read DICOM series ({itk_message(err)})", folder) from err
    if not ids:
        raise InputError("folder holds no readable DICOM image series", folder)
    if len(ids) > 1:
        raise InputError(f"folder holds {len(ids)} DICOM series ({', '.join(ids)}); give each series its own folder",
                         folder)
    return [Path(f) for f in files]


def read_dicom_header(folder: Path) -> tuple[int, ...]:
    """Shape ``[X, Y, Z(, C)]`` of a DICOM series from its file list and the header of its first file."""
    files = dicom_series_files(folder)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(files[0]))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(f"cannot read DICOM header ({itk_message(err)})", files[0]) from err
    size = reader.GetSize()  # [X, Y] or [X, Y, frames]; the series stacks its files along Z
    size = (size[0], size[1], (size[2] if len(size) > 2 else 1) * len(files))
    return _shape(size, reader.GetNumberOfComponents())


def read_dicom_series(folder: Path) -> tuple[np.ndarray, ImageGrid]:
    """Read the one DICOM series in ``folder`` (pixel values rescaled to their real units, e.g. HU), refusing two
    series, a missing slice, uneven slice spacing and slices shifted across their plane."""
    files = dicom_series_files(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"cannot read DICOM series ({itk_message(err)})", folder) from err
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if len(files) > 1:
        positions = [_position(reader, i, files[i]) for i in range(len(files))]
        check_slice_positions(np.asarray(positions), direction[:, 2], files, folder)
    shape = _shape(image.GetSize(), image.GetNumberOfComponentsPerPixel())
    grid = _grid(folder, "dicom", shape, image.GetOrigin(), image.GetSpacing(), image.GetDirection(), tuple(files))
    return _array(image), grid


def _position(reader: sitk.ImageSeriesReader, index: int, file: Path) -> list[float]:
    if not reader.HasMetaDataKey(index, IMAGE_POSITION):
        raise InputError("DICOM slice has no Image Position (Patient)", file)
    return [float(v) for v in reader.GetMetaData(index, IMAGE_POSITION).split("\\")]


def check_slice_positions(positions: np.ndarray, normal: np.ndarray, files: list[Path], folder: Path) -> None:
    """Slices ``positions`` ``[N, 3]`` (in slice order) must be evenly spaced along ``normal`` with no gap."""
    steps = np.diff(positions @ normal)  # [N, 3] -> [N - 1]
    tolerance = max(SLICE_TOLERANCE * float(np.median(steps)), 1e-4)

    def pair(i: int) -> str:
        return f"{files[i].name} and {files[i + 1].name}"

    if (steps < tolerance).any():
        i = int(np.argmax(steps < tolerance))
        raise InputError(f"two DICOM slices at the same position ({pair(i)}): one series per folder", folder)
    base = float(steps.min())
    multiples = np.rint(steps / base)
    if (np.abs(steps - multiples * base) <= tolerance).all() and multiples.max() > 1:  # whole slices left out
        i = int(np.argmax(multiples > 1))
        raise InputError(f"DICOM series misses {int(multiples[i]) - 1} slice(s) between {pair(i)} ({steps[i]:.4g} mm "
                         f"apart, slices elsewhere {base:.4g} mm)", folder)
    spacing = float(np.median(steps))
    if (np.abs(steps - spacing) > tolerance).any():
        i = int(np.argmax(np.abs(steps - spacing) > tolerance))
        raise InputError(f"DICOM series has uneven slice spacing: {steps[i]:.4g} mm between {pair(i)}, {spacing:.4g} "
                         "mm elsewhere", folder)
    shift = np.linalg.norm(np.diff(positions, axis=0) - steps[:, None] * normal, axis=1)  # [N - 1, 3] -> [N - 1]
    if shift.max() > tolerance:
        i = int(shift.argmax())
        raise InputError(f"DICOM slices shift {shift[i]:.4g} mm across their plane between {pair(i)} (a gantry "
                         "tilt?); resample the series first", folder)


# -- writing ----------------------------------------------------------------------------------------------------


def itk_image(array: np.ndarray, grid: ImageGrid, metadata: Mapping[str, str] | None = None) -> sitk.Image:
    """An image of ``array`` (``[X, Y, Z]`` or ``[X, Y, Z, C]`` components) on ``grid``'s exact ITK geometry."""
    array = np.asarray(array)
    if array.ndim == 4:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0, 3))), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))  # [X,Y,Z] -> [Z,Y,X]
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    image.SetSpacing(tuple(float(v) for v in grid.spacing))
    image.SetDirection(tuple(float(v) for v in np.asarray(grid.direction).ravel()))
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    return image


def write_itk(image: sitk.Image, path: Path, fmt: str) -> None:
    """Write ``image`` to ``path`` (compressed) with the format's own ImageIO."""
    writer = sitk.ImageFileWriter()
    writer.SetImageIO(IMAGE_IO[fmt])
    writer.SetFileName(str(path))
    writer.UseCompressionOn()
    writer.Execute(image)
