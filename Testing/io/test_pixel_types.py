"""What pixel values mean: complex voxels (magnitude), 16-bit PNG against an 8-bit normal bank."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from conftest import RESOLUTION
from HiMatchADLib import HiMatchDetector
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.features.slicing import prepare_volume
from HiMatchADLib.io.readers import read_image


def test_complex_voxels_are_read_as_their_magnitude(tmp_path):
    img, _ = make_phantom((8, 32, 32), seed=2)
    mag = img.array.astype(np.float32)
    phase = np.random.default_rng(0).uniform(-np.pi, np.pi, mag.shape)
    c = sitk.GetImageFromArray((mag * np.exp(1j * phase)).astype(np.complex64))
    sitk.WriteImage(c, str(tmp_path / "c.nii.gz"))
    back = read_image(tmp_path / "c.nii.gz")
    np.testing.assert_allclose(back.array, mag, rtol=1e-5, atol=1e-3)  # not the real part
    assert [w for w in back.warnings if "complex-valued" in w and "magnitude" in w]


def _png(path, arr, bits):
    if bits == 8:
        PILImage.fromarray(arr.astype(np.uint8)).save(path)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint16)), str(path))


def _slice8(seed):
    a = make_phantom((1, 64, 64), seed=seed)[0].array[0]
    return np.clip(a / max(float(a.max()), 1e-6) * 255, 0, 255).round()


@pytest.fixture(scope="module")
def png_bank(tmp_path_factory):
    d = tmp_path_factory.mktemp("png_normals")
    for i in range(4):
        _png(d / f"subject{'abcd'[i]}.png", _slice8(20 + i), 8)  # four subjects
    return d


def test_a_16_bit_png_against_an_8_bit_bank_is_scaled_as_a_fraction_of_its_range(tiny_model, png_bank, tmp_path):
    q8 = _slice8(99)
    _png(tmp_path / "q8.png", q8, 8)
    _png(tmp_path / "q16.png", q8 * 257, 16)  # the same picture in 16 bits
    assert read_image(tmp_path / "q16.png").pixel_type == "uint16"
    a = prepare_volume(read_image(tmp_path / "q8.png"))
    b = prepare_volume(read_image(tmp_path / "q16.png"), modality="8bit")
    np.testing.assert_allclose(a.canonical, b.canonical, atol=1e-6)
    kw = dict(model=tiny_model, method="knn", k=2, resolution=RESOLUTION)
    det = HiMatchDetector(cache_dir=tmp_path / "c", **kw).fit(png_bank)  # the bank resolves to the 8bit preset
    ref, same = det.predict(tmp_path / "q8.png"), det.predict(tmp_path / "q16.png")
    np.testing.assert_allclose(same.heatmap, ref.heatmap, rtol=1e-4, atol=1e-5)
    assert same.anomalous_voxels == ref.anomalous_voxels
    assert not [w for w in same.warnings if "looks like" in w]
