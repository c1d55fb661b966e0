"""The detection result: plain numpy arrays + geometry, and the post-processing that can be redone
cheaply (thresholding, removal of small components) without recomputing the anomaly maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .geometry import Geometry


@dataclass
class Support:
    """One retrieved normal reference for a query slice."""

    source: str  # file name of the normal image/volume
    slice_index: int  # index of the slice within that volume (0 for 2D images)
    similarity: float  # combined retrieval similarity (higher = more similar)

    def to_dict(self) -> dict:
        return {"source": self.source, "slice_index": int(self.slice_index), "similarity": round(float(self.similarity), 6)}


def component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxels of each label ``0..n`` of a labelled array: ``np.bincount(labels.ravel())``, counted by
    blocks of slices (bincount and indexing convert the whole array to 64-bit integers first)."""
    sizes = np.zeros(n + 1, np.int64)
    for a in range(0, labels.shape[0], 16):
        sizes += np.bincount(labels[a : a + 16].ravel(), minlength=n + 1)
    return sizes


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop connected components (26-connected in 3D, 8-connected in 2D) smaller than ``min_size`` voxels."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask
    squeeze = mask.ndim == 3 and mask.shape[0] == 1
    m = mask[0] if squeeze else mask
    structure = np.ones((3,) * m.ndim, dtype=bool)
    labels, n = ndimage.label(m, structure=structure)
    if n == 0:
        return mask
    keep = component_sizes(labels, n) >= min_size
    keep[0] = False
    out = np.empty(labels.shape, bool)
    for a in range(0, labels.shape[0], 16):  # by blocks, as in component_sizes
        out[a : a + 16] = keep[labels[a : a + 16]]
    return out[None] if squeeze else out


