"""Intensity normalisation by modality preset, foreground masks, and slicing into model inputs.

Presets are data (:data:`PRESETS`), not code paths: each names an intensity mapping to [0, 1], a
foreground rule and a default slice axis. ``auto`` picks ``8bit`` for 8-bit 2D images, ``ct`` when
the image holds Hounsfield-like values (below -500), else ``mri``. OCT must be asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..core.errors import HiMatchADError
from ..core.geometry import Image, Reorientation, canonical_reorientation
from ..io.formats import IMAGE_SUFFIXES
from ..io.readers import read_image
from .canvas import PlaneMap, has_physical_spacing, model_side, plan_plane, to_canvas
from .presets import (
    PRESETS,
    count_outside,
    foreground_mask,
    normalise,
    outlier_fences,
    padding_array,
    padding_values,
    resolve_modality,
    sample_values,
    valid_range,
    volume_blocks,
)

SLICE_AXES = ("auto", "axial", "coronal", "sagittal", "largest_spacing")


# Canonical numpy axis of each anatomical slicing direction (see orientation.py).
_CANONICAL_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}

#: The anatomical plane of the slices taken along each canonical axis.
SLICE_PLANES = {axis: plane for plane, axis in _CANONICAL_AXIS.items()}


@dataclass
class PreparedVolume:
    """A volume in canonical orientation, normalised, with its foreground and slicing axis.

    ``canonical`` and ``foreground`` are what the model sees. With a common pixel spacing
    (``plane`` set) they lie on the model canvas and ``native_foreground`` keeps the foreground on
    the input's own grid (:attr:`native_shape`); otherwise they are the same arrays. ``native``, the
    normalised slices on the input's grid, is ``canonical`` without a plane; with one it is not kept
    (None): the model sees the canvas only, and a CT's normalised volume is hundreds of MiB.
    """

    image: Image
    modality: str
    reorientation: Reorientation
    canonical: np.ndarray  # normalised [0,1], canonical orientation, slice axis moved to 0
    foreground: np.ndarray  # bool, same shape as ``canonical``
    slice_axis_canonical: int  # canonical numpy axis the slices were taken along
    slice_axis_input: int  # input numpy axis that corresponds to it
    positions: np.ndarray  # per slice: relative position in [0,1] within the foreground extent (NaN for 2D)
    pixel_spacing: tuple[float, float] = (1.0, 1.0)  # (row, column) spacing of the slices, mm
    slice_spacing: float = 1.0  # distance between neighbouring slices, mm
    warnings: list = field(default_factory=list)
    plane: Optional[PlaneMap] = None
    native: Optional[np.ndarray] = None
    native_foreground: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.native is None and self.plane is None:
            self.native = self.canonical
        if self.native_foreground is None:
            self.native_foreground = self.foreground

    @property
    def native_shape(self) -> tuple:
        """``(slices, rows, columns)`` on the input's own grid (slice axis first)."""
        return tuple(self.native_foreground.shape)

    def map_to_native(self, maps: np.ndarray) -> np.ndarray:
        """(B, h, w) maps on the model's slice grid (``canonical``) -> (B, H, W) on the native grid."""
        return maps if self.plane is None else self.plane.to_native(maps)

    @property
    def n_slices(self) -> int:
        return int(self.canonical.shape[0])

    def slices_with_foreground(self, min_pixels: int = 1) -> np.ndarray:
        counts = self.native_foreground.reshape(self.n_slices, -1).sum(1)
        return np.flatnonzero(counts >= min_pixels)

    def to_input_grid(self, slices_first: np.ndarray) -> np.ndarray:
        """Put an array shaped like ``native`` (slice axis first) back on the input's grid."""
        canon = np.moveaxis(slices_first, 0, self.slice_axis_canonical)
        return np.ascontiguousarray(self.reorientation.from_canonical(canon))


