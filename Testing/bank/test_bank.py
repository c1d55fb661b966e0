"""The normal bank cache: reuse, invalidation, corruption, no pickle, skipped files."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import numpy as np
import pytest

from conftest import PHANTOM_SHAPE, RESOLUTION
from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.evaluation.phantom import make_phantom


def _copy_normals(src, dst, n=3):
    dst.mkdir()
    for p in sorted(src.iterdir())[:n]:
        shutil.copy2(p, dst / p.name)
    return dst


def _det(model, cache, **kw):
    return HiMatchDetector(model=model, method="knn", resolution=RESOLUTION, cache_dir=cache, **kw)


def test_cache_is_reused_then_invalidated(tiny_model, normals_dir, tmp_path):
    folder = _copy_normals(normals_dir, tmp_path / "n")
    cache = tmp_path / "cache"
    msgs = []
    det = _det(tiny_model, cache, progress=lambda m, d, t: msgs.append(m)).fit(folder)
    root = det.bank.root
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert "Building normal bank" in msgs
    # arrays are plain .npy / .npz, readable without pickle
    for f in root.iterdir():
        if f.suffix == ".npy":
            np.load(f, allow_pickle=False)
    # second detector, same folder: loaded, not rebuilt
    msgs.clear()
    det2 = _det(tiny_model, cache, progress=lambda m, d, t: msgs.append(m)).fit(folder)
    assert "Building normal bank" not in msgs
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    assert det2.bank.n_slices == det.bank.n_slices
    # change one file's content: rebuilt in place
    img, _ = make_phantom(PHANTOM_SHAPE, seed=99)
    time.sleep(0.01)
    write_image(img.array, img.geometry, folder / "normal_0.nii.gz")
    det3 = _det(tiny_model, cache).fit(folder)
    assert det3.bank.root == root
    assert (root / "manifest.json").stat().st_mtime_ns != stamp
    # add a file: more slices
    write_image(img.array, img.geometry, folder / "normal_new.nii.gz")
    det4 = _det(tiny_model, cache).fit(folder)
    assert len(det4.bank.files) == 4 and det4.bank.n_slices > det3.bank.n_slices
    # only one bank folder for this folder+settings, no leftovers
    assert len([p for p in (cache / "banks").iterdir() if not p.name.startswith(".")]) == 1
    assert not [p for p in (cache / "banks").iterdir() if p.name.startswith(".")]


def test_other_settings_get_their_own_bank(tiny_model, normals_dir, tmp_path):
    a = _det(tiny_model, tmp_path).fit(normals_dir)
    b = HiMatchDetector(model=tiny_model, method="knn", resolution=96, cache_dir=tmp_path).fit(normals_dir)
    assert a.bank.root != b.bank.root


def test_corrupt_cache_is_rebuilt(tiny_model, normals_dir, tmp_path):
    folder = _copy_normals(normals_dir, tmp_path / "n", 2)
    det = _det(tiny_model, tmp_path / "c").fit(folder)
    n = det.bank.n_slices
    root = det.bank.root
    (root / "tokens.npy").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        det2 = _det(tiny_model, tmp_path / "c").fit(folder)
    assert det2.bank.n_slices == n
    assert np.load(root / "tokens.npy", allow_pickle=False).shape[0] > 0


def test_unreadable_normal_file_is_skipped_and_listed(tiny_model, normals_dir, tmp_path, lesion_case):
    folder = _copy_normals(normals_dir, tmp_path / "n", 2)
    (folder / "broken.nii.gz").write_bytes(b"not an image at all")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        det = _det(tiny_model, tmp_path / "c").fit(folder)
    assert any("broken.nii.gz" in str(x.message) for x in w)
    assert [s["path"] for s in det.bank.skipped] == ["broken.nii.gz"]
    res = det.predict(lesion_case[0])
    assert any("broken.nii.gz" in m for m in res.warnings)
    assert any("broken.nii.gz" in m for m in res.to_dict()["warnings"])


def test_empty_or_useless_normal_folder(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HiMatchADError, match="no images found"):
        _det(tiny_model, tmp_path / "c").fit(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.nii.gz").write_bytes(b"xx")
    write_image(np.full((4, 8, 8), 7.0, np.float32), make_phantom((4, 8, 8))[0].geometry, bad / "const.nii.gz")
    with pytest.raises(HiMatchADError, match="no usable normal slices"):
        _det(tiny_model, tmp_path / "c").fit(bad)


def test_dpmm_mixture_is_cached_with_the_bank(fitted):
    det = fitted("dpmm")
    files = sorted(p.name for p in det.bank.root.glob("dpmm_*.npz"))
    assert len(files) == 1
    z = np.load(det.bank.root / files[0], allow_pickle=False)
    assert z["means"].shape[1] == det.extractor.dim
    assert (det.scorer.weights > 1e-6).all()
    # only components with tokens assigned are scored against, and the counts cover the fitted tokens
    used = (z["weights"] > 1e-6) & (z["soft_counts"] >= 1) & (z["hard_counts"] >= 1)
    assert det.scorer.means.shape[0] == used.sum() >= 1
    assert z["hard_counts"].sum() == int(z["n_tokens"])


def test_codebook_assigns_each_row_to_its_most_similar_entry():
    from HiMatchADLib.bank.clusters import build_codebook, codebook_size

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 16))
    x = centres[rng.integers(0, 40, 3000)] + 0.05 * rng.standard_normal((3000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    size = codebook_size(len(x), 2.0)
    assert size == round(2.0 * np.sqrt(3000)) == 110
    cb, codes = build_codebook(x, size, seed=0)
    assert cb.shape[0] <= size and codes.shape == (3000,)
    assert np.allclose(np.linalg.norm(cb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(np.unique(codes), np.arange(cb.shape[0]))  # unused entries dropped
    sims = x.astype(np.float32) @ cb.T
    assert np.allclose(sims[np.arange(3000), codes], sims.max(1), atol=1e-5)
    assert np.quantile(sims.max(1), 0.9) > 0.98 > np.quantile(sims.max(1), 0.0)  # 40 tight clusters, 110 entries
    cb2, codes2 = build_codebook(x, size, seed=0)
    assert np.array_equal(codes, codes2) and np.array_equal(cb, cb2)  # seeded
    # sqrt growth: 4x the vectors, 2x the entries; small inputs are their own codebook
    assert codebook_size(4 * 6400, 8.0) == 2 * codebook_size(6400, 8.0) == 1280
    small, small_codes = build_codebook(x[:50], 64)
    assert small.shape[0] == 50 and np.array_equal(small_codes, np.arange(50))


def _check_stage_matching(bank, rng):
    """Matching a query against several slices at once equals brute force slice by slice."""
    from HiMatchADLib.methods.maps import max_cos_to_slices

    for st in bank.stages:
        q = rng.standard_normal((7, bank.cls.shape[1])).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        slices = [0, 3, 3, bank.n_slices - 1]
        got = max_cos_to_slices(bank, st, q, slices)
        want = np.stack([(q @ bank.slice_centroids(st, i).T).max(1) for i in slices], axis=1)
        assert np.allclose(got, want, atol=1e-6)


def test_stage_maps_use_each_slice_own_centroids(fitted):
    """Default bank: per stage, each slice's own spherical k-means centroids (float16, memory-mapped)."""
    from HiMatchADLib.bank.clusters import spherical_kmeans
    from HiMatchADLib.io.readers import read_image
    from HiMatchADLib.features.slicing import prepare_volume

    det = fitted("himatch")
    bank = det.bank
    assert not bank.uses_codebook and not bank.codebooks and not bank.codes
    assert not [p for p in bank.root.iterdir() if p.name.startswith(("cent_", "codebook_")) and not p.name.startswith("cent_offsets_")]
    for st in bank.stages:
        assert isinstance(bank.centroids[st], np.memmap) and bank.centroids[st].dtype == np.float16
    # Reference: re-extract a few normal slices and cluster their foreground tokens again.
    for i in [0, bank.n_slices // 2, bank.n_slices - 1]:
        prep = prepare_volume(read_image(bank.manifest["folder"] + "/" + bank.files[int(bank.slice_file[i])]), det.modality, det.slice_axis)
        (q,), _ = det._queries(prep, np.asarray([int(bank.slice_index[i])]))
        for si, st in enumerate(bank.stages):
            want = spherical_kmeans(q.tokens[si], det.clusters_per_slice, seed=det.seed)
            got = bank.slice_centroids(st, i)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=2e-3)  # float16 storage
        with pytest.raises(ValueError, match="no codebook"):
            bank.slice_codes(bank.stages[-1], i)
    _check_stage_matching(bank, np.random.default_rng(0))
    per_slice = sum(bank.centroids[s].nbytes for s in bank.stages)
    assert per_slice == sum(int(bank.cent_offsets[s][-1]) for s in bank.stages) * bank.cls.shape[1] * 2
    assert bank.clustered_nbytes() >= per_slice


