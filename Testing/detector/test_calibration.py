"""Calibration never sees its own subject: grouping by subject, the held-out plan, the warnings."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.evaluation.phantom import make_phantom

SUBJECTS = 6
VIEWS = "abcd"


@pytest.fixture(scope="module")
def copies_dir(tmp_path_factory):
    """2D normals: each subject's four files are the same image (a leak scores them as perfect
    matches), named ``P<n>_<letter>`` so that the default ``<subject>_<n>`` rule cannot group them."""
    d = tmp_path_factory.mktemp("copies")
    for s in range(SUBJECTS):
        img, _ = make_phantom((1, 64, 64), seed=300 + s)
        for v in VIEWS:
            write_image(img.array, img.geometry, d / f"P{s}_{v}.nii.gz")
    return d


def _det(model, cache, method="knn", **kw):
    return HiMatchDetector(model=model, method=method, k=2, resolution=RESOLUTION, cache_dir=cache, **kw)


def test_subject_pattern_keeps_copies_of_a_subject_out_of_its_calibration(tiny_model, copies_dir, tmp_path):
    leaky = _det(tiny_model, tmp_path, calibration_slices=8)
    with pytest.warns(UserWarning, match="every 2D normal file is its own subject"):
        leaky.fit(copies_dir)
    assert len(leaky.subjects) == SUBJECTS * len(VIEWS)
    assert any("its own subject" in w for w in leaky.fit_info["warnings"])
    # Without the pattern a held-out file finds its own copy: normal scores are (nearly) zero.
    assert leaky.calibration["normal_pixel_quantiles"]["0.99"] < 1e-3
    other, _ = make_phantom((1, 64, 64), seed=299)
    res = leaky.predict(other)  # (P0_a itself is one of the normals: refused)
    assert any("its own subject" in w for w in res.warnings)

    grouped = _det(tiny_model, tmp_path, calibration_slices=8, subject_pattern=r"^(P\d+)_").fit(copies_dir)
    assert grouped.subjects == [f"P{s}" for s in range(SUBJECTS)]
    assert not any("its own subject" in w for w in grouped.fit_info["warnings"])
    # Held out by subject: every held-out slice is matched only against other subjects' images,
    # which differ, so its scores are clearly above zero (reference: the same computation by hand).
    cal = grouped.calibration
    leak = leaky.calibration["normal_pixel_quantiles"]["0.99"]
    assert cal["normal_pixel_quantiles"]["0.5"] > max(3e-3, 10 * leak), (cal["normal_pixel_quantiles"], leak)
    held = set(cal["held_out_groups"])
    assert cal["n_slices"] >= 8 and len(held) >= 2
    bank = grouped.bank
    for i in np.flatnonzero(np.isin(grouped.slice_subject, [grouped.subjects.index(h) for h in held])):
        own = grouped.slice_subject == grouped.slice_subject[i]
        tok = np.asarray(bank.slice_tokens(i), np.float32)
        others = np.concatenate([np.asarray(bank.slice_tokens(j), np.float32) for j in np.flatnonzero(~own)])
        ref = 1.0 - (tok @ others.T).max(1)
        got = 1.0 - grouped.scorer.max_sim(tok, int(grouped.slice_subject[i]))
        np.testing.assert_allclose(got, ref, atol=1e-5)
        copies = np.concatenate([np.asarray(bank.slice_tokens(j), np.float32) for j in np.flatnonzero(own) if j != i])
        leaked = 1.0 - (tok @ copies.T).max(1)  # what a match against its own subject would give
        assert ref.mean() > 5 * max(float(leaked.mean()), 1e-4)


def test_himatch_and_dpmm_calibrate_without_their_held_out_subjects(tiny_model, copies_dir, tmp_path):
    det = _det(tiny_model, tmp_path, method="himatch", calibration_slices=8, subject_pattern=r"^(P\d+)_").fit(copies_dir)
    held = [det.subjects.index(h) for h in det.calibration["held_out_groups"]]
    from HiMatchADLib.features.slicing import prepare_volume

    for g in held:
        i = int(np.flatnonzero(det.slice_subject == g)[0])
        f = det.bank.files[int(det.bank.slice_file[i])]
        prep = prepare_volume(det.check_query(copies_dir / f), det.modality, det.slice_axis)
        qs, _ = det._queries(prep, np.array([0]))
        qs[0].group = g
        ids, _, _ = det.scorer.retrieve(qs)[0]
        assert ids.size and not np.any(det.slice_subject[ids] == g)

    dp = HiMatchDetector(model=tiny_model, method="dpmm", resolution=RESOLUTION, cache_dir=tmp_path, calibration_slices=8,
                         subject_pattern=r"^(P\d+)_", dpmm_components=5).fit(copies_dir)
    held = [dp.subjects.index(h) for h in dp.calibration["held_out_groups"]]
    assert 1 <= len(held) <= SUBJECTS // 2  # the mixture keeps at least half of the subjects
    path = next(dp.bank.root.glob("dpmm_*.npz"))
    fitted_on = int(np.load(path)["n_tokens"])
    expected = sum(int(dp.bank.tok_offsets[i + 1] - dp.bank.tok_offsets[i]) for i in np.flatnonzero(~np.isin(dp.slice_subject, held)))
    assert fitted_on == expected


def test_calibration_reaches_the_requested_number_of_slices(tiny_model, copies_dir, tmp_path):
    """One slice per 2D file: subjects are added until ``calibration_slices`` slices are held out
    (formerly at most 12 subjects, so 12 slices)."""
    det = _det(tiny_model, tmp_path, calibration_slices=20)
    with pytest.warns(UserWarning):
        det.fit(copies_dir)
    assert det.calibration["n_slices"] == 20 and len(det.calibration["held_out_groups"]) == 20
    small = _det(tiny_model, tmp_path, calibration_slices=3, subject_pattern=r"^(P\d+)_")
    with pytest.warns(UserWarning, match="only 5 held-out normal slices"):
        small.fit(copies_dir)
    assert any("threshold is uncertain" in w for w in small.fit_info["warnings"])


def test_subject_pattern_errors(tiny_model, copies_dir, tmp_path):
    for bad in ("(unclosed", "P\\d+", "(P)(\\d)"):
        with pytest.raises(HiMatchADError, match="subject pattern"):
            _det(tiny_model, tmp_path, subject_pattern=bad)
    with pytest.raises(HiMatchADError, match="does not match the normal file"):
        _det(tiny_model, tmp_path, subject_pattern=r"^(Q\d+)_").fit(copies_dir)


def test_cli_subject_pattern(tiny_model):
    from HiMatchADLib.cli.main import build_parser
    from HiMatchADLib.cli.commands import detector_from_args

    args = build_parser().parse_args(["detect", "x.nii.gz", "--normals", "n", "--out-dir", "o", "--model", tiny_model, "--subject-pattern", "^(P[0-9]+)_"])
    det = detector_from_args(args)
    assert det.subject_pattern == "^(P[0-9]+)_" and det.settings()["subject_pattern"] == "^(P[0-9]+)_"


def test_one_extreme_voxel_in_one_normal_moves_no_threshold_and_is_reported(tiny_model, normals_dir, tmp_path):
    import shutil

    from HiMatchADLib.io.readers import read_image

    bad = tmp_path / "normals"
    shutil.copytree(normals_dir, bad)
    img = read_image(bad / "normal_2.nii.gz")
    arr = img.array.copy()
    arr[8, 30, 30] = -1e5
    write_image(arr, img.geometry, bad / "normal_2.nii.gz")
    kw = dict(model=tiny_model, method="knn", k=4, resolution=RESOLUTION)
    clean = HiMatchDetector(cache_dir=tmp_path / "c1", **kw).fit(normals_dir)
    dirty = HiMatchDetector(cache_dir=tmp_path / "c2", **kw).fit(bad)
    assert dirty.calibration["threshold"] == pytest.approx(clean.calibration["threshold"], rel=1e-3)  # 3 % off before outliers were fenced
    said = [w for w in dirty.fit_info["warnings"] if "normal image normal_2" in w and "extreme values" in w]
    assert said, dirty.fit_info["warnings"]
    assert not any("extreme values" in w for w in clean.fit_info["warnings"])
