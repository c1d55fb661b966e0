"""What the evaluation reads besides the images: slice positions from file names, image sizes from
headers, ground-truth masks, and the folder of normals the detector is fitted on.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..bank.store import default_cache_root
from ..core.errors import HiMatchADError
from ..io.discovery import list_images
from ..io.formats import strip_suffix
from ..io.readers import read_image
from .datasets import TestCase

_SLICE_NO = re.compile(r"^(.*?)[_\-. ]*(\d+)$")


def name_positions(paths: Sequence[Path]) -> dict[str, float]:
    """Relative slice position of 2D slices from names ``<subject>_<slice number>``.

    ``(n - min_n) / (max_n - min_n)`` over the slices of the same subject in ``paths``; NaN when a
    name has no trailing number or its subject has one slice number only.
    """

    parsed: dict[str, tuple[str, int]] = {}
    for p in paths:
        m = _SLICE_NO.match(strip_suffix(p))
        if m:
            parsed[str(p)] = (m.group(1), int(m.group(2)))
    ranges: dict[str, list[int]] = {}
    for subj, n in parsed.values():
        r = ranges.setdefault(subj, [n, n])
        r[0], r[1] = min(r[0], n), max(r[1], n)
    out = {}
    for p in paths:
        key = str(p)
        if key in parsed:
            subj, n = parsed[key]
            lo, hi = ranges[subj]
            out[key] = (n - lo) / (hi - lo) if hi > lo else float("nan")
        else:
            out[key] = float("nan")
    return out


def image_pixels(path: Path) -> int:
    """Number of voxels of an image from its header (falls back to reading it)."""
    import SimpleITK as sitk

    if path.is_file():
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(str(path))
            r.ReadImageInformation()
            return int(np.prod(r.GetSize()))
        except RuntimeError:
            pass
    return int(read_image(path).array.size)


def read_mask(case: TestCase, shape: tuple) -> Optional[np.ndarray]:
    """Binary ground truth of a case on the image grid; all zero for a normal case without mask."""
    if case.mask is None:
        return None if case.label else np.zeros(shape, dtype=bool)
    m = read_image(case.mask).array
    if m.shape != tuple(shape):
        raise HiMatchADError(
            f"{case.mask}: mask shape {tuple(m.shape)} (z, y, x) differs from its image {case.image.name} {tuple(shape)}; "
            "masks must be on the image's voxel grid"
        )
    return np.nan_to_num(m) > 0


def normals_folder(paths: Sequence[Path], normal_dir: Path, cache_root: Optional[Path]) -> Path:
    """A folder holding exactly ``paths``: ``normal_dir`` itself or a folder of links to them.

    The detector fits on a folder; a subsample (``--max-normals``) becomes a folder of symbolic links
    (copies where links are not allowed) under the cache, named by the hash of the chosen files, so
    repeated runs reuse one cached bank.
    """

    paths = [Path(p) for p in paths]
    if [str(p) for p in list_images(normal_dir)] == [str(p) for p in paths]:
        return normal_dir
    if cache_root is None:
        cache_root = default_cache_root()
    digest = hashlib.sha256("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()[:16]
    folder = Path(cache_root) / "subsets" / f"{normal_dir.name}-{len(paths)}-{digest}"
    names = []
    seen: set = set()
    for i, p in enumerate(paths):
        name = p.name if p.name not in seen else f"{i:05d}_{p.name}"
        seen.add(name)
        names.append(name)
    wanted = dict(zip(names, paths))
    if folder.is_dir():
        have = {q.name for q in folder.iterdir() if not q.name.startswith(".")}
        if have == set(names):
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    for q in folder.iterdir():
        if q.name not in wanted and (q.is_symlink() or q.is_file()):
            q.unlink()
    for name, src in wanted.items():
        dst = folder / name
        if dst.exists() or dst.is_symlink():
            continue
        try:
            os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
        except OSError:
            import shutil

            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    return folder
