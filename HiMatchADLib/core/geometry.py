"""Image geometry (ITK/LPS): :class:`Geometry`, :class:`Image`, and the canonical reorientation of index axes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from .errors import HiMatchADError

if TYPE_CHECKING:  # annotations only: the series type lives in a higher layer
    from ..io.dicom import DicomSeries


@dataclass
class Geometry:
    """Physical placement of an image grid (ITK/LPS conventions)."""

    size: tuple[int, int, int]  # (nx, ny, nz)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    is_2d: bool = False

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(s) for s in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy shape ``(nz, ny, nx)`` of arrays on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return np.asarray(self.origin) + self.direction @ (np.asarray(self.spacing) * ijk)

    def same_as(self, other: "Geometry", tol: float = 1e-6) -> bool:
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.reshape(-1).tolist(),
            "is_2d": self.is_2d,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(d["size"], d["spacing"], d["origin"], np.asarray(d["direction"]).reshape(3, 3), d.get("is_2d", False))


@dataclass
class Image:
    """An image as a float32 array ``(nz, ny, nx)`` plus its geometry and provenance."""

    array: np.ndarray
    geometry: Geometry
    name: str = "image"
    path: Optional[str] = None
    pixel_type: str = "float32"  # pixel type on disk, e.g. "uint8" for 8-bit PNGs
    warnings: list = field(default_factory=list)
    #: For a DICOM input: its files in slice order, and the series they form (else empty / None).
    dicom_files: tuple = ()
    dicom_series: Optional[DicomSeries] = None
    #: False when the file records no pixel spacing (a DICOM series without PixelSpacing): the
    #: geometry's 1 mm is then a placeholder, as for a PNG.
    spacing_recorded: bool = True

    @property
    def is_2d(self) -> bool:
        return self.geometry.is_2d

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=None,
        name: str = "image",
        is_2d: Optional[bool] = None,
    ) -> "Image":
        """Wrap a numpy array (``(ny, nx)`` or ``(nz, ny, nx)``) with a geometry given in ITK order."""
        arr = np.asarray(array)
        if arr.ndim == 2:
            arr = arr[None]
            is_2d = True if is_2d is None else is_2d
        if arr.ndim != 3:
            raise HiMatchADError(f"expected a 2D or 3D array, got shape {arr.shape}")
        spacing = tuple(spacing) + (1.0,) * (3 - len(tuple(spacing)))
        origin = tuple(origin) + (0.0,) * (3 - len(tuple(origin)))
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
        if d.shape == (2, 2):
            d3 = np.eye(3)
            d3[:2, :2] = d
            d = d3
        geo = Geometry((arr.shape[2], arr.shape[1], arr.shape[0]), spacing, origin, d.reshape(3, 3), bool(is_2d))
        pixel_type = str(arr.dtype)
        return cls(arr.astype(np.float32, copy=False), geo, name=name, pixel_type=pixel_type)


@dataclass(frozen=True)
class Reorientation:
    """``canonical = flip(transpose(array, axes), flips)``; see :func:`canonical_reorientation`."""

    axes: tuple[int, int, int]  # numpy axes of the input that become canonical numpy axes 0, 1, 2
    flips: tuple[bool, bool, bool]  # flip canonical numpy axis n after transposing

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.axes)
        flip_axes = tuple(n for n, f in enumerate(self.flips) if f)
        return np.flip(out, flip_axes) if flip_axes else out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        flip_axes = tuple(n for n, f in enumerate(self.flips) if f)
        out = np.flip(array, flip_axes) if flip_axes else array
        return np.transpose(out, np.argsort(self.axes))

    def input_axis(self, canonical_axis: int) -> int:
        """The input's numpy axis that became ``canonical_axis``."""
        return int(self.axes[canonical_axis])

    def canonical_spacing(self, spacing_xyz) -> tuple[float, float, float]:
        """Spacing of canonical numpy axes ``(k, j, i)``."""
        sp_numpy = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
        return tuple(float(sp_numpy[a]) for a in self.axes)


#: How far a direction matrix may be from orthonormal, and a written or read-back direction from
#: the one meant (largest element difference): one tolerance wherever directions are compared, so
#: that what is accepted on input is accepted when its outputs are written and read back. 1e-4 rad
#: moves a point 256 mm from the origin by 0.03 mm.
DIRECTION_TOLERANCE = 1e-4


IDENTITY = Reorientation((0, 1, 2), (False, False, False))


def canonical_reorientation(direction: np.ndarray) -> Reorientation:
    """Permutation and flips bringing an array with ``direction`` cosines to LPS canonical order."""
    d = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))
    sign = np.sign(np.asarray(direction, dtype=float).reshape(3, 3))
    # Greedy assignment, largest cosine first (as ITK's closest-orientation code does).
    world_to_index = [-1, -1, -1]
    used_world: set[int] = set()
    used_index: set[int] = set()
    for flat in np.argsort(-d, axis=None):
        w, j = divmod(int(flat), 3)
        if w in used_world or j in used_index:
            continue
        world_to_index[w] = j
        used_world.add(w)
        used_index.add(j)
        if len(used_world) == 3:
            break
    # Canonical numpy axis n holds world axis (2 - n): axis 0 = S (world z), 1 = P (y), 2 = L (x).
    axes = []
    flips = []
    for n in range(3):
        w = 2 - n
        j = world_to_index[w]
        axes.append(2 - j)  # index axis j is numpy axis 2 - j
        flips.append(bool(sign[w, j] < 0))
    return Reorientation(tuple(axes), tuple(flips))
