"""``knn`` (AnomalyDINO): nearest normal patch, 1 - cosine."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ..bank.store import NormalBank
from .base import MethodSpec, Scorer, SliceScores, register_method
from .knn_index import check_knn_index, open_index


class KnnScorer(Scorer):
    """Nearest normal last-stage token of every query token, through the index ``index``
    (``exact``, ``ivf`` or ``hnsw``; see :mod:`HiMatchADLib.methods.knn_index`)."""

    name = "knn"

    def __init__(self, bank: NormalBank, groups: Optional[np.ndarray] = None, index: str = "exact", reporter=None):
        self.bank = bank
        # Subject of each bank slice (what a calibration query excludes); the bank's own by default.
        self.groups = bank.slice_group if groups is None else np.asarray(groups)
        self.index = check_knn_index(index)
        self.reporter = reporter
        self.timings: dict = {}

    def searcher(self):
        """The index over the bank's tokens (built, loaded or reused on first use)."""

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

    def describe(self) -> dict:
        return {"knn_index": self.index_info}

    def fit_warnings(self) -> list:
        info = self.index_info
        return [info["warning"]] if "warning" in info else []


def _make(detector, held_out_groups: list) -> KnnScorer:
    scorer = KnnScorer(detector.bank, groups=detector.slice_subject, index=detector.knn_index, reporter=detector.reporter)
    scorer.searcher()  # built or loaded now, not in the first prediction
    return scorer


SPEC = register_method(
    MethodSpec(
        name="knn",
        title="AnomalyDINO: nearest normal patch, 1 - cosine",
        reference="AnomalyDINO (WACV 2025)",
        make_scorer=_make,
        # exact: the key calibrations had before the index existed
        key_settings=lambda detector: [] if detector.knn_index == "exact" else ["knn_index"],
        uses_knn_index=True,
        smoothing_sigma=4.0,  # AnomalyDINO: the map resized to the image, then a Gaussian of 4 image pixels
    )
)
