"""One case's output, whatever produced it, and the accumulation of a method's outputs into its metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..core.errors import HiMatchADError
from ..methods.base import list_methods
from .datasets import TestCase
from .metrics import PixelAccumulator, image_auroc

#: The detector's modes (``HiMatchDetector(method=...)``), in the order they are evaluated.
DETECTOR_METHODS = list_methods()


@dataclass
class CaseOutput:
    heatmap: np.ndarray  # (nz, ny, nx) on the input grid
    foreground: np.ndarray
    labelmap: Optional[np.ndarray]
    threshold: float
    volume_score: float
    slice_scores: np.ndarray  # indexed along ``slice_axis`` of the input grid
    slice_axis: int
    seconds: float
    timings: dict = field(default_factory=dict)
    device: Optional[str] = None


def from_detection_result(res, seconds: float) -> CaseOutput:
    return CaseOutput(
        heatmap=np.asarray(res.heatmap, dtype=np.float32),
        foreground=np.asarray(res.foreground, dtype=bool),
        labelmap=np.asarray(res.labelmap, dtype=bool),
        threshold=float(res.threshold),
        volume_score=float(res.volume_score),
        slice_scores=np.asarray(res.slice_scores, dtype=np.float64),
        slice_axis=int(res.slice_axis),
        seconds=seconds,
        timings=dict(res.timings or {}),
        device=(res.settings or {}).get("device"),
    )


class MethodRecord:
    def __init__(self, name: str, stride: int, max_fpr: float = 0.3):
        self.name = name
        self.pixels = PixelAccumulator(negative_stride=stride, max_fpr=max_fpr)
        self.labels: list[int] = []
        self.scores: list[float] = []
        self.slice_labels: list[np.ndarray] = []
        self.slice_scores: list[np.ndarray] = []
        self.seconds: list[float] = []
        self.slices_scored: list[int] = []
        self.timings: dict[str, float] = {}
        self.thresholds: list[float] = []
        self.per_case: dict[str, dict] = {}
        self.fit: dict = {}
        self.memory: dict = {}
        self.device: Optional[str] = None
        self.summary: dict = {}

    def add(self, case: TestCase, out: CaseOutput, gt: Optional[np.ndarray], is_3d: bool) -> None:
        if gt is not None and out.heatmap.shape != gt.shape:
            raise HiMatchADError(
                f"{case.name}: the {self.name} heatmap has shape {out.heatmap.shape} but the ground truth {gt.shape}; "
                "the detector must return maps on the input grid"
            )
        self.labels.append(case.label)
        self.scores.append(out.volume_score)
        self.seconds.append(out.seconds)
        n_scored = int(np.isfinite(out.slice_scores).sum()) if out.slice_scores is not None else 1
        self.slices_scored.append(max(n_scored, 1))
        self.thresholds.append(out.threshold)
        if out.device:
            self.device = out.device
        for k, v in (out.timings or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.timings[k] = self.timings.get(k, 0.0) + float(v)
        if is_3d and gt is not None:
            other = tuple(a for a in range(3) if a != out.slice_axis)
            lab = gt.any(axis=other)
            sc = np.asarray(out.slice_scores, dtype=np.float64)
            keep = np.isfinite(sc)
            self.slice_labels.append(lab[keep].astype(int))
            self.slice_scores.append(sc[keep])
        if gt is not None:
            self.pixels.add(out.heatmap, gt, out.labelmap)
        self.per_case[case.name] = {"score": _r(out.volume_score), "seconds": round(out.seconds, 4)}

    def finish(self, is_3d: bool) -> dict:
        pm = self.pixels.compute().to_dict()
        n = len(self.seconds)
        sec = np.asarray(self.seconds)
        res = {
            "image_auroc": _r(image_auroc(self.labels, self.scores)),
            "slice_auroc": None,
            **{k: _r(v) if isinstance(v, float) else v for k, v in pm.items()},
            "threshold": _r(float(np.median(self.thresholds))) if self.thresholds else None,
            "timing": {
                "cases": n,
                "seconds_per_case_mean": _r(float(sec.mean())) if n else None,
                "seconds_per_case_median": _r(float(np.median(sec))) if n else None,
                "seconds_per_slice": _r(float(sec.sum() / max(sum(self.slices_scored), 1))) if n else None,
                "slices_scored": int(sum(self.slices_scored)),
                "fit_seconds": self.fit.get("seconds"),
                "steps_seconds_total": {k: round(v, 4) for k, v in sorted(self.timings.items())},
            },
            "memory": self.memory,
            "device": self.device,
            "fit": self.fit,
        }
        if is_3d and self.slice_labels:
            res["slice_auroc"] = _r(image_auroc(np.concatenate(self.slice_labels), np.concatenate(self.slice_scores)))
        self.summary = res
        return res


def _r(x, nd: int = 6):
    if x is None:
        return None
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return x
    return round(xf, nd) if math.isfinite(xf) else None
