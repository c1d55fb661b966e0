"""Scoring steps against reference computations on constructed data where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from HiMatchADLib.methods.dpmm import DpmmScorer
from HiMatchADLib.methods.base import QuerySlice


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
    fit = DpmmScorer.fit(x, n_components=30, seed=0, concentration=None)  # scikit-learn's default prior
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
    fit = DpmmScorer.fit(x, n_components=30, seed=0, concentration=None)  # scikit-learn's default prior
    unused = fit["hard_counts"] == 0
    assert (fit["weights"][unused] > 1e-6).sum() > 5  # the weight cut alone keeps them
    g = _unit(x.mean(0))
    assert (_unit(fit["means"][unused & (fit["weights"] > 1e-6)]) @ g).min() > 0.99
    weight_only = DpmmScorer(fit["means"], fit["weights"], np.ones(30), np.ones(30, int))
    assert weight_only.score([_query(g[None])])[0].patch[0] < 0.01  # would call the mean normal


def _hand_bank(tmp_path, centroids_per_slice: list, stages=(1, 2)):
    """A NormalBank built in memory: per stage, each slice's centroids as given (float16 memmaps)."""
    from HiMatchADLib.bank.store import NormalBank

    n = len(centroids_per_slice)
    d = centroids_per_slice[0].shape[1]
    offs = np.cumsum([0] + [len(c) for c in centroids_per_slice]).astype(np.int64)
    rows = np.concatenate(centroids_per_slice).astype(np.float16)
    cents = {}
    for s in stages:
        path = tmp_path / f"centroids_{s}.npy"
        np.save(path, rows)
        cents[s] = np.load(path, mmap_mode="r")
    return NormalBank(
        root=tmp_path,
        manifest={"settings": {"stages": list(stages), "shared_codebook": False}, "files": [{"path": "a"}], "n_slices": n},
        cls=np.zeros((n, d), np.float16),
        tokens=np.zeros((0, d), np.float16),
        tok_offsets=np.zeros(n + 1, np.int64),
        codebooks={},
        codes={},
        cent_offsets={s: offs for s in stages},
        slice_file=np.zeros(n, np.int32),
        slice_index=np.arange(n, dtype=np.int32),
        slice_group=np.arange(n, dtype=np.int32),
        slice_pos=np.full(n, np.nan, np.float32),
        slice_grid=np.ones((n, 2), np.int32),
        centroids=cents,
    )


def test_stage_scores_against_the_supports_own_centroids(tmp_path):
    """a = min_k (1 - max_c cos(q, c in C_k)), v = Var_k of the same distances (population variance)."""
    from HiMatchADLib.methods.himatch import HiMatchScorer

    rng = np.random.default_rng(0)
    d = 16
    slices = [_unit(rng.normal(size=(m, d))).astype(np.float16).astype(np.float32) for m in (3, 5, 4)]
    bank = _hand_bank(tmp_path, slices)
    scorer = HiMatchScorer(bank, k=3)
    # query tokens: one equal to a centroid of slice 1 (distance 0 there), one random, one between two slices
    q = np.stack([slices[1][2], _unit(rng.normal(size=d)), _unit(slices[0][0] + slices[2][1])]).astype(np.float32)
    query = QuerySlice(0, [q, q], q[0], np.ones(3, bool), (1, 3))
    supports = np.array([0, 1, 2])
    a, v = scorer.stage_scores(query, supports)
    dist = np.stack([1.0 - (q @ c.T).max(1) for c in slices], axis=1)  # (tokens, supports)
    for s in range(2):
        np.testing.assert_allclose(a[s], dist.min(1), atol=1e-6)
        np.testing.assert_allclose(v[s], dist.var(1), atol=1e-6)
    assert a[0, 0] == pytest.approx(0.0, abs=1e-3)  # float16 centroid: unit to 1e-4
    # only the retrieved supports count: without slice 1 the first token is no longer matched exactly
    a2, _ = scorer.stage_scores(query, np.array([0, 2]))
    np.testing.assert_allclose(a2[0], dist[:, [0, 2]].min(1), atol=1e-6)
    assert a2[0, 0] > 0.1


