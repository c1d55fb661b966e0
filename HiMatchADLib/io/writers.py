"""Writers: volumes and images in the input's exact geometry, written atomically and verified by reading back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import HiMatchADError
from ..core.geometry import DIRECTION_TOLERANCE, Geometry
from .formats import NIFTI_SUFFIXES
from .readers import quiet_itk, read_sitk


def to_sitk(array: np.ndarray, geometry: Geometry):
    """Wrap ``array`` (numpy shape ``geometry.shape``) into a SimpleITK image carrying ``geometry``."""
    import SimpleITK as sitk

    arr = np.asarray(array)
    if tuple(arr.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {arr.shape} does not match geometry {geometry.shape}")
    if geometry.is_2d:
        img = sitk.GetImageFromArray(arr[0])
        img.SetSpacing(geometry.spacing[:2])
        img.SetOrigin(geometry.origin[:2])
        img.SetDirection(tuple(geometry.direction[:2, :2].reshape(-1)))
    else:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(geometry.spacing)
        img.SetOrigin(geometry.origin)
        img.SetDirection(tuple(geometry.direction.reshape(-1)))
    return img


def _orthogonality_error(direction: np.ndarray) -> float:
    d = np.asarray(direction, dtype=float)
    return float(np.max(np.abs(d.T @ d - np.eye(d.shape[0]))))


def check_storable(geometry: Geometry, path: str | os.PathLike, source: Optional[str] = None) -> None:
    """Refuse a geometry that the format of ``path`` cannot store exactly (before any work is done).

    NIfTI stores the orientation as a rotation: a direction matrix that is not orthonormal within
    :data:`~HiMatchADLib.core.geometry.DIRECTION_TOLERANCE` (a sheared grid, or axes whose
    direction vectors are not of unit length) would be silently changed, and the output would no
    longer overlay its input. ``source``: the input's path, named in the message.
    """
    d = geometry.direction[:2, :2] if geometry.is_2d else geometry.direction
    if str(path).lower().endswith(NIFTI_SUFFIXES) and _orthogonality_error(d) > DIRECTION_TOLERANCE:
        norms = np.linalg.norm(d, axis=0)
        cols = d / norms
        angles = np.degrees(np.arccos(np.clip(np.abs(cols.T @ cols), 0, 1)))
        worst = float(np.min(angles[np.triu_indices(len(d), 1)]))
        whose = f"the axes of {source}" if source else "the image's axes"
        if np.max(np.abs(cols.T @ cols - np.eye(len(d)))) > DIRECTION_TOLERANCE:
            what = f"{whose} are not perpendicular (sheared grid, {worst:.2f} degrees between two axes)"
        else:
            length = float(norms[int(np.argmax(np.abs(norms - 1)))])
            what = f"the direction matrix of {source or 'the image'} is not orthonormal (an axis' direction vector has length {length:.6g}, not 1)"
        raise HiMatchADError(
            f"{what}; {Path(path).name} (NIfTI) cannot store such a geometry and the result would not overlay the input. "
            "Resample the input onto an orthogonal grid first (e.g. 3D Slicer's Resample Scalar/Vector/DWI Volume)"
        )


def _verify_written(tmp: Path, img: dict, voxels: np.ndarray, final: Path, lossy: bool) -> None:
    """Read a written file back and compare it with what was meant: ``img`` holds the written
    image's ``size``, ``components``, ``spacing``, ``origin`` and ``direction``, ``voxels`` its array
    (numpy order), which ITK's copy was made from (freed before the read-back)."""
    import SimpleITK as sitk

    try:
        back = read_sitk(tmp)
    except HiMatchADError as exc:
        raise HiMatchADError(f"writing {final} failed: the file read back is incomplete (disk full?): {exc}") from exc
    problem = None
    if back.GetSize() != img["size"] or back.GetNumberOfComponentsPerPixel() != img["components"]:
        problem = f"size {back.GetSize()} instead of {img['size']}"
    elif not np.allclose(back.GetSpacing(), img["spacing"], rtol=1e-5, atol=1e-6):
        problem = f"spacing {back.GetSpacing()} instead of {img['spacing']}"
    elif not np.allclose(back.GetOrigin(), img["origin"], rtol=1e-5, atol=1e-4):
        problem = f"origin {back.GetOrigin()} instead of {img['origin']}"
    elif not np.allclose(back.GetDirection(), img["direction"], rtol=0, atol=DIRECTION_TOLERANCE):
        problem = "a different direction matrix"
    elif not lossy:
        a, b = voxels, sitk.GetArrayViewFromImage(back)
        nan = a.dtype.kind == "f"
        step = max(1, (1 << 22) // max(1, a[0].size))  # by blocks: no full-size temporaries
        same = a.shape == b.shape and all(
            np.array_equal(a[i : i + step], b[i : i + step], equal_nan=nan) for i in range(0, a.shape[0], step)
        )
        if not same:
            problem = "different voxel values"
    if problem is not None:
        raise HiMatchADError(f"writing {final} failed: the file read back has {problem}; check the disk and write again")


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``array`` with ``geometry`` to ``path`` atomically and verified.

    The file is written under a temporary name, read back and compared with ``array`` and
    ``geometry`` (writers may not report a full disk: ITK's NIfTI writer does not), then renamed.
    """
    import SimpleITK as sitk

    check_storable(geometry, path)
    img = to_sitk(array, geometry)
    meant = {
        "size": img.GetSize(), "components": img.GetNumberOfComponentsPerPixel(), "spacing": img.GetSpacing(),
        "origin": img.GetOrigin(), "direction": img.GetDirection(),
    }
    lossy = str(path).lower().endswith((".jpg", ".jpeg"))
    with atomic_path(path) as tmp:
        try:
            with quiet_itk():
                sitk.WriteImage(img, str(tmp), compress)
        except RuntimeError as exc:
            raise HiMatchADError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
        del img  # ITK's copy of the voxels goes before the file is read back
        voxels = np.asarray(array)
        _verify_written(tmp, meant, voxels[0] if geometry.is_2d else voxels, Path(path), lossy)
    return Path(path)
