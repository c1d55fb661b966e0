"""Reader feedback ("mark as normal"): a marked false-positive pattern stops scoring as anomalous in
the case and in another one, a true lesion elsewhere is still found, the threshold is not changed,
removal gives the earlier results bit for bit, damaged or foreign entries are refused; each method's
use of the marks against a reference computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import PHANTOM_SHAPE
from HiMatchADLib import HiMatchADError
from HiMatchADLib.bank.feedback import FeedbackEntry, read_entries
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.methods.base import QuerySlice, SliceScores
from HiMatchADLib.methods.dpmm import DpmmScorer
from HiMatchADLib.methods.feedback import FeedbackEvidence, build_evidence
from HiMatchADLib.methods.fusion import fuse_stages, standardise
from HiMatchADLib.methods.himatch import HiMatchScorer
from HiMatchADLib.methods.knn import KnnScorer

ART_SLICE, LESION_SLICE = 4, 11


def _case(path: Path, seed: int, direction=None) -> tuple:
    """A phantom with a striped artefact (slices 3-5, left) and a bright lesion (slices 10-12,
    right): both unlike the normal phantoms. Returns (path, artefact mask, lesion mask)."""
    img, _ = make_phantom(PHANTOM_SHAPE, seed=seed, direction=direction)
    a = img.array.astype(np.float32).copy()
    z, y, x = np.meshgrid(*(np.arange(n) for n in PHANTOM_SHAPE), indexing="ij")
    tissue = np.median(a[a > a.max() * 0.2])
    art = (np.abs(z - ART_SLICE) <= 1) & ((y - 28) ** 2 + (x - 20) ** 2 <= 64)
    stripes = ((y // 2 + x // 2) % 2).astype(np.float32)
    a[art] = (tissue * (0.3 + 1.2 * stripes))[art]
    les = (np.abs(z - LESION_SLICE) <= 1) & ((y - 34) ** 2 + (x - 44) ** 2 <= 64)
    a[les] = tissue * 1.8
    write_image(a, img.geometry, path)
    return path, art, les


def _p99(res, mask) -> float:
    return float(np.percentile(res.heatmap[mask], 99))


@pytest.fixture()
def det_with_folder(fitted, tmp_path, monkeypatch):
    def get(method):
        det = fitted(method)
        monkeypatch.setattr(det, "feedback_dir", tmp_path / f"feedback-{method}")
        monkeypatch.setattr(det, "_feedback", None)
        return det

    return get


@pytest.mark.parametrize("method", ["himatch", "knn", "dpmm"])
def test_a_marked_pattern_stops_scoring_here_and_in_another_case_while_the_lesion_is_found(det_with_folder, tmp_path, method):
    det = det_with_folder(method)
    one, art1, les1 = _case(tmp_path / "one.nii.gz", 1000)
    two, art2, les2 = _case(tmp_path / "two.nii.gz", 1001)
    before1, before2 = det.predict(one), det.predict(two)
    thr = before1.threshold
    assert _p99(before1, art1) > thr and _p99(before2, art2) > thr  # the artefact is a false positive at first
    assert _p99(before1, les1) > thr
    entry = det.mark_normal(one, region=art1.astype(np.uint8), note="striped artefact of this scanner")
    assert entry["region"]["slices"] == [ART_SLICE - 1, ART_SLICE, ART_SLICE + 1] and entry["region"]["patches"] > 0
    assert entry["case"]["input_digest"] == before1.input_digest and entry["note"] == "striped artefact of this scanner"
    after1, after2 = det.predict(one), det.predict(two)
    assert after1.threshold == thr == after2.threshold  # feedback never moves the calibrated threshold
    assert _p99(after1, art1) < thr and _p99(after2, art2) < thr  # gone here and in a case it was not marked on
    assert not after1.labelmap[art1].any() and not after2.labelmap[art2].any()
    assert _p99(after1, les1) > thr and after1.labelmap[les1].any()  # the true lesion is still found
    assert after1.settings["feedback"] == [entry["id"]]
    assert [e["id"] for e in after1.provenance["feedback"]] == [entry["id"]]
    assert after1.provenance["feedback_folder"] == str(det.feedback_folder)
    paths = det.save(after1, tmp_path / "out")
    saved = json.loads(paths["scores"].read_text())
    assert saved["provenance"]["feedback"][0]["note"] == "striped artefact of this scanner"
    # Removing the entry gives the results of the bank alone, bit for bit.
    det.remove_feedback(entry["id"][:6])
    again = det.predict(one)
    np.testing.assert_array_equal(again.heatmap, before1.heatmap)
    np.testing.assert_array_equal(again.slice_scores, before1.slice_scores)
    assert {k: v for k, v in again.settings.items()} == before1.settings and again.provenance["feedback"] == []


def test_slices_and_a_flipped_grid_record_the_input_slices_and_mark_only_them(det_with_folder, tmp_path):
    det = det_with_folder("knn")
    flip = np.diag([1.0, -1.0, -1.0])  # the slice axis runs the other way in the world
    case, art, les = _case(tmp_path / "flipped.nii.gz", 1002, direction=flip)
    before = det.predict(case)
    entry = det.mark_normal(case, slices=range(ART_SLICE - 1, ART_SLICE + 2))
    assert entry["region"]["kind"] == "slices" and entry["region"]["slices"] == [3, 4, 5] and entry["region"]["slice_axis"] == 0
    after = det.predict(case)
    assert _p99(after, art) < before.threshold < _p99(before, art)
    assert _p99(after, les) == pytest.approx(_p99(before, les), rel=0.05)  # slices far from the mark barely change


def test_a_region_outside_the_slices_or_the_foreground_is_refused(det_with_folder, tmp_path):
    det = det_with_folder("knn")
    case, art, les = _case(tmp_path / "c.nii.gz", 1003)
    with pytest.raises(HiMatchADError, match="no voxel in the foreground"):
        det.mark_normal(case, region=les.astype(np.uint8), slices=[0, 1])
    with pytest.raises(HiMatchADError, match="say what is normal"):
        det.mark_normal(case)
    with pytest.raises(HiMatchADError, match="slices must lie in"):
        det.mark_normal(case, slices=[99])
    with pytest.raises(HiMatchADError, match=r"is \(2, 2\), the case"):
        det.mark_normal(case, region=np.ones((2, 2)))
    assert det.feedback_entries() == []  # nothing half-written


def _entry_paths(folder: Path) -> tuple:
    js = sorted(folder.glob("entry-*.json"))
    assert len(js) == 1
    return js[0], js[0].with_suffix(".npz")


@pytest.mark.parametrize("damage, message", [
    (lambda j, z: z.write_bytes(z.read_bytes()[:-10]), "differ from the recorded digest"),
    (lambda j, z: z.write_bytes(z.read_bytes()[:-10] + b"0123456789"), "differ from the recorded digest"),
    (lambda j, z: j.write_text(j.read_text()[:40]), "its record cannot be read"),
    (lambda j, z: z.unlink(), "cannot be read"),
    (lambda j, z: j.write_text(json.dumps({**json.loads(j.read_text()), "format": 99})), "newer than this version"),
    (lambda j, z: j.rename(j.with_name("entry-000000000000.json")), "its name and its id differ"),
    (lambda j, z: j.write_text(json.dumps({**json.loads(j.read_text()), "model": {"id": "other", "weights_digest": "sha256:00", "precision": "fp32"}})),
     "cannot be used with this detector: it was made with the model other"),
], ids=["truncated", "altered", "cut-record", "arrays-missing", "newer-format", "renamed", "other-model"])
def test_damaged_or_foreign_feedback_is_refused_not_skipped(det_with_folder, tmp_path, damage, message):
    det = det_with_folder("knn")
    case, art, _ = _case(tmp_path / "c.nii.gz", 1004)
    det.mark_normal(case, region=art.astype(np.uint8))
    det.predict(case)  # read and used
    damage(*_entry_paths(det.feedback_folder))
    with pytest.raises(HiMatchADError, match=message):
        det.predict(case)


# --------------------------------------------------------------------- each method against its reference
def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _entry(rng, n_stages=2, n_slices=2, per_slice=5, d=8) -> FeedbackEntry:
    offsets = np.arange(n_slices + 1) * per_slice
    tokens = [_unit(rng.standard_normal((int(offsets[-1]), d))) for _ in range(n_stages)]
    meta = {"id": "abcdefabcdef", "created": "2026-01-01T00:00:00+00:00", "arrays": {"sha256": "0"}}
    return FeedbackEntry(meta, _unit(rng.standard_normal((n_slices, d))), offsets, tokens)


def test_knn_feedback_is_the_nearest_neighbour_over_the_bank_and_the_marked_tokens():
    rng = np.random.default_rng(0)
    bank_tokens = _unit(rng.standard_normal((50, 8)))
    entry = _entry(rng)
    q = _unit(np.concatenate([entry.tokens[-1][:3] + 0.01 * rng.standard_normal((3, 8)), rng.standard_normal((7, 8))]))
    base = 1.0 - (q @ bank_tokens.T).max(1)
    scores = [SliceScores(patch=base.astype(np.float32))]
    query = QuerySlice(0, [q, q], q[0], np.ones(10, bool), (2, 5))
    KnnScorer.apply_feedback(None, [query], scores, build_evidence([entry], "tokens", 2, 64))
    union = np.concatenate([bank_tokens, entry.tokens[-1]])
    np.testing.assert_allclose(scores[0].patch, 1.0 - (q @ union.T).max(1), atol=1e-6)
    assert (scores[0].patch[:3] < 0.01).all() and np.array_equal(scores[0].patch[3:] <= base[3:], np.ones(7, bool))


def test_dpmm_feedback_adds_components_to_the_nearest_component_rule():
    rng = np.random.default_rng(1)
    means = rng.standard_normal((6, 8)).astype(np.float32)
    scorer = DpmmScorer(means, np.full(6, 1 / 6), np.full(6, 10.0), np.full(6, 10))
    entry = _entry(rng, per_slice=4)  # fewer tokens than clusters: the components are the marked tokens
    q = _unit(rng.standard_normal((9, 8)))
    query = QuerySlice(0, [q, q], q[0], np.ones(9, bool), (3, 3))
    scores = scorer.score([query])
    scorer.apply_feedback([query], scores, build_evidence([entry], "components", 2, 64))
    augmented = DpmmScorer(np.concatenate([means, entry.tokens[-1]]), np.full(14, 1 / 14), np.full(14, 10.0), np.full(14, 10))
    np.testing.assert_allclose(scores[0].patch, augmented.score([query])[0].patch, atol=1e-6)


def test_himatch_feedback_is_one_more_support_at_every_stage_then_the_same_fusion():
    rng = np.random.default_rng(2)
    entry = _entry(rng, n_stages=3, per_slice=4)
    evidence = build_evidence([entry], "clusters", 3, 64)
    q = [_unit(rng.standard_normal((6, 8))) for _ in range(3)]
    q[1][:2] = entry.tokens[1][:2]  # two query patches are marked patterns at stage 1
    a = rng.uniform(0.2, 0.6, (3, 6)).astype(np.float32)  # closest-support distances of the K normal supports
    v = rng.uniform(0.0, 0.01, (3, 6)).astype(np.float32)
    scorer = HiMatchScorer.__new__(HiMatchScorer)
    scorer.fusion = "reliability"
    scorer.calibration = {"median": [0.3, 0.4, 0.35], "sigma": [0.05, 0.1, 0.08], "weights": [0.2, 0.5, 0.3]}
    s = SliceScores(patch=np.zeros(6, np.float32), stage=a.copy(), var=v)
    scorer.apply_feedback([QuerySlice(0, q, q[0][0], np.ones(6, bool), (2, 3))], [s], evidence)
    # Reference: the marked slice is a support whose clusters (4 tokens <= 64 per slice: the tokens
    # themselves) enter the minimum over supports, stage by stage.
    ref_a = np.stack([np.minimum(a[k], 1.0 - (q[k] @ entry.tokens[k].T).max(1)) for k in range(3)])
    np.testing.assert_allclose(s.stage, ref_a, atol=1e-6)
    assert np.allclose(s.stage[1, :2], 0.0, atol=1e-6)
    z, vt = standardise(ref_a, v, scorer.calibration["median"], scorer.calibration["sigma"])
    np.testing.assert_allclose(s.patch, fuse_stages(z, vt, "reliability", scorer.calibration["weights"]), atol=1e-5)
    z_ref = (ref_a - np.array([0.3, 0.4, 0.35])[:, None]) / np.array([0.05, 0.1, 0.08])[:, None]
    np.testing.assert_allclose(s.patch, (np.array([0.2, 0.5, 0.3])[:, None] * z_ref).sum(0), atol=1e-5)


def test_evidence_without_vectors_changes_nothing():
    ev = FeedbackEvidence([None, np.zeros((0, 4), np.float32)])
    assert ev.distance(0, np.ones((2, 4))) is None and ev.distance(1, np.ones((2, 4))) is None
    assert build_evidence([], "tokens", 2, 64) is None


def test_entries_read_back_as_written(det_with_folder, tmp_path):
    det = det_with_folder("himatch")
    case, art, _ = _case(tmp_path / "c.nii.gz", 1005)
    meta = det.mark_normal(case, region=art.astype(np.uint8), note="n")
    (entry,) = read_entries(det.feedback_folder)
    assert entry.meta == meta and entry.n_slices == 3 and len(entry.tokens) == len(det.bank.stages)
    assert entry.tokens[0].shape == (meta["region"]["patches"], det.bank.cls.shape[1])
    assert meta["model"]["weights_digest"] == det.extractor.info["weights_digest"]
