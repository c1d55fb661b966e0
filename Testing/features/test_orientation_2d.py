"""2D images with a geometry follow the canonical orientation, as volumes do: the same physical image
stored row- or column-flipped gives the same map, on its own grid."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib import HiMatchDetector
from HiMatchADLib.core.geometry import Geometry, Image
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.features.slicing import prepare_volume
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image


def _flipped(img: Image, rows: bool, cols: bool) -> Image:
    """The same physical image with its rows and/or columns stored in the other order."""
    g = img.geometry
    arr = img.array[:, ::-1] if rows else img.array
    arr = arr[:, :, ::-1] if cols else arr
    d = np.array(g.direction, float)
    origin = np.array(g.origin, float)
    ny, nx = img.array.shape[1:]
    if rows:
        origin = origin + d[:, 1] * g.spacing[1] * (ny - 1)
        d[:, 1] *= -1
    if cols:
        origin = origin + d[:, 0] * g.spacing[0] * (nx - 1)
        d[:, 0] *= -1
    return Image(np.ascontiguousarray(arr), Geometry(g.size, g.spacing, tuple(origin), d, is_2d=True), name=img.name)


@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)])
def test_a_flipped_2d_image_is_prepared_as_the_same_physical_image(rows, cols):
    img, _ = make_phantom((1, 64, 48), seed=5, lesion=True)
    assert img.is_2d
    base = prepare_volume(img)
    flip = prepare_volume(_flipped(img, rows, cols))
    np.testing.assert_array_equal(flip.canonical, base.canonical)
    np.testing.assert_array_equal(flip.foreground, base.foreground)


def test_a_flipped_2d_nifti_gives_the_same_map_on_its_own_grid(tiny_model, tmp_path):
    normals = tmp_path / "normals"
    for i in range(3):
        n, _ = make_phantom((1, 64, 64), seed=40 + i, name=f"s{i}")
        write_image(n.array, n.geometry, normals / f"subject{i}_slice.nii.gz")
    img, _ = make_phantom((1, 64, 64), seed=7, lesion=True, lesion_radius=0.3)
    write_image(img.array, img.geometry, tmp_path / "q.nii.gz")
    f = _flipped(img, True, False)
    write_image(f.array, f.geometry, tmp_path / "q_flipped.nii.gz")
    assert np.allclose(read_image(tmp_path / "q_flipped.nii.gz").geometry.direction[1, 1], -1)
    det = HiMatchDetector(model=tiny_model, method="knn", k=2, resolution=RESOLUTION, cache_dir=tmp_path / "c").fit(normals)
    a, b = det.predict(tmp_path / "q.nii.gz"), det.predict(tmp_path / "q_flipped.nii.gz")
    np.testing.assert_allclose(b.heatmap[:, ::-1], a.heatmap, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(b.labelmap[:, ::-1], a.labelmap)
