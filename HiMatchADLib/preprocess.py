"""Intensity normalisation by modality preset, foreground masks, and slicing into model inputs.

Presets are data (:data:`PRESETS`), not code paths: each names an intensity mapping to [0, 1], a
foreground rule and a default slice axis. ``auto`` picks ``8bit`` for 8-bit 2D images, ``ct`` when
the image holds Hounsfield-like values (below -500), else ``mri``. OCT must be asked for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import HiMatchADError
from .imageio import IMAGE_SUFFIXES, Image
from .orientation import IDENTITY, Reorientation, canonical_reorientation
from .result import component_sizes

PRESETS: dict[str, dict] = {
    # Robust percentile scaling: the background level (0.5th percentile of all voxels) -> 0 and the
    # foreground median (voxels above half the Otsu threshold, the foreground rule: Otsu alone can
    # fall between tissue and a large bright lesion) -> 0.25, clipped to [0, 1]: saturation
    # starts at 4 times the median's distance from the background, so bright normal tissue (CSF on
    # T2, enhancement on T1ce, fat) keeps its contrast instead of merging with lesions, and a median,
    # unlike a high percentile, does not move when a large bright lesion is present. Padding values
    # are excluded first (see padding_values). Foreground: above half the Otsu threshold, holes
    # filled slice by slice.
    "mri": {"scaling": "percentile", "low": 0.5, "high": 50.0, "high_value": 0.25, "stats_otsu_factor": 0.5, "foreground": "otsu", "otsu_factor": 0.5, "slice_axis": "axial"},
    # Hounsfield window (soft tissue, level 40 / width 400); body = HU > -500, largest component.
    "ct": {"scaling": "window", "level": 40.0, "width": 400.0, "foreground": "hu", "hu_min": -500.0, "slice_axis": "axial"},
    # OCT: percentile scaling; B-scans are the slices, stacked along the most widely spaced axis.
    "oct": {"scaling": "percentile", "low": 1.0, "high": 50.0, "high_value": 0.4, "foreground": "otsu", "otsu_factor": 0.5, "slice_axis": "largest_spacing"},
    # 8-bit slices (PNG/JPEG): value / 255.
    "8bit": {"scaling": "divide", "divisor": 255.0, "foreground": "otsu", "otsu_factor": 0.5, "slice_axis": "axial"},
}
MODALITIES = ("auto",) + tuple(PRESETS)
SLICE_AXES = ("auto", "axial", "coronal", "sagittal", "largest_spacing")
# Canonical numpy axis of each anatomical slicing direction (see orientation.py).
_CANONICAL_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

#: Whole volumes are scanned in blocks of slices of about this many voxels (16 MiB as float32), so
#: that no full-size temporary (a mask, a float copy) is made: a 512 x 512 x 400 CT is 105 million
#: voxels, and each such temporary would cost 100-800 MiB.
BLOCK_VOXELS = 1 << 22
#: Intensity statistics are computed on a deterministic subsample of at most about this many voxels.
MAX_SAMPLE = 2_000_000


def _blocks(array: np.ndarray):
    """Slices of the first axis of ``array`` holding about :data:`BLOCK_VOXELS` voxels each."""
    n = array.shape[0] if array.ndim else 0
    per = max(1, BLOCK_VOXELS // max(1, int(np.prod(array.shape[1:], dtype=np.int64))))
    for a in range(0, n, per):
        yield slice(a, min(n, a + per))


def _pad_values(pad, dtype) -> Optional[np.ndarray]:
    return np.asarray(pad, dtype) if len(pad) else None


def _valid(block: np.ndarray, pad: Optional[np.ndarray]) -> np.ndarray:
    """Voxels of ``block`` that are finite and hold none of the padding values ``pad``."""
    ok = np.isfinite(block)
    if pad is not None:
        ok &= ~np.isin(block, pad)
    return ok


def _sample(values: np.ndarray, valid_of: Optional[np.ndarray] = None, pad: Optional[np.ndarray] = None, limit: int = MAX_SAMPLE) -> np.ndarray:
    """``values[m][:: n // limit + 1]`` (or ``values[m]`` when ``n <= limit``), where ``m`` marks the
    valid voxels (:func:`_valid`) of ``valid_of`` (default ``values``) and ``n`` is their number:
    the same sample, in C order of the arrays' shape, without full-size temporaries."""
    src = values if valid_of is None else valid_of
    n = sum(int(np.count_nonzero(_valid(src[b], pad))) for b in _blocks(src))
    step = n // limit + 1 if n > limit else 1
    parts, seen = [], 0
    for b in _blocks(src):
        picked = values[b][_valid(src[b], pad)]
        parts.append(picked[(-seen) % step :: step].copy())  # not a view that keeps the block alive
        seen += picked.size
    return np.concatenate(parts) if parts else np.zeros(0, values.dtype)


def _valid_range(array: np.ndarray, pad: Optional[np.ndarray]) -> tuple:
    """(lowest, highest) valid value of ``array`` (:func:`_valid`); (inf, -inf) when there is none."""
    lo, hi = np.inf, -np.inf
    for b in _blocks(array):
        block = array[b]
        ok = _valid(block, pad)
        if ok.any():
            lo = min(lo, float(np.min(block, where=ok, initial=np.inf)))
            hi = max(hi, float(np.max(block, where=ok, initial=-np.inf)))
    return lo, hi


def _percentile_below(array: np.ndarray, q: float, value: float) -> bool:
    """Whether ``np.percentile(array[np.isfinite(array)], q) < value`` (False without finite voxels),
    from counts over blocks instead of a sorted copy of the volume."""
    n = below = 0
    for b in _blocks(array):
        block = array[b]
        fin = np.isfinite(block)
        n += int(np.count_nonzero(fin))
        below += int(np.count_nonzero(fin & (block < value)))
    if n == 0:
        return False
    k = int(np.floor(np.true_divide(q, 100) * (n - 1)))  # the percentile lies between sorted values k and k + 1
    if below > k + 1:
        return True  # both are below
    if below <= k:
        return False  # value k is not below, nor anything interpolated above it
    finite = array[np.isfinite(array)]  # between the two: interpolate as numpy does (rare)
    return float(np.percentile(finite, q)) < value


def resolve_modality(image: Image, modality: str) -> str:
    modality = (modality or "auto").lower()
    if modality not in MODALITIES:
        raise HiMatchADError(f"unknown modality '{modality}'; choose one of {', '.join(MODALITIES)}")
    if modality != "auto":
        return modality
    if image.pixel_type == "uint8" and image.is_2d:
        return "8bit"
    return "ct" if _percentile_below(image.array, 1, -500) else "mri"


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (numpy; no extra dependency)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))]) if bins > 1 else lo


