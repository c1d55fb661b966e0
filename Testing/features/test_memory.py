"""Bounded memory at clinical size: the preprocessing scans volumes block by block with the results
of whole-array computations, and a detection frees its prepared volume once the maps are made."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from HiMatchADLib.features import presets as preprocess
from HiMatchADLib.core.geometry import Image
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.features.presets import PRESETS, _percentile_below, sample_values, normalise
from HiMatchADLib.features.slicing import prepare_volume

SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def _awkward(seed: int = 0) -> np.ndarray:
    """A phantom with padding rows, NaN and infinite voxels."""
    img, _ = make_phantom((12, 40, 36), seed=seed)
    a = img.array.copy()
    a[:, :4] = -32768.0
    a[3, 10:14, 10:14] = np.nan
    a[4, 10:14, 10:14] = np.inf
    return a


@pytest.fixture()
def small_blocks(monkeypatch):
    monkeypatch.setattr(preprocess, "BLOCK_VOXELS", 1000)  # a block is one slice of the volumes below


def test_block_sample_is_the_whole_array_sample(small_blocks):
    a = _awkward()
    pad = np.asarray([-32768.0], np.float32)
    ok = np.isfinite(a) & ~np.isin(a, pad)
    for limit in (50, 999, 10**9):
        n = int(ok.sum())
        want = a[ok][:: n // limit + 1] if n > limit else a[ok]
        assert np.array_equal(sample_values(a, pad=pad, limit=limit), want)
    moved = np.moveaxis(a, 2, 0)  # a view: blocks of a non-contiguous array
    other = np.moveaxis(a * 2, 2, 0)
    okm = np.isfinite(moved) & ~np.isin(moved, pad)
    assert np.array_equal(sample_values(other, valid_of=moved, pad=pad, limit=77), other[okm][:: int(okm.sum()) // 77 + 1])


def test_percentile_test_without_sorting_is_numpys(small_blocks):
    rng = np.random.default_rng(0)
    a = rng.normal(0, 300, (10, 20, 30)).astype(np.float32)
    a[0, 0, :5] = np.nan
    a[1, 1, :3] = np.inf
    values = np.sort(a[np.isfinite(a)])
    for q in (1, 37.5, 99):
        p = float(np.percentile(values, q))
        k = int(np.floor(q / 100 * (values.size - 1)))
        for v in (p, np.nextafter(p, np.inf), np.nextafter(p, -np.inf), values[k], values[k + 1], (values[k] + values[k + 1]) / 2, -1e9, 1e9):
            assert _percentile_below(a, q, float(v)) == (p < float(v)), (q, v)
    assert _percentile_below(np.full((2, 3, 4), np.nan, np.float32), 1, 0.0) is False


@pytest.mark.parametrize("modality", ["mri", "ct", "oct"])
def test_prepared_volumes_do_not_depend_on_the_block_size(monkeypatch, modality):
    a = _awkward(seed=3)
    if modality == "ct":
        a = np.where(np.isfinite(a) & (a > -32768), a * 8 - 1000, a)
    img = Image.from_array(a, spacing=(0.9, 1.1, 2.0), direction=SAGITTAL, name="awkward")
    results = []
    for block in (10**12, 700):  # one block (whole-array arithmetic), then blocks smaller than a slice
        monkeypatch.setattr(preprocess, "BLOCK_VOXELS", block)
        for spacing in (None, 1.5):
            p = prepare_volume(img, modality, "auto", spacing, 64, 16)
            results.append((p.canonical, p.foreground, p.native_foreground, p.positions, p.warnings, p.native is None))
    for whole, blocks in zip(results[:2], results[2:]):
        for x, y in zip(whole[:4], blocks[:4]):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert whole[4:] == blocks[4:]
    assert results[0][5] is False and results[1][5] is True  # the normalised native volume is kept only without a canvas


def test_normalise_puts_the_slice_axis_first_without_changing_values(small_blocks):
    a = _awkward()
    whole = normalise(a, PRESETS["mri"], pad=[-32768.0])
    for axis in (0, 1, 2):
        moved = normalise(a, PRESETS["mri"], pad=[-32768.0], slice_axis=axis)
        assert moved.flags.c_contiguous and np.array_equal(moved, np.moveaxis(whole, axis, 0))
    assert whole[:, :4].max() == 0 and np.isfinite(whole).all()


def test_a_detection_frees_its_prepared_volume(fitted, lesion_case):
    det = fitted("knn")
    query = det.prepare(lesion_case[0])
    freed = weakref.ref(query.prep)
    result = det.predict(query)
    gc.collect()
    assert freed() is None and query.prep is None
    # The input array is kept for the overview picture, as the very array read (no copy, nothing normalised).
    assert result.image_array is query.image.array
