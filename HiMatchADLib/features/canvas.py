"""The slice canvas: in-plane resampling to one pixel spacing, the model grid, model input tensors, patch foreground."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..core.geometry import Image
from ..io.formats import IMAGE_SUFFIXES

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)


IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


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


def has_physical_spacing(image: Image) -> bool:
    """False for 2D slices read from PNG/JPEG/TIFF/BMP files, whose pixel spacing is not recorded,
    and for images whose header records none (:attr:`Image.spacing_recorded`)."""
    if not getattr(image, "spacing_recorded", True):
        return False
    return not (image.is_2d and image.path is not None and str(image.path).lower().endswith(IMAGE_SUFFIXES))


#: The model input's longer side is at most this many times its shorter side (``resolution``): a
#: very elongated slice is shrunk to fit rather than given thousands of patches.
MAX_ASPECT = 4.0
#: With a common pixel spacing, a side of the model canvas is at most this many times
#: ``resolution``: a slice with twice the normal set's typical field of view still keeps the normal
#: set's millimetres per pixel; a larger one is cropped to its foreground, then coarsened.
MAX_CANVAS = 2


def model_side(resolution: int, patch_size: int) -> int:
    """The model input's shorter side for ``resolution`` (a multiple of the patch size), as in the
    references, which resize the shorter side of every image to it."""
    return max(1, int(round(resolution / float(patch_size)))) * int(patch_size)


def _ceil_to(n: float, step: int) -> int:
    return max(step, int(math.ceil(n / step - 1e-9)) * step)


def plan_plane(native_hw, pixel_spacing, foreground_box, spacing_mm: float, resolution: int, patch_size: int):
    """Where the native slices go on the model canvas at ``spacing_mm`` per pixel.

    Returns (:class:`PlaneMap`, warning or None). The canvas is the resampled slice, each side
    rounded up to a multiple of the patch size: it is the model input as it is (no rescaling). A
    side may be at most :data:`MAX_CANVAS` times the model side; a native slice larger than that at
    ``spacing_mm`` is cropped to its foreground's bounding box (all slices together); if that is
    still larger, the spacing is coarsened until it fits and a warning says so.
    """
    L = MAX_CANVAS * model_side(resolution, patch_size)
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
    canvas = (min(L, _ceil_to(h, patch_size)), min(L, _ceil_to(w, patch_size)))
    offset = ((canvas[0] - h) // 2, (canvas[1] - w) // 2)
    return PlaneMap((H, W), tuple(int(v) for v in box), (h, w), offset, canvas, float(s)), warn


def _resize(x, size: tuple, mode: str):
    """(B, 1, h, w) -> (B, 1, *size): ``bicubic`` (the references' resampling of images) or
    ``bilinear`` (masks); antialiased when shrinking."""
    import torch.nn.functional as F

    antialias = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=antialias)


def to_canvas(slices: np.ndarray, plane: PlaneMap, threshold: Optional[float] = None) -> np.ndarray:
    """Slices resampled onto the model canvas (float32, bicubic), or, with ``threshold``, the boolean
    mask of the (bilinearly) resampled values at or above it (made block by block, without the float
    canvas)."""
    import torch

    r0, r1, c0, c1 = plane.box
    h, w = plane.scaled_hw
    out = np.zeros((slices.shape[0],) + tuple(plane.canvas_hw), np.float32 if threshold is None else bool)
    for a in range(0, slices.shape[0], 64):  # bounded memory on long volumes
        x = torch.from_numpy(np.ascontiguousarray(slices[a : a + 64, r0:r1, c0:c1], dtype=np.float32))[:, None]
        y = _resize(x, (h, w), "bicubic" if threshold is None else "bilinear")[:, 0].numpy()
        oy, ox = plane.offset
        out[a : a + 64, oy : oy + h, ox : ox + w] = y if threshold is None else y >= threshold
    return out


def model_grid(height: int, width: int, resolution: int, patch_size: int) -> tuple[int, int]:
    """Model input size, as in the references: the shorter side ``resolution``, the aspect kept (the
    longer side at most :data:`MAX_ASPECT` times the shorter), each side rounded to a multiple of
    the patch size. (The references crop the remainder instead; rounding keeps every image pixel,
    at a distortion of at most half a patch.)"""
    scale = resolution / float(min(height, width))
    scale = min(scale, MAX_ASPECT * resolution / float(max(height, width)))
    gh = max(1, int(round(height * scale / patch_size)))
    gw = max(1, int(round(width * scale / patch_size)))
    return gh * patch_size, gw * patch_size


def to_model_input(slices: np.ndarray, size: tuple[int, int]):
    """(B, H, W) float32 in [0,1] -> (B, 3, h, w) torch tensor, resized (bicubic), ImageNet-normalised."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = _resize(x, size, "bicubic")
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