def test_himatch_calibration_statistics_and_fusion_against_a_reference():
    """``HiMatchScorer.calibrate``: per stage the median and 1.4826 x MAD of the held-out raw stage
    scores (floored at 1e-6), then every held-out slice fused. ``fusion="variance"`` (the former
    per-pixel rule): sum_s w_s z_s / sum_s w_s with z = (a - median) / sigma and
    w = 1 / (v / sigma^2 + tau); ``"reliability"``: one weight per stage, w_s = 1 / (R_s + 1) with
    R_s the mean of v / sigma^2 over the held-out patches; both written out here by hand."""
    from HiMatchADLib.methods.base import SliceScores
    from HiMatchADLib.methods.himatch import HiMatchScorer

    rng = np.random.default_rng(3)
    scorer = HiMatchScorer.__new__(HiMatchScorer)  # the statistics need no bank
    scorer.stages, scorer.fusion, scorer.calibration = [1, 3], "variance", None
    centre = [SliceScores(patch=np.zeros(5, np.float32), stage=rng.normal([[0.2], [0.5]], [[0.05], [0.1]], (2, 5)), var=rng.random((2, 5)) * 0.01) for _ in range(4)]
    constant = SliceScores(patch=np.zeros(3, np.float32), stage=np.full((2, 3), 0.7), var=np.zeros((2, 3)))
    record = scorer.calibrate(centre, centre + [constant])
    a = np.concatenate([s.stage for s in centre], axis=1)
    med = [float(np.sort(row)[9] + np.sort(row)[10]) / 2 for row in a]  # median of 20 values
    mad = [float(np.median(np.abs(row - m))) for row, m in zip(a, med)]
    assert record["stages"]["stages"] == [1, 3]
    np.testing.assert_allclose(record["stages"]["median"], med, rtol=1e-12)
    np.testing.assert_allclose(record["stages"]["sigma"], [1.4826 * m for m in mad], rtol=1e-12)
    for s in centre + [constant]:
        z = [(s.stage[i] - med[i]) / (1.4826 * mad[i]) for i in range(2)]
        w = [1.0 / (s.var[i] / (1.4826 * mad[i]) ** 2 + 1.0) for i in range(2)]
        np.testing.assert_allclose(s.patch, (w[0] * z[0] + w[1] * z[1]) / (w[0] + w[1]), rtol=1e-5)
    # a stored record gives the same fusion back
    other = HiMatchScorer.__new__(HiMatchScorer)
    other.stages, other.fusion, other.calibration = [1, 3], "variance", None
    other.set_calibration(record)
    np.testing.assert_array_equal(other.fuse(constant.stage, constant.var), scorer.fuse(constant.stage, constant.var))
    assert other.calibration == record["stages"]
    # the reliability rule: one weight per stage from the held-out support variances
    v = np.concatenate([s.var for s in centre], axis=1)
    rel = [float(np.mean(v[i] / (1.4826 * mad[i]) ** 2)) for i in range(2)]
    w = [1.0 / (r + 1.0) for r in rel]
    scorer.fusion = "reliability"
    record = scorer.calibrate(centre, centre + [constant])
    np.testing.assert_allclose(record["stages"]["reliability"], rel, rtol=1e-6)
    np.testing.assert_allclose(record["stages"]["weights"], [w[0] / sum(w), w[1] / sum(w)], rtol=1e-6)
    for s in centre + [constant]:
        z = [(s.stage[i] - med[i]) / (1.4826 * mad[i]) for i in range(2)]
        np.testing.assert_allclose(s.patch, (w[0] * z[0] + w[1] * z[1]) / (w[0] + w[1]), rtol=1e-5)
    # a stage with no spread on the held-out slices keeps a positive sigma
    flat = [SliceScores(patch=np.zeros(4, np.float32), stage=np.full((2, 4), 0.3), var=np.zeros((2, 4)))]
    assert scorer.calibrate(flat, flat)["stages"]["sigma"] == [1e-6, 1e-6]


