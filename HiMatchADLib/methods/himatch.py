"""``himatch`` (HiMatch-AD): dual-branch retrieval, stage maps against clustered support features, reliability-weighted fusion."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..bank.store import NormalBank
from ..core.result import Support
from .base import MethodSpec, QuerySlice, Scorer, SliceScores, register_method
from .fusion import FUSIONS, fuse_stages, stage_reliability, stage_weights, standardise
from .maps import max_cos_to_slices


class HiMatchScorer(Scorer):
    """Dual-branch retrieval, clustered multi-stage maps, reliability-weighted fusion (``fusion``, see :mod:`.fusion`)."""

    name = "himatch"

    def __init__(
        self,
        bank: NormalBank,
        k: int = 8,
        candidates: int = 32,
        alpha: float = 0.5,
        position_window: Optional[float] = None,
        fusion: str = FUSIONS[0],
        groups: Optional[np.ndarray] = None,
    ):
        self.bank = bank
        # Subject of each bank slice (what a calibration query excludes); the bank's own by default.
        self.groups = bank.slice_group if groups is None else np.asarray(groups)
        self.k = int(max(1, min(k, bank.n_slices)))
        self.candidates = int(max(self.k, candidates))
        self.alpha = float(alpha)
        self.position_window = position_window
        self.fusion = fusion
        self.stages = bank.stages
        self.calibration: Optional[dict] = None  # {"median": [S], "sigma": [S], "reliability": [S], "weights": [S]}
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
            last_cos = max_cos_to_slices(bank, self._last, q.tokens[-1], cand)
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
            cos = last_cos if (st == self._last and last_cos is not None) else max_cos_to_slices(self.bank, st, q.tokens[si], supports)
            d = 1.0 - cos  # (n, K)
            a[si] = d.min(1)
            v[si] = d.var(1)
        return a, v

    def fuse(self, a: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.calibration is None:
            raise RuntimeError("himatch fusion needs calibration statistics")
        z, vt = standardise(a, v, self.calibration["median"], self.calibration["sigma"])
        return fuse_stages(z, vt, self.fusion, self.calibration.get("weights"))

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

    def apply_feedback(self, queries: list, scores: list, evidence) -> None:
        """Marked slices as extra supports: each stage score is the distance to the closest support,
        the marked slices' clusters included (:mod:`.feedback`); then fused again."""
        for q, s in zip(queries, scores):
            if s.stage is None:
                continue
            a = s.stage.copy()
            for si in range(a.shape[0]):
                d = evidence.distance(si, q.tokens[si])
                if d is not None:
                    np.minimum(a[si], d, out=a[si])
            s.stage = a
            s.patch = self.fuse(a, s.var).astype(np.float32)

    # ------------------------------------------------------------------ calibration protocol
    def calibration_scores(self, queries: list) -> list:
        """Held-out slices are scored unfused: the fusion needs the stage statistics they give."""
        return self.score(queries, fuse=False)

    def calibrate(self, centre: list, collected: list) -> dict:
        """Median and robust spread (1.4826 MAD) of every stage's raw scores over the held-out
        slices, and each stage's reliability (mean standardised support variance over them, see
        :mod:`.fusion`); the held-out scores are then fused with them."""
        a = np.concatenate([s.stage for s in centre], axis=1)
        v = np.concatenate([s.var for s in centre], axis=1)
        med = np.median(a, axis=1)
        sig = np.maximum(1.4826 * np.median(np.abs(a - med[:, None]), axis=1), 1e-6)
        rel = stage_reliability(standardise(a, v, med, sig)[1])
        self.calibration = {
            "stages": list(self.stages),
            "median": med.tolist(),
            "sigma": sig.tolist(),
            "reliability": rel.tolist(),
            "weights": stage_weights(rel).tolist(),
        }
        for s in collected:
            s.patch = self.fuse(s.stage, s.var).astype(np.float32)
        return {"stages": self.calibration}

    def set_calibration(self, record: dict) -> None:
        self.calibration = record["stages"]

    def calibration_warnings(self) -> list:
        if not self.bank.uses_codebook:
            return []
        return [
            "the shared codebook was trained on every normal slice, the calibration subjects included: "
            "the calibrated threshold may be optimistic"
        ]


def _softplus(pix: np.ndarray) -> np.ndarray:
    # softplus: positive (background, 0, stays lowest), monotone (no ties among foreground
    # pixels, so ranking metrics see the whole score), ~identity above 2 standard deviations.
    return np.logaddexp(0.0, pix, out=pix)


def _make(detector, held_out_groups: list) -> HiMatchScorer:
    return HiMatchScorer(
        detector.bank, detector.k, detector.candidates, detector.alpha, detector.position_window, detector.fusion, groups=detector.slice_subject
    )


SPEC = register_method(
    MethodSpec(
        name="himatch",
        title="HiMatch-AD: dual-branch retrieval, clustered multi-stage maps, reliability-weighted fusion",
        reference="arXiv 2606.22556",
        make_scorer=_make,
        key_settings=lambda detector: ["k", "position_window", "candidates", "alpha", "fusion"],
        pixel_transform=_softplus,
        uses_fusion=True,
        feedback="clusters",
    )
)