def test_shared_codebook_is_opt_in(tiny_model, normals_dir, tmp_path):
    from HiMatchADLib.bank.clusters import codebook_size

    folder = _copy_normals(normals_dir, tmp_path / "n", n=2)
    det = HiMatchDetector(model=tiny_model, resolution=RESOLUTION, cache_dir=tmp_path / "c", shared_codebook=True, k=2).fit(folder)
    own = HiMatchDetector(model=tiny_model, resolution=RESOLUTION, cache_dir=tmp_path / "c", k=2).fit(folder)
    bank = det.bank
    assert bank.uses_codebook and bank.root != own.bank.root and not bank.centroids
    # the codebook saw the calibration subjects: the calibration says so, the per-slice clusters do not
    said = "shared codebook was trained on every normal slice"
    assert any(said in w for w in det.calibration["warnings"]) and not any(said in w for w in own.calibration["warnings"])
    for st in bank.stages:
        m = int(bank.cent_offsets[st][-1])
        assert m == int(own.bank.cent_offsets[st][-1])
        assert bank.codebooks[st].dtype == np.float16
        assert bank.codebooks[st].shape[0] <= codebook_size(m, det.codebook_factor)
        assert bank.manifest["codebook_sizes"][str(st)] == bank.codebooks[st].shape[0]
        # each slice centroid was replaced by its most similar codebook entry
        cents = np.asarray(own.bank.centroids[st], np.float32)
        cb = np.asarray(bank.codebooks[st], np.float32)
        best = (cents @ cb.T).max(1)
        assert np.allclose((cents * cb[bank.codes[st]]).sum(1), best, atol=2e-3)
    _check_stage_matching(bank, np.random.default_rng(1))


