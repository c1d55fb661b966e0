"""Synthetic head-like phantoms with known lesions (for the demo and the tests; generated, not shipped).

Each phantom is an MRI-like volume: air background, a scalp/skull shell, brain tissue with a white
matter core and dark ventricles, smooth low-frequency texture and noise. Anatomy varies between
subjects (size, position, tilt, texture). A lesion is a smooth blob (hyper- or hypo-intense) inside
the brain; its mask is returned with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.geometry import Image
from ..io.writers import write_image


def _smooth_noise(rng: np.random.Generator, shape: tuple, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape), sigma)
    return n / max(float(n.std()), 1e-6)


def make_phantom(
    shape: tuple = (24, 64, 64),
    seed: int = 0,
    lesion: bool = False,
    lesion_radius: float = 0.2,
    lesion_contrast: float = 0.6,
    spacing: tuple = (1.0, 1.0, 2.0),
    origin: tuple = (0.0, 0.0, 0.0),
    direction: Optional[np.ndarray] = None,
    name: str = "phantom",
) -> tuple[Image, Optional[np.ndarray]]:
    """One synthetic volume ``(nz, ny, nx)`` (``nz == 1`` gives a 2D image) and its lesion mask.

    ``lesion_radius`` is relative to the brain's half-width; ``lesion_contrast`` is added to the
    tissue intensity inside the lesion (negative for a hypo-intense lesion).
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz) if nz > 1 else np.zeros(1),
        np.linspace(-1, 1, ny),
        np.linspace(-1, 1, nx),
        indexing="ij",
    )
    scale = 1.0 + 0.06 * rng.standard_normal(3)
    shift = 0.04 * rng.standard_normal(3)
    tilt = 0.15 * rng.standard_normal()
    xr = np.cos(tilt) * x - np.sin(tilt) * y
    yr = np.sin(tilt) * x + np.cos(tilt) * y
    zz, yy, xx = (z - shift[0]) / (0.9 * scale[0]), (yr - shift[1]) / (0.8 * scale[1]), (xr - shift[2]) / (0.68 * scale[2])
    r = np.sqrt(xx**2 + yy**2 + zz**2)
    head = r < 1.0
    brain = r < 0.86
    wm = np.sqrt((xx / 0.75) ** 2 + (yy / 0.8) ** 2 + (zz / 0.8) ** 2) < 0.55
    vent = (np.abs(xx) - 0.12) ** 2 / 0.01 + (yy / 0.35) ** 2 + (zz / 0.4) ** 2 < 1.0
    tex = _smooth_noise(rng, shape, 3.0)
    img = np.zeros(shape, np.float32)
    img[head] = 0.35
    img[brain] = 0.55
    img[brain & wm] = 0.75
    img[brain & vent] = 0.2
    img += (0.04 * tex + 0.02 * rng.standard_normal(shape)) * head
    mask = None
    if lesion:
        inside = np.argwhere(brain & ~vent & (r < 0.6))
        c = inside[rng.integers(len(inside))]
        rad = lesion_radius * np.array([nz, ny * 0.8, nx * 0.68]) / 2.0
        rad[0] = max(rad[0], 1.0) if nz > 1 else 1.0
        idx = np.indices(shape).astype(np.float32)
        d = np.sqrt(sum(((idx[a] - c[a]) / rad[a]) ** 2 for a in range(3)))
        d = d * (1 + 0.15 * _smooth_noise(rng, shape, 2.0))
        profile = np.clip(3.0 - 3.0 * d, 0, 1)  # plateau inside d < 2/3, smooth edge to d = 1
        mask = (d < 0.85) & brain  # where the added intensity is at least ~45 % of the lesion's
        img += np.float32(lesion_contrast) * profile * brain
    img = np.clip(img, 0, None) * 1000.0  # MRI-like arbitrary units
    out = Image.from_array(img.astype(np.float32), spacing=spacing, origin=origin, direction=direction, name=name, is_2d=nz == 1)
    out.pixel_type = "float32"
    return out, (None if mask is None else mask.astype(np.uint8))


#: The demo's lesion: a large, bright, smooth blob (35 % of the brain's half-width, +0.6 of the tissue
#: intensity range). Even untrained (random-weight) ViT features separate it from the phantom's tissue,
#: so the demo shows the whole path when no pretrained weights are at hand; a subtle lesion would not.
DEMO_LESION = {"lesion_radius": 0.35, "lesion_contrast": 0.6}


def write_demo_dataset(folder: str | os.PathLike, n_normals: int = 6, shape: tuple = (24, 64, 64), seed: int = 0) -> dict:
    """Normal volumes in ``folder/normals`` and one query with a lesion (:data:`DEMO_LESION`, + its
    mask) in ``folder``."""

    folder = Path(folder)
    (folder / "normals").mkdir(parents=True, exist_ok=True)
    for i in range(n_normals):
        img, _ = make_phantom(shape, seed=seed + 1 + i, name=f"normal_{i:02d}")
        write_image(img.array, img.geometry, folder / "normals" / f"normal_{i:02d}.nii.gz")
    q, mask = make_phantom(shape, seed=seed + 1000, lesion=True, name="query", **DEMO_LESION)
    write_image(q.array, q.geometry, folder / "query.nii.gz")
    write_image(mask, q.geometry, folder / "query_lesion_mask.nii.gz")
    return {"normals": folder / "normals", "query": folder / "query.nii.gz", "mask": folder / "query_lesion_mask.nii.gz"}
