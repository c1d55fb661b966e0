"""Geometry between MRML volume nodes (RAS) and the library's images (LPS), and checks that a result fits its node."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import slicer
import vtk

from ..core.errors import HiMatchADError
from ..core.geometry import Geometry, Image
from ..core.result import DetectionResult

#: Flips RAS <-> LPS (it is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- geometry
def ijk_to_ras_matrix(node) -> np.ndarray:
    """The node's ``IJKToRAS`` matrix as a 4x4 numpy array (local coordinates, parent transform excluded)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def geometry_from_ijk_to_ras(ijk_to_ras, size: Sequence[int], is_2d: bool = False) -> Geometry:
    """LPS :class:`Geometry` of a grid of ``size = (nx, ny, nz)`` voxels placed by ``ijk_to_ras``."""
    m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    linear = RAS_TO_LPS @ m[:3, :3]  # IJK -> LPS
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(linear)):
        raise HiMatchADError("the volume's IJK-to-RAS matrix is degenerate (zero spacing); fix its geometry first")
    direction = linear / spacing
    origin = RAS_TO_LPS @ m[:3, 3]
    return Geometry(tuple(int(s) for s in size), tuple(spacing), tuple(origin), direction, is_2d)


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """4x4 ``IJKToRAS`` matrix of an LPS :class:`Geometry`."""
    m = np.eye(4)
    m[:3, :3] = RAS_TO_LPS @ np.asarray(geometry.direction, dtype=float) @ np.diag(geometry.spacing)
    m[:3, 3] = RAS_TO_LPS @ np.asarray(geometry.origin, dtype=float)
    return m


def lps_to_ras(point) -> np.ndarray:
    return RAS_TO_LPS @ np.asarray(point, dtype=float)


def volume_size(node) -> tuple[int, int, int]:
    """``(nx, ny, nz)`` of a volume node's voxel grid."""
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise HiMatchADError("the volume has no voxels (no image data); load or select another volume")
    return tuple(int(d) for d in image.GetDimensions())


def image_from_volume_node(node, name: Optional[str] = None) -> Image:
    """Copy a scalar (or RGB) volume node into a library :class:`Image` (LPS geometry, float32 copy).

    The voxels are copied, never a view of the node's memory, so the node may change or be deleted
    while the library works on the image in another thread. RGB(A) volumes are converted to
    luminance. A single-slice volume becomes a 2D image, as a PNG or JPEG read by the library would.
    """
    if node is None:
        raise HiMatchADError("no input volume selected")
    if not node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLVectorVolumeNode"):
        raise HiMatchADError(f"'{node.GetName()}' is a {node.GetClassName()}; select a scalar volume")
    size = volume_size(node)
    view = slicer.util.arrayFromVolume(node)
    pixel_type = str(view.dtype)
    if view.ndim == 4:  # vector volume (k, j, i, components)
        ncomp = view.shape[3]
        if ncomp >= 3:
            data = np.asarray(view[..., :3], dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        else:
            data = np.array(view[..., 0], dtype=np.float32, copy=True)
    elif view.ndim == 3:
        data = np.array(view, dtype=np.float32, copy=True)
    else:
        raise HiMatchADError(f"'{node.GetName()}' has an unsupported voxel layout {view.shape}")
    if data.size == 0:
        raise HiMatchADError(f"'{node.GetName()}' has no voxels")
    geometry = geometry_from_ijk_to_ras(ijk_to_ras_matrix(node), size, is_2d=(size[2] == 1))
    image = Image(data, geometry, name=name or node.GetName() or "volume", path=None, pixel_type=pixel_type)
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int((~finite).sum())
        if n_bad == finite.size:
            raise HiMatchADError(f"'{node.GetName()}': every voxel is NaN or infinite; nothing to analyse")
        image.array = np.where(finite, data, np.nan).astype(np.float32)
        image.warnings.append(f"{node.GetName()}: {n_bad} non-finite voxels (NaN/Inf) treated as background")
    return image


#: Largest difference accepted between a result's geometry and its volume node's: mm for spacing
#: and origin, unitless for the direction cosines (plus float32 rounding, as NIfTI stores them).
GEOMETRY_TOLERANCE = 1e-4


def geometry_differences(expected: Geometry, actual: Geometry, tol: float = GEOMETRY_TOLERANCE) -> list[str]:
    """What differs between two grids: size, spacing, origin, directions (empty when they match)."""

    def close(a, b) -> bool:
        return bool(np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-6, atol=tol))

    def fmt(v) -> str:
        return "(" + ", ".join(f"{x:.6g}" for x in np.asarray(v, dtype=float).reshape(-1)) + ")"

    differences = []
    if tuple(expected.size) != tuple(actual.size):
        differences.append(f"size {tuple(expected.size)} != {tuple(actual.size)}")
    if not close(expected.spacing, actual.spacing):
        differences.append(f"spacing {fmt(expected.spacing)} != {fmt(actual.spacing)} mm")
    if not close(expected.origin, actual.origin):
        shift = float(np.linalg.norm(np.subtract(expected.origin, actual.origin)))
        differences.append(f"origin {fmt(expected.origin)} != {fmt(actual.origin)} (LPS, {shift:.4g} mm apart)")
    if not close(expected.direction, actual.direction):
        angle = float(np.abs(np.asarray(expected.direction) - np.asarray(actual.direction)).max())
        differences.append(f"axis directions differ (largest cosine difference {angle:.4g})")
    return differences