def test_bank_of_an_older_format_is_rebuilt(tiny_model, normals_dir, tmp_path):
    from HiMatchADLib.bank.store import BANK_FORMAT

    folder = _copy_normals(normals_dir, tmp_path / "n", n=2)
    root = _det(tiny_model, tmp_path / "c").fit(folder).bank.root
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format"] = BANK_FORMAT - 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    msgs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = _det(tiny_model, tmp_path / "c", progress=lambda m, d, t: msgs.append(m)).fit(folder)
    assert "Building normal bank" in msgs and det.bank.manifest["format"] == BANK_FORMAT


def test_precision_and_device_type_are_part_of_the_bank_key(tiny_model, normals_dir, tmp_path):
    folder = _copy_normals(normals_dir, tmp_path / "n", n=2)
    cache = tmp_path / "cache"
    msgs = []
    d32 = _det(tiny_model, cache, precision="fp32", progress=lambda m, d, t: msgs.append(m)).fit(folder)
    assert "Building normal bank" in msgs
    msgs.clear()
    d16 = _det(tiny_model, cache, precision="bf16", progress=lambda m, d, t: msgs.append(m)).fit(folder)
    assert "Building normal bank" in msgs  # never the fp32 bank
    assert d16.bank.root != d32.bank.root
    assert d16.bank.manifest["features"]["precision"] == "bf16"
    assert d32.bank.manifest["features"] == {**d16.bank.manifest["features"], "precision": "fp32"}
    assert d32.bank.manifest["features"]["device_type"] == "cpu"
    # the bf16 bank holds bf16 features: close to, not equal to, the fp32 ones
    t32 = np.asarray(d32.bank.tokens, np.float32)
    t16 = np.asarray(d16.bank.tokens, np.float32)
    assert t32.shape == t16.shape and not np.array_equal(t32, t16)
    assert (t32 * t16).sum(1).mean() > 0.98
    msgs.clear()
    again = _det(tiny_model, cache, precision="bf16", progress=lambda m, d, t: msgs.append(m)).fit(folder)
    assert again.bank.root == d16.bank.root and "Building normal bank" not in msgs
    # a bank made on another device type is another cache entry
    from HiMatchADLib.bank.build import bank_key

    ex = d32.extractor
    key_cpu = bank_key(folder, ex, d32._bank_settings())
    original = ex.cache_key
    try:
        ex.cache_key = lambda: {**original(), "device_type": "cuda"}
        assert bank_key(folder, ex, d32._bank_settings()) != key_cpu
    finally:
        del ex.cache_key


def test_no_usable_normal_slices_says_why(tiny_model, normals_dir, tmp_path):
    from HiMatchADLib import HiMatchADError, HiMatchDetector

    det = HiMatchDetector(model=tiny_model, method="knn", k=2, resolution=16, cache_dir=tmp_path / "c")
    with pytest.raises(HiMatchADError) as info:
        det.fit(normals_dir)
    msg = str(info.value)
    assert msg.startswith("no usable normal slices in ")
    assert "foreground patches of 16x16 model pixels (a slice needs 4; the model grid is 1x1 patches at resolution 16)" in msg
    assert "raise --resolution" in msg