def padding_values(array: np.ndarray, min_fraction: float = 1e-3, min_count: int = 100) -> list:
    """Values that pad an image rather than image it (e.g. -32768 / 32767 outside the scanned field).

    The lowest or the highest value of the image is padding when it covers at least
    ``min_fraction`` of the voxels (and ``min_count`` voxels) and lies further from the rest of the values (their 0.5-99.5th
    percentile range) than that range is wide. A background of zeros or a saturated 8-bit maximum
    is not: it lies next to the other values.
    """
    vals = _sample(array)  # deterministic subsample for speed on big volumes
    if vals.size < 10:
        return []
    step = array.size / max(vals.size, 1)  # voxels per sampled value
    candidates = [v for v in {float(vals.min()), float(vals.max())} if (vals == v).mean() >= min_fraction and (vals == v).sum() * step >= min_count]
    if not candidates:
        return []
    rest = vals[~np.isin(vals, np.asarray(candidates, vals.dtype))]  # both ends may be padded
    if rest.size == 0:
        return []
    lo, hi = (float(v) for v in np.percentile(rest, [0.5, 99.5]))
    if hi <= lo:  # the other values are (nearly) constant: nothing to compare a gap with
        return []
    span = hi - lo
    return sorted(v for v in candidates if v < lo - span or v > hi + span)


def normalise(array: np.ndarray, preset: dict, *, pad=(), slice_axis: Optional[int] = None) -> np.ndarray:
    """Map intensities to [0, 1] by the preset's rule; non-finite voxels and the padding values
    ``pad`` become 0 (and take no part in the statistics). float32, made block by block.

    With ``slice_axis`` the result has that axis first (C-contiguous), ready to be sliced.
    """
    pad_arr = _pad_values(pad, array.dtype)
    kind = preset["scaling"]
    if kind == "divide":
        divisor = float(preset["divisor"])

        def scale(a):
            return a / divisor
    elif kind == "window":
        lo = preset["level"] - preset["width"] / 2.0
        width = float(preset["width"])

        def scale(a):
            return (a - lo) / width
    elif kind == "percentile":
        vals = _sample(array, pad=pad_arr).astype(np.float32, copy=False)  # deterministic subsample for speed on big volumes
        lo = float(np.percentile(vals, preset["low"]))
        fg_vals = vals[vals > otsu_threshold(vals) * float(preset.get("stats_otsu_factor", 1.0))]
        hi = float(np.percentile(fg_vals if fg_vals.size else vals, preset["high"]))
        if hi <= lo:
            hi = float(vals.max())
        span, top = max(hi - lo, 1e-6), float(preset.get("high_value", 1.0))

        def scale(a):
            return (a - lo) / span * top
    else:  # pragma: no cover - presets are data checked by tests
        raise ValueError(f"unknown scaling {kind}")
    src = array if slice_axis is None else np.moveaxis(array, slice_axis, 0)
    out = np.empty(src.shape, np.float32)
    for b in _blocks(src):
        block = src[b]
        a = np.where(_valid(block, pad_arr), block, np.nan).astype(np.float32)
        out[b] = np.nan_to_num(np.clip(scale(a), 0.0, 1.0), nan=0.0)
    return out


