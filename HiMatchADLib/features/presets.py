"""Intensity presets (data, not code paths): normalisation to [0, 1] and the foreground of each modality."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..core.errors import HiMatchADError
from ..core.geometry import Image
from ..core.result import component_sizes

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
    # ``pixel_spacing`` "stretch": B-scan pixels are kept and each B-scan stretched to the model
    # input (shorter side ``resolution``), as the references do, by default: B-scan pixels are
    # strongly anisotropic (about 4 um axial, 12 um lateral), and one isotropic spacing would squash
    # the retina's depth into one or two patch rows.
    "oct": {
        "scaling": "percentile", "low": 1.0, "high": 50.0, "high_value": 0.4, "foreground": "otsu", "otsu_factor": 0.5,
        "slice_axis": "largest_spacing", "pixel_spacing": "stretch",
    },
    # 8-bit slices (PNG/JPEG): value / 255.
    "8bit": {"scaling": "divide", "divisor": 255.0, "foreground": "otsu", "otsu_factor": 0.5, "slice_axis": "axial"},
}


MODALITIES = ("auto",) + tuple(PRESETS)


#: Whole volumes are scanned in blocks of slices of about this many voxels (16 MiB as float32), so
#: that no full-size temporary (a mask, a float copy) is made: a 512 x 512 x 400 CT is 105 million
#: voxels, and each such temporary would cost 100-800 MiB.
BLOCK_VOXELS = 1 << 22


#: Intensity statistics are computed on a deterministic subsample of at most about this many voxels.
MAX_SAMPLE = 2_000_000


def volume_blocks(array: np.ndarray):
    """Slices of the first axis of ``array`` holding about :data:`BLOCK_VOXELS` voxels each."""
    n = array.shape[0] if array.ndim else 0
    per = max(1, BLOCK_VOXELS // max(1, int(np.prod(array.shape[1:], dtype=np.int64))))
    for a in range(0, n, per):
        yield slice(a, min(n, a + per))


def padding_array(pad, dtype) -> Optional[np.ndarray]:
    return np.asarray(pad, dtype) if len(pad) else None


def _valid(block: np.ndarray, pad: Optional[np.ndarray]) -> np.ndarray:
    """Voxels of ``block`` that are finite and hold none of the padding values ``pad``."""
    ok = np.isfinite(block)
    if pad is not None:
        ok &= ~np.isin(block, pad)
    return ok


def sample_values(values: np.ndarray, valid_of: Optional[np.ndarray] = None, pad: Optional[np.ndarray] = None, limit: int = MAX_SAMPLE) -> np.ndarray:
    """``values[m][:: n // limit + 1]`` (or ``values[m]`` when ``n <= limit``), where ``m`` marks the
    valid voxels (:func:`_valid`) of ``valid_of`` (default ``values``) and ``n`` is their number:
    the same sample, in C order of the arrays' shape, without full-size temporaries."""
    src = values if valid_of is None else valid_of
    n = sum(int(np.count_nonzero(_valid(src[b], pad))) for b in volume_blocks(src))
    step = n // limit + 1 if n > limit else 1
    parts, seen = [], 0
    for b in volume_blocks(src):
        picked = values[b][_valid(src[b], pad)]
        parts.append(picked[(-seen) % step :: step].copy())  # not a view that keeps the block alive
        seen += picked.size
    return np.concatenate(parts) if parts else np.zeros(0, values.dtype)


def valid_range(array: np.ndarray, pad: Optional[np.ndarray]) -> tuple:
    """(lowest, highest) valid value of ``array`` (:func:`_valid`); (inf, -inf) when there is none."""
    lo, hi = np.inf, -np.inf
    for b in volume_blocks(array):
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
    for b in volume_blocks(array):
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


#: Outlier fences: a value further below the 0.1th or above the 99.9th percentile than
#: ``OUTLIER_REACH`` times the distance between those percentiles is an outlier (a corrupt or
#: hand-edited voxel, not tissue: a CT's metal at 3071 HU or a bright lesion lies within reach).
OUTLIER_PERCENTILES = (0.1, 99.9)
OUTLIER_REACH = 3.0


def outlier_fences(values: np.ndarray) -> tuple:
    """(low, high) fences of a 1D sample (see :data:`OUTLIER_PERCENTILES`); (-inf, inf) when the
    sample is too narrow to judge (its percentiles coincide) or empty."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return -np.inf, np.inf
    p_lo, p_hi = (float(v) for v in np.percentile(values, OUTLIER_PERCENTILES))
    width = p_hi - p_lo
    if not width > 0:
        return -np.inf, np.inf
    return p_lo - OUTLIER_REACH * width, p_hi + OUTLIER_REACH * width


def count_outside(array: np.ndarray, fences: tuple, pad: Optional[np.ndarray] = None) -> tuple:
    """(below, above): valid voxels of ``array`` (:func:`_valid`) below / above the ``fences``."""
    below = above = 0
    lo, hi = fences
    for b in volume_blocks(array):
        block = array[b]
        ok = _valid(block, pad)
        below += int(np.count_nonzero(ok & (block < lo)))
        above += int(np.count_nonzero(ok & (block > hi)))
    return below, above


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (numpy; no extra dependency).

    The histogram spans the sample's range cut at its outlier fences (:func:`outlier_fences`),
    outliers counted in the end bins: one corrupt voxel of -1e5 or 1e30 would otherwise squeeze
    every tissue into one or two of the bins.
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    f_lo, f_hi = outlier_fences(values)
    lo, hi = max(float(values.min()), f_lo), min(float(values.max()), f_hi)
    if hi <= lo:
        return lo
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
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
    vals = sample_values(array)  # deterministic subsample for speed on big volumes
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
    pad_arr = padding_array(pad, array.dtype)
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
        vals = sample_values(array, pad=pad_arr).astype(np.float32, copy=False)  # deterministic subsample for speed on big volumes
        f_lo, f_hi = outlier_fences(vals)
        if np.isfinite(f_lo):  # outliers (see outlier_fences) take no part in the statistics
            vals = vals[(vals >= f_lo) & (vals <= f_hi)]
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
    for b in volume_blocks(src):
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

    pad_arr = padding_array(pad, array.dtype)
    src = np.moveaxis(array, slice_axis, 0)
    if preset["foreground"] == "hu":
        hu_min = preset["hu_min"]

        def block_mask(b):
            block = src[b]
            return _valid(block, pad_arr) & (block > hu_min)
    else:
        vals = sample_values(normalised, valid_of=array, pad=pad_arr)
        t = max(otsu_threshold(vals) * float(preset.get("otsu_factor", 0.5)), 1e-3)
        norm = np.moveaxis(normalised, slice_axis, 0)

        def block_mask(b):
            return _valid(src[b], pad_arr) & (norm[b] > t)
    filled = np.empty(src.shape, bool)
    for b in volume_blocks(src):
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
