"""Outputs overlay the input exactly: reorientation round trips and file geometry."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_SHAPE, oblique_direction
from HiMatchADLib.core.geometry import Geometry, Image
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.core.geometry import canonical_reorientation
from HiMatchADLib.features.slicing import prepare_volume


def signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for j, (w, s) in enumerate(zip(perm, signs)):
                d[w, j] = s
            yield d


@pytest.mark.parametrize("direction", list(signed_permutations()), ids=lambda d: "".join("%+d" % v for v in d.ravel()))
def test_reorientation_is_exact_and_invertible(direction):
    rng = np.random.default_rng(0)
    arr = rng.random((3, 4, 5)).astype(np.float32)
    reo = canonical_reorientation(direction)
    canon = reo.to_canonical(arr)
    np.testing.assert_array_equal(reo.from_canonical(canon), arr)
    # Canonical index (k, j, i) must increase towards S, P, L: check with physical positions.
    geo = Geometry((5, 4, 3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)
    idx = np.indices(arr.shape).reshape(3, -1)  # numpy (z, y, x)
    phys = np.stack([geo.index_to_physical((x, y, z)) for z, y, x in idx.T])
    phys_canon = reo.to_canonical(phys[:, 0].reshape(arr.shape)), reo.to_canonical(phys[:, 1].reshape(arr.shape)), reo.to_canonical(phys[:, 2].reshape(arr.shape))
    # L (x) increases along canonical axis 2, P (y) along axis 1, S (z) along axis 0.
    assert np.all(np.diff(phys_canon[0], axis=2) > 0)
    assert np.all(np.diff(phys_canon[1], axis=1) > 0)
    assert np.all(np.diff(phys_canon[2], axis=0) > 0)


def test_oblique_volume_axial_axis_is_the_most_superior_index_axis():
    d = oblique_direction() @ np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], float)  # stored sagittally, then tilted
    img = Image.from_array(np.random.default_rng(1).random((10, 12, 14)).astype(np.float32) * 100 + 1, direction=d)
    prep = prepare_volume(img, "mri", "axial")
    # index axis j (numpy axis 1) is closest to S here
    assert prep.slice_axis_input == 1
    assert prep.n_slices == 12


def test_write_read_roundtrip_keeps_oblique_geometry(tmp_path):
    d = oblique_direction()
    img = Image.from_array(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.5, 3.25), direction=d)
    write_image(img.array, img.geometry, tmp_path / "x.nii.gz")
    back = read_image(tmp_path / "x.nii.gz")
    assert back.geometry.same_as(img.geometry, tol=1e-5)
    np.testing.assert_array_equal(back.array, img.array)


def _assert_same_geometry(path, ref: sitk.Image):
    out = sitk.ReadImage(str(path))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("method", ["knn"])
def test_detect_outputs_overlay_an_oblique_input(tmp_path, fitted, lesion_case, method):
    """Heatmap and labelmap carry the input's size, spacing, origin and oblique direction, and the
    lesion (placed in voxel space) is found at the same voxels, i.e. the same physical place."""
    img, mask = lesion_case
    d = oblique_direction()
    src = tmp_path / "oblique_case.nii.gz"
    write_image(img.array, Geometry(img.geometry.size, (0.9, 1.1, 2.2), (12.0, -30.0, 55.5), d), src)
    det = fitted(method)
    res = det.predict(src)
    paths = det.save(res, tmp_path / "out")
    ref = sitk.ReadImage(str(src))
    _assert_same_geometry(paths["heatmap"], ref)
    _assert_same_geometry(paths["labelmap"], ref)
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["heatmap"])))
    assert heat.shape == PHANTOM_SHAPE
    # The hottest region lies on the lesion voxels of the input grid.
    assert heat[mask > 0].mean() > 1.5 * heat[(mask == 0) & res.foreground].mean()
    scores = json.loads(paths["scores"].read_text())
    np.testing.assert_allclose(np.asarray(scores["geometry"]["direction"]).reshape(3, 3), d, atol=1e-9)


def test_reoriented_volume_gives_the_same_maps(fitted, lesion_case):
    """The same anatomy stored in another voxel order gives the same heatmap once mapped back."""
    img, _ = lesion_case
    det = fitted("knn")
    res_a = det.predict(img)
    # Store the volume flipped along x and y with a direction that says so: same anatomy.
    flipped = img.array[:, ::-1, ::-1].copy()
    d = np.diag([-1.0, -1.0, 1.0])
    nx, ny = img.geometry.size[0], img.geometry.size[1]
    origin = img.geometry.index_to_physical((nx - 1, ny - 1, 0))
    img_b = Image.from_array(flipped, spacing=img.geometry.spacing, origin=origin, direction=d, name="b")
    res_b = det.predict(img_b)
    np.testing.assert_allclose(res_b.heatmap[:, ::-1, ::-1], res_a.heatmap, rtol=1e-4, atol=1e-5)


def test_2d_image_outputs_keep_the_pixel_grid(tmp_path, fitted):
    from PIL import Image as PILImage

    rng = np.random.default_rng(3)
    from HiMatchADLib.evaluation.phantom import make_phantom

    ph, _ = make_phantom((1, 80, 72), seed=5, lesion=True)
    png = (np.clip(ph.array[0] / ph.array.max(), 0, 1) * 255).astype(np.uint8)
    PILImage.fromarray(png).save(tmp_path / "slice_7.png")
    det = fitted("knn")
    res = det.predict(tmp_path / "slice_7.png")
    paths = det.save(res, tmp_path / "out")
    assert set(paths) == {"heatmap", "labelmap", "scores", "overlay"}
    ref = sitk.ReadImage(str(tmp_path / "slice_7.png"))
    for key in ("heatmap", "labelmap"):
        out = sitk.ReadImage(str(paths[key]))
        assert out.GetDimension() == 2
        assert out.GetSize() == ref.GetSize() == (72, 80)
    overlay = np.asarray(PILImage.open(paths["overlay"]))
    assert overlay.shape == (80, 72, 3)
    del rng
