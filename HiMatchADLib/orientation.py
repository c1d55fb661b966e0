"""Reorientation of a volume array to a canonical anatomical orientation, and back.

The canonical orientation is ITK's "LPS" code: index ``i`` (numpy axis 2) increases towards the
patient's Left, ``j`` (numpy axis 1) towards Posterior, ``k`` (numpy axis 0) towards Superior. An
axial slice ``canonical[k]`` is then displayed in the radiological convention (anterior at the top,
patient's right on the image's left), whatever order the file stored its voxels in.

The transform is a permutation of axes plus flips, chosen from the direction cosines (each world
axis goes to the index axis most aligned with it), so it moves voxels without resampling and its
inverse puts results back on the input grid exactly. Oblique volumes are handled the same way: the
closest axis-aligned orientation is used, and the output keeps the input's grid and geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
