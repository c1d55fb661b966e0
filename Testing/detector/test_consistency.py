"""3D-consistent maps: fusion across slices against a reference computation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.methods.maps import fuse_slices, window


def test_fusion_is_the_gaussian_average_of_scored_foreground_neighbours():
    n, sp, sig = 9, 2.0, 3.0  # window: 3 sigma = 9 mm = 4 slices each side
    assert window(sp, sig) == 4
    vals = np.arange(n, dtype=np.float32) * 10.0
    maps = np.repeat(vals[:, None, None], 4, 1).repeat(4, 2)
    fg = np.ones((n, 4, 4), bool)
    fg[3, 0, 0] = False  # neighbour background: must not pull the average towards 0
    scored = np.ones(n, bool)
    scored[5] = False  # no map there
    out = fuse_slices(maps, fg, scored, sp, sig)
    for i in np.flatnonzero(scored):
        js = [j for j in range(n) if scored[j] and abs(i - j) <= 4]
        g = np.exp(-0.5 * ((np.array(js) - i) * sp / sig) ** 2)
        ref = (g * vals[js]).sum() / g.sum()
        assert out[i, 1, 1] == pytest.approx(ref, rel=1e-5)
        js0 = [j for j in js if j != 3]
        g0 = np.exp(-0.5 * ((np.array(js0) - i) * sp / sig) ** 2)
        if i != 3:
            assert out[i, 0, 0] == pytest.approx((g0 * vals[js0]).sum() / g0.sum(), rel=1e-5)
    assert out[3, 0, 0] == 0  # outside its own foreground: 0
    np.testing.assert_array_equal(out[5], maps[5])  # unscored slices unchanged


def test_fusion_favours_evidence_seen_on_neighbouring_slices():
    rng = np.random.default_rng(0)
    maps = rng.normal(0, 1, (11, 32, 32)).astype(np.float32)
    maps[3:8, 10:16, 10:16] += 2.0  # a lesion through five slices
    maps[5, 24:27, 24:27] += 6.0  # a one-slice spike (matching noise)
    fg = np.ones_like(maps, bool)
    out = fuse_slices(maps, fg, np.ones(11, bool), 1.0, 1.5)
    lesion_vs_spike_before = maps[5, 10:16, 10:16].mean() - maps[5, 24:27, 24:27].mean()
    lesion_vs_spike_after = out[5, 10:16, 10:16].mean() - out[5, 24:27, 24:27].mean()
    assert lesion_vs_spike_before < 0 < lesion_vs_spike_after
    assert out[:, :8, :8].std() < 0.7 * maps[:, :8, :8].std()  # noise averaged down


def test_detector_maps_are_the_fused_single_slice_maps(tiny_model, normals_dir, lesion_case, tmp_path):
    img, _ = lesion_case
    off = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path).fit(normals_dir)
    on = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path, consistency_mm=3.0).fit(normals_dir)
    a, b = off.predict(img), on.predict(img)
    spacing = img.geometry.spacing[2]  # axial slices of the phantom: along numpy axis 0
    ref = fuse_slices(a.heatmap, a.foreground, np.isfinite(a.slice_scores), spacing, 3.0)
    np.testing.assert_allclose(b.heatmap, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.heatmap, b.heatmap)
    # calibrated on fused held-out maps: same held-out slices, its own threshold
    assert on.calibration["n_slices"] == off.calibration["n_slices"]
    assert on.calibration["threshold"] != off.calibration["threshold"]
    assert on.settings()["consistency_mm"] == 3.0
    with pytest.raises(HiMatchADError, match="consistency_mm"):
        HiMatchDetector(model=tiny_model, consistency_mm=-1)


def test_an_enormous_window_is_bounded_by_the_volume_and_is_the_plain_average():
    """``consistency_mm=1e9`` used to loop over two billion slice offsets per slice. The window is
    bounded by the slices there are: every scored slice becomes the foreground-weighted average of
    all scored slices (all Gaussian weights are 1 at that sigma)."""
    n = 7
    assert window(2.0, 1e9) > 10**8 and window(2.0, 1e9, n) == n - 1 and window(2.0, 3.0, n) == 4
    vals = np.arange(n, dtype=np.float32)
    maps = np.repeat(vals[:, None, None], 3, 1).repeat(3, 2)
    scored = np.ones(n, bool)
    scored[2] = False
    out = fuse_slices(maps, np.ones((n, 3, 3), bool), scored, 2.0, 1e9)
    mean = vals[scored].mean()
    np.testing.assert_allclose(out[scored], mean, rtol=1e-6)
    np.testing.assert_array_equal(out[2], maps[2])  # an unscored slice is left as it is


def test_a_detector_with_an_enormous_window_calibrates_and_predicts(tiny_model, normals_dir, cache_dir, lesion_case):
    det = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=cache_dir, consistency_mm=1e9).fit(normals_dir)
    res = det.predict(lesion_case[0])
    scored = np.isfinite(res.slice_scores)
    # every scored slice's map is the same average over the volume: equal on the foreground shared by all
    common = res.foreground[scored].all(axis=0)
    maps = res.heatmap[scored][:, common]
    np.testing.assert_allclose(maps, np.broadcast_to(maps[0], maps.shape), rtol=1e-5)