def foreground_mask(array: np.ndarray, normalised: Optional[np.ndarray], preset: dict, slice_axis: int = 0, *, pad=()) -> np.ndarray:
    """Boolean foreground of a (canonical) volume; holes are filled slice by slice.

    ``normalised`` (same shape as ``array``; not used by the CT body rule, which may get None) is
    what :func:`normalise` made of it; voxels that are not finite or hold a padding value ``pad`` are
    background. The mask is stored slice axis first: ``np.moveaxis(mask, slice_axis, 0)`` is
    C-contiguous.
    """
    from scipy import ndimage

    pad_arr = _pad_values(pad, array.dtype)
    src = np.moveaxis(array, slice_axis, 0)
    if preset["foreground"] == "hu":
        hu_min = preset["hu_min"]

        def block_mask(b):
            block = src[b]
            return _valid(block, pad_arr) & (block > hu_min)
    else:
        vals = _sample(normalised, valid_of=array, pad=pad_arr)
        t = max(otsu_threshold(vals) * float(preset.get("otsu_factor", 0.5)), 1e-3)
        norm = np.moveaxis(normalised, slice_axis, 0)

        def block_mask(b):
            return _valid(src[b], pad_arr) & (norm[b] > t)
    filled = np.empty(src.shape, bool)
    for b in _blocks(src):
        mask = block_mask(b)
        for n in range(mask.shape[0]):
            filled[b.start + n] = ndimage.binary_fill_holes(mask[n])
    if preset["foreground"] == "hu" and filled.any():
        labels, n = ndimage.label(np.ascontiguousarray(np.moveaxis(filled, 0, slice_axis)))
        if n > 1:
            sizes = component_sizes(labels, n)
            sizes[0] = 0
            largest = labels == int(np.argmax(sizes))
            del labels
            filled = np.ascontiguousarray(np.moveaxis(largest, slice_axis, 0))
    return np.moveaxis(filled, 0, slice_axis)


@dataclass(frozen=True)
class PlaneMap:
    """How the slices of a volume were put on the model canvas at a common pixel spacing.

    The native in-plane region ``box`` (rows ``r0:r1``, columns ``c0:c1`` of the canonical slice)
    is resampled to ``scaled_hw`` pixels of ``spacing_mm`` each and placed at ``offset`` on a canvas
    of ``canvas_hw`` pixels (the rest is background). :meth:`to_native` is the inverse for maps.
    """

    native_hw: tuple
    box: tuple  # (r0, r1, c0, c1)
    scaled_hw: tuple
    offset: tuple
    canvas_hw: tuple
    spacing_mm: float

    def to_native(self, maps: np.ndarray) -> np.ndarray:
        """(B, canvas_h, canvas_w) maps on the canvas -> (B, H, W) on the native slice grid (bilinear;
        0 outside ``box``)."""
        import torch
        import torch.nn.functional as F

        maps = np.asarray(maps, np.float32)
        r0, r1, c0, c1 = self.box
        oy, ox = self.offset
        h, w = self.scaled_hw
        region = torch.from_numpy(np.ascontiguousarray(maps[:, oy : oy + h, ox : ox + w]))[:, None]
        antialias = (r1 - r0) < h or (c1 - c0) < w
        back = F.interpolate(region, size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False, antialias=antialias)[:, 0].numpy()
        out = np.zeros((maps.shape[0],) + tuple(self.native_hw), np.float32)
        out[:, r0:r1, c0:c1] = back
        return out


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


def has_physical_spacing(image: Image) -> bool:
    """False for 2D slices read from PNG/JPEG/TIFF/BMP files, whose pixel spacing is not recorded."""
    return not (image.is_2d and image.path is not None and str(image.path).lower().endswith(IMAGE_SUFFIXES))


