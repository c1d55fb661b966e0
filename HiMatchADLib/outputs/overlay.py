"""The overlay picture of a 2D result: the heatmap over the image, the labelmap outline."""

from __future__ import annotations

import numpy as np

# Anchor colours of matplotlib's "inferno" map (perceptually uniform), interpolated linearly.
_INFERNO = np.array(
    [
        [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
        [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
    ],
    dtype=np.float32,
) / 255.0


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB float32 (inferno)."""
    v = np.clip(values, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_INFERNO) - 1)
    f = (v - lo)[..., None]
    return _INFERNO[lo] * (1 - f) + _INFERNO[hi] * f


def composite(grey: np.ndarray, heatmap: np.ndarray, labelmap: np.ndarray, low: float, high: float) -> np.ndarray:
    """Grey image in [0, 1] + heatmap (inferno over ``[low, high]``, transparent near ``low``) +
    labelmap outline (cyan) -> float RGB in [0, 1]. Outline pixels are the labelmap's own border
    pixels (inside it), so the outline lies exactly on the segment."""
    from scipy import ndimage

    rgb = np.repeat(np.clip(np.asarray(grey, dtype=np.float32), 0, 1)[..., None], 3, axis=2)
    h = np.clip((np.asarray(heatmap, dtype=np.float32) - low) / max(high - low, 1e-12), 0, 1)
    alpha = (0.65 * np.clip(h * 2.0 - 0.2, 0, 1))[..., None]  # faint below ~10 % of the range
    rgb = rgb * (1 - alpha) + colormap(h) * alpha
    lab = np.asarray(labelmap).astype(bool)
    edge = lab & ~ndimage.binary_erosion(lab)
    rgb[edge] = OUTLINE_RGB
    return rgb


#: Colour of the segment outline.
OUTLINE_RGB = (0.0, 1.0, 1.0)


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, labelmap: np.ndarray, threshold: float, floor: float = 0.0) -> np.ndarray:
    """2D grey image + heatmap (inferno from ``floor`` up, transparent where low) + labelmap outline -> uint8 RGB."""
    img = np.nan_to_num(np.asarray(image, dtype=np.float32))
    lo, hi = np.percentile(img, [0.5, 99.5])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    top = max(float(heatmap.max()), float(threshold) if np.isfinite(threshold) else 0.0, floor + 1e-6)
    rgb = composite(grey, heatmap, labelmap, floor, top)
    return (rgb * 255 + 0.5).astype(np.uint8)
