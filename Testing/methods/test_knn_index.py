"""kNN indexes of the ``knn`` mode (exact, ivf, hnsw) on constructed banks where the answer is known,
their persistence next to the bank, and the ``knn_index`` setting through the detector, the batch
runner and the command line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from HiMatchADLib.methods import knn_index as ki
from HiMatchADLib.core.errors import HiMatchADError
from HiMatchADLib.methods.knn import KnnScorer
from HiMatchADLib.methods.base import QuerySlice
from HiMatchADLib.methods.maps import top_percent_mean

from conftest import RESOLUTION

APPROXIMATE = ("ivf", "hnsw")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _token_bank(root, tokens, slice_sizes, groups, seed=0):
    """A NormalBank holding ``tokens`` (float16 on disk, memory-mapped, as built banks hold them),
    ``slice_sizes`` tokens per slice and the subject ``groups`` of the slices."""
    from HiMatchADLib.bank.store import NormalBank
    from HiMatchADLib.core.digest import file_digest

    import os

    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "new_tokens.npy", np.asarray(tokens, np.float16))
    os.replace(root / "new_tokens.npy", root / "tokens.npy")  # an earlier memory map keeps its file
    n = len(slice_sizes)
    d = tokens.shape[1]
    offs = np.cumsum([0] + list(slice_sizes)).astype(np.int64)
    assert offs[-1] == len(tokens)
    manifest = {
        "settings": {"stages": [1], "shared_codebook": False, "seed": seed},
        "files": [{"path": "a"}],
        "n_slices": n,
        "content": "content-" + str(len(tokens)),
        "checksums": {"tokens.npy": file_digest(root / "tokens.npy")},
    }
    return NormalBank(
        root=root,
        manifest=manifest,
        cls=np.zeros((n, d), np.float16),
        tokens=np.load(root / "tokens.npy", mmap_mode="r"),
        tok_offsets=offs,
        codebooks={},
        codes={},
        cent_offsets={1: np.zeros(n + 1, np.int64)},
        slice_file=np.zeros(n, np.int32),
        slice_index=np.arange(n, dtype=np.int32),
        slice_group=np.asarray(groups, np.int32),
        slice_pos=np.full(n, np.nan, np.float32),
        slice_grid=np.ones((n, 2), np.int32),
    )


def _clustered(n_slices=60, per_slice=80, d=32, k=40, spread=0.15, seed=0):
    """Unit tokens around ``k`` random centres; slice ``s`` belongs to subject ``s // 4``."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(k, d)))
    x = _unit(centres[rng.integers(0, k, n_slices * per_slice)] + spread * rng.normal(size=(n_slices * per_slice, d)))
    x = x.astype(np.float16).astype(np.float32)  # the values the bank stores
    return x, [per_slice] * n_slices, np.arange(n_slices) // 4


