"""The grid of an input image: its voxel shape and where each voxel lies, in both conventions of the field.

* nibabel and MONAI use a 4 x 4 **RAS** affine (x to the Right, y Anterior, z Superior), voxel -> world mm.
* ITK, SimpleITK, NRRD, MetaImage and DICOM use **LPS** (x to the Left, y Posterior, z Superior) with an origin,
  a spacing and a direction matrix whose columns are the unit vectors of the voxel axes.

The two describe the same points: ``affine[:3, :3] = F @ direction @ diag(spacing)`` and ``affine[:3, 3] = F @
origin`` with ``F = diag(-1, -1, 1)``. A grid keeps the geometry as the file stated it (ITK's origin, spacing and
direction for SimpleITK formats, the affine for NIfTI), so a prediction written back in the input's format carries
the same numbers, bit for bit, oblique directions included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def ras_affine(origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """ITK geometry (LPS origin ``[3]``, spacing ``[3]``, direction ``[3, 3]``) -> RAS affine ``[4, 4]``."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(direction, dtype=np.float64) @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def itk_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS affine ``[4, 4]`` -> ITK geometry (LPS origin ``[3]``, spacing ``[3]``, direction ``[3, 3]``)."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))  # length of each voxel axis
    direction = LPS_TO_RAS @ affine[:3, :3] / spacing
    return LPS_TO_RAS @ affine[:3, 3], spacing, direction


@dataclass(frozen=True, eq=False)
class ImageGrid:
    """The voxel grid of an input image: shape ``[X, Y, Z]`` (the file's voxel order, ITK's i, j, k), both
    geometries, and where it came from (a file, or a DICOM series folder with its slice files in order)."""

    path: Path
    format: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    nifti_header: Any = None
    files: tuple[Path, ...] = field(default_factory=tuple)

    @classmethod
    def from_affine(cls, path: Path, fmt: str, shape: tuple[int, ...], affine: np.ndarray,
                    nifti_header: Any = None) -> ImageGrid:
        origin, spacing, direction = itk_geometry(affine)
        return cls(path, fmt, _shape3(shape), np.asarray(affine, dtype=np.float64), origin, spacing, direction,
                   nifti_header)

    @classmethod
    def from_itk(cls, path: Path, fmt: str, shape: tuple[int, ...], origin, spacing, direction,
                 files: tuple[Path, ...] = ()) -> ImageGrid:
        origin, spacing = np.asarray(origin, dtype=np.float64), np.asarray(spacing, dtype=np.float64)
        direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # row-major, as ITK lists it
        return cls(path, fmt, _shape3(shape), ras_affine(origin, spacing, direction), origin, spacing, direction,
                   None, tuple(files))


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(int(s) for s in shape[:3])  # type: ignore[return-value]
