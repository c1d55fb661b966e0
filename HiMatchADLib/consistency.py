"""3D-consistent maps: each slice's map fused with those of its neighbours within a distance in mm.

The papers score 2D images one at a time. In a volume, neighbouring slices image the same anatomy,
so a real anomaly appears in several adjacent slice maps while matching noise does not. With
``consistency_mm`` = s, the map of slice i becomes the normalised Gaussian average over the scored
slices j with |z_i - z_j| <= 3 s (z: slice position in mm, weights exp(-(z_i - z_j)^2 / 2 s^2)),
pixel by pixel and over foreground pixels only:

    F_i(x) = sum_j g_ij fg_j(x) M_j(x) / sum_j g_ij fg_j(x)

so background pixels of a neighbour (map 0) do not dilute the average. Pixels outside the
foreground of slice i stay 0.
"""

from __future__ import annotations

import numpy as np


def window(slice_spacing: float, sigma_mm: float) -> int:
    """How many neighbouring slices on each side take part (3 sigma)."""
    if sigma_mm is None or sigma_mm <= 0:
        return 0
    return int(np.floor(3.0 * float(sigma_mm) / max(float(slice_spacing), 1e-6) + 1e-9))


def fuse_one(i: int, maps: dict, foregrounds: dict, slice_spacing: float, sigma_mm: float) -> np.ndarray:
    """Fused map of slice ``i`` from the scored slices' ``maps`` and ``foregrounds`` (dicts keyed by
    slice index; slices missing from ``maps`` were not scored)."""
    w = window(slice_spacing, sigma_mm)
    num = np.zeros(maps[i].shape, np.float64)
    den = np.zeros(maps[i].shape, np.float64)
    for j in range(i - w, i + w + 1):
        if j not in maps:
            continue
        g = np.exp(-0.5 * ((i - j) * float(slice_spacing) / float(sigma_mm)) ** 2)
        f = foregrounds[j].astype(np.float64) * g
        num += f * maps[j]
        den += f
    fused = np.where(den > 0, num / np.maximum(den, 1e-12), maps[i])
    return (fused * foregrounds[i]).astype(np.float32)


def fuse_slices(maps: np.ndarray, foreground: np.ndarray, scored: np.ndarray, slice_spacing: float, sigma_mm: float) -> np.ndarray:
    """Fuse the maps ``(n, H, W)`` of a volume across slices (see the module docstring); ``scored``
    says per slice whether it has a map. Unscored slices are returned unchanged."""
    maps = np.asarray(maps, np.float32)
    out = maps.copy()
    if window(slice_spacing, sigma_mm) == 0:
        return out
    idx = np.flatnonzero(np.asarray(scored, bool))
    m = {int(j): maps[j] for j in idx}
    f = {int(j): foreground[j] for j in idx}
    for i in idx:
        out[i] = fuse_one(int(i), m, f, slice_spacing, sigma_mm)
    return out
