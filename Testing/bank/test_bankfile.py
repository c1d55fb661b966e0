"""Bank files (``export_bank`` / ``load_bank``): one shareable file that predicts as the folder does,
and refuses clearly when damaged, truncated, of a newer format, for another model or other settings."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib import HiMatchDetector
from HiMatchADLib.bank.bankfile import BANK_FILE_FORMAT, MANIFEST_NAME, BankFile
from HiMatchADLib.core.errors import HiMatchADError

METHODS = ("himatch", "knn", "dpmm")


@pytest.fixture(scope="module")
def exported(fitted, tmp_path_factory):
    """One anonymised bank file per method, exported from the shared fitted detectors."""
    folder = tmp_path_factory.mktemp("bankfiles")
    files = {}

    def get(method: str):
        if method not in files:
            files[method] = fitted(method).export_bank(folder / f"{method}.himatchad-bank")
        return files[method]

    return get


def _load(tiny_model, path, tmp_path, **kw):
    return HiMatchDetector(model=tiny_model, cache_dir=tmp_path / "cache", **kw).load_bank(path)


@pytest.mark.parametrize("method", METHODS)
def test_a_bank_file_predicts_exactly_as_the_folder(method, fitted, exported, tiny_model, lesion_case, tmp_path):
    img, _ = lesion_case
    ref = fitted(method).predict(img)
    det = _load(tiny_model, exported(method), tmp_path)  # method, k, resolution... taken from the file
    assert (det.method, det.resolution, det.sigma) == (method, RESOLUTION, fitted(method).sigma)
    if method == "himatch":
        assert det.k == 4  # k is himatch's (its calibration depends on it)
    assert det.normals_dir is None and det.bank_file == exported(method)
    assert det.bank_file_digest == BankFile.open(exported(method)).digest and det.bank_file_digest.startswith("sha256:")
    got = det.predict(img)
    # the same arrays, calibration and mixture, the same computation: bit-identical
    assert np.array_equal(got.heatmap, ref.heatmap)
    assert np.array_equal(got.slice_scores, ref.slice_scores, equal_nan=True)
    assert got.threshold == ref.threshold and got.volume_score == ref.volume_score
    assert np.array_equal(got.labelmap, ref.labelmap)
    if method == "himatch":  # supports are named by opaque identifiers
        names = {s.source for sl in got.supports if sl for s in sl}
        assert names and all(n.startswith("normal-") for n in names)


def test_the_file_is_one_uncompressed_zip_with_provenance(exported, fitted, tmp_path):
    path = exported("himatch")
    det = fitted("himatch")
    with zipfile.ZipFile(path) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        names = zf.namelist()
    assert names[0] == MANIFEST_NAME and "calibration.json" in names and "bank/tokens.npy" in names
    m = BankFile.open(path).manifest
    assert m["format"] == BANK_FILE_FORMAT and m["method"] == "himatch" and m["names"] == "anonymised"
    assert m["model"]["weights_digest"] == det.extractor.info["weights_digest"] and m["model"]["weights_digest"].startswith("sha256:")
    assert m["model"]["licence"] == "unknown (local folder)" and m["model"]["precision"] == det.precision
    assert m["counts"] == {"subjects": 5, "volumes": 5, "slices": det.bank.n_slices, "tokens": int(det.bank.tokens.shape[0]), "skipped": 0}
    assert m["settings"]["resolution"] == RESOLUTION and m["tool_version"] and m["created"]
    for name, rec in m["members"].items():  # SHA-256 of every member
        with zipfile.ZipFile(path) as zf:
            assert hashlib.sha256(zf.read(name)).hexdigest() == rec["sha256"]
    assert not list(path.parent.glob(".*"))  # the temporary name is gone


def test_arrays_are_memory_mapped_from_the_file(exported, tiny_model, tmp_path):
    det = _load(tiny_model, exported("himatch"), tmp_path)
    assert isinstance(det.bank.tokens, np.memmap) and str(det.bank.tokens.filename) == str(exported("himatch").resolve())


def test_no_source_name_in_an_anonymised_file(exported, normals_dir):
    raw = exported("dpmm").read_bytes()  # dpmm: calibration of held-out subjects and a mixture too
    for f in sorted(normals_dir.iterdir()):
        for fragment in (f.name, f.name.split(".")[0], str(normals_dir), normals_dir.name):
            assert fragment.encode() not in raw, fragment
    assert b"normal-0001" in raw and b"subject-0001" in raw


def test_keep_names_keeps_them(fitted, normals_dir, tmp_path):
    path = fitted("himatch").export_bank(tmp_path / "named.himatchad-bank", keep_names=True)
    raw = path.read_bytes()
    assert all(f.name.encode() in raw for f in normals_dir.iterdir())
    assert BankFile.open(path).manifest["names"] == "kept"


def _rewrite_member(src, dest, name, change):
    """Copy the bank file with the bytes of member ``name`` changed in place (same size)."""
    shutil.copy(src, dest)
    bf = BankFile.open(dest)
    start, size = bf._offsets[name]
    with open(dest, "r+b") as fh:
        fh.seek(start + size // 2)
        b = fh.read(1)
        fh.seek(start + size // 2)
        fh.write(change(b))


def test_a_tampered_member_is_refused_naming_it(exported, tiny_model, tmp_path):
    bad = tmp_path / "bad.himatchad-bank"
    _rewrite_member(exported("himatch"), bad, "bank/tokens.npy", lambda b: bytes([b[0] ^ 0xFF]))
    with pytest.raises(HiMatchADError, match=r"member bank/tokens\.npy differs from the checksum"):
        _load(tiny_model, bad, tmp_path)


def test_a_changed_manifest_is_refused(exported, tiny_model, tmp_path):
    bad = tmp_path / "bad.himatchad-bank"
    shutil.copy(exported("himatch"), bad)
    data = bytearray(bad.read_bytes())
    i = data.index(b'"resolution": 128')
    data[i : i + 17] = b'"resolution": 256'
    bad.write_bytes(bytes(data))
    with pytest.raises(HiMatchADError, match="himatchad-bank.json"):  # the ZIP's CRC, or the manifest's own SHA-256
        _load(tiny_model, bad, tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_truncated_file_is_refused(exported, tiny_model, tmp_path, keep):
    data = exported("himatch").read_bytes()
    bad = tmp_path / "cut.himatchad-bank"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(HiMatchADError, match="not a readable HiMatch-AD bank file .*truncated or damaged"):
        _load(tiny_model, bad, tmp_path)


def _with_manifest(src, dest, change):
    """A copy of the bank file whose manifest ``change`` edits, its checksum recomputed (as a newer
    HiMatch-AD, or a careful forger, would write it)."""
    with zipfile.ZipFile(src) as zf:
        members = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    m = json.loads(members[MANIFEST_NAME])
    change(m)
    head = json.dumps(m).encode()
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.comment = b"himatchad-bank sha256:" + hashlib.sha256(head).hexdigest().encode()
        zf.writestr(MANIFEST_NAME, head)
        for name, data in members.items():
            if name != MANIFEST_NAME:
                zf.writestr(name, data)
    return dest


def test_a_newer_format_is_refused(exported, tiny_model, tmp_path):
    bad = _with_manifest(exported("himatch"), tmp_path / "new.himatchad-bank", lambda m: m.update(format=BANK_FILE_FORMAT + 1))
    with pytest.raises(HiMatchADError, match=rf"made by a newer HiMatch-AD \(format {BANK_FILE_FORMAT + 1}; .*upgrade"):
        _load(tiny_model, bad, tmp_path)


def test_a_manifest_with_bad_member_records_is_refused(exported, tiny_model, tmp_path):
    bad = _with_manifest(exported("himatch"), tmp_path / "odd.himatchad-bank", lambda m: m["members"].update({"calibration.json": 7}))
    with pytest.raises(HiMatchADError, match="no valid list of members"):
        _load(tiny_model, bad, tmp_path)


def test_another_model_is_refused_naming_both(exported, tmp_path):
    from HiMatchADLib.features.backbone import build_random_model

    other = str(build_random_model(tmp_path / "other-dinov3", "tiny", seed=1))  # same architecture, other weights
    need = BankFile.open(exported("himatch")).manifest["model"]["weights_digest"]
    with pytest.raises(HiMatchADError, match="made with the model") as err:
        HiMatchDetector(model=other, cache_dir=tmp_path / "c").load_bank(exported("himatch"))
    assert need in str(err.value) and other in str(err.value) and "--model" in str(err.value)


def test_settings_the_bank_fixes_are_refused_when_asked_otherwise(exported, tiny_model, tmp_path):
    with pytest.raises(HiMatchADError, match=r"resolution 128 \(asked: 256\)") as err:
        _load(tiny_model, exported("himatch"), tmp_path, resolution=256, method="knn")
    assert 'method "himatch" (asked: "knn")' in str(err.value)
    with pytest.raises(HiMatchADError, match="target_fpr 0.01"):
        _load(tiny_model, exported("dpmm"), tmp_path, target_fpr=0.05)
    # what the bank does not fix is the user's: a fixed threshold
    det = _load(tiny_model, exported("himatch"), tmp_path, threshold=0.5, k=4)
    assert det.threshold == 0.5


def test_not_a_bank_file(tiny_model, tmp_path):
    (tmp_path / "x.zip").write_bytes(b"hello")
    with pytest.raises(HiMatchADError, match="not a readable HiMatch-AD bank file"):
        _load(tiny_model, tmp_path / "x.zip", tmp_path)
    with pytest.raises(HiMatchADError, match="bank file not found"):
        _load(tiny_model, tmp_path / "missing.himatchad-bank", tmp_path)


def test_an_export_that_fails_verification_leaves_nothing(fitted, tmp_path, monkeypatch):
    from HiMatchADLib.bank import bankfile

    def refuse(*a, **k):
        raise HiMatchADError("verification failed")

    monkeypatch.setattr(bankfile.BankFile, "open", classmethod(lambda cls, *a, **k: refuse()))
    with pytest.raises(HiMatchADError, match="verification failed"):
        fitted("himatch").export_bank(tmp_path / "x.himatchad-bank")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_an_approximate_knn_index_is_rebuilt_from_the_file_and_cached_beside_it(tiny_model, normals_dir, cache_dir, lesion_case, tmp_path):
    img, _ = lesion_case
    det = HiMatchDetector(model=tiny_model, method="knn", knn_index="ivf", k=4, resolution=RESOLUTION, cache_dir=cache_dir).fit(normals_dir)
    ref = det.predict(img)
    path = det.export_bank(tmp_path / "ivf.himatchad-bank")
    got = _load(tiny_model, path, tmp_path)
    assert got.knn_index == "ivf" and got.fit_info["knn_index"]["kind"] == "ivf"
    res = got.predict(img)
    # the index is built from the same tokens with the same seed, single-threaded: the same index here
    assert np.array_equal(res.heatmap, ref.heatmap) and res.threshold == ref.threshold
    assert list((tmp_path / "cache" / "bankfiles").glob("*/knn_ivf_*.faiss"))
