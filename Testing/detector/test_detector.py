"""The three modes find a lesion on a phantom; results are deterministic and re-thresholdable."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import PHANTOM_SHAPE, RESOLUTION
from sklearn.metrics import roc_auc_score

from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.evaluation.phantom import make_phantom

# Lower bounds of the pixel AUROC (inside the foreground) on the bright-lesion phantom with the
# random tiny model; brightness alone reaches about 0.95 there. Random features carry intensity and
# texture but no anatomy, so these bounds check that the pipeline works, not the method's quality.
AUROC_BOUND = {"himatch": 0.7, "knn": 0.8, "dpmm": 0.9}


@pytest.mark.parametrize("method", ["himatch", "knn", "dpmm"])
def test_methods_find_the_lesion(fitted, lesion_case, method):
    img, mask = lesion_case
    res = fitted(method).predict(img)
    fg = res.foreground
    auroc = roc_auc_score(mask[fg].ravel(), res.heatmap[fg].ravel())
    assert auroc > AUROC_BOUND[method], auroc
    assert res.heatmap.shape == PHANTOM_SHAPE and res.heatmap.dtype == np.float32
    assert np.all(res.heatmap[~fg] == 0)
    assert res.heatmap[mask > 0].mean() > 1.3 * res.heatmap[(mask == 0) & fg].mean()
    assert res.slice_axis == 0 and len(res.slice_scores) == PHANTOM_SHAPE[0]


def test_calibrated_threshold_flags_the_lesion_not_a_normal_volume(fitted, lesion_case):
    det = fitted("dpmm")
    normal, _ = make_phantom(PHANTOM_SHAPE, seed=2000)
    r_norm = det.predict(normal)
    r_les = det.predict(lesion_case[0])
    mask = lesion_case[1] > 0
    assert (r_les.labelmap.astype(bool) & mask).sum() > 0.2 * mask.sum()
    # the calibrated threshold keeps false positives on an unseen normal volume small
    assert r_norm.labelmap.sum() < 0.05 * r_norm.foreground.sum()


def test_himatch_retrieves_k_supports_from_the_bank(fitted, lesion_case):
    det = fitted("himatch")
    res = det.predict(lesion_case[0])
    scored = [s for s in res.supports if s]
    assert scored and all(len(s) == 4 for s in scored)
    names = {f"normal_{i}.nii.gz" for i in range(5)}
    assert all(sup.source in names for s in scored for sup in s)
    # similarities are sorted, best first
    assert all(s[i].similarity >= s[i + 1].similarity for s in scored for i in range(len(s) - 1))
    assert set(det.calibration["stages"]["stages"]) == set(det.extractor.stages)
    assert len(det.extractor.stages) == 4 and det.extractor.stages[-1] == 4
    # the fused map goes through softplus, not a clip at 0: positive on the whole foreground, so
    # normal tissue below the normal median keeps its order instead of tying with the background
    fg = res.foreground
    assert res.heatmap[fg].min() > 0 and np.isfinite(res.heatmap).all()
    assert (res.heatmap[fg] < np.log(2.0)).mean() > 0.05  # fused score < 0 there, formerly clipped to 0
    # the last stage's similarities computed by retrieval are the ones the stage maps would compute
    from HiMatchADLib.features.slicing import prepare_volume

    prep = prepare_volume(lesion_case[0], det.modality, det.slice_axis)
    qs, _ = det._queries(prep, prep.slices_with_foreground()[:3])
    for q, (ids, _, last_cos) in zip(qs, det.scorer.retrieve(qs)):
        reused, fresh = det.scorer.stage_scores(q, ids, last_cos), det.scorer.stage_scores(q, ids)
        assert np.allclose(reused[0], fresh[0], atol=1e-6) and np.allclose(reused[1], fresh[1], atol=1e-6)
    # displays start at the median normal-tissue score from the calibration, below the threshold
    assert 0 < res.display_floor == res.threshold_info["normal_pixel_median"] < res.threshold


def test_same_inputs_same_outputs(tiny_model, normals_dir, lesion_case, tmp_path):
    """Determinism: a fresh bank (own cache) and calibration give identical maps."""
    a = HiMatchDetector(model=tiny_model, method="himatch", k=4, resolution=RESOLUTION, cache_dir=tmp_path / "c1").fit(normals_dir)
    b = HiMatchDetector(model=tiny_model, method="himatch", k=4, resolution=RESOLUTION, cache_dir=tmp_path / "c2").fit(normals_dir)
    ra, rb = a.predict(lesion_case[0]), b.predict(lesion_case[0])
    np.testing.assert_array_equal(ra.heatmap, rb.heatmap)
    assert ra.threshold == rb.threshold


def test_relabel_without_recomputing(fitted, lesion_case):
    res = fitted("knn").predict(lesion_case[0])
    low, high = res.labelmap_at(res.threshold * 0.5), res.labelmap_at(res.threshold * 2)
    assert low.sum() >= res.labelmap.sum() >= high.sum()
    res.set_threshold(float(res.heatmap.max()) + 1)
    assert res.labelmap.sum() == 0


def test_small_components_are_removed():
    from HiMatchADLib.core.result import remove_small_components

    m = np.zeros((1, 20, 20), bool)
    m[0, 2:4, 2:4] = True  # 4 px
    m[0, 10:15, 10:15] = True  # 25 px
    out = remove_small_components(m, 10)
    assert out.sum() == 25 and not out[0, 2, 2]


def test_2d_query_against_3d_normals_and_reverse(tmp_path, fitted, tiny_model, lesion_case):
    img, mask = lesion_case
    z = int(np.argmax(mask.sum((1, 2))))
    from HiMatchADLib.core.geometry import Image
    from HiMatchADLib.io.writers import write_image

    sl = Image.from_array(img.array[z], name="slice")
    res = fitted("knn").predict(sl)
    assert res.heatmap.shape == (1,) + PHANTOM_SHAPE[1:] and res.geometry.is_2d
    assert any("2D slice but the normal bank holds 3D volumes" in w for w in res.warnings)  # may be meant: a warning
    assert res.settings["bank_dims"] == "3d" and res.settings["bank_modality"] == res.settings["modality_used"] == "mri"
    assert res.heatmap[0][mask[z] > 0].mean() > res.heatmap[0][(mask[z] == 0) & res.foreground[0]].mean()
    # 2D normals (slices of the normal phantoms), 3D query
    d2 = tmp_path / "normals2d"
    d2.mkdir()
    for i in range(3):
        ph, _ = make_phantom(PHANTOM_SHAPE, seed=10 + i)
        for k in (4, 8, 12):
            write_image(ph.array[k][None], Image.from_array(ph.array[k]).geometry, d2 / f"subj{i}_{k}.nii.gz")
    det = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path / "c").fit(d2)
    assert det.bank.n_slices == 9 and len(det.bank.groups) == 3  # grouped by subject for calibration
    assert det.bank.manifest["settings"]["dims"] == "2d"
    # a volume against 2D slices is a clear mismatch (no positions, other normalisation): an error
    with pytest.raises(HiMatchADError, match="3D volume but the normal bank holds 2D slices"):
        det.predict(img)
    res2 = det.predict(sl)
    assert res2.heatmap.shape == (1,) + PHANTOM_SHAPE[1:] and not any("normal bank" in w for w in res2.warnings)


def test_bad_settings_are_user_errors(tiny_model):
    for kwargs in ({"method": "svm"}, {"modality": "pet"}, {"threshold": "high"}, {"target_fpr": 2}, {"k": 0}):
        with pytest.raises(HiMatchADError):
            HiMatchDetector(model=tiny_model, **kwargs)
    # wrong types and values out of range say which keyword and what it must be
    for kwargs, message in (
        ({"k": "abc"}, "k must be a whole number, not 'abc'"),
        ({"k": 1.5}, "k must be a whole number, not 1.5"),  # int() would make it 1 without a word
        ({"slice_step": True}, "slice_step must be a whole number, not True"),
        ({"batch_size": 0}, "batch_size must be at least 1, not 0"),
        ({"resolution": 5000}, "resolution must be at most 4096 pixels, not 5000"),
        ({"resolution": 8}, "resolution must be at least 16 pixels (one model patch), not 8"),
        ({"sigma": "wide"}, "smoothing sigma must be a number, not 'wide'"),
        ({"sigma": -1}, "smoothing sigma must be a number of at least 0, not -1"),
        ({"position_window": 1.5}, "position window must be between 0 and 1, not 1.5"),
        ({"fusion": "median"}, "fusion must be one of reliability, mean, max, variance, not 'median'"),
        ({"fusion": "max", "method": "knn"}, "fusion max applies to method himatch only"),
        ({"stages": ["last"]}, "stages must be a list of layer numbers, not ['last']"),
        ({"target_fpr": 2}, "target false-positive rate must be between 0 and 1, not 2.0"),
        ({"codebook_factor": 0}, "codebook_factor must be positive, not 0"),
        ({"seed": 1.5j}, "seed must be a whole number"),
        ({"consistency_mm": float("inf")}, "consistency_mm must be a positive distance"),
        ({"pixel_spacing": "fine"}, "pixel spacing must be 'auto', 'off' or a number of mm, not 'fine'"),
        ({"knn_index": "hnsw", "method": "dpmm"}, "knn_index hnsw applies to method knn only"),
    ):
        with pytest.raises(HiMatchADError, match=re.escape(message)):
            HiMatchDetector(model=tiny_model, **kwargs)
    with pytest.raises(HiMatchADError, match="fit"):
        HiMatchDetector(model=tiny_model).predict(np.zeros((4, 4)))


def test_every_keyword_of_the_detector_is_declared():
    import inspect

    from HiMatchADLib.detector.parameters import DETECTOR_PARAMETERS

    keywords = set(inspect.signature(HiMatchDetector).parameters) - {"progress", "cancel_event"}
    assert keywords == set(DETECTOR_PARAMETERS)
    det = HiMatchDetector(model="m", k="3", threshold="0.5", pixel_spacing="off", modality="CT", stages=(1, 2))
    assert (det.k, det.threshold, det.pixel_spacing, det.modality, det.stages) == (3, 0.5, None, "ct", [1, 2])


def test_each_mode_smooths_as_its_reference_and_the_prior_is_off():
    """sigma None resolves to the mode's reference (AnomalyDINO: 4 image pixels; the DPMM reference
    does not smooth); a given sigma applies to every mode. The slice-position prior is opt-in, and
    only himatch records a fusion rule."""
    assert [HiMatchDetector(model="m", method=m).sigma for m in ("himatch", "knn", "dpmm")] == [4.0, 4.0, 0.0]
    assert HiMatchDetector(model="m", method="dpmm", sigma=2).sigma == 2.0
    det = HiMatchDetector(model="m")
    assert det.position_window is None and det.fusion == "reliability"
    assert det.settings()["fusion"] == "reliability" and "fusion" not in HiMatchDetector(model="m", method="knn").settings()
    assert "fusion" in det.method_key()


def test_cancel_stops_a_long_step(tiny_model, normals_dir, tmp_path):
    import threading

    from HiMatchADLib import Cancelled

    ev = threading.Event()
    seen = []

    def progress(msg, done, total):
        seen.append(msg)
        if "bank" in msg and done > 0:
            ev.set()

    det = HiMatchDetector(model=tiny_model, resolution=RESOLUTION, cache_dir=tmp_path, progress=progress, cancel_event=ev, batch_size=2)
    with pytest.raises(Cancelled):
        det.fit(normals_dir)
    # nothing half-built is left where a bank would be loaded from
    assert not list((tmp_path / "banks").glob("*/manifest.json"))


def test_cli_refuses_fp16_and_passes_bf16(tiny_model, tmp_path, capsys, lesion_case):
    from HiMatchADLib.cli.commands import detector_from_args
    from HiMatchADLib.cli.main import build_parser, main
    from HiMatchADLib.io.writers import write_image

    img, _ = lesion_case
    case = tmp_path / "case.nii.gz"
    write_image(img.array, img.geometry, case)
    (tmp_path / "normals").mkdir()
    code = main(["--quiet", "detect", str(case), "--normals", str(tmp_path / "normals"), "--out-dir", str(tmp_path / "o"), "--model", tiny_model, "--precision", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: precision fp16 is not supported") and len(err.strip().splitlines()) == 1
    args = build_parser().parse_args(["detect", str(case), "--normals", "n", "--out-dir", "o", "--model", tiny_model, "--precision", "bf16"])
    assert detector_from_args(args).precision == "bf16"
    args = build_parser().parse_args(["detect", str(case), "--normals", "n", "--out-dir", "o", "--model", tiny_model])
    from HiMatchADLib.features.backbone import resolve_precision

    assert detector_from_args(args).precision == resolve_precision("auto", "auto")  # the default, resolved


def _bad_inputs(d):
    """A corrupt file, a 4D series, and a volume the CT preset finds no body in."""
    import SimpleITK as sitk

    from HiMatchADLib.core.geometry import Image
    from HiMatchADLib.io.writers import write_image

    corrupt = d / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x00not an image")
    four_d = d / "series.nii.gz"
    vols = [sitk.GetImageFromArray(np.random.default_rng(t).random((4, 16, 16)).astype(np.float32)) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(vols), str(four_d))  # three time points
    air = np.random.default_rng(1).uniform(-1000, -700, (6, 32, 32)).astype(np.float32)
    write_image(air, Image.from_array(air).geometry, d / "air.nii.gz")
    return [(corrupt, "auto", "not a readable image"), (four_d, "auto", "4D"), (d / "air.nii.gz", "ct", "no foreground")]


def test_bad_query_is_reported_before_the_model_or_the_bank(tmp_path, monkeypatch):
    import HiMatchADLib.detector.detector as detector_mod

    def untouchable(*a, **k):
        raise AssertionError("the normal bank was touched before the query was checked")

    monkeypatch.setattr(detector_mod, "build_or_load", untouchable)
    monkeypatch.setattr(detector_mod, "FeatureExtractor", untouchable)
    for path, modality, message in _bad_inputs(tmp_path):
        det = HiMatchDetector(model="/nonexistent/model", modality=modality)
        with pytest.raises(HiMatchADError, match=message):
            det.check_query(path)


def test_cli_detect_checks_the_input_before_building_the_bank(tiny_model, normals_dir, tmp_path, capsys, monkeypatch):
    import HiMatchADLib.detector.detector as detector_mod
    from HiMatchADLib.cli.main import main

    calls = []
    real = detector_mod.build_or_load
    monkeypatch.setattr(detector_mod, "build_or_load", lambda *a, **k: calls.append(a) or real(*a, **k))
    cache = tmp_path / "cache"
    for path, modality, message in _bad_inputs(tmp_path):
        code = main(["--quiet", "detect", str(path), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "o"),
                     "--model", tiny_model, "--modality", modality, "--cache-dir", str(cache)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and message in err and "Traceback" not in err, err
    assert calls == [] and not cache.exists()  # no bank work at all


def test_predict_reuses_the_checked_query(fitted, lesion_case, tmp_path):
    from HiMatchADLib.io.writers import write_image

    det = fitted("knn")
    img, _ = lesion_case
    path = tmp_path / "case.nii.gz"
    write_image(img.array, img.geometry, path)
    checked = det.check_query(path)
    assert checked.array.shape == PHANTOM_SHAPE
    res_checked = det.predict(checked)
    res_path = det.predict(path)
    np.testing.assert_array_equal(res_checked.heatmap, res_path.heatmap)
    assert res_checked.timings["read"] > 0 and res_checked.timings["total"] >= res_checked.timings["read"] + res_checked.timings["preprocess"]
    assert det._checked is None  # used once, not kept