def model_side(resolution: int, patch_size: int) -> int:
    """The model input's longer side for ``resolution`` (a multiple of the patch size)."""
    return max(1, int(round(resolution / float(patch_size)))) * int(patch_size)


def _ceil_to(n: float, step: int) -> int:
    return max(step, int(math.ceil(n / step - 1e-9)) * step)


def plan_plane(native_hw, pixel_spacing, foreground_box, spacing_mm: float, resolution: int, patch_size: int):
    """Where the native slices go on the model canvas at ``spacing_mm`` per pixel.

    Returns (:class:`PlaneMap`, warning or None). The canvas's longer side is the model's longer
    side (so the model does not rescale it) and its shorter side a multiple of the patch size. A
    native slice larger than the canvas at that spacing is cropped to its foreground's bounding
    box (all slices together); if that is still larger, the spacing is coarsened until it fits and
    a warning says so.
    """
    L = model_side(resolution, patch_size)
    H, W = int(native_hw[0]), int(native_hw[1])
    sr, sc = float(pixel_spacing[0]), float(pixel_spacing[1])
    s = float(spacing_mm)
    box = [0, H, 0, W]
    warn = None
    if H * sr / s > L + 1e-6 or W * sc / s > L + 1e-6:  # too large: keep the foreground's extent
        fr0, fr1, fc0, fc1 = foreground_box
        for a, (lo, hi, n, sp) in enumerate(((fr0, fr1, H, sr), (fc0, fc1, W, sc))):
            if n * sp / s > L + 1e-6:
                keep = max(hi - lo, min(n, int(math.floor(L * s / sp))))  # at least the foreground
                start = (lo + hi) // 2 - keep // 2  # centred on the foreground, containing it
                start = max(min(start, lo), hi - keep, 0)
                start = min(start, n - keep)
                box[2 * a], box[2 * a + 1] = int(start), int(start + keep)
        extent = max((box[1] - box[0]) * sr, (box[3] - box[2]) * sc)
        if extent / s > L + 1e-6:
            s_new = extent / L
            warn = (
                f"the foreground spans {extent:.1f} mm in-plane, more than {L} model pixels at {s:g} mm: "
                f"resampled at {s_new:.4g} mm per pixel instead, so anatomy looks {s_new / s:.2f} times smaller than in the normal bank"
            )
            s = s_new
    rh, rw = box[1] - box[0], box[3] - box[2]
    h = max(1, min(L, int(round(rh * sr / s))))
    w = max(1, min(L, int(round(rw * sc / s))))
    if h >= w:
        canvas = (L, min(L, _ceil_to(w, patch_size)))
    else:
        canvas = (min(L, _ceil_to(h, patch_size)), L)
    offset = ((canvas[0] - h) // 2, (canvas[1] - w) // 2)
    return PlaneMap((H, W), tuple(int(v) for v in box), (h, w), offset, canvas, float(s)), warn


def _to_canvas(slices: np.ndarray, plane: PlaneMap, mode: str = "bilinear", threshold: Optional[float] = None) -> np.ndarray:
    """Slices resampled onto the model canvas (float32), or, with ``threshold``, the boolean mask of
    the resampled values at or above it (made block by block, without the float canvas)."""
    import torch
    import torch.nn.functional as F

    r0, r1, c0, c1 = plane.box
    h, w = plane.scaled_hw
    out = np.zeros((slices.shape[0],) + tuple(plane.canvas_hw), np.float32 if threshold is None else bool)
    for a in range(0, slices.shape[0], 64):  # bounded memory on long volumes
        x = torch.from_numpy(np.ascontiguousarray(slices[a : a + 64, r0:r1, c0:c1], dtype=np.float32))[:, None]
        antialias = h < (r1 - r0) or w < (c1 - c0)
        y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)[:, 0].numpy()
        oy, ox = plane.offset
        out[a : a + 64, oy : oy + h, ox : ox + w] = y if threshold is None else y >= threshold
    return out


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
    reo = IDENTITY if image.is_2d else canonical_reorientation(image.geometry.direction)
    axis = 0 if image.is_2d else choose_slice_axis(image, reo, preset, slice_axis)
    raw = reo.to_canonical(image.array)  # a view: nothing below copies the whole volume but the normalised one
    warn: list[str] = list(image.warnings)
    pad = padding_values(raw) if preset["scaling"] != "divide" else []
    pad_arr = _pad_values(pad, raw.dtype)
    if pad:  # neither foreground nor part of the intensity statistics
        n_pad = sum(int(np.count_nonzero(np.isin(raw[b], pad_arr))) for b in _blocks(raw))
        warn.append(
            f"{image.name}: {n_pad} voxels ({100.0 * n_pad / raw.size:.2g} %) hold the padding value(s) "
            f"{', '.join(f'{v:g}' for v in pad)}: excluded from the foreground and the intensity statistics"
        )
    lo, hi = _valid_range(raw, pad_arr)
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
        norm = _to_canvas(native, plane)
        fg = _to_canvas(native_fg, plane, threshold=0.5)
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


