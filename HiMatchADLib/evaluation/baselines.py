"""Intensity-only baselines, computed by the same code as the detector's modes.

``intensity``
    the image itself after the detector's own intensity normalisation (its modality preset), inside
    the detector's foreground. A bright lesion (e.g. on FLAIR) is found by brightness alone; every
    number of a feature-based mode should be read against this one.
``intensity-dev``
    ``|x - mu(p)| / sd(p)``: the deviation of the normalised intensity from the mean and standard
    deviation of the normal set's foreground intensities at the same relative slice position ``p``
    (ten bins of the position within the foreground extent for volumes; for 2D slices the trailing
    slice number of the file name relative to the range of that subject's slice numbers; one global
    bin when neither is known). Finds hyper- and hypo-intense lesions.

Their image (and slice) score is the mean of the top 1 % of foreground values (the AnomalyDINO
rule); their threshold for "Dice at the automatic threshold" is the (1 - target_fpr) quantile of
their values on normal-set foreground pixels.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..core.errors import HiMatchADError
from ..core.geometry import Image
from ..features.slicing import prepare_volume
from ..io.readers import read_image
from .inputs import name_positions
from .metrics import top_fraction_mean
from .records import CaseOutput

#: The baselines, in the order they are reported.
BASELINES = ("intensity", "intensity-dev")


class IntensityBaselines:
    """The ``intensity`` and ``intensity-dev`` maps (see the module documentation)."""

    n_bins = 10
    min_bin_pixels = 1000
    max_samples = 1_000_000

    def __init__(self, modality: str = "auto", slice_axis: str = "auto", target_fpr: float = 0.01):
        self.modality = modality
        self.slice_axis = slice_axis
        self.target_fpr = float(target_fpr)
        self.mu = np.zeros(self.n_bins + 1)
        self.sd = np.ones(self.n_bins + 1)
        self.thresholds: dict[str, float] = {}
        self.positions: dict[str, float] = {}
        self.info: dict = {}

    def _prepare(self, image: Image):
        return prepare_volume(image, self.modality, self.slice_axis)

    def _bins(self, positions: np.ndarray) -> np.ndarray:
        p = np.asarray(positions, dtype=float)
        b = np.clip(np.floor(np.nan_to_num(p, nan=-1.0) * self.n_bins), 0, self.n_bins - 1).astype(int)
        return np.where(np.isfinite(p), b, self.n_bins)  # the last bin is "position unknown"

    def _slice_positions(self, prep, path: Optional[Path]) -> np.ndarray:
        if prep.image.is_2d or prep.n_slices == 1:
            return np.array([self.positions.get(str(path), float("nan"))])
        return np.asarray(prep.positions, dtype=float)

    def fit(self, normals: Sequence[Path], on_item: Optional[Callable[[], None]] = None) -> "IntensityBaselines":
        self.positions = name_positions(normals)
        k = self.n_bins + 1
        cnt, s1, s2 = np.zeros(k), np.zeros(k), np.zeros(k)
        per_slice: list[tuple[np.ndarray, int]] = []
        total_fg = 0
        for path in normals:
            try:
                prep = self._prepare(read_image(path))
            except HiMatchADError:
                continue  # the detector skips such images too
            bins = self._bins(self._slice_positions(prep, path))
            for i in prep.slices_with_foreground():
                v = prep.canonical[i][prep.foreground[i]].astype(np.float64)
                b = int(bins[i])
                cnt[b] += v.size
                s1[b] += v.sum()
                s2[b] += (v * v).sum()
                per_slice.append((v[:: max(1, v.size // 4000)].astype(np.float32), b))
                total_fg += v.size
            if on_item:
                on_item()
        if total_fg == 0:
            raise HiMatchADError("the normal reference set has no foreground to compute the intensity baselines from")
        g_mu = s1.sum() / cnt.sum()
        g_sd = math.sqrt(max(s2.sum() / cnt.sum() - g_mu**2, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = s1 / cnt
            sd = np.sqrt(np.maximum(s2 / cnt - mu**2, 0.0))
        use = cnt >= self.min_bin_pixels
        self.mu = np.where(use, mu, g_mu)
        self.sd = np.maximum(np.where(use, sd, g_sd), 1e-3)
        vals = np.concatenate([v for v, _ in per_slice])
        bins = np.concatenate([np.full(v.size, b) for v, b in per_slice])
        if vals.size > self.max_samples:
            step = vals.size // self.max_samples + 1
            vals, bins = vals[::step], bins[::step]
        q = 1.0 - self.target_fpr
        self.thresholds = {
            "intensity": float(np.quantile(vals, q)),
            "intensity-dev": float(np.quantile(np.abs(vals - self.mu[bins]) / self.sd[bins], q)),
        }
        self.info = {
            "position_bins": self.n_bins,
            "bin_mean": [round(float(x), 5) for x in self.mu],
            "bin_sd": [round(float(x), 5) for x in self.sd],
            "bin_pixels": [int(x) for x in cnt],
            "thresholds": self.thresholds,
            "threshold_rule": f"{q:g} quantile of normal-set foreground values",
        }
        return self

    def predict(self, image: Image, path: Optional[Path] = None) -> dict[str, CaseOutput]:
        t0 = time.perf_counter()
        prep = self._prepare(image)
        t_prep = time.perf_counter() - t0
        x, fg = prep.canonical, prep.foreground
        bins = self._bins(self._slice_positions(prep, path))
        mu = self.mu[bins][:, None, None]
        sd = self.sd[bins][:, None, None]
        maps = {"intensity": np.where(fg, x, 0.0).astype(np.float32), "intensity-dev": np.where(fg, np.abs(x - mu) / sd, 0.0).astype(np.float32)}
        n = prep.n_slices
        order = np.arange(n)
        if prep.reorientation.flips[prep.slice_axis_canonical]:
            order = order[::-1]
        fg_in = prep.to_input_grid(fg)
        out = {}
        for name, m in maps.items():
            t = time.perf_counter()
            ss = np.full(n, np.nan)
            for i in range(n):
                if fg[i].any():
                    ss[i] = top_fraction_mean(m[i][fg[i]])
            in_scores = np.full(n, np.nan)
            in_scores[order] = ss
            heat = prep.to_input_grid(m)
            thr = self.thresholds[name]
            out[name] = CaseOutput(
                heatmap=heat,
                foreground=fg_in,
                labelmap=(heat > thr) & fg_in,
                threshold=thr,
                volume_score=top_fraction_mean(m[fg]) if fg.any() else float("nan"),
                slice_scores=in_scores,
                slice_axis=prep.slice_axis_input,
                seconds=t_prep + time.perf_counter() - t,
                timings={"preprocess": t_prep, "maps": time.perf_counter() - t},
            )
        return out
