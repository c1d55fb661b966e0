"""The normal bank cache: reuse, invalidation, corruption, no pickle, skipped files."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import numpy as np
import pytest

from conftest import PHANTOM_SHAPE, RESOLUTION
from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.imageio import write_image
from HiMatchADLib.phantom import make_phantom


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
