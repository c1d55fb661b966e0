r"""Patch scoring for the three modes, and the maps built from patch scores.

Notation: a query slice has foreground patches :math:`i` with unit tokens :math:`q_i^{(s)}` at
stage :math:`s`; :math:`\cos` is the inner product of unit vectors.

``knn`` (AnomalyDINO): :math:`a_i = 1 - \max_{b \in \mathcal{B}} \cos(q_i, b)` over every
foreground patch token :math:`b` of every normal slice (last stage; by default exact, faiss
brute-force inner products; ``knn_index`` ``ivf`` or ``hnsw`` find the maximum approximately, see
``knn_index.py``).

``dpmm`` (AnomalyDINO-DPMM): a Dirichlet-process Gaussian mixture (truncated at 200 components,
diagonal covariances, stick-breaking concentration prior 2) is fitted to a seeded sample of at most
50 000 normal last-stage tokens; with component means :math:`\mu_c` L2-normalised,
:math:`a_i = 1 - \max_c \cos(q_i, \mu_c)` over the components that explain normal tokens: weight
:math:`\pi_c > 10^{-6}` (the reference's cut), summed responsibility of the fitted tokens
:math:`\ge 1` and at least one token whose most likely component it is. The variational fit gives
every unused component a weight of about :math:`1/n` and the prior mean (the mean of the data) as its
mean; the weight cut alone would keep them and make the average token look perfectly normal.

``himatch``:

1. Retrieval (dual branch). Global branch: :math:`g_n = \cos(\mathrm{cls}_q, \mathrm{cls}_n)` for every
   normal slice :math:`n` (faiss inner-product search); the best ``candidates`` slices are kept, and
   for volumes only slices whose relative position lies within ``position_window`` of the query's
   (slice-position prior). Patch branch: :math:`p_n = \mathrm{mean}_i \max_{c \in C_n} \cos(q_i, c)`
   over the last-stage clustered features :math:`C_n` of slice :math:`n` (below). Candidates are ranked by
   :math:`r_n = \alpha g_n + (1 - \alpha) p_n` and the top :math:`K` are the supports.
2. Stage maps. For each stage :math:`s` and support :math:`k`,
   :math:`d_{ik}^{(s)} = 1 - \max_{c \in C_k^{(s)}} \cos(q_i^{(s)}, c)` against the support's clustered
   features :math:`C_k^{(s)}`, computed when the bank was built: the spherical k-means centroids
   (64 per slice) of the support slice's own foreground tokens at stage :math:`s`, as in HiMatch-AD,
   which compares the query with the clustered features of the retrieved references. (Opt-in
   ``shared_codebook``: each centroid is replaced by its entry in a codebook shared by the whole
   normal set, spherical k-means over all slice centroids of the stage with :math:`8\sqrt{m}`
   entries for :math:`m` centroids.) The stage score is the
   distance to the closest support, :math:`a_i^{(s)} = \min_k d_{ik}^{(s)}`, and its uncertainty the
   spread across supports, :math:`v_i^{(s)} = \mathrm{Var}_k\, d_{ik}^{(s)}`.
3. Calibration. Each stage is standardised against its own normal-score distribution, measured on
   held-out normal slices (leave-one-subject-out): :math:`z_i^{(s)} = (a_i^{(s)} - m_s) / \sigma_s`
   with :math:`m_s` the median and :math:`\sigma_s = 1.4826\,\mathrm{MAD}` of the held-out
   :math:`a^{(s)}`.
4. Uncertainty-weighted fusion. With the variance in the same units,
   :math:`\tilde v_i^{(s)} = v_i^{(s)} / \sigma_s^2`, the weights are
   :math:`w_i^{(s)} = 1 / (\tilde v_i^{(s)} + \tau)` and the fused score is
   :math:`F_i = \sum_s w_i^{(s)} z_i^{(s)} / \sum_s w_i^{(s)}` (:math:`\tau = 1` keeps the weights
   bounded: with agreeing supports the fusion is the plain mean of the stages).

Maps (all modes): patch scores on the patch grid (background patches set to the slice's median
foreground score) are upsampled bilinearly to the slice's pixel grid and smoothed with a Gaussian of
sigma 4 pixels of the model input; pixels outside the foreground are 0. The ``himatch`` pixel map is passed through
:math:`\mathrm{softplus}(F) = \log(1 + e^F)`: positive inside the foreground (so the background's 0 stays
the lowest value), strictly increasing (no ties among foreground pixels, unlike clipping at 0), and
within 0.13 of :math:`F` ("standard deviations above normal") wherever :math:`F \ge 2`. Slice score: mean of the top 1 % patch scores of the slice;
volume score: mean of the top 1 % of all foreground patch scores of the volume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .bank import NormalBank
from .result import Support


@dataclass
class QuerySlice:
    index: int  # slice index in the prepared volume
    tokens: list  # per stage (n_fg, D) float32 unit vectors
    cls: np.ndarray  # (D,)
    fg: np.ndarray  # (gh*gw,) bool
    grid: tuple
    pos: float = float("nan")
    group: Optional[int] = None  # bank group to exclude (calibration)


@dataclass
class SliceScores:
    patch: np.ndarray  # (n_fg,) final patch scores
    stage: Optional[np.ndarray] = None  # (S, n_fg) raw stage scores (himatch)
    var: Optional[np.ndarray] = None  # (S, n_fg) variance across supports (himatch)
    supports: list = field(default_factory=list)


def top_percent_mean(x: np.ndarray, percent: float = 1.0) -> float:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan")
    n = max(1, int(np.ceil(x.size * percent / 100.0)))
    return float(np.mean(np.partition(x, x.size - n)[x.size - n :]))


def patch_to_pixels(scores: np.ndarray, fg: np.ndarray, grid: tuple, out_hw: tuple, sigma: float = 4.0, model_hw: Optional[tuple] = None) -> np.ndarray:
    """Foreground patch scores -> smoothed pixel map of size ``out_hw`` (bilinear, then Gaussian).

    ``sigma`` is in pixels of the model input (``model_hw``), as in AnomalyDINO where the map is
    smoothed at the model's resolution; it is converted to the output grid's pixels per axis.
    """
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    full = np.full(grid[0] * grid[1], float(np.median(scores)) if scores.size else 0.0, dtype=np.float32)
    full[fg] = scores
    t = torch.from_numpy(full.reshape(1, 1, grid[0], grid[1]))
    up = F.interpolate(t, size=tuple(out_hw), mode="bilinear", align_corners=False)[0, 0].numpy()
    if sigma > 0:
        if model_hw is not None:
            sig = (sigma * out_hw[0] / model_hw[0], sigma * out_hw[1] / model_hw[1])
        else:
            sig = (sigma, sigma)
        up = gaussian_filter(up, sigma=sig)
    return up.astype(np.float32)


def _segment_max(sims: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Max over column segments ``[offsets[k], offsets[k+1])`` -> (rows, K)."""
    return np.maximum.reduceat(sims, offsets[:-1], axis=1)


