"""Synthetic lesions: layout, geometry, determinism, lesions inside the foreground, CLI errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from HiMatchADLib.evaluation.datasets import load_dataset
from HiMatchADLib.core.errors import HiMatchADError
from HiMatchADLib.core.geometry import Image
from HiMatchADLib.io.discovery import list_images
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.evaluation.synth import SynthConfig, add_subparser, foreground_mask, insert_lesions, make_synthetic_dataset

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
DIRECTION = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # a sagittally stored volume


def _head(seed: int, shape=(24, 40, 36)) -> np.ndarray:
    """A noisy ellipsoidal 'head' in air."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (z / 0.8) ** 2 + (y / 0.85) ** 2 + (x / 0.8) ** 2 < 1
    return (np.where(inside, 400.0, 0.0) + rng.normal(0, 10, shape)).clip(0).astype(np.float32)


@pytest.fixture(scope="module")
def normals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("normals")
    for i in range(6):
        img = Image.from_array(_head(i), spacing=(1.5, 1.2, 2.0), origin=(10.0 + i, -5.0, 3.0), direction=DIRECTION)
        write_image(img.array, img.geometry, root / f"subj{i}.nii.gz")
    return root


def test_dataset_layout_geometry_and_masks(normals, tmp_path):
    out = tmp_path / "synth"
    cfg = SynthConfig(seed=3, n_holdout=3, n_normal_test=1, radius_mm=(3.0, 5.0), margin_mm=2.0, min_depth=0.2)
    calls = []
    manifest = make_synthetic_dataset(normals, out, cfg, progress=lambda m, d, t: calls.append((m, d, t)))
    # one progress step per part, each counted from 1 to its own total
    assert calls == [("normal reference set", i, 3) for i in (1, 2, 3)] + [("test cases", i, 3) for i in (1, 2, 3)]
    assert len(list_images(out / "normal")) == 3
    assert len(list_images(out / "test" / "img")) == 3 and len(list_images(out / "test" / "label")) == 3
    assert sum(t["label"] for t in manifest["test"]) == 2
    assert json.loads((out / "synth.json").read_text())["settings"]["seed"] == 3
    assert (out / "README.md").exists()
    names = {p.name for p in list_images(out / "normal")} | {t["name"] for t in manifest["test"]}
    assert len(names) == 6  # every source used exactly once
    for t in manifest["test"]:
        src = read_image(normals / t["source"])
        img = read_image(out / "test" / "img" / t["name"])
        mask = read_image(out / "test" / "label" / t["name"])
        assert img.geometry.same_as(src.geometry) and mask.geometry.same_as(src.geometry)
        assert mask.pixel_type == "uint8"
        m = mask.array > 0
        if t["label"]:
            assert m.sum() == t["lesion_voxels"] > 0
            assert not m[~foreground_mask(src.array)].any()  # inside the foreground
            changed = np.abs(img.array - src.array) > 1e-3
            assert changed[m].mean() > 0.9  # the mask marks changed voxels
            assert not changed[~foreground_mask(src.array)].any()  # air untouched
        else:
            assert not m.any()
            np.testing.assert_array_equal(img.array, src.array)  # untouched held-out volume
    ds = load_dataset(out)
    assert ds.layout == "volumes" and ds.n_anomalous == 2 and ds.n_normal_test == 1


def test_seeded_and_reproducible(normals, tmp_path):
    cfg = dict(n_holdout=2, n_normal_test=0, radius_mm=(3.0, 4.0), margin_mm=2.0, min_depth=0.2)
    a = make_synthetic_dataset(normals, tmp_path / "a", SynthConfig(seed=7, **cfg))
    b = make_synthetic_dataset(normals, tmp_path / "b", SynthConfig(seed=7, **cfg))
    c = make_synthetic_dataset(normals, tmp_path / "c", SynthConfig(seed=8, **cfg))
    assert a["test"] == b["test"] and a["test"] != c["test"]
    for t in a["test"]:
        np.testing.assert_array_equal(read_image(tmp_path / "a" / "test" / "img" / t["name"]).array,
                                      read_image(tmp_path / "b" / "test" / "img" / t["name"]).array)


def test_hyper_and_hypo_lesions_change_intensity_in_their_direction():
    img = Image.from_array(_head(0, (30, 40, 40)), spacing=(2.0, 2.0, 2.0))
    base = np.nan_to_num(img.array)
    for p_hyper, sign in ((1.0, 1), (0.0, -1)):
        cfg = SynthConfig(p_hyper=p_hyper, radius_mm=(6.0, 8.0), margin_mm=2.0, min_depth=0.2)
        arr, mask, lesions = insert_lesions(img, np.random.default_rng(0), cfg, n_lesions=1)
        assert lesions[0]["type"] == ("hyper" if sign > 0 else "hypo")
        assert mask.sum() == lesions[0]["voxels"] > 20
        diff = (arr - base)[mask > 0].mean()
        assert sign * diff > 0.2 * 400 * min(cfg.hyper_contrast[0], cfg.hypo_contrast[0])


def test_errors(normals, tmp_path):
    with pytest.raises(HiMatchADError, match="at least 3"):
        d = tmp_path / "two"
        d.mkdir()
        for p in list_images(normals)[:2]:
            (d / p.name).write_bytes(p.read_bytes())
        make_synthetic_dataset(d, tmp_path / "o1")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(HiMatchADError, match="not empty"):
        make_synthetic_dataset(normals, tmp_path / "full")
    with pytest.raises(HiMatchADError, match="outside NORMALS_DIR"):
        make_synthetic_dataset(normals, normals / "sub")
    with pytest.raises(HiMatchADError, match="n-holdout"):
        make_synthetic_dataset(normals, tmp_path / "o2", SynthConfig(n_holdout=6))
    with pytest.raises(HiMatchADError, match="lesions"):
        make_synthetic_dataset(normals, tmp_path / "o3", SynthConfig(lesions=(2, 1)))
    two_d = Image.from_array(np.ones((8, 8), np.float32))
    with pytest.raises(HiMatchADError, match="3D"):
        insert_lesions(two_d, np.random.default_rng(0), SynthConfig())


def test_cli_subcommand(normals, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="himatchad")
    sub = parser.add_subparsers(dest="command")
    add_subparser(sub)
    out = tmp_path / "cli"
    args = parser.parse_args(["synth", str(normals), "--out", str(out), "--seed", "1", "--n-holdout", "2", "--quiet"])
    assert args.func(args) == 0
    assert "2 test volumes" in capsys.readouterr().out
    assert load_dataset(out).layout == "volumes"


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "ixi-t1-normals").is_dir(), reason="../shared/data/ixi-t1-normals not present")
def test_ixi_volume_lesions_keep_geometry(tmp_path):
    src = list_images(SHARED / "ixi-t1-normals")[0]
    img = read_image(src)
    arr, mask, lesions = insert_lesions(img, np.random.default_rng(0), SynthConfig(), n_lesions=2)
    assert arr.shape == img.array.shape and mask.any() and len(lesions) == 2
    write_image(mask, img.geometry, tmp_path / "m.nii.gz")
    assert read_image(tmp_path / "m.nii.gz").geometry.same_as(img.geometry)


def test_2d_inputs_are_refused_before_anything_is_written(tmp_path):
    from PIL import Image as PILImage

    src = tmp_path / "slices"
    src.mkdir()
    for i in range(4):
        PILImage.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(src / f"s{i}.png")
    with pytest.raises(HiMatchADError, match="3D volumes"):
        make_synthetic_dataset(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