def choose_slice_axis(image: Image, reo: Reorientation, preset: dict, slice_axis: str) -> int:
    shape = reo.to_canonical(np.empty(image.array.shape, dtype=np.uint8)).shape
    singleton = [n for n in range(3) if shape[n] == 1]
    if singleton:
        return singleton[0]  # a single-slice volume is sliced along its thin axis
    choice = preset["slice_axis"] if slice_axis in (None, "auto") else slice_axis
    if choice not in SLICE_AXES:
        raise HiMatchADError(f"unknown slice axis '{choice}'; choose one of {', '.join(SLICE_AXES)}")
    if choice == "largest_spacing":
        sp = reo.canonical_spacing(image.geometry.spacing)
        return int(np.argmax(sp))
    return _CANONICAL_AXIS[choice]


def prepare_volume(
    image: Image,
    modality: str = "auto",
    slice_axis: str = "auto",
    spacing_mm: Optional[float] = None,
    resolution: Optional[int] = None,
    patch_size: Optional[int] = None,
) -> PreparedVolume:
    """Normalise, compute the foreground, reorient to canonical, and put the slice axis first.

    With ``spacing_mm`` (and the model's ``resolution`` and ``patch_size``), the slices are also
    resampled in-plane to that pixel spacing on the model canvas (see :func:`plan_plane`), so one
    millimetre is the same number of model pixels in every image; images without a recorded pixel
    spacing (2D PNG/JPEG/TIFF/BMP) are left as they are.
    """
    mod = resolve_modality(image, modality)
    preset = PRESETS[mod]
    if preset["scaling"] == "divide" and image.pixel_type == "uint16":  # a 16-bit PNG/TIFF: a fraction of its full range
        preset = {**preset, "divisor": 65535.0}
    reo = canonical_reorientation(image.geometry.direction)  # 2D images with a direction too (a PNG has none: identity)
    axis = 0 if image.is_2d else choose_slice_axis(image, reo, preset, slice_axis)
    raw = reo.to_canonical(image.array)  # a view: nothing below copies the whole volume but the normalised one
    warn: list[str] = list(image.warnings)
    pad = padding_values(raw) if preset["scaling"] != "divide" else []
    pad_arr = padding_array(pad, raw.dtype)
    if pad:  # neither foreground nor part of the intensity statistics
        n_pad = sum(int(np.count_nonzero(np.isin(raw[b], pad_arr))) for b in volume_blocks(raw))
        warn.append(
            f"{image.name}: {n_pad} voxels ({100.0 * n_pad / raw.size:.2g} %) hold the padding value(s) "
            f"{', '.join(f'{v:g}' for v in pad)}: excluded from the foreground and the intensity statistics"
        )
    if preset["scaling"] != "divide":
        fences = outlier_fences(sample_values(raw, pad=pad_arr))
        below, above = count_outside(raw, fences, pad_arr)
        if below or above:  # clipped by the scaling; the statistics are robust to them
            parts = [f"{n} below {f:.6g}" for n, f in ((below, fences[0]),) if n] + [f"{n} above {f:.6g}" for n, f in ((above, fences[1]),) if n]
            warn.append(
                f"{image.name}: {below + above} voxel(s) hold extreme values far outside the image's intensity range "
                f"({', '.join(parts)}): clipped, and left out of the intensity statistics"
            )
    lo, hi = valid_range(raw, pad_arr)
    if lo > hi:
        raise HiMatchADError(f"{image.name}: no finite voxel")
    if hi == lo:
        raise HiMatchADError(f"{image.name}: the image is constant (every voxel is {lo:g}); nothing to analyse")
    if preset["foreground"] == "hu":  # needs no normalised values: its components are labelled before they exist
        fg = foreground_mask(raw, None, preset, axis, pad=pad)
        norm = normalise(raw, preset, pad=pad, slice_axis=axis)
    else:
        norm = normalise(raw, preset, pad=pad, slice_axis=axis)
        fg = foreground_mask(raw, np.moveaxis(norm, 0, axis), preset, axis, pad=pad)
    if not fg.any():
        raise HiMatchADError(f"{image.name}: no foreground found (the image is empty or nearly constant)")
    fg = np.ascontiguousarray(np.moveaxis(fg, axis, 0))  # stored slice axis first: no copy
    n = norm.shape[0]
    if image.is_2d or n == 1:
        positions = np.full(n, np.nan, dtype=np.float32)
    else:
        has = np.flatnonzero(fg.reshape(n, -1).any(1))
        first, last = int(has[0]), int(has[-1])
        positions = ((np.arange(n) - first) / max(last - first, 1)).astype(np.float32)
    sp = reo.canonical_spacing(image.geometry.spacing)
    in_plane = [sp[a] for a in range(3) if a != axis]
    pixel_spacing = (float(in_plane[0]), float(in_plane[1]))
    plane = None
    native, native_fg = norm, fg
    if spacing_mm is not None and has_physical_spacing(image):
        if resolution is None or patch_size is None:
            raise ValueError("a common pixel spacing needs the model's resolution and patch size")
        rows = np.flatnonzero(fg.any(axis=(0, 2)))
        cols = np.flatnonzero(fg.any(axis=(0, 1)))
        fbox = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
        plane, w = plan_plane(norm.shape[1:], pixel_spacing, fbox, float(spacing_mm), int(resolution), int(patch_size))
        if w:
            warn.append(f"{image.name}: {w}")
        norm = to_canvas(native, plane)
        fg = to_canvas(native_fg, plane, threshold=0.5)
    return PreparedVolume(
        image=image,
        modality=mod,
        reorientation=reo,
        canonical=norm,
        foreground=fg,
        slice_axis_canonical=axis,
        slice_axis_input=reo.input_axis(axis),
        positions=positions,
        pixel_spacing=pixel_spacing,
        slice_spacing=float(sp[axis]),
        warnings=warn,
        plane=plane,
        native=native if plane is None else None,
        native_foreground=native_fg,
    )