@pytest.mark.parametrize("canvas_scale", [None, 0.5, 2.0])
def test_maps_are_smoothed_by_sigma_pixels_of_the_image_whatever_the_model_grid(canvas_scale):
    """AnomalyDINO resizes the patch map to the image and smooths it with sigma = 4 image pixels.
    A Gaussian adds sigma^2 to the spatial variance of what it smooths: the map of one hot patch
    gains 16 pixel^2 per axis on the native grid, whether the slice was stretched to the model input
    (no canvas) or resampled onto a canvas at half or twice its pixel size."""
    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.features.canvas import PlaneMap

    native = (96, 96)
    if canvas_scale is None:
        plane, grid = None, (8, 8)
    else:
        side = int(96 * canvas_scale)
        plane, grid = PlaneMap(native, (0, 96, 0, 96), (side, side), (0, 0), (side, side), 1.0 / canvas_scale), (8, 8)
    patch = np.zeros(64, np.float32)
    patch[3 * 8 + 4] = 1.0
    q = QuerySlice(0, [], np.zeros(1), np.ones(64, bool), grid)

    def spread(sigma):
        det = HiMatchDetector(model="m", method="knn", sigma=sigma)
        m = det._pixel_map(patch.copy(), q, plane, native).astype(np.float64)
        m = np.clip(m, 0, None)
        rows, cols = np.indices(native)
        tot = m.sum()
        var = []
        for c in (rows, cols):
            mu = (m * c).sum() / tot
            var.append((m * (c - mu) ** 2).sum() / tot)
        return np.array(var)

    np.testing.assert_allclose(spread(4.0) - spread(0.0), [16.0, 16.0], rtol=0.06)


def _retrieved_levels(tmp_path, position_window):
    """Retrieval on a constructed bank of two normal volumes of one anatomy with different coverage:
    volume A covers levels 0-1 over its whole extent (relative position = level, 8 slices), volume B
    has more coverage below (relative position = 0.4 + 0.6 x level, 20 slices). Slice features are
    points on a circle indexed by anatomical level (cosine between levels l, m: cos(pi (l - m))).
    The query is level 0.5 at relative position 0.5."""
    from HiMatchADLib.methods.himatch import HiMatchScorer

    def feat(level):
        v = np.zeros(8, np.float32)
        v[0], v[1] = np.cos(np.pi * level), np.sin(np.pi * level)
        return v

    levels = np.concatenate([np.linspace(0, 1, 8), np.linspace(0, 1, 20)])
    pos = np.concatenate([np.linspace(0, 1, 8), 0.4 + 0.6 * np.linspace(0, 1, 20)]).astype(np.float32)
    bank = _hand_bank(tmp_path, [feat(lv)[None] for lv in levels])
    bank.cls = np.stack([feat(lv) for lv in levels]).astype(np.float16)
    bank.slice_pos = pos
    bank.slice_group = np.array([0] * 8 + [1] * 20, np.int32)
    scorer = HiMatchScorer(bank, k=4, candidates=8, position_window=position_window)
    q = feat(0.5)[None]
    (ids, _, _), = scorer.retrieve([QuerySlice(0, [q, q], q[0], np.ones(1, bool), (1, 1), pos=0.5)])
    return levels[ids]


def test_retrieval_without_the_position_prior_takes_the_same_anatomy_whatever_the_coverage(tmp_path):
    """Default (no prior): the supports are the slices of the query's anatomical level, from both
    volumes. With the former hard window (0.15), volume B's slices of that level lie at relative
    position 0.7 and are cut, and B's slices from lower levels take their place."""
    (tmp_path / "off").mkdir()
    off = _retrieved_levels(tmp_path / "off", None)
    assert np.abs(off - 0.5).max() < 0.08  # the four nearest levels: 0.474, 0.526 (B), 0.429, 0.571 (A)
    (tmp_path / "on").mkdir()
    on = _retrieved_levels(tmp_path / "on", 0.15)
    assert np.abs(on - 0.5).mean() > 2 * np.abs(off - 0.5).mean()
    assert (on < 0.42).sum() >= 2  # lower anatomy retrieved through the window
