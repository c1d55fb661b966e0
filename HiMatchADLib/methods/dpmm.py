"""``dpmm`` (AnomalyDINO-DPMM): distance to the nearest component of a Dirichlet-process mixture of normal patches."""

from __future__ import annotations

import time
import warnings
from typing import Optional

import numpy as np

from ..core.atomic import atomic_path
from .base import MethodSpec, Scorer, SliceScores, register_method


class DpmmScorer(Scorer):
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
        # The fit as given (what a bank file stores; the same scorer is made from it again).
        self.fitted = {"means": np.asarray(means), "weights": np.asarray(weights), "soft_counts": np.asarray(soft_counts), "hard_counts": hard_counts}
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
        n_components: int = 200,
        covariance_type: str = "diag",
        max_iter: int = 200,
        seed: int = 0,
        concentration: Optional[float] = 2.0,
        chunk: int = 8192,
    ) -> dict:
        """Fit the mixture (scikit-learn ``BayesianGaussianMixture``, Dirichlet-process prior).

        Defaults as the detector's (200 components, concentration 2, the reference's initial
        value). ``concentration``: the stick-breaking concentration prior (None: scikit-learn's
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


#: Version of the cached mixture file (2: with soft and hard component counts).
DPMM_FORMAT = 2
_FIELDS = ("means", "weights", "soft_counts", "hard_counts")


def _make(detector, held_out_groups: list) -> DpmmScorer:
    """The mixture of the detector's bank without the held-out subjects: loaded from the bank's
    cache when fitted before with the same settings, else fitted and cached (atomically)."""
    bank = detector.bank
    if "dpmm" in bank.extras:  # the mixture a bank file brought (fitted where the bank was made)
        return DpmmScorer(*(bank.extras["dpmm"][f] for f in _FIELDS))
    key = {k: v for k, v in detector.method_key().items() if k.startswith("dpmm") or k == "seed"}
    key["held_out"] = [detector.subjects[int(g)] for g in held_out_groups]
    key["dpmm_format"] = DPMM_FORMAT
    path = bank.extra_path("dpmm", key, ".npz")
    if path.exists():
        try:
            z = np.load(path, allow_pickle=False)
            return DpmmScorer(*(z[f] for f in _FIELDS))
        except Exception as exc:
            warnings.warn(f"cached mixture {path} unreadable ({exc}); refitting")
    detector.reporter("Fitting Dirichlet-process mixture", 0, 1)
    held = np.isin(detector.slice_subject, held_out_groups) if len(detector.subjects) > 1 else np.zeros(bank.n_slices, bool)
    rows = np.concatenate([np.arange(bank.tok_offsets[i], bank.tok_offsets[i + 1]) for i in np.flatnonzero(~held)])
    rng = np.random.default_rng(detector.seed)
    if rows.size > detector.dpmm_max_tokens:
        rows = np.sort(rng.choice(rows, detector.dpmm_max_tokens, replace=False))
    fit = DpmmScorer.fit(
        np.asarray(bank.tokens[rows], dtype=np.float32),
        detector.dpmm_components,
        detector.dpmm_covariance,
        seed=detector.seed,
        concentration=detector.dpmm_concentration,
    )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            **{k: fit[k] for k in _FIELDS},
            converged=np.asarray(fit["converged"]),
            n_iter=np.asarray(fit["n_iter"]),
            n_tokens=np.asarray(rows.size),
        )
    detector.reporter("Fitting Dirichlet-process mixture", 1, 1)
    return DpmmScorer(*(fit[k] for k in _FIELDS))


SPEC = register_method(
    MethodSpec(
        name="dpmm",
        title="AnomalyDINO-DPMM: distance to the nearest component of a Dirichlet-process mixture of normal patches",
        reference="arXiv 2509.19997 (MICCAI 2025)",
        make_scorer=_make,
        key_settings=lambda detector: ["dpmm_components", "dpmm_max_tokens", "dpmm_covariance", "dpmm_concentration"],
        held_out_of_fit=True,
        smoothing_sigma=0.0,  # the reference interpolates its maps bilinearly and does not smooth them
        feedback="components",
    )
)