def in_plane_extent(path, modality: str = "auto", slice_axis: str = "auto") -> Optional[tuple]:
    """(field of view in mm along the slices' shorter side, (row, column) pixel spacing) of an image
    from its header, or None when it has no recorded pixel spacing (PNG/JPEG/TIFF/BMP)."""
    from pathlib import Path

    import SimpleITK as sitk


    p = Path(path)
    if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES):
        return None
    if p.is_dir():
        img = read_image(p)
        size, spacing, direction, dim = img.geometry.size, img.geometry.spacing, img.geometry.direction, 2 if img.is_2d else 3
    else:
        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        dim = r.GetDimension()
        size, spacing, direction = r.GetSize(), r.GetSpacing(), r.GetDirection()
    if dim == 2 or (dim >= 3 and 1 in tuple(size)[:3] and tuple(size)[2] == 1):
        rows, cols = float(spacing[1]), float(spacing[0])
        return min(size[1] * rows, size[0] * cols), (rows, cols)
    size, spacing = tuple(size)[:3], tuple(spacing)[:3]
    d = np.asarray(direction, float)
    d = d.reshape(int(round(math.sqrt(d.size))), -1)[:3, :3]
    reo = canonical_reorientation(d)
    shape = reo.to_canonical(np.empty((size[2], size[1], size[0]), dtype=np.uint8)).shape
    sp = reo.canonical_spacing(spacing)
    singleton = [n for n in range(3) if shape[n] == 1]
    if singleton:
        axis = singleton[0]
    else:
        choice = slice_axis if slice_axis not in (None, "auto") else ("largest_spacing" if modality == "oct" else "axial")
        axis = int(np.argmax(sp)) if choice == "largest_spacing" else _CANONICAL_AXIS.get(choice, 0)
    plane = [a for a in range(3) if a != axis]
    return min(shape[a] * sp[a] for a in plane), (float(sp[plane[0]]), float(sp[plane[1]]))


def common_spacing(extents: list, resolution: int, patch_size: int) -> Optional[float]:
    """Default pixel spacing of the model canvas for a normal set: the median field of view (shorter
    in-plane side, mm) over the model's shorter side, so that a typical normal slice is resampled
    as the references resize an image (shorter side ``resolution``). None when no image has a
    recorded spacing."""
    fov = [e[0] for e in extents if e is not None]
    if not fov:
        return None
    return float(np.median(fov)) / model_side(resolution, patch_size)