def _max_cos_to_slices(bank: NormalBank, stage: int, tokens: np.ndarray, slices) -> np.ndarray:
    """(n, len(slices)): for each query token, max cosine to each slice's clustered features.

    Per-slice centroids (default): only the rows of ``slices`` are read from the memory-mapped
    bank. Shared codebooks: the entries of all the slices are gathered once (deduplicated), so the
    product costs ``n x (#distinct entries)`` however many slices share them.
    """
    offs = bank.cent_offsets[stage]
    if not bank.uses_codebook:
        cents = bank.centroids[stage]
        segs = [np.asarray(cents[offs[c] : offs[c + 1]], dtype=np.float32) for c in slices]
        seg_off = np.cumsum([0] + [s.shape[0] for s in segs])
        return _segment_max(tokens @ np.concatenate(segs).T, seg_off)
    codes = bank.codes[stage]
    segs = [codes[offs[c] : offs[c + 1]] for c in slices]
    seg_off = np.cumsum([0] + [s.shape[0] for s in segs])
    used, inv = np.unique(np.concatenate(segs), return_inverse=True)
    sims = tokens @ bank.codebook_f32(stage)[used].T
    return _segment_max(sims[:, inv], seg_off)


class KnnScorer:
    """Nearest normal last-stage token of every query token, through the index ``index``
    (``exact``, ``ivf`` or ``hnsw``; see :mod:`HiMatchADLib.knn_index`)."""

    name = "knn"

    def __init__(self, bank: NormalBank, groups: Optional[np.ndarray] = None, index: str = "exact", reporter=None):
        from .knn_index import check_knn_index

        self.bank = bank
        # Subject of each bank slice (what a calibration query excludes); the bank's own by default.
        self.groups = bank.slice_group if groups is None else np.asarray(groups)
        self.index = check_knn_index(index)
        self.reporter = reporter
        self.timings: dict = {}

    def searcher(self):
        """The index over the bank's tokens (built, loaded or reused on first use)."""
        from .knn_index import open_index

        return open_index(self.bank, self.index, self.reporter)

    @property
    def index_info(self) -> dict:
        """Kind, parameters, bytes and provenance of the index (see ``knn_index.open_index``)."""
        return dict(self.searcher().info)

    def max_sim(self, q: np.ndarray, exclude_group: Optional[int] = None) -> np.ndarray:
        """Max cosine of each row of ``q`` to the bank's tokens, without the tokens of the slices
        of subject ``exclude_group`` when given."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        keep = None
        if exclude_group is not None:
            keep = np.repeat(self.groups != exclude_group, np.diff(self.bank.tok_offsets))
            if keep.all():
                keep = None
        return self.searcher().max_sim(q, keep)

    def score(self, queries: list) -> list:
        t = time.perf_counter()
        # One search per exclusion group (all queries of a predict() share group None).
        by_group: dict = {}
        for n, q in enumerate(queries):
            by_group.setdefault(q.group, []).append(n)
        res: list = [None] * len(queries)
        for g, members in by_group.items():
            toks = [queries[n].tokens[-1] for n in members]
            sims = self.max_sim(np.concatenate(toks), g)
            off = np.cumsum([0] + [t_.shape[0] for t_ in toks])
            for j, n in enumerate(members):
                res[n] = SliceScores(patch=(1.0 - sims[off[j] : off[j + 1]]).astype(np.float32))
        self.timings["matching"] = self.timings.get("matching", 0.0) + time.perf_counter() - t
        return res


class DpmmScorer:
    """Distance to the nearest used Dirichlet-process mixture component mean (AnomalyDINO-DPMM).

    Only components that explain normal tokens are kept: weight above ``min_weight`` (the
    reference's 1e-6), at least one token's worth of responsibility (``soft_counts >= 1``) and at
    least one token assigned to them (``hard_counts >= 1``). scikit-learn's variational mixture
    leaves every unused stick component with a weight of about 1/n and the prior mean (the global
    mean of the data) as its mean; keeping those would make "average tissue" match perfectly.
    """

    name = "dpmm"

    def __init__(self, means: np.ndarray, weights: np.ndarray, soft_counts: np.ndarray, hard_counts: np.ndarray, min_weight: float = 1e-6):
        hard_counts = np.asarray(hard_counts)
        keep = (np.asarray(weights) > min_weight) & (np.asarray(soft_counts) >= 1.0) & (hard_counts >= 1)
        if not keep.any():  # degenerate fit: the most used component(s)
            keep = hard_counts == hard_counts.max()
        m = np.asarray(means[keep], dtype=np.float32)
        self.means = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
        self.weights = np.asarray(weights[keep], dtype=np.float32)
        self.n_fitted = int(len(weights))
        self.timings: dict = {}

    @staticmethod
    def fit(
        tokens: np.ndarray,
        n_components: int = 100,
        covariance_type: str = "diag",
        max_iter: int = 200,
        seed: int = 0,
        concentration: Optional[float] = None,
        chunk: int = 8192,
    ) -> dict:
        """Fit the mixture (scikit-learn ``BayesianGaussianMixture``, Dirichlet-process prior).

        ``concentration``: the stick-breaking concentration prior (None: scikit-learn's
        ``1 / n_components``). Returns ``means``, ``weights``, ``soft_counts`` (summed
        responsibilities of the fitted tokens per component), ``hard_counts`` (tokens whose most
        likely component it is), ``converged`` and ``n_iter``.
        """
        import warnings as _w

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import BayesianGaussianMixture

        x = np.asarray(tokens, dtype=np.float64)
        n_components = int(max(1, min(n_components, x.shape[0])))
        gm = BayesianGaussianMixture(
            n_components=n_components,
            covariance_type=covariance_type,
            weight_concentration_prior_type="dirichlet_process",
            weight_concentration_prior=concentration,
            max_iter=max_iter,
            random_state=seed,
            init_params="kmeans",
        )
        with _w.catch_warnings():
            _w.simplefilter("ignore", ConvergenceWarning)
            gm.fit(x)
        soft = np.zeros(n_components, np.float64)
        hard = np.zeros(n_components, np.int64)
        for a in range(0, x.shape[0], chunk):
            resp = gm.predict_proba(x[a : a + chunk])
            soft += resp.sum(0)
            hard += np.bincount(resp.argmax(1), minlength=n_components)
        return {
            "means": gm.means_.astype(np.float32),
            "weights": gm.weights_.astype(np.float32),
            "soft_counts": soft.astype(np.float32),
            "hard_counts": hard,
            "converged": bool(gm.converged_),
            "n_iter": int(gm.n_iter_),
        }

    def score(self, queries: list) -> list:
        t = time.perf_counter()
        out = []
        for q in queries:
            sims = q.tokens[-1] @ self.means.T
            out.append(SliceScores(patch=(1.0 - sims.max(1)).astype(np.float32)))
        self.timings["matching"] = self.timings.get("matching", 0.0) + time.perf_counter() - t
        return out


class HiMatchScorer:
    """Dual-branch retrieval, clustered multi-stage maps, uncertainty-weighted fusion."""

    name = "himatch"

    def __init__(
        self,
        bank: NormalBank,
        k: int = 8,
        candidates: int = 32,
        alpha: float = 0.5,
        position_window: Optional[float] = 0.15,
        tau: float = 1.0,
        groups: Optional[np.ndarray] = None,
    ):
        self.bank = bank
        # Subject of each bank slice (what a calibration query excludes); the bank's own by default.
        self.groups = bank.slice_group if groups is None else np.asarray(groups)
        self.k = int(max(1, min(k, bank.n_slices)))
        self.candidates = int(max(self.k, candidates))
        self.alpha = float(alpha)
        self.position_window = position_window
        self.tau = float(tau)
        self.stages = bank.stages
        self.calibration: Optional[dict] = None  # {"median": [S], "sigma": [S]}
        self.timings: dict = {}
        self._last = self.stages[-1]
        self._cls_index = None

    def _search_cls(self, cls: np.ndarray, n: int):
        import faiss

        if self._cls_index is None:
            self._cls_index = faiss.IndexFlatIP(self.bank.cls.shape[1])
            self._cls_index.add(self.bank.cls_f32())
        D, I = self._cls_index.search(np.ascontiguousarray(cls, dtype=np.float32), n)
        return D, I

    def retrieve(self, queries: list) -> list:
        """Supports per query: list of (slice ids (K,), similarities (K,), last-stage max cosine
        (n_fg, K) of each query token to each support's clustered features, or None)."""
        bank = self.bank
        n_bank = bank.n_slices
        n_search = min(n_bank, max(8 * self.candidates, 256))
        D, I = self._search_cls(np.stack([q.cls for q in queries]), n_search)
        use_pos = self.position_window is not None and bank.has_positions
        out = []
        for qi, q in enumerate(queries):
            ids, sims = I[qi], D[qi]
            valid = ids >= 0
            if q.group is not None:
                valid &= self.groups[np.maximum(ids, 0)] != q.group
            cand = ids[valid]
            csim = sims[valid]
            if use_pos and np.isfinite(q.pos):
                bp = bank.slice_pos[cand]
                near = ~np.isfinite(bp) | (np.abs(bp - q.pos) <= self.position_window)
                if near.sum() >= self.k:
                    cand, csim = cand[near], csim[near]
            if cand.size < self.k and n_search < n_bank:  # everything was filtered: search all
                Dall, Iall = self._search_cls(q.cls[None], n_bank)
                ok = self.groups[Iall[0]] != q.group if q.group is not None else np.ones(n_bank, bool)
                cand, csim = Iall[0][ok], Dall[0][ok]
            cand, csim = cand[: self.candidates], csim[: self.candidates]
            if cand.size == 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.float32), None))
                continue
            # Patch branch on the candidates' last-stage clustered features.
            last_cos = _max_cos_to_slices(bank, self._last, q.tokens[-1], cand)
            r = self.alpha * csim + (1.0 - self.alpha) * last_cos.mean(0)
            order = np.argsort(-r, kind="stable")[: self.k]
            out.append((cand[order].astype(np.int64), r[order].astype(np.float32), last_cos[:, order]))
        return out

    def stage_scores(self, q: QuerySlice, supports: np.ndarray, last_cos: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(S, n_fg) closest-support distance and (S, n_fg) variance across supports.

        ``last_cos``: the last stage's (n_fg, K) max cosines to the supports when retrieval already
        computed them.
        """
        S = len(self.stages)
        n = q.tokens[0].shape[0]
        a = np.empty((S, n), np.float32)
        v = np.empty((S, n), np.float32)
        for si, st in enumerate(self.stages):
            cos = last_cos if (st == self._last and last_cos is not None) else _max_cos_to_slices(self.bank, st, q.tokens[si], supports)
            d = 1.0 - cos  # (n, K)
            a[si] = d.min(1)
            v[si] = d.var(1)
        return a, v

    def fuse(self, a: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.calibration is None:
            raise RuntimeError("himatch fusion needs calibration statistics")
        med = np.asarray(self.calibration["median"], np.float32)[:, None]
        sig = np.asarray(self.calibration["sigma"], np.float32)[:, None]
        z = (a - med) / sig
        w = 1.0 / (v / sig**2 + self.tau)
        return (w * z).sum(0) / w.sum(0)

    def score(self, queries: list, fuse: bool = True) -> list:
        t0 = time.perf_counter()
        sup = self.retrieve(queries)
        t1 = time.perf_counter()
        out = []
        t_fuse = 0.0
        for q, (ids, sims, last_cos) in zip(queries, sup):
            if ids.size == 0:
                out.append(SliceScores(patch=np.zeros(q.tokens[0].shape[0], np.float32)))
                continue
            a, v = self.stage_scores(q, ids, last_cos)
            tf = time.perf_counter()
            patch = self.fuse(a, v) if fuse else a[-1]
            t_fuse += time.perf_counter() - tf
            supports = [
                Support(self.bank.files[int(self.bank.slice_file[i])], int(self.bank.slice_index[i]), float(s)) for i, s in zip(ids, sims)
            ]
            out.append(SliceScores(patch=patch.astype(np.float32), stage=a, var=v, supports=supports))
        t2 = time.perf_counter()
        self.timings["retrieval"] = self.timings.get("retrieval", 0.0) + (t1 - t0)
        self.timings["stage_maps"] = self.timings.get("stage_maps", 0.0) + (t2 - t1 - t_fuse)
        self.timings["fusion"] = self.timings.get("fusion", 0.0) + t_fuse
        return out

# ------------------------------------------------------------------ 3D-consistent maps
# 3D-consistent maps: each slice's map fused with those of its neighbours within a distance in mm.
#
# The papers score 2D images one at a time. In a volume, neighbouring slices image the same anatomy,
# so a real anomaly appears in several adjacent slice maps while matching noise does not. With
# ``consistency_mm`` = s, the map of slice i becomes the normalised Gaussian average over the scored
# slices j with |z_i - z_j| <= 3 s (z: slice position in mm, weights exp(-(z_i - z_j)^2 / 2 s^2)),
# pixel by pixel and over foreground pixels only:
#
#     F_i(x) = sum_j g_ij fg_j(x) M_j(x) / sum_j g_ij fg_j(x)
#
# so background pixels of a neighbour (map 0) do not dilute the average. Pixels outside the
# foreground of slice i stay 0.


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