def model_grid(height: int, width: int, resolution: int, patch_size: int) -> tuple[int, int]:
    """Model input size: longer side ``resolution``, aspect kept, both sides multiples of the patch."""
    scale = resolution / float(max(height, width))
    gh = max(1, int(round(height * scale / patch_size)))
    gw = max(1, int(round(width * scale / patch_size)))
    return gh * patch_size, gw * patch_size


def to_model_input(slices: np.ndarray, size: tuple[int, int]):
    """(B, H, W) float32 in [0,1] -> (B, 3, h, w) torch tensor, resized, ImageNet-normalised."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]
    if tuple(x.shape[-2:]) != tuple(size):
        antialias = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    mean = torch.from_numpy(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.from_numpy(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def patch_foreground(masks: np.ndarray, grid: tuple[int, int], min_fraction: float = 0.25) -> np.ndarray:
    """(B, H, W) bool masks -> (B, gh*gw) bool: patches whose area is at least ``min_fraction`` foreground."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
    frac = F.adaptive_avg_pool2d(m, grid) if m.shape[-2] >= grid[0] and m.shape[-1] >= grid[1] else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
    return (frac[:, 0] >= min_fraction).reshape(masks.shape[0], -1).numpy()


_GROUP_RE = re.compile(r"[_\-. ]*\d+$")


def source_group(name: str, is_2d: bool) -> str:
    """Group key for leave-one-subject-out calibration.

    2D slices exported from one volume are usually named ``<subject>_<slice number>``; dropping the
    trailing number groups them, so that a held-out slice is never matched against its neighbours.
    A volume is its own group.
    """
    if not is_2d:
        return name
    stripped = _GROUP_RE.sub("", name)
    return stripped or name


def compile_subject_pattern(pattern: Optional[str]):
    """Check a subject pattern: a regular expression with exactly one group (the subject's name)."""
    if pattern is None or pattern == "":
        return None
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise HiMatchADError(f"subject pattern '{pattern}' is not a valid regular expression: {exc}") from None
    if rx.groups != 1:
        raise HiMatchADError(f"subject pattern '{pattern}' must have exactly one group (the subject), not {rx.groups}")
    return rx


def subject_of(path: str, rx) -> str:
    """Subject named by ``rx`` (see :func:`compile_subject_pattern`) in a normal file's relative path.

    The pattern is searched (``re.search``) in the path relative to the normal folder, with ``/``
    separators; its group is the subject. A path it does not match is an error.
    """
    rel = str(path).replace("\\", "/")
    m = rx.search(rel)
    if m is None or not m.group(1):
        raise HiMatchADError(f"subject pattern '{rx.pattern}' does not match the normal file '{rel}' (or its group is empty)")
    return m.group(1)


def is_2d_file(path) -> bool:
    """Whether an image file holds a 2D slice (from its header; PNG/JPEG/TIFF/BMP always do)."""
    import SimpleITK as sitk

    from pathlib import Path

    from .imageio import read_image

    p = Path(path)
    if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES):
        return True
    if p.is_dir():
        return read_image(p).is_2d
    r = sitk.ImageFileReader()
    r.SetFileName(str(p))
    r.ReadImageInformation()
    return r.GetDimension() == 2


def in_plane_extent(path, modality: str = "auto", slice_axis: str = "auto") -> Optional[tuple]:
    """(field of view in mm along the slices' longer side, (row, column) pixel spacing) of an image
    from its header, or None when it has no recorded pixel spacing (PNG/JPEG/TIFF/BMP)."""
    import SimpleITK as sitk

    from pathlib import Path

    from .imageio import read_image

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
        return max(size[1] * rows, size[0] * cols), (rows, cols)
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
    return max(shape[a] * sp[a] for a in plane), (float(sp[plane[0]]), float(sp[plane[1]]))


def common_spacing(extents: list, resolution: int, patch_size: int) -> Optional[float]:
    """Default pixel spacing of the model canvas for a normal set: the median field of view (longer
    in-plane side, mm) over the model's longer side, so that a typical normal slice fills the model
    input as before. None when no image has a recorded spacing."""
    fov = [e[0] for e in extents if e is not None]
    if not fov:
        return None
    return float(np.median(fov)) / model_side(resolution, patch_size)
