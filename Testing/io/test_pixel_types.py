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


@pytest.mark.parametrize("name,dtype", [("f.nii", np.float32), ("f.nii.gz", np.float32), ("d.nii.gz", np.float64)])
def test_nan_and_inf_in_a_nifti_are_background_with_a_warning_not_zero(tmp_path, name, dtype):
    """ITK's NIfTI reader turns NaN and Inf into 0 without a word: they are found in the file."""
    img, _ = make_phantom((6, 32, 32), seed=4)
    arr = img.array.astype(dtype)
    arr[2, 10:12, 10:12] = np.nan
    arr[3, 5, 5], arr[4, 6, 6] = np.inf, -np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / name))
    back = read_image(tmp_path / name)
    np.testing.assert_array_equal(~np.isfinite(back.array), ~np.isfinite(arr))
    assert [w for w in back.warnings if "6 non-finite voxels" in w]
    assert np.array_equal(back.array[np.isfinite(arr)], arr[np.isfinite(arr)].astype(np.float32))


def test_a_direction_sheared_within_tolerance_is_accepted_on_input_and_on_output(tiny_model, normals_dir, tmp_path):
    """A direction 5e-5 from orthonormal was accepted when read (1e-4) and refused when its written
    outputs were verified (1e-5), after the whole computation: one tolerance now."""
    from HiMatchADLib.core.geometry import DIRECTION_TOLERANCE, Geometry
    from HiMatchADLib.io.writers import write_image
    from HiMatchADLib.outputs.files import load_result

    img, _ = make_phantom((16, 64, 64), seed=9, lesion=True)
    g = img.geometry
    d = np.array(g.direction, float)
    d[0, 1] = 5e-5
    assert 5e-5 < DIRECTION_TOLERANCE
    write_image(img.array, Geometry(g.size, g.spacing, g.origin, d), tmp_path / "sheared.nii.gz")
    det = HiMatchDetector(model=tiny_model, method="knn", k=2, resolution=RESOLUTION, cache_dir=tmp_path / "c").fit(normals_dir)
    res = det.predict(tmp_path / "sheared.nii.gz")
    from HiMatchADLib.outputs.files import save_result

    paths = save_result(res, tmp_path / "out")
    back = load_result(paths["scores"])
    np.testing.assert_allclose(back.geometry.direction, read_image(tmp_path / "sheared.nii.gz").geometry.direction, atol=1e-12)
    np.testing.assert_allclose(read_image(paths["heatmap"]).geometry.direction, d, atol=DIRECTION_TOLERANCE)
