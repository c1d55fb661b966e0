"""Common in-plane pixel spacing: one millimetre is the same number of model pixels everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import RESOLUTION, oblique_direction
from HiMatchADLib.core.geometry import Geometry, Image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.features.slicing import common_spacing, in_plane_extent, prepare_volume
from HiMatchADLib.features.canvas import model_grid


def _disc_volume(n_rows, n_cols, spacing_rc, radius_mm=(30.0, 30.0), centre_mm=None, n_slices=3):
    """An ellipse of known size in mm (value 100 on 10), sampled on a grid with the given spacing."""
    sr, sc = spacing_rc
    r = (np.arange(n_rows) + 0.5) * sr
    c = (np.arange(n_cols) + 0.5) * sc
    cy, cx = centre_mm if centre_mm else (n_rows * sr / 2, n_cols * sc / 2)
    inside = ((r[:, None] - cy) / radius_mm[0]) ** 2 + ((c[None, :] - cx) / radius_mm[1]) ** 2 <= 1.0
    arr = np.where(inside, 100.0, 10.0).astype(np.float32)
    vol = np.repeat(arr[None], n_slices, 0)
    return Image.from_array(vol, spacing=(sc, sr, 2.0), name="disc"), inside


def _extent_px(mask2d):
    rows = np.flatnonzero(mask2d.any(1))
    cols = np.flatnonzero(mask2d.any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_same_anatomy_at_two_spacings_has_the_same_size_in_model_pixels():
    spacing = 0.5  # mm per model pixel
    a, _ = _disc_volume(200, 200, (0.5, 0.5))  # FOV 100 mm
    b, _ = _disc_volume(150, 150, (1.0, 1.0))  # FOV 150 mm: more than 224 model pixels, within twice that
    sizes = []
    for img, scaled, canvas in ((a, (200, 200), (208, 208)), (b, (300, 300), (304, 304))):
        prep = prepare_volume(img, "mri", "axial", spacing, 224, 16)
        fg = prep.foreground[1]
        # the canvas is the slice at 0.5 mm, rounded up to whole patches: the model input as it is
        assert prep.plane.scaled_hw == scaled and prep.canonical.shape[1:] == canvas
        sizes.append(_extent_px(fg))
        assert prep.plane.spacing_mm == spacing and not prep.warnings
    # Reference: 60 mm of anatomy at 0.5 mm per pixel = 120 model pixels, in both images.
    for h, w in sizes:
        assert abs(h - 120) <= 2 and abs(w - 120) <= 2, sizes
    # What stretching each slice to the model grid did: the anatomy's size depended on the FOV.
    old = [_extent_px(prepare_volume(img, "mri", "axial").foreground[1])[0] * 224 / img.array.shape[1] for img in (a, b)]
    assert abs(old[0] - old[1]) > 40


def test_anisotropic_pixels_are_not_distorted():
    img, _ = _disc_volume(240, 60, (0.25, 1.0), radius_mm=(20.0, 20.0))  # a 40 mm circle on 0.25 x 1 mm pixels
    prep = prepare_volume(img, "mri", "axial", 0.5, 224, 16)
    h, w = _extent_px(prep.foreground[1])
    assert abs(h - 80) <= 2 and abs(w - 80) <= 2  # a circle stays a circle (40 mm / 0.5 mm)
    stretched = prepare_volume(img, "mri", "axial")
    hs, ws = _extent_px(stretched.foreground[1])
    assert hs > 3 * ws  # on the pixel grid it is an ellipse of aspect 4


def test_maps_return_to_the_native_grid_at_the_right_place():
    """A spot on the native grid goes to the canvas and back to the same native pixels."""
    img, _ = _disc_volume(90, 130, (1.2, 0.7))
    prep = prepare_volume(img, "mri", "axial", 0.6, 224, 16)
    native = np.zeros((1,) + prep.native_shape[1:], np.float32)
    native[0, 40:46, 70:78] = 1.0
    from HiMatchADLib.features.canvas import to_canvas

    back = prep.plane.to_native(to_canvas(native, prep.plane))
    assert back.shape == native.shape
    r, c = np.unravel_index(np.argmax(back[0]), back.shape[1:])
    assert 40 <= r < 46 and 70 <= c < 78
    assert np.abs(back - native).mean() < 0.01 and back[0, 41:45, 71:77].min() > 0.8
    # a smooth field survives the round trip
    yy, xx = np.mgrid[0:90, 0:130]
    field = (np.sin(yy / 15.0) + np.cos(xx / 20.0))[None].astype(np.float32)
    rt = prep.plane.to_native(to_canvas(field, prep.plane))
    assert np.abs(rt - field)[0, 2:-2, 2:-2].max() < 0.05


def test_large_field_of_view_coarsens_the_spacing_with_a_warning():
    img, _ = _disc_volume(200, 200, (2.0, 2.0), radius_mm=(180.0, 180.0))  # 360 mm of anatomy
    prep = prepare_volume(img, "mri", "axial", 0.5, 224, 16)  # at most 2 x 224 px = 224 mm
    # cropped to the body's 360 mm, which then spans the canvas's 448 pixels
    assert prep.plane.spacing_mm == pytest.approx(360 / 448, rel=0.03)
    assert max(_extent_px(prep.foreground[1])) >= 440 and max(prep.canonical.shape[1:]) == 448
    assert any("anatomy looks" in w for w in prep.warnings)


def test_png_slices_keep_the_stretched_grid(tmp_path):
    from PIL import Image as PILImage

    from HiMatchADLib.io.readers import read_image

    arr = np.zeros((80, 60), np.uint8)
    arr[20:60, 10:50] = 200
    PILImage.fromarray(arr).save(tmp_path / "s_1.png")
    img = read_image(tmp_path / "s_1.png")
    prep = prepare_volume(img, "auto", "auto", 0.5, 224, 16)
    assert prep.plane is None and prep.canonical.shape == (1, 80, 60)
    assert in_plane_extent(tmp_path / "s_1.png") is None


def test_default_spacing_is_the_median_fov_over_the_model_side(tmp_path):
    fovs = []
    for i, (n, sp) in enumerate([(100, 1.0), (200, 0.8), (120, 2.0)]):
        img, _ = _disc_volume(n, n, (sp, sp))
        write_image(img.array, img.geometry, tmp_path / f"v{i}.nii.gz")
        fovs.append(n * sp)
    ext = [in_plane_extent(tmp_path / f"v{i}.nii.gz") for i in range(3)]
    assert [e[0] for e in ext] == pytest.approx(fovs)
    assert common_spacing(ext, 448, 16) == pytest.approx(np.median(fovs) / 448)
    # the shorter side sets it, as the references resize the shorter side to the model's
    img, _ = _disc_volume(100, 300, (1.0, 1.0))
    write_image(img.array, img.geometry, tmp_path / "wide.nii.gz")
    assert in_plane_extent(tmp_path / "wide.nii.gz")[0] == pytest.approx(100.0)
    assert common_spacing([None, None], 448, 16) is None


def test_bank_records_its_spacing_and_queries_use_it(tiny_model, normals_dir, lesion_case, tmp_path):
    from HiMatchADLib import HiMatchDetector

    det = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path).fit(normals_dir)
    # phantoms: 64 x 64 pixels of 1 mm -> 64 mm over 128 model pixels
    assert det.bank.manifest["settings"]["pixel_spacing_mm"] == pytest.approx(0.5)
    img, mask = lesion_case
    # The same anatomy stored on 1.6 x 0.8 mm pixels of an oblique volume (resampled from the phantom).
    from scipy.ndimage import zoom

    arr = zoom(img.array, (1, 1 / 1.6, 1 / 0.8), order=1)
    m = zoom(mask.astype(np.float32), (1, 1 / 1.6, 1 / 0.8), order=1) > 0.5
    d = oblique_direction()
    src = tmp_path / "aniso.nii.gz"
    write_image(arr, Geometry((arr.shape[2], arr.shape[1], arr.shape[0]), (0.8, 1.6, 2.0), (5.0, -7.0, 11.0), d), src)
    res = det.predict(src)
    assert res.heatmap.shape == arr.shape and res.geometry.same_as(Geometry((arr.shape[2], arr.shape[1], arr.shape[0]), (0.8, 1.6, 2.0), (5.0, -7.0, 11.0), d), tol=1e-6)
    prep = det._prepared(det.check_query(src), {})[1]
    assert prep.plane is not None and prep.plane.spacing_mm == pytest.approx(0.5)
    # The anatomy spans the same model pixels as in the normals (64 mm at 0.5 mm = 128 px).
    h, w = _extent_px(prep.foreground[8])
    ref = prepare_volume(img, "auto", "auto", 0.5, RESOLUTION, 16)
    hr, wr = _extent_px(ref.foreground[8])
    assert abs(h - hr) <= 3 and abs(w - wr) <= 3
    fg = res.foreground
    assert np.all(res.heatmap[~fg] == 0)
    assert res.heatmap[m & fg].mean() > 1.3 * res.heatmap[~m & fg].mean()


def test_pixel_spacing_option(tiny_model):
    from HiMatchADLib import HiMatchADError, HiMatchDetector
    from HiMatchADLib.cli.main import build_parser
    from HiMatchADLib.cli.commands import detector_from_args

    base = ["detect", "x.nii.gz", "--normals", "n", "--out-dir", "o", "--model", tiny_model]
    assert detector_from_args(build_parser().parse_args(base)).pixel_spacing == "auto"
    assert detector_from_args(build_parser().parse_args(base + ["--pixel-spacing", "0.7"])).pixel_spacing == 0.7
    assert detector_from_args(build_parser().parse_args(base + ["--pixel-spacing", "off"])).pixel_spacing is None
    for bad in ("-1", "wide", 0):
        with pytest.raises(HiMatchADError, match="pixel spacing"):
            HiMatchDetector(model=tiny_model, pixel_spacing=bad)


def test_oct_b_scans_keep_their_pixels_and_a_retina_spans_four_patch_rows(tiny_model, tmp_path):
    """OCT B-scans of 496 x 512 pixels at 3.9 um (depth) x 11.7 um (lateral): by default each B-scan
    keeps its own pixels and is stretched to the model input (shorter side ``resolution``), as the
    references do, so a 300 um retina spans at least four patch rows at the default 448. One
    isotropic spacing (the MRI/CT default) squashes the depth: fewer than four."""
    from HiMatchADLib import HiMatchDetector

    depth, lateral = 0.0039, 0.0117
    n_layer = int(round(0.3 / depth))  # 77 rows of retina
    arr = np.full((5, 496, 512), 5.0, np.float32)
    arr[:, 200 : 200 + n_layer, :] = 100.0
    img = Image.from_array(arr, spacing=(lateral, depth, 0.12))  # B-scans 120 um apart: the widest spacing
    (tmp_path / "normals").mkdir()
    for i in range(2):
        write_image(arr, img.geometry, tmp_path / "normals" / f"oct_{i}.nii.gz")
    det = HiMatchDetector(model=tiny_model, modality="oct", cache_dir=tmp_path / "cache")
    assert det.resolution == 448
    det._ensure_extractor()
    settings = det._bank_settings(tmp_path / "normals")
    assert settings.pixel_spacing_mm is None  # no common spacing for OCT by default
    p = det.extractor.patch_size

    def layer_patch_rows(prep):
        rows = np.flatnonzero(prep.canonical[2].mean(1) > 0.2)  # the bright band on what the model is given
        h = prep.canonical.shape[1] if prep.plane is not None else det.extractor.grid_for(*prep.canonical.shape[1:])[0]
        return (rows[-1] - rows[0] + 1) * h / prep.canonical.shape[1] / p

    prep = prepare_volume(img, "oct", "auto", settings.pixel_spacing_mm, det.resolution, p)
    assert prep.plane is None and prep.canonical.shape == (5, 496, 512)  # B-scans, in their own pixels
    assert layer_patch_rows(prep) >= 4.0
    iso = common_spacing([in_plane_extent(tmp_path / "normals" / "oct_0.nii.gz", "oct")], det.resolution, p)
    assert layer_patch_rows(prepare_volume(img, "oct", "auto", iso, det.resolution, p)) < 4.0
    # MRI keeps its physical spacing by default
    mri = HiMatchDetector(model=tiny_model, modality="mri", cache_dir=tmp_path / "cache")
    mri._ensure_extractor()
    assert mri._bank_settings(tmp_path / "normals").pixel_spacing_mm is not None


def test_model_input_has_the_shorter_side_at_the_resolution():
    """As the references: the shorter side is ``resolution`` and the aspect is kept (each side a
    whole number of patches); 512 gives DINOv3/16 a 32 x 32 grid on a square slice."""
    assert model_grid(240, 240, 448, 16) == (448, 448)
    assert model_grid(496, 512, 448, 16) == (448, 464)
    assert model_grid(512, 256, 448, 16) == (896, 448)
    assert model_grid(300, 300, 512, 16) == (512, 512)
    # an extremely elongated slice is shrunk so that its longer side is at most 4 x the resolution
    assert model_grid(100, 1000, 224, 16) == (96, 896)
