"""Writing a detection result: heatmap, labelmap, scores JSON and (for 2D inputs) an overlay PNG.

Every file is written under a temporary name and renamed into place; the scores JSON comes last and
carries ``"complete": true``, so a folder with a readable JSON holds a finished result.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Union

import numpy as np

from .errors import HiMatchADError
from .imageio import atomic_path, write_image, write_text_atomic
from .result import DetectionResult

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


def output_paths(out_dir: Union[str, os.PathLike], name: str, is_2d: bool) -> dict:
    out = Path(out_dir)
    paths = {
        "heatmap": out / f"{name}_heatmap.nii.gz",
        "labelmap": out / f"{name}_labelmap.nii.gz",
        "scores": out / f"{name}_scores.json",
    }
    if is_2d:
        paths["overlay"] = out / f"{name}_overlay.png"
    return paths


def is_complete(out_dir: Union[str, os.PathLike], name: str) -> bool:
    """True when every output of ``name`` exists and its scores JSON says it is complete."""
    p = output_paths(out_dir, name, False)
    try:
        data = json.loads(p["scores"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not data.get("complete"):
        return False
    need = output_paths(out_dir, name, bool(data.get("geometry", {}).get("is_2d")))
    return all(v.exists() for v in need.values())


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, labelmap: np.ndarray, threshold: float, floor: float = 0.0) -> np.ndarray:
    """2D grey image + heatmap (inferno from ``floor`` up, transparent where low) + labelmap outline -> uint8 RGB."""
    from scipy import ndimage

    img = np.nan_to_num(np.asarray(image, dtype=np.float32))
    lo, hi = np.percentile(img, [0.5, 99.5])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    top = max(float(heatmap.max()), float(threshold) if np.isfinite(threshold) else 0.0, floor + 1e-6)
    h = np.clip((heatmap - floor) / (top - floor), 0, 1)
    alpha = (0.65 * np.clip(h * 2.0 - 0.2, 0, 1))[..., None]  # faint below ~10 % of the range
    rgb = rgb * (1 - alpha) + colormap(h) * alpha
    lab = labelmap.astype(bool)
    edge = lab & ~ndimage.binary_erosion(lab)
    rgb[edge] = (0.0, 1.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def save_result(result: DetectionResult, out_dir: Union[str, os.PathLike]) -> dict:
    """Write the result next to nothing half-done; returns the written paths."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HiMatchADError(f"cannot create output folder {out}: {exc.strerror}") from exc
    paths = output_paths(out, result.name, result.geometry.is_2d)
    t = time.perf_counter()
    write_image(result.heatmap.astype(np.float32), result.geometry, paths["heatmap"])
    write_image(result.labelmap.astype(np.uint8), result.geometry, paths["labelmap"])
    if "overlay" in paths:
        from PIL import Image as PILImage

        img = getattr(result, "image_array", None)
        base = img[0] if img is not None else result.heatmap[0]
        rgb = overlay_rgb(base, result.heatmap[0], result.labelmap[0], result.threshold, result.display_floor)
        with atomic_path(paths["overlay"]) as tmp:
            PILImage.fromarray(rgb).save(tmp, format="PNG")
    result.timings["write"] = time.perf_counter() - t
    data = result.to_dict()
    data["outputs"] = {k: v.name for k, v in paths.items()}
    data["complete"] = True
    write_text_atomic(paths["scores"], json.dumps(data, indent=1))
    return paths
