"""Scoring steps against reference computations on constructed data where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from HiMatchADLib.scoring import DpmmScorer, QuerySlice


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clusters_on_sphere(n=3000, d=32, k=5, spread=0.04, seed=0):
    """``k`` well separated clusters of unit vectors (centres nearly orthogonal in ``d`` dims)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(k, d)))
    labels = rng.integers(0, k, n)
    x = _unit(centres[labels] + spread * rng.normal(size=(n, d)))
    return x.astype(np.float32), centres.astype(np.float32), labels


def _query(tokens):
    t = np.asarray(tokens, np.float32)
    return QuerySlice(0, [t], t[0], np.ones(len(t), bool), (1, len(t)))


def test_dpmm_keeps_exactly_the_used_components():
    x, centres, labels = _clusters_on_sphere()
    fit = DpmmScorer.fit(x, n_components=30, seed=0)
    assert fit["hard_counts"].sum() == len(x) and fit["soft_counts"].sum() == pytest.approx(len(x), rel=1e-4)
    scorer = DpmmScorer(fit["means"], fit["weights"], fit["soft_counts"], fit["hard_counts"])
    # One kept component per true cluster, at the cluster's centre.
    assert scorer.means.shape == (5, 32)
    cos = scorer.means @ centres.T
    assert sorted(cos.argmax(1).tolist()) == [0, 1, 2, 3, 4]
    assert cos.max(1).min() > 0.99
    # Reference (AnomalyDINO-DPMM): 1 - cosine to the nearest component mean; here the components are
    # the cluster means, so the normal scores are 1 - max cosine to the true centres.
    ref = 1.0 - (x @ _unit(np.stack([x[labels == c].mean(0) for c in range(5)])).T).max(1)
    got = scorer.score([_query(x)])[0].patch
    np.testing.assert_allclose(got, ref, atol=2e-3)
    # "Average tissue": the global mean direction lies between the clusters and is anomalous.
    g = _unit(x.mean(0))
    s_mean = scorer.score([_query(g[None])])[0].patch[0]
    assert s_mean == pytest.approx(1.0 - (centres @ g).max(), abs=0.01)
    assert s_mean > 5 * np.quantile(got, 0.99)


def test_unused_stick_components_sit_at_the_global_mean():
    """What the count rule removes: sklearn gives unused components ~1/n weight and the data mean."""
    x, _, _ = _clusters_on_sphere(seed=1)
    fit = DpmmScorer.fit(x, n_components=30, seed=0)
    unused = fit["hard_counts"] == 0
    assert (fit["weights"][unused] > 1e-6).sum() > 5  # the weight cut alone keeps them
    g = _unit(x.mean(0))
    assert (_unit(fit["means"][unused & (fit["weights"] > 1e-6)]) @ g).min() > 0.99
    weight_only = DpmmScorer(fit["means"], fit["weights"], np.ones(30), np.ones(30, int))
    assert weight_only.score([_query(g[None])])[0].patch[0] < 0.01  # would call the mean normal
