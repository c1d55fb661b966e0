"""The fusion of calibrated stage maps (``HiMatchADLib.methods.fusion``) on constructed stage
distances where the right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from HiMatchADLib.methods.base import SliceScores
from HiMatchADLib.methods.fusion import FUSIONS, check_fusion, fuse_stages, stage_weights, standardise
from HiMatchADLib.methods.himatch import HiMatchScorer

S, K = 4, 8


def _scorer(fusion: str) -> HiMatchScorer:
    scorer = HiMatchScorer.__new__(HiMatchScorer)  # the fusion needs no bank
    scorer.stages, scorer.fusion, scorer.calibration = [3, 6, 9, 12], fusion, None
    return scorer


def _slice(rng, n, noise, lesion=None, lesion_stage=None, lesion_shift=0.0):
    """Stage scores and support variances as ``HiMatchScorer.stage_scores`` computes them, from
    constructed distances d[s, i, k] = base + per-support noise: ``noise[s]`` is how much the
    supports disagree at stage ``s``. At ``lesion`` patches the distances of ``lesion_stage`` grow
    by ``lesion_shift``, and by a different amount for every support (a lesion token is far from
    every support, and far by different amounts), so its support variance grows with it."""
    base = rng.normal(0.3, 0.02, (S, n, 1))
    d = base + np.asarray(noise)[:, None, None] * rng.random((S, n, K))
    if lesion is not None:
        d[lesion_stage, lesion] += lesion_shift * (0.5 + rng.random((int(np.sum(lesion)), K)))
    return SliceScores(patch=np.zeros(n, np.float32), stage=d.min(2), var=d.var(2))


def _calibrated(fusion, noise, seed=0):
    rng = np.random.default_rng(seed)
    scorer = _scorer(fusion)
    held_out = [_slice(rng, 400, noise) for _ in range(6)]
    scorer.calibrate(held_out, held_out)
    return scorer


def _contrast(fused, lesion):
    return float(np.mean(fused[lesion]) - np.median(fused[~lesion]))


@pytest.mark.parametrize("fusion", ["reliability", "mean", "max"])
def test_a_lesion_one_stage_sees_keeps_at_least_the_contrast_of_the_mean(fusion):
    """Stages equally reliable on normals; a lesion only the last stage sees. The per-map weights
    keep (at least) the plain mean's contrast, up to the sampling of the held-out reliabilities
    (equal in expectation, equal to 2 % here); the former per-pixel variance weights lose most of it
    at the lesion, because the lesion's own support variance lowers the stage's weight there."""
    rng = np.random.default_rng(1)
    noise = [0.05] * S
    cal = {name: _calibrated(name, noise) for name in ("mean", "variance", fusion)}
    lesion = np.zeros(500, bool)
    lesion[:40] = True
    q = _slice(rng, 500, noise, lesion, lesion_stage=S - 1, lesion_shift=0.4)
    mean = _contrast(cal["mean"].fuse(q.stage, q.var), lesion)
    assert mean > 2.0  # a visible lesion in the plain mean
    assert _contrast(cal[fusion].fuse(q.stage, q.var), lesion) >= 0.98 * mean
    # the former rule is a soft minimum where one stage is discriminative
    assert _contrast(cal["variance"].fuse(q.stage, q.var), lesion) < 0.6 * mean


def test_equally_reliable_stages_give_the_plain_mean():
    """Equal stage reliabilities (the same support disagreement on normals) give equal weights and
    the plain mean of the calibrated stage maps, whatever the query's own support variances."""
    scorer = _calibrated("reliability", [0.05] * S)
    rec = scorer.calibration
    rec["reliability"] = [rec["reliability"][0]] * S  # exactly equal
    rec["weights"] = stage_weights(rec["reliability"]).tolist()
    rng = np.random.default_rng(2)
    a, v = rng.random((S, 50)), rng.random((S, 50)) * 10  # the variances take no part
    z, _ = standardise(a, v, rec["median"], rec["sigma"])
    np.testing.assert_allclose(scorer.fuse(a, v), z.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rec["weights"], [1.0 / S] * S)


def test_a_stage_noisy_on_normals_gets_a_smaller_weight():
    """One stage whose supports disagree much more on normal slices (relative to its own normal
    spread) gets a smaller weight than the others; the others keep equal weights (within sampling)."""
    noisy = 2
    noise = [0.02] * S
    noise[noisy] = 0.2
    rec = _calibrated("reliability", noise).calibration
    w = np.asarray(rec["weights"])
    assert w[noisy] < 0.75 * np.delete(w, noisy).min()
    assert np.ptp(np.delete(w, noisy)) < 0.1 * w.max()
    assert w.sum() == pytest.approx(1.0)
    # and the weights are the stated formula of the stored reliabilities
    np.testing.assert_allclose(w, stage_weights(rec["reliability"]))
    r = np.asarray(rec["reliability"])
    np.testing.assert_allclose(w, (1 / (r + 1)) / (1 / (r + 1)).sum())


def test_the_rules_against_their_formulas():
    rng = np.random.default_rng(4)
    z, vt = rng.normal(size=(S, 30)), rng.random((S, 30))
    w = np.array([0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(fuse_stages(z, vt, "reliability", w), (w[:, None] * z).sum(0), rtol=1e-5)
    np.testing.assert_allclose(fuse_stages(z, vt, "mean", None), z.mean(0), rtol=1e-5)
    np.testing.assert_allclose(fuse_stages(z, vt, "max", None), z.max(0), rtol=1e-6)
    wv = 1 / (vt + 1)
    np.testing.assert_allclose(fuse_stages(z, vt, "variance", None), (wv * z).sum(0) / wv.sum(0), rtol=1e-5)
    with pytest.raises(ValueError, match="stage weights"):
        fuse_stages(z, vt, "reliability", None)
    assert [check_fusion(f.upper()) for f in FUSIONS] == list(FUSIONS)
    with pytest.raises(ValueError, match="reliability, mean, max, variance"):
        check_fusion("median")