def _planted_queries(x, n=1500, eps=0.02, seed=1):
    """Queries a small step away from known bank tokens: each one's nearest neighbour is planted."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), n, replace=False)
    return _unit(x[rows] + eps * rng.normal(size=(n, x.shape[1]))).astype(np.float32), rows


def _query(tokens, group=None):
    t = np.asarray(tokens, np.float32)
    return QuerySlice(0, [t], t[0], np.ones(len(t), bool), (1, len(t)), group=group)


@pytest.fixture(scope="module")
def clustered_bank(tmp_path_factory):
    x, sizes, groups = _clustered()
    return _token_bank(tmp_path_factory.mktemp("bank"), x, sizes, groups), x, groups


def test_parameters_follow_the_documented_rules():
    p = ki.index_params("ivf", 1_000_000)
    assert p["nlist"] == 4000 and p["nprobe"] == 125 and p["train_points"] == 64 * 4000
    small = ki.index_params("ivf", 2000)
    assert small["nlist"] == 2000 // 39 and small["nprobe"] == 16 and small["train_points"] == 2000
    assert ki.index_params("ivf", 10)["nlist"] == 1 and ki.index_params("ivf", 10)["nprobe"] == 1
    assert ki.index_params("hnsw", 5) == {"M": 48, "efConstruction": 60, "efSearch": 64}
    assert ki.index_params("exact", 5) == {}


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_approximate_indexes_return_the_exact_max_similarity(clustered_bank, kind):
    bank, x, _ = clustered_bank
    q, planted = _planted_queries(x)
    truth = (q @ x.T).max(1)
    exact = ki.open_index(bank, "exact").max_sim(q)
    np.testing.assert_allclose(exact, truth, atol=1e-5)
    assert np.mean(np.abs(exact - np.sum(q * x[planted], 1)) <= 1e-5) > 0.99  # the planted token is the nearest
    got = ki.open_index(bank, kind).max_sim(q)
    assert np.mean(np.abs(got - truth) <= 1e-5) >= 0.99
    # every value is a cosine to a real normal token: never above the true maximum
    assert np.all(got <= truth + 1e-5)


def test_ivf_searched_list_by_list_gives_faiss_ivf_search_results(clustered_bank):
    import faiss

    bank, x, groups = clustered_bank
    q, _ = _planted_queries(x, n=600, eps=0.3, seed=3)  # far enough that the probed lists matter
    ivf = ki.open_index(bank, "ivf")
    nprobe = ivf.params["nprobe"]
    assert ivf.index.nlist > nprobe  # a real partition: not every list is probed
    D, _ = ivf.index.search(q, 1, params=faiss.SearchParametersIVF(nprobe=nprobe))
    np.testing.assert_allclose(ivf.max_sim(q), D[:, 0], atol=1e-5)
    keep = np.repeat(groups != 2, 80)
    sel, _bitmap = ki.keep_selector(keep)
    D, I = ivf.index.search(q, 1, params=faiss.SearchParametersIVF(nprobe=nprobe, sel=sel))
    found = I[:, 0] >= 0
    np.testing.assert_allclose(ivf.max_sim(q, keep)[found], D[found, 0], atol=1e-5)


@pytest.mark.parametrize("kind", ("exact",) + APPROXIMATE)
def test_scores_of_an_easy_set_match_exact(clustered_bank, kind):
    bank, x, groups = clustered_bank
    q, _ = _planted_queries(x, n=800, seed=5)
    slices = [_query(q[i : i + 100]) for i in range(0, 800, 100)]
    ref = [1.0 - (s.tokens[-1] @ x.T).max(1) for s in slices]
    got = KnnScorer(bank, index=kind).score(slices)
    for r, g in zip(ref, got):
        assert np.mean(np.abs(g.patch - r) <= 1e-5) >= 0.99
        assert top_percent_mean(g.patch) == pytest.approx(top_percent_mean(r), abs=1e-3)


@pytest.mark.parametrize("kind", ("exact",) + APPROXIMATE)
def test_the_own_subject_is_excluded_by_every_index(tmp_path, kind):
    """Subject 0 alone holds tokens close to the queries; excluding it leaves only far tokens, which
    every index must return (an index that skips too few candidates would return a near one). Half
    the bank is subject 0, so the ivf lists a query probes hold only excluded tokens."""
    rng = np.random.default_rng(0)
    d = 32
    u = _unit(rng.normal(size=d))
    near = _unit(u + 0.15 * rng.normal(size=(3000, d)))  # cos to u ~ 0.75
    centres = rng.normal(size=(10, d))
    centres = _unit(centres - np.outer(centres @ u, u))  # other anatomy, orthogonal to u
    centres[0] = 0.2 * u + np.sqrt(1 - 0.2**2) * centres[0]  # the closest one
    far = _unit(centres[rng.integers(0, 10, 3000)] + 0.1 * rng.normal(size=(3000, d)))
    x = np.concatenate([near, far]).astype(np.float16).astype(np.float32)
    sizes = [100] * 60
    groups = np.r_[np.zeros(30, int), 1 + np.arange(30) // 5]
    bank = _token_bank(tmp_path, x, sizes, groups)
    q = _unit(u + 0.1 * rng.normal(size=(300, d))).astype(np.float32)
    keep = np.repeat(groups != 0, 100)
    truth_excluded = (q @ x[keep].T).max(1)
    truth_all = (q @ x.T).max(1)
    assert truth_all.min() > 0.75 and truth_excluded.max() < 0.7  # the planted gap
    scorer = KnnScorer(bank, index=kind)
    assert scorer.max_sim(q).min() > 0.75  # without the exclusion: near tokens
    got = scorer.max_sim(q, exclude_group=0)
    assert got.max() < 0.7  # nothing of subject 0 was returned
    assert np.mean(np.abs(got - truth_excluded) <= 1e-5) >= 0.99
    assert np.all(got <= truth_excluded + 1e-5)
    # through score(): the query slice's group is its subject
    patch = scorer.score([_query(q, group=0)])[0].patch
    np.testing.assert_allclose(patch, 1.0 - got, atol=1e-6)


def test_exact_search_by_runs_and_by_chunks_equals_brute_force(clustered_bank):
    bank, x, groups = clustered_bank
    q, _ = _planted_queries(x, n=300, eps=0.5, seed=7)
    keep = np.repeat(groups != 1, 80)
    np.testing.assert_allclose(ki.chunked_max_sim(bank.tokens, q, keep, chunk_rows=333), (q @ x[keep].T).max(1), atol=1e-5)
    np.testing.assert_allclose(ki.chunked_max_sim(bank.tokens, q, None, chunk_rows=1000), (q @ x.T).max(1), atol=1e-5)
    # a subject whose slices are not stored together (subject_pattern groups): many runs
    scattered = np.random.default_rng(0).random(len(x)) > 0.3
    assert len(ki.kept_runs(scattered, len(x))) > 100
    want = (q @ x[scattered].T).max(1)
    np.testing.assert_allclose(ki.flat_max_sim(x, q, scattered), want, atol=1e-5)
    np.testing.assert_allclose(ki.chunked_max_sim(bank.tokens, q, scattered, chunk_rows=333), want, atol=1e-5)
    assert ki.kept_runs(np.array([0, 1, 1, 0, 1], bool), 5) == [(1, 3), (4, 5)] and ki.kept_runs(None, 3) == [(0, 3)]


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_an_index_too_large_for_memory_is_replaced_by_the_chunked_exact_search(clustered_bank, tmp_path, kind):
    _, x, groups = clustered_bank
    bank = _token_bank(tmp_path, x, [80] * 60, groups)
    s = ki.open_index(bank, kind, max_bytes=x.nbytes)  # the tokens fit, the index with its links does not
    assert isinstance(s, ki.ChunkedExact) and s.info["how"] == "chunked"
    assert kind in s.info["warning"] and "exactly" in s.info["warning"]
    q, _ = _planted_queries(x, n=200, eps=0.5)
    np.testing.assert_allclose(s.max_sim(q), (q @ x.T).max(1), atol=1e-5)
    assert not list(tmp_path.glob("knn_*"))  # nothing was built or written


# ------------------------------------------------------------------ persistence
@pytest.mark.parametrize("kind", APPROXIMATE)
def test_a_persisted_index_is_reused_and_reproducible(clustered_bank, tmp_path, kind):
    _, x, groups = clustered_bank
    bank = _token_bank(tmp_path / "a", x, [80] * 60, groups)
    first = ki.open_index(bank, kind)
    assert first.info["how"] == "built"
    files = sorted(p.name for p in bank.root.glob(f"knn_{kind}_*"))
    assert [f.rsplit(".", 1)[1] for f in files] == ["faiss", "json"]
    record = json.loads((bank.root / files[1]).read_text())
    assert record["key"] == ki.index_key(bank, kind, first.params)
    assert record["bytes"] == (bank.root / files[0]).stat().st_size
    # a new process (empty in-memory cache) loads it, and gets the same answers
    bank._cache.clear()
    again = ki.open_index(bank, kind)
    assert again.info["how"] == "loaded"
    q, _ = _planted_queries(x, n=400, eps=0.4, seed=9)
    np.testing.assert_array_equal(again.max_sim(q), first.max_sim(q))
    # the same tokens, built elsewhere: the same bytes (seeded, one thread)
    other = _token_bank(tmp_path / "b", x, [80] * 60, groups)
    ki.open_index(other, kind)
    assert json.loads(next(other.root.glob(f"knn_{kind}_*.json")).read_text())["digest"] == record["digest"]


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_a_damaged_or_foreign_index_is_rebuilt_never_used(clustered_bank, tmp_path, kind):
    _, x, groups = clustered_bank
    bank = _token_bank(tmp_path / "bank", x, [80] * 60, groups)
    good = ki.open_index(bank, kind)
    q, _ = _planted_queries(x, n=300, eps=0.4, seed=11)
    want = good.max_sim(q)
    path = next(bank.root.glob(f"knn_{kind}_*.faiss"))
    record_path = path.with_suffix(".json")
    record = json.loads(record_path.read_text())

    # 1. damaged bytes
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    bank._cache.clear()
    with pytest.warns(UserWarning, match="cannot be used"):
        s = ki.open_index(bank, kind)
    assert s.info["how"] == "built"
    np.testing.assert_array_equal(s.max_sim(q), want)
    assert json.loads(record_path.read_text())["digest"] == record["digest"]  # rewritten as it should be

    # 2. an index of other tokens under this name, with a consistent record (e.g. copied by hand)
    y = _clustered(seed=5)[0]
    foreign_bank = _token_bank(tmp_path / "foreign", y, [80] * 60, groups)
    ki.open_index(foreign_bank, kind)
    fpath = next(foreign_bank.root.glob(f"knn_{kind}_*.faiss"))
    path.write_bytes(fpath.read_bytes())
    record_path.write_text(fpath.with_suffix(".json").read_text())
    bank._cache.clear()
    with pytest.warns(UserWarning, match="another bank"):
        s = ki.open_index(bank, kind)
    assert s.info["how"] == "built"
    np.testing.assert_array_equal(s.max_sim(q), want)

    # 3. the bank's tokens changed (same file names): the key differs, so the old file is not read
    bank2 = _token_bank(tmp_path / "bank", y, [80] * 60, groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ki.open_index(bank2, kind)
    assert s.info["how"] == "built"
    qy, _ = _planted_queries(y, n=300)
    assert np.mean(np.abs(s.max_sim(qy) - (qy @ y.T).max(1)) <= 1e-5) >= 0.99
    assert len(list(bank2.root.glob(f"knn_{kind}_*.faiss"))) == 1  # the stale index was removed


def test_an_unwritable_bank_folder_keeps_the_index_in_memory(clustered_bank, tmp_path, monkeypatch):
    _, x, groups = clustered_bank
    bank = _token_bank(tmp_path, x, [80] * 60, groups)

    def refuse(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(ki, "write_index", refuse)
    with pytest.warns(UserWarning, match="kept in memory only"):
        s = ki.open_index(bank, "hnsw")
    q, _ = _planted_queries(x, n=200)
    assert np.mean(np.abs(s.max_sim(q) - (q @ x.T).max(1)) <= 1e-5) >= 0.99
    assert not list(tmp_path.glob("knn_*"))


# ------------------------------------------------------------------ the setting
def test_invalid_knn_index_is_refused(tiny_model, tmp_path, capsys):
    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.cli.main import main

    (tmp_path / "x.nii.gz").write_bytes(b"")
    (tmp_path / "n").mkdir()

    with pytest.raises(HiMatchADError, match="unknown kNN index 'lsh'; choose one of exact, ivf, hnsw"):
        HiMatchDetector(model=tiny_model, method="knn", knn_index="lsh")
    with pytest.raises(HiMatchADError, match="applies to method knn only"):
        HiMatchDetector(model=tiny_model, method="himatch", knn_index="hnsw")
    assert HiMatchDetector(model=tiny_model, method="knn", knn_index="IVF").knn_index == "ivf"
    from HiMatchADLib.worker.server import Worker

    assert "knn_index" in Worker(emit=lambda event: None).allowed_settings()  # the Slicer module's worker passes it on
    with pytest.raises(SystemExit) as exc:
        main(["detect", str(tmp_path / "x.nii.gz"), "--normals", str(tmp_path / "n"), "--out-dir", str(tmp_path / "o"), "--knn-index", "lsh"])
    assert exc.value.code == 2 and "invalid choice: 'lsh'" in capsys.readouterr().err
    code = main(["--quiet", "detect", str(tmp_path / "x.nii.gz"), "--normals", str(tmp_path / "n"), "--out-dir", str(tmp_path / "o"), "--method", "dpmm", "--knn-index", "ivf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: knn_index ivf applies to method knn only (method is dpmm); leave it at exact"]


def test_settings_record_the_index_and_a_batch_resume_recomputes_when_it_changes(fitted, tiny_model, normals_dir, cache_dir, tmp_path):
    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.batch import STATUS_DONE, STATUS_OK, run_batch
    from HiMatchADLib.io.writers import write_image
    from HiMatchADLib.evaluation.phantom import make_phantom

    exact = fitted("knn")
    assert exact.settings()["knn_index"] == "exact"
    assert "knn_index" not in fitted("himatch").settings()  # the other methods search no tokens
    hnsw = HiMatchDetector(model=tiny_model, method="knn", k=4, knn_index="hnsw", resolution=RESOLUTION, cache_dir=cache_dir).fit(normals_dir)
    assert hnsw.settings()["knn_index"] == "hnsw" and hnsw.fit_info["knn_index"]["kind"] == "hnsw"
    assert hnsw.calibration["key"]["knn_index"] == "hnsw"  # calibrated with its own index
    inp = tmp_path / "in"
    img, _ = make_phantom((16, 64, 64), seed=1000, lesion=True, name="a")
    write_image(img.array, img.geometry, inp / "a.nii.gz")
    out = tmp_path / "out"
    assert run_batch(exact, inp, out)[0]["status"] == STATUS_OK
    assert json.loads((out / "a_scores.json").read_text())["settings"]["knn_index"] == "exact"
    log = []
    rows = run_batch(hnsw, inp, out, log=log.append)
    assert rows[0]["status"] == STATUS_OK and log == ["a.nii.gz: recomputed: settings changed: knn_index exact -> hnsw"]
    assert json.loads((out / "a_scores.json").read_text())["settings"]["knn_index"] == "hnsw"
    assert run_batch(hnsw, inp, out)[0]["status"] == STATUS_DONE
    assert run_batch(exact, inp, out, log=log.append)[0]["status"] == STATUS_OK  # and back


def test_the_detector_uses_the_persisted_index_of_its_bank(tiny_model, normals_dir, lesion_case, tmp_path):
    from HiMatchADLib import HiMatchDetector

    kw = dict(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path)
    exact = HiMatchDetector(**kw).fit(normals_dir)
    ivf = HiMatchDetector(**kw, knn_index="ivf").fit(normals_dir)
    assert ivf.fit_info["knn_index"]["how"] == "built" and list(ivf.bank.root.glob("knn_ivf_*.faiss"))
    again = HiMatchDetector(**kw, knn_index="ivf").fit(normals_dir)
    assert again.fit_info["knn_index"]["how"] == "loaded"
    a, b, c = (d.predict(lesion_case[0]) for d in (exact, ivf, again))
    np.testing.assert_array_equal(b.heatmap, c.heatmap)
    assert b.settings["knn_index"] == "ivf" and a.settings["knn_index"] == "exact"
    # a small bank: the ivf answers are those of the exact search for nearly every pixel
    assert np.mean(np.abs(a.heatmap - b.heatmap) <= 1e-4) > 0.99
    assert b.volume_score == pytest.approx(a.volume_score, abs=1e-3)


def test_a_bank_too_large_for_the_index_is_searched_exactly_with_a_warning(tiny_model, normals_dir, lesion_case, tmp_path, monkeypatch):
    from HiMatchADLib import HiMatchDetector

    monkeypatch.setattr(ki, "MAX_INDEX_BYTES", 1)
    with pytest.warns(UserWarning, match="hnsw kNN index of this bank would need"):
        det = HiMatchDetector(model=tiny_model, method="knn", knn_index="hnsw", resolution=RESOLUTION, cache_dir=tmp_path).fit(normals_dir)
    assert det.fit_info["knn_index"]["how"] == "chunked"
    res = det.predict(lesion_case[0])
    assert any("searched exactly, chunk by chunk" in w for w in res.warnings)
    assert not list(det.bank.root.glob("knn_*"))
