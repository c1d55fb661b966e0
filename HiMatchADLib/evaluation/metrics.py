"""Detection and segmentation metrics for anomaly maps.

Image level
    :func:`image_auroc` -- area under the ROC curve of one score per image (or per volume, or per
    slice), from scikit-learn.

Pixel level, pooled over every pixel (voxel) of every test case, as in MVTec AD and BMAD
    - pixel AUROC and pixel average precision (AP): scikit-learn (``roc_auc_score``,
      ``average_precision_score``; AP is the step-wise sum over recall, not interpolated);
    - AUPRO: area under the per-region-overlap curve up to a false-positive rate of 0.3, divided by
      0.3 so that a perfect detector scores 1.0 (:func:`aupro`, own implementation, below);
    - best Dice: the largest Dice of the pooled segmentation over all thresholds, and the threshold
      that reaches it;
    - Dice at a given threshold (e.g. the detector's calibrated one): pooled
      ``2 |P & G| / (|P| + |G|)`` over all cases (:class:`PixelAccumulator` counts it exactly).

AUPRO definition (Bergmann et al., MVTec AD, IJCV 2021). For a threshold ``t``, a pixel is flagged
when its score is ``>= t``. The false-positive rate ``FPR(t)`` is the fraction of normal pixels
(ground truth 0, over all cases) that are flagged. Every connected component of the ground truth
(8-connected in 2D, 26-connected in 3D, per case) is a region ``r``; its overlap ``O_r(t)`` is the
fraction of its pixels that are flagged, and ``PRO(t)`` is the mean of ``O_r(t)`` over all regions of
all cases, so a small lesion counts as much as a large one. The curve ``(FPR(t), PRO(t))`` is
evaluated at every distinct score (ties are flagged together, joined by a straight segment), starts
at ``(0, 0)``, and is integrated with the trapezoidal rule from FPR 0 to ``max_fpr``, the value at
``max_fpr`` being interpolated linearly between the two points that bracket it. The area is divided
by ``max_fpr``.

Memory. Pooled pixel metrics need one sort over all pixels (about 30 bytes per pixel at the peak).
:class:`PixelAccumulator` keeps every ground-truth-positive pixel and, when asked to (``stride > 1``),
only every ``stride``-th normal pixel (a fixed pattern over the concatenated pixel index, so the
same inputs always give the same result), each kept normal pixel standing for ``stride`` pixels
(``sample_weight``). FPR, AUROC, AP and Dice are then unbiased estimates with a negligible error for
smooth maps; with ``stride == 1`` (the default) every metric is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np


def _clean_scores(scores) -> np.ndarray:
    """Scores as float64; NaN (no foreground, nothing scored) ranks below every finite score."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    bad = ~np.isfinite(s)
    if bad.any():
        finite = s[~bad]
        low = (finite.min() - 1.0) if finite.size else 0.0
        s = s.copy()
        s[np.isnan(s) | (s == -np.inf)] = low
        s[s == np.inf] = (finite.max() + 1.0) if finite.size else 1.0
    return s


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of one score per image (1 = anomalous). NaN when only one class is present.

    Ties count one half (the Mann-Whitney statistic). A NaN score, e.g. an image in which nothing
    was scored, ranks below every finite score.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(bool).ravel()
    s = _clean_scores(scores)
    if y.size != s.size:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def roc_points(labels, scores, max_points: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of an image-level ROC curve, thinned to at most ``max_points`` points (plots)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(bool).ravel()
    if y.all() or not y.any():
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    fpr, tpr, _ = roc_curve(y, _clean_scores(scores))
    return _thin(fpr, tpr, max_points)


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= max_points:
        return x, y
    keep = np.unique(np.r_[np.linspace(0, x.size - 1, max_points).round().astype(int), x.size - 1])
    return x[keep], y[keep]


def top_fraction_mean(values: np.ndarray, fraction: float = 0.01) -> float:
    """Mean of the highest ``fraction`` of ``values`` (at least one value); NaN when empty.

    The AnomalyDINO image score (mean of the top 1 % of patch scores), used here for the baselines.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    k = max(1, int(math.ceil(fraction * v.size)))
    return float(np.partition(v, v.size - k)[v.size - k :].mean())


def region_weights(gt: np.ndarray) -> tuple[np.ndarray, int]:
    """For the positive pixels of ``gt`` (in ``np.flatnonzero`` order): ``1 / size of their region``.

    Regions are connected components, 8-connected for a 2D mask (also a ``(1, ny, nx)`` one) and
    26-connected for a 3D mask. Returns the weights and the number of regions.
    """
    from scipy import ndimage

    g = np.asarray(gt, dtype=bool)
    if g.ndim == 3 and g.shape[0] == 1:
        g = g[0]
    if not g.any():
        return np.zeros(0, dtype=np.float64), 0
    labels, n = ndimage.label(g, structure=np.ones((3,) * g.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel()).astype(np.float64)
    lab = labels.ravel()[np.flatnonzero(g.ravel())]
    return 1.0 / sizes[lab], int(n)


@dataclass
class _Curves:
    """Pooled curves at every distinct threshold, highest threshold first (without the (0,0) start)."""

    thresholds: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    pro: np.ndarray
    tp: np.ndarray  # flagged positive pixels
    fp: np.ndarray  # flagged normal pixels (weighted)
    n_pos: float
    n_neg: float


def _curves(scores: np.ndarray, positive: np.ndarray, neg_weight: np.ndarray | float, pro_weight: np.ndarray) -> _Curves:
    """One descending sort, cumulative sums cut at the end of every group of tied scores.

    ``neg_weight``: weight of each normal pixel (scalar or per pixel, ignored for positives).
    ``pro_weight``: per pixel, ``1 / (region size * number of regions)`` for positives, 0 otherwise.
    """
    scores = np.asarray(scores)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    ends = np.flatnonzero(s[1:] != s[:-1])
    ends = np.r_[ends, s.size - 1]
    thresholds = s[ends].astype(np.float64)
    del s
    pos_sorted = positive[order]
    tp = np.cumsum(pos_sorted, dtype=np.float64)[ends]
    if np.isscalar(neg_weight):
        fp = np.cumsum(~pos_sorted, dtype=np.float64)[ends] * float(neg_weight)
        n_neg = float((~positive).sum()) * float(neg_weight)
    else:
        w = np.where(pos_sorted, 0.0, np.asarray(neg_weight, dtype=np.float64)[order])
        fp = np.cumsum(w)[ends]
        n_neg = float(w.sum())
        del w
    del pos_sorted
    pro = np.cumsum(np.asarray(pro_weight, dtype=np.float64)[order])[ends]
    n_pos = float(positive.sum())
    fpr = fp / n_neg if n_neg > 0 else np.full_like(fp, np.nan)
    tpr = tp / n_pos if n_pos > 0 else np.full_like(tp, np.nan)
    return _Curves(thresholds, fpr, tpr, np.minimum(pro, 1.0), tp, fp, n_pos, n_neg)


def _integrate_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the polyline through (0,0) and the points (x, y), from 0 to ``limit``.

    ``x`` must be non-decreasing. The polyline is cut at ``limit`` by linear interpolation.
    """
    x = np.r_[0.0, np.asarray(x, dtype=np.float64)]
    y = np.r_[0.0, np.asarray(y, dtype=np.float64)]
    inside = x <= limit
    last = int(np.flatnonzero(inside)[-1])
    xs, ys = x[: last + 1], y[: last + 1]
    if last + 1 < x.size and x[last] < limit:
        x0, x1, y0, y1 = x[last], x[last + 1], y[last], y[last + 1]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.r_[xs, limit], np.r_[ys, y_lim]
    elif last + 1 == x.size and x[last] < limit:
        # The curve ends (every pixel flagged) before the limit: it stays at its last value.
        xs, ys = np.r_[xs, limit], np.r_[ys, ys[-1]]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def _prepare(anomaly_maps: Iterable[np.ndarray], gts: Iterable[np.ndarray]):
    scores, positive, pro_w = [], [], []
    n_regions = 0
    for amap, gt in zip(anomaly_maps, gts):
        amap = np.asarray(amap)
        gt = np.asarray(gt, dtype=bool)
        if amap.shape != gt.shape:
            raise ValueError(f"anomaly map shape {amap.shape} differs from ground-truth shape {gt.shape}")
        w, n = region_weights(gt)
        n_regions += n
        pw = np.zeros(gt.size, dtype=np.float64)
        pw[np.flatnonzero(gt.ravel())] = w
        scores.append(amap.ravel().astype(np.float64))
        positive.append(gt.ravel())
        pro_w.append(pw)
    if not scores:
        raise ValueError("no anomaly maps given")
    pro = np.concatenate(pro_w)
    if n_regions:
        pro /= n_regions
    return np.concatenate(scores), np.concatenate(positive), pro, n_regions


def pro_curve(anomaly_maps: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, PRO, thresholds) at every distinct score, highest threshold first (see module doc)."""
    s, pos, pw, _ = _prepare(anomaly_maps, gts)
    c = _curves(s, pos, 1.0, pw)
    return c.fpr, c.pro, c.thresholds


def aupro(anomaly_maps: Iterable[np.ndarray], gts: Iterable[np.ndarray], max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (1.0 for a perfect detector).

    ``anomaly_maps`` and ``gts`` are sequences of arrays of equal shapes (one pair per case). NaN
    when there is no anomalous region or no normal pixel.
    """
    if not 0 < max_fpr <= 1:
        raise ValueError("max_fpr must be in (0, 1]")
    s, pos, pw, n_regions = _prepare(anomaly_maps, gts)
    if n_regions == 0 or pos.all():
        return float("nan")
    c = _curves(s, pos, 1.0, pw)
    return _integrate_to(c.fpr, c.pro, max_fpr) / max_fpr


def best_dice(scores: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Best pooled Dice over all thresholds (flagged: score >= threshold) and its threshold."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(gt, dtype=bool).ravel()
    if not g.any():
        return float("nan"), float("nan")
    c = _curves(s, g, 1.0, np.zeros(s.size))
    d = 2 * c.tp / (c.tp + c.fp + c.n_pos)
    i = int(np.argmax(d))
    return float(d[i]), float(c.thresholds[i])


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    denom = int(p.sum()) + int(g.sum())
    return float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom


@dataclass
class PixelMetrics:
    pixel_auroc: float
    pixel_ap: float
    aupro: float
    best_dice: float
    best_dice_threshold: float
    dice_at_threshold: float
    n_pixels: int  # pixels evaluated (all of them, before subsampling)
    n_positive: int
    n_regions: int
    n_cases: int
    negative_stride: int
    max_fpr: float

    def to_dict(self) -> dict:
        def f(x):
            return None if x is None or not np.isfinite(x) else float(x)

        return {
            "pixel_auroc": f(self.pixel_auroc),
            "pixel_ap": f(self.pixel_ap),
            "aupro": f(self.aupro),
            "aupro_max_fpr": self.max_fpr,
            "best_dice": f(self.best_dice),
            "best_dice_threshold": f(self.best_dice_threshold),
            "dice_at_threshold": f(self.dice_at_threshold),
            "n_pixels": int(self.n_pixels),
            "n_positive_pixels": int(self.n_positive),
            "n_regions": int(self.n_regions),
            "n_cases": int(self.n_cases),
            "negative_stride": int(self.negative_stride),
        }


class PixelAccumulator:
    """Collects anomaly maps case by case and computes the pooled pixel metrics once.

    ``add(anomaly_map, gt, prediction=None)`` per test case (arrays of one shape; ``gt`` binary,
    all zero for a normal case; ``prediction`` an optional binary segmentation whose pooled Dice is
    counted exactly). Only what the metrics need is kept: every positive pixel with its score and
    region weight, and the scores of the normal pixels (every ``negative_stride``-th one when
    ``negative_stride > 1``; see the module documentation).
    """

    def __init__(self, negative_stride: int = 1, max_fpr: float = 0.3, keep_curves: bool = True):
        if negative_stride < 1:
            raise ValueError("negative_stride must be >= 1")
        self.stride = int(negative_stride)
        self.max_fpr = float(max_fpr)
        self.keep_curves = keep_curves
        self._neg: list[np.ndarray] = []
        self._pos: list[np.ndarray] = []
        self._pos_w: list[np.ndarray] = []
        self._offset = 0
        self.n_pixels = 0
        self.n_regions = 0
        self.n_cases = 0
        self._tp = self._fp = self._fn = 0
        self._has_prediction = False
        self.curves: Optional[dict] = None

    def add(self, anomaly_map: np.ndarray, gt: Optional[np.ndarray], prediction: Optional[np.ndarray] = None) -> None:
        amap = np.asarray(anomaly_map, dtype=np.float32)
        g = np.zeros(amap.shape, dtype=bool) if gt is None else np.asarray(gt, dtype=bool)
        if g.shape != amap.shape:
            raise ValueError(f"anomaly map shape {amap.shape} differs from ground-truth shape {g.shape}")
        flat = amap.ravel()
        if not np.isfinite(flat).all():
            flat = np.nan_to_num(flat, nan=0.0, posinf=np.finfo(np.float32).max, neginf=0.0)
        gflat = g.ravel()
        pos_idx = np.flatnonzero(gflat)
        if pos_idx.size:
            w, n = region_weights(g)
            self._pos.append(flat[pos_idx].copy())
            self._pos_w.append(w)
            self.n_regions += n
        start = (-self._offset) % self.stride
        sub = flat[start :: self.stride]
        self._neg.append(sub[~gflat[start :: self.stride]].copy())
        self._offset += flat.size
        self.n_pixels += flat.size
        self.n_cases += 1
        if prediction is not None:
            p = np.asarray(prediction, dtype=bool)
            if p.shape != g.shape:
                raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
            self._has_prediction = True
            tp = int((p & g).sum())
            self._tp += tp
            self._fp += int(p.sum()) - tp
            self._fn += int(g.sum()) - tp

    @property
    def n_positive(self) -> int:
        return int(sum(p.size for p in self._pos))

    def compute(self) -> PixelMetrics:
        from sklearn.metrics import average_precision_score, roc_auc_score

        nan = float("nan")
        pos = np.concatenate(self._pos) if self._pos else np.zeros(0, np.float32)
        neg = np.concatenate(self._neg) if self._neg else np.zeros(0, np.float32)
        dice_thr = nan
        if self._has_prediction and (2 * self._tp + self._fp + self._fn) > 0:
            dice_thr = 2 * self._tp / (2 * self._tp + self._fp + self._fn)
        if pos.size == 0 or neg.size == 0:
            return PixelMetrics(nan, nan, nan, nan, nan, dice_thr, self.n_pixels, pos.size, self.n_regions, self.n_cases, self.stride, self.max_fpr)
        scores = np.concatenate([neg, pos])
        y = np.zeros(scores.size, dtype=bool)
        y[neg.size :] = True
        weight = None
        if self.stride > 1:
            weight = np.where(y, 1.0, float(self.stride))
        auroc = float(roc_auc_score(y, scores, sample_weight=weight))
        ap = float(average_precision_score(y, scores, sample_weight=weight))
        pro_w = np.zeros(scores.size, dtype=np.float64)
        pro_w[neg.size :] = np.concatenate(self._pos_w) / max(self.n_regions, 1)
        del neg
        c = _curves(scores, y, float(self.stride), pro_w)
        del scores, y, pro_w, weight
        pro_area = _integrate_to(c.fpr, c.pro, self.max_fpr) / self.max_fpr
        d = 2 * c.tp / (c.tp + c.fp + c.n_pos)
        i = int(np.argmax(d))
        if self.keep_curves:
            fx, fy = _thin(np.r_[0.0, c.fpr], np.r_[0.0, c.tpr], 1024)
            inside = c.fpr <= self.max_fpr
            px, py = _thin(np.r_[0.0, c.fpr[inside]], np.r_[0.0, c.pro[inside]], 1024)
            self.curves = {"roc_fpr": fx, "roc_tpr": fy, "pro_fpr": px, "pro": py}
        return PixelMetrics(
            auroc, ap, pro_area, float(d[i]), float(c.thresholds[i]), dice_thr,
            self.n_pixels, int(c.n_pos), self.n_regions, self.n_cases, self.stride, self.max_fpr,
        )