@dataclass
class DetectionResult:
    """What :meth:`HiMatchDetector.predict` returns.

    All arrays are on the input's voxel grid, numpy order ``(nz, ny, nx)`` (``nz == 1`` for a 2D
    input), and ``geometry`` is the input's geometry, so writing them with it overlays the input.

    - ``heatmap``: float32 anomaly score per voxel (0 outside the foreground; higher = more anomalous).
      For ``himatch`` the unit is the fused calibrated score (standard deviations above the normal
      score distribution, through softplus so it stays positive); for ``knn`` and ``dpmm`` it is 1 - cosine similarity.
    - ``labelmap``: uint8, 1 where ``heatmap > threshold`` inside the foreground, after removing
      components smaller than ``min_component_size`` voxels.
    - ``slice_axis``: numpy axis (0, 1 or 2) of these arrays along which the volume was sliced;
      ``slice_scores[i]`` and ``supports[i]`` belong to index ``i`` along that axis
      (``slice_scores`` is NaN for a slice without foreground).
    - ``provenance``: what made the result (versions, device, precision, model and weights digest,
      bank digest, settings, input digest; :mod:`HiMatchADLib.detector.provenance`), ``{}`` for a
      result that does not record it (one read back from an older scores JSON).
    - ``source_files``: for a DICOM input, its files in slice order (what a DICOM SEG references);
      ``source_series``: what the scores JSON records about that series (``"series"``).
    """

    heatmap: np.ndarray
    foreground: np.ndarray
    threshold: float
    geometry: Geometry
    slice_axis: int
    slice_scores: np.ndarray
    volume_score: float
    supports: list = field(default_factory=list)
    min_component_size: int = 1
    method: str = "himatch"
    model: str = ""
    name: str = "image"
    source_path: Optional[str] = None
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    threshold_info: dict = field(default_factory=dict)

    @property
    def display_floor(self) -> float:
        """Heatmap value shown as 'nothing': the median over held-out normal foreground when the
        threshold was calibrated (so typical normal tissue stays transparent), else 0."""
        v = self.threshold_info.get("normal_pixel_median") if self.threshold_info else None
        try:
            v = float(v)
        except (TypeError, ValueError):
            return 0.0
        return v if np.isfinite(v) and v > 0 and (not np.isfinite(self.threshold) or v < self.threshold) else 0.0

    def display_range(self) -> tuple[float, float]:
        """``(low, high)`` of a colour window for the heatmap: from :attr:`display_floor` to the
        99.9th percentile of the foreground (at least 1.25 x the threshold, so anything above the
        threshold lies in the warm half of the map)."""
        values = self.heatmap[self.foreground] if self.foreground.any() else self.heatmap.ravel()
        if values.size > 4_000_000:  # a regular subsample is plenty for a display range
            values = values[:: values.size // 4_000_000 + 1]
        values = values[np.isfinite(values)]
        high = float(np.percentile(values, 99.9)) if values.size else 0.0
        if np.isfinite(self.threshold):
            high = max(high, float(self.threshold) * 1.25)
        low = self.display_floor
        if not np.isfinite(high) or high <= low:
            high = low + 1.0
        return low, high
    labelmap: np.ndarray = None  # computed from heatmap/threshold when not given
    source_files: tuple = ()
    source_series: dict = field(default_factory=dict)
    input_digest: dict = field(default_factory=dict)  # core.digest.files_digest of the input file(s)
    provenance: dict = field(default_factory=dict)  # what made it (detector.provenance); {} when not recorded

    def __post_init__(self) -> None:
        if self.labelmap is None:
            self.labelmap = self.labelmap_at(self.threshold)

    def labelmap_at(self, threshold: float, min_component_size: Optional[int] = None) -> np.ndarray:
        """Labelmap for another threshold (no recomputation of the maps)."""
        min_size = self.min_component_size if min_component_size is None else int(min_component_size)
        mask = (self.heatmap > threshold) & self.foreground
        return remove_small_components(mask, min_size).astype(np.uint8)

    def set_threshold(self, threshold: float) -> None:
        self.threshold = float(threshold)
        self.labelmap = self.labelmap_at(self.threshold)

    @property
    def anomalous_voxels(self) -> int:
        return int(self.labelmap.sum())

    @property
    def voxel_measure(self) -> float:
        """Physical size of one voxel: mm³ for a volume, mm² (the pixel area) for a 2D image."""
        spacing = self.geometry.spacing
        return float(np.prod(spacing[:2] if self.geometry.is_2d else spacing))

    @property
    def most_anomalous_slice(self) -> int:
        """Index along ``slice_axis`` of the slice with the highest score (-1 when none)."""
        s = np.asarray(self.slice_scores, dtype=float)
        if s.size == 0 or np.all(np.isnan(s)):
            return -1
        return int(np.nanargmax(s))

    def slice_center_physical(self, index: int) -> np.ndarray:
        """LPS position (mm) of the centre of slice ``index`` along ``slice_axis``."""
        nz, ny, nx = self.heatmap.shape
        center = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0, (nz - 1) / 2.0])
        center[2 - self.slice_axis] = index
        return self.geometry.index_to_physical(center)

    def to_dict(self) -> dict:
        """JSON-ready summary (the ``<name>_scores.json`` content)."""

        def _f(x):
            return None if x is None or not np.isfinite(x) else round(float(x), 6)

        return {
            "name": self.name,
            "input": self.source_path,
            "method": self.method,
            "model": self.model,
            "volume_score": _f(self.volume_score),
            "threshold": _f(self.threshold),
            "threshold_info": self.threshold_info,
            "min_component_size": int(self.min_component_size),
            "anomalous_voxels": self.anomalous_voxels,
            "anomalous_volume_mm3": round(self.anomalous_voxels * self.voxel_measure, 3),
            "slice_axis": int(self.slice_axis),
            "most_anomalous_slice": self.most_anomalous_slice,
            "slice_scores": [_f(s) for s in np.asarray(self.slice_scores, dtype=float)],
            "slices": int(len(self.slice_scores)),
            "slices_scored": int(np.isfinite(np.asarray(self.slice_scores, dtype=float)).sum()),
            "supports": [[s.to_dict() for s in sl] for sl in self.supports],
            "geometry": self.geometry.to_dict(),
            "settings": self.settings,
            "timings_s": {k: round(float(v), 4) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
            **({"series": dict(self.source_series)} if self.source_series else {}),
            **({"input_digest": dict(self.input_digest)} if self.input_digest else {}),
            **({"provenance": self.provenance} if self.provenance else {}),
        }