def volume_geometry(node) -> Geometry:
    """LPS :class:`Geometry` of a volume node's voxel grid (its parent transform excluded)."""
    size = volume_size(node)
    return geometry_from_ijk_to_ras(ijk_to_ras_matrix(node), size, is_2d=(size[2] == 1))


def check_result_matches(result: DetectionResult, reference_node) -> None:
    """Raise :class:`HiMatchADError` unless ``result`` was computed on ``reference_node``'s voxel grid.

    The node's local geometry (size, spacing, origin and directions of its ``IJKToRAS``; its parent
    transform excluded) must be the result's :attr:`~DetectionResult.geometry` within
    :data:`GEOMETRY_TOLERANCE`. A result of another volume (another patient loaded after the scene
    was closed, a resampled or cropped copy) is refused, never attached.
    """
    if reference_node is None:
        raise HiMatchADError("no input volume node to compare the result with; select the volume that was analysed")
    name = reference_node.GetName()
    geometry = volume_geometry(reference_node)
    differences = geometry_differences(result.geometry, geometry)
    if not differences and tuple(np.shape(result.heatmap)) != geometry.shape:
        differences.append(f"heatmap array {tuple(np.shape(result.heatmap))} != voxel grid {geometry.shape}")
    if differences:
        raise HiMatchADError(
            f"the result '{result.name}' was not computed on the volume '{name}' (result vs volume: "
            + "; ".join(differences)
            + "); run the detection on this volume again"
        )


def slice_center_ras(result: DetectionResult, index: int) -> np.ndarray:
    """RAS position (mm, local coordinates of the input volume) of the centre of slice ``index``."""
    return lps_to_ras(result.slice_center_physical(int(index)))


def slice_index_at_ras(result: DetectionResult, reference_node, ras) -> int:
    """Index along ``result.slice_axis`` of the slice through RAS point ``ras`` (-1 if outside).

    ``ras`` is in world coordinates; the reference volume's parent transform (linear) is undone.
    """
    point = np.append(np.asarray(ras, dtype=float)[:3], 1.0)
    transform_node = reference_node.GetParentTransformNode() if reference_node is not None else None
    if transform_node is not None:
        world_to_local = vtk.vtkGeneralTransform()
        transform_node.GetTransformFromWorld(world_to_local)
        point[:3] = world_to_local.TransformPoint(point[:3])
    ijk = np.linalg.inv(ijk_to_ras_matrix(reference_node)) @ point
    index = int(np.floor(ijk[2 - int(result.slice_axis)] + 0.5))
    n = result.heatmap.shape[int(result.slice_axis)]
    return index if 0 <= index < n else -1
