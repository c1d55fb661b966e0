"""A damaged normal bank is never used: checksums recorded at build time are verified before a
cached bank is opened, and a mismatch rebuilds it. Killed builds leave no temporary folder forever."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib import HiMatchDetector
from HiMatchADLib.bank.store import NormalBank, verify_checksums
from HiMatchADLib.bank.build import clean_stale_temporaries


def damage(path: Path, how: str) -> None:
    """What a bad disk or a careless copy does to an array file: the header stays, the data does not."""
    data = bytearray(path.read_bytes())
    start = 128 if path.suffix == ".npy" else len(data) // 2  # past the .npy header
    if how == "zeros":
        data[start:] = bytes(len(data) - start)
    elif how == "random":
        data[start:] = np.random.default_rng(0).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    elif how == "truncate":
        data = data[: start + (len(data) - start) // 2]
    path.write_bytes(bytes(data))


@pytest.fixture
def built(tiny_model, normals_dir, tmp_path):
    det = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path / "cache").fit(normals_dir)
    return det, tmp_path / "cache"


def test_the_manifest_records_a_checksum_of_every_array(built):
    det, _ = built
    root = det.bank.root
    recorded = det.bank.manifest["checksums"]
    arrays = {p.name for p in root.iterdir() if p.suffix in (".npy", ".npz") and not p.name.startswith(("dpmm_", "calib_"))}
    assert set(recorded) == arrays and {"cls.npy", "tokens.npy", "slices.npz"} <= arrays
    verify_checksums(root, det.bank.manifest)


@pytest.mark.parametrize("name,how", [("cls.npy", "random"), ("tokens.npy", "zeros"), ("slices.npz", "random"), ("tok_offsets.npy", "truncate")])
def test_damaged_arrays_are_detected_and_the_bank_rebuilt(built, tiny_model, normals_dir, name, how, lesion_case):
    det, cache = built
    root = det.bank.root
    before = det.predict(lesion_case[0]).heatmap
    damage(root / name, how)
    with pytest.raises(ValueError, match="damaged|differ|checksum"):
        verify_checksums(root, json.loads((root / "manifest.json").read_text()))
    with pytest.raises(Exception):
        NormalBank.load(root)  # verified by default
    with pytest.warns(UserWarning, match="rebuilding"):
        again = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=cache).fit(normals_dir)
    verify_checksums(again.bank.root, again.bank.manifest)
    np.testing.assert_allclose(again.predict(lesion_case[0]).heatmap, before, rtol=1e-5, atol=1e-6)


def test_per_slice_centroids_are_covered_too(tiny_model, normals_dir, tmp_path):
    det = HiMatchDetector(model=tiny_model, method="himatch", k=4, resolution=RESOLUTION, cache_dir=tmp_path).fit(normals_dir)
    centroids = sorted(det.bank.root.glob("centroids_*.npy"))
    assert centroids and all(p.name in det.bank.manifest["checksums"] for p in centroids)
    damage(centroids[0], "zeros")
    with pytest.raises(ValueError, match="damaged"):
        NormalBank.load(det.bank.root)


def test_stale_temporaries_of_killed_builds_are_removed(tmp_path):
    banks = tmp_path / "banks"
    banks.mkdir()
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    fresh_dead = banks / f".abc.tmp-{dead_pid}-1"
    old_dead = banks / f".abd.tmp-{dead_pid}-2"
    old_live = banks / f".abe.tmp-{os.getpid()}-3"
    abandoned_live = banks / f".abf.old-{os.getpid()}-4"
    bank = banks / "0123456789abcdef0123"
    for d in (fresh_dead, old_dead, old_live, abandoned_live, bank):
        d.mkdir()
        (d / "tokens.npy").write_bytes(b"x")
    now = time.time()

    def age(d, seconds):
        for p in (d / "tokens.npy", d):
            os.utime(p, (now - seconds, now - seconds))

    age(old_dead, 2 * 3600)
    age(old_live, 2 * 3600)
    age(abandoned_live, 30 * 3600)
    age(bank, 30 * 3600)
    removed = set(clean_stale_temporaries(banks, now=now))
    assert removed == {old_dead, abandoned_live}
    assert fresh_dead.exists() and old_live.exists() and bank.exists()
