"""MRI intensity preset on constructed intensity distributions: no saturation, padding excluded."""

from __future__ import annotations

import numpy as np

from HiMatchADLib.core.geometry import Image
from HiMatchADLib.features.presets import PRESETS, normalise, otsu_threshold, padding_values
from HiMatchADLib.features.slicing import prepare_volume


def _t2_like(seed=0):
    """A head: background noise ~5, white matter 100, grey matter 70, CSF 250 (bright, normal, 10 %
    of the brain) and a lesion 160; returns the volume and the label of each voxel."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:12, 0:64, 64:128] - np.array([6, 32, 96])[:, None, None, None]
    r = np.sqrt((y / 28.0) ** 2 + (x / 24.0) ** 2)
    label = np.zeros((12, 64, 64), np.int8)  # 0 background
    label[r < 1.0] = 1  # grey matter
    label[r < 0.7] = 2  # white matter
    label[(r < 0.25)] = 3  # CSF (ventricles)
    label[(np.abs(y - 8) < 3) & (np.abs(x - 8) < 3) & (r < 0.7)] = 4  # lesion
    level = np.array([5.0, 70.0, 100.0, 250.0, 160.0])
    arr = level[label] + rng.normal(0, 3, label.shape)
    return arr.astype(np.float32), label


def test_bright_normal_tissue_keeps_its_contrast():
    arr, label = _t2_like()
    out = normalise(arr, PRESETS["mri"])
    csf, lesion, wm = (np.median(out[label == k]) for k in (3, 4, 2))
    # Reference: background level -> 0, median of the foreground (above half the Otsu threshold) -> 0.25.
    fg = arr[arr > 0.5 * otsu_threshold(arr.ravel())]
    lo, med = np.percentile(arr, 0.5), np.median(fg)
    np.testing.assert_allclose(out, np.clip((arr - lo) / (med - lo) * 0.25, 0, 1), atol=1e-4)
    assert csf > lesion + 0.1 > wm + 0.2  # three different grey levels
    assert (out[label > 0] >= 1.0).mean() == 0  # nothing saturates
    # The former preset (foreground median -> 0.5, clip at 1) merged CSF and lesion at 1.
    old = {"scaling": "percentile", "low": 0.5, "high": 50.0, "high_value": 0.5}
    prev = normalise(arr, old)
    assert np.median(prev[label == 3]) == np.median(prev[label == 4]) == 1.0


def test_a_large_bright_lesion_does_not_move_normal_grey_levels():
    arr, label = _t2_like(3)
    big = arr.copy()
    blob = (label == 2) & (np.indices(label.shape)[2] < 32)  # half the white matter becomes lesion
    big[blob] = 190.0  # 1.9 times white matter
    a, b = normalise(arr, PRESETS["mri"]), normalise(big, PRESETS["mri"])
    keep = (label > 0) & ~blob
    assert blob.mean() / (label > 0).mean() > 0.1
    assert np.abs(a[keep] - b[keep]).max() < 0.05  # the median moves a little (a tenth of the tissue changed)


def test_padding_values_are_excluded_from_foreground_and_statistics():
    arr, label = _t2_like(1)
    clean = prepare_volume(Image.from_array(arr, name="clean"), "mri", "axial")
    padded = arr.copy()
    padded[:, :2, :] = -32768  # a padded border (about 3 % of the voxels)
    padded[:, -1, :20] = 32767
    assert sorted(padding_values(padded)) == [-32768.0, 32767.0]
    prep = prepare_volume(Image.from_array(padded, name="padded"), "mri", "axial")
    inner = (padded != -32768) & (padded != 32767)
    # Tissue gets the same grey levels and the same foreground as without padding.
    np.testing.assert_allclose(prep.canonical[inner], clean.canonical[inner], atol=2e-3)
    assert not prep.foreground[~inner].any()
    assert prep.foreground[label > 0].all() and clean.foreground[label > 0].all()
    assert (prep.foreground[inner] == clean.foreground[inner]).mean() > 0.995  # noise voxels near the threshold
    assert any("padding value" in w and "-32768" in w for w in prep.warnings)
    # Without the exclusion the sentinel values dominate the scaling: tissue collapses to one level.
    raw = normalise(padded, PRESETS["mri"])
    assert abs(np.median(raw[label == 2]) - np.median(raw[label == 3])) < 0.05


def test_background_zeros_and_8bit_maxima_are_not_padding():
    arr, _ = _t2_like(2)
    arr[arr < 30] = 0.0  # a skull-stripped style background of exact zeros (most voxels)
    assert padding_values(arr) == []
    img8 = np.clip(arr, 0, 255).astype(np.uint8)
    img8[:, :3] = 255  # a saturated bright band
    assert padding_values(img8.astype(np.float32)) == []


def test_a_few_bright_voxels_are_not_padding():
    arr = np.zeros((4, 8, 8), np.float32)
    arr[:, 2:6, 2:6] = 1.0
    arr[0, 5, 5] = 4.0  # one voxel: 0.4 % of a tiny image, far above the rest, but a single voxel
    assert padding_values(arr) == []


def _with_outliers(arr: np.ndarray, value: float, n: int):
    out = arr.copy()
    idx = np.unravel_index(np.arange(n) * 997 + 5, arr.shape)
    out[idx] = value
    keep = np.ones(arr.shape, bool)
    keep[idx] = False
    return out, keep


def test_a_handful_of_extreme_voxels_moves_neither_the_scaling_nor_the_foreground():
    from HiMatchADLib.evaluation.phantom import make_phantom

    img, _ = make_phantom((16, 48, 48), seed=3, lesion=True)
    arr = img.array.astype(np.float32)
    base = prepare_volume(Image(arr, img.geometry, name="scan"))
    assert not any("extreme" in w for w in base.warnings)
    for value, n in [(-1e5, 1), (1e6, 1), (1e30, 10), (-3e4, 5)]:
        bad, keep = _with_outliers(arr, value, n)
        prep = prepare_volume(Image(bad, img.geometry, name="scan"))
        # Identity geometry: canonical order is the input's (slice axis 0).
        np.testing.assert_allclose(prep.canonical[keep], base.canonical[keep], atol=1e-3)
        assert np.array_equal(prep.foreground[keep], base.foreground[keep])
        side = "below" if value < 0 else "above"
        assert [w for w in prep.warnings if f"{n} voxel(s) hold extreme values" in w and f"{n} {side}" in w], prep.warnings


def test_otsu_threshold_ignores_outliers_and_matches_the_reference_without_them():
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.normal(10, 1, 5000), rng.normal(100, 5, 5000)]).astype(np.float32)
    ref = otsu_threshold(vals)
    truth = np.arange(vals.size) >= 5000
    assert np.array_equal(vals > ref, truth)
    for extra in ([-1e5], [1e6], [1e30] * 10):
        t = otsu_threshold(np.concatenate([vals, np.asarray(extra, np.float32)]))
        assert np.array_equal(vals > t, truth), (extra, t, ref)  # the same two classes as without them
    # A bright lesion or metal within reach is not an outlier: nothing is cut.
    from HiMatchADLib.features.presets import outlier_fences

    lo, hi = outlier_fences(vals)
    assert lo < vals.min() and hi > 3 * vals.max()


def test_ct_metal_is_not_an_outlier():
    rng = np.random.default_rng(1)
    ct = rng.normal(40, 20, (8, 64, 64)).astype(np.float32)
    ct[:, :8] = -1000
    ct[:, 30:33, 30:33] = 3071  # metal: 9 voxels per slice
    ct[:, 40:44, 40:44] = 1200  # bone
    prep = prepare_volume(Image.from_array(ct, name="ct"))
    assert prep.modality == "ct"
    assert not any("extreme" in w for w in prep.warnings)
