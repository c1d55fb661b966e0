"""The overview picture, on constructed cases where the right picture is known."""

from __future__ import annotations

import numpy as np
import pytest

from HiMatchADLib.core.geometry import Geometry
from HiMatchADLib.core.result import DetectionResult
from HiMatchADLib.outputs.overlay import OUTLINE_RGB
from HiMatchADLib.outputs.overview import (
    overview_panels,
    radiological_view,
    render_overview,
    slice_plane,
    top_slices,
    write_overview,
)


def _case(direction=np.eye(3), shape=(12, 20, 24), spacing=(1.0, 1.0, 3.0)):
    """A lesion cube in slices 5..7; slice scores peak there (slice 6 highest)."""
    heat = np.zeros(shape, np.float32)
    heat[5:8, 6:12, 8:16] = 5.0
    fg = np.ones(shape, bool)
    scores = np.full(shape[0], 0.1)
    scores[[5, 6, 7]] = [2.0, 3.0, 2.5]
    scores[[1, 10]] = [0.9, 1.2]
    scores[0] = np.nan
    geom = Geometry(size=(shape[2], shape[1], shape[0]), spacing=spacing, origin=(0.0, 0.0, 0.0), direction=direction)
    return DetectionResult(heatmap=heat, foreground=fg, threshold=2.0, geometry=geom, slice_axis=0, slice_scores=scores,
                           volume_score=3.0, name="case", method="himatch", model="tiny",
                           threshold_info={"normal_pixel_median": 0.5, "normal_slice_score": {"median": 0.2, "p95": 0.8, "max": 1.0}})


def test_the_shown_slices_are_the_top_scoring_ones_in_anatomical_order():
    assert top_slices(np.array([0.1, np.nan, 3.0, 0.5, 2.0, 2.5, 0.2]), 3) == [2, 4, 5]
    assert top_slices(np.array([np.nan, np.nan]), 6) == []
    res = _case()
    assert [p["index"] for p in overview_panels(res, np.zeros_like(res.heatmap), n=4)] == [5, 6, 7, 10]


def test_axial_views_put_the_patients_right_on_the_left_and_anterior_on_top():
    """LPS: +x is the patient's left, +y posterior. An identity-direction axial slice is already in
    radiological display; a volume stored with x flipped (direction -1) is flipped back."""
    a = np.arange(6 * 8).reshape(6, 8)  # rows along j (y), columns along i (x)
    g = Geometry(size=(8, 6, 4), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), direction=np.eye(3))
    view, labels, aspect = radiological_view(a, g, axis=0)
    assert slice_plane(g, 0) == "axial" and labels == ("R", "L", "A", "P") and aspect == 1.0
    assert np.array_equal(view, a)
    flipped = Geometry(size=(8, 6, 4), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), direction=np.diag([-1.0, 1.0, 1.0]))
    assert np.array_equal(radiological_view(a, flipped, axis=0)[0], a[:, ::-1])
    # a volume whose i axis runs along y and j along x (a transposed storage): transposed back
    swapped = Geometry(size=(8, 6, 4), spacing=(2.0, 1.0, 1.0), origin=(0, 0, 0),
                       direction=np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]))
    view, _, aspect = radiological_view(a, swapped, axis=0)
    assert np.array_equal(view, a.T) and aspect == 2.0  # rows along i (2 mm), columns along j (1 mm)


def test_coronal_and_sagittal_views_put_superior_on_top():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (k=z, j=y, i=x)
    g = Geometry(size=(6, 5, 4), spacing=(1.0, 1.0, 2.0), origin=(0, 0, 0), direction=np.eye(3))
    coronal, labels, aspect = radiological_view(vol[:, 2, :], g, axis=1)  # slicing along y
    assert slice_plane(g, 1) == "coronal" and labels == ("R", "L", "S", "I") and aspect == 2.0
    assert np.array_equal(coronal, vol[::-1, 2, :])  # the highest z on the top row
    sagittal, labels, _ = radiological_view(vol[:, :, 3], g, axis=2)
    assert slice_plane(g, 2) == "sagittal" and labels == ("A", "P", "S", "I")
    assert np.array_equal(sagittal, vol[::-1, :, 3])  # anterior (low y) on the left, superior on top


def test_the_outline_lies_on_the_labelmap_and_the_heat_shows_inside():
    res = _case()
    grey = np.full(res.heatmap.shape, 0.3, np.float32)
    panel = next(p for p in overview_panels(res, grey, n=6) if p["index"] == 6)
    rgb, lab = panel["rgb"], panel["labelmap"]
    outline = np.all(np.isclose(rgb, OUTLINE_RGB), axis=-1)
    assert outline.any() and not (outline & ~lab).any()  # every outline pixel is a labelmap pixel
    assert not outline[lab].all()  # ... on its border: the interior shows the heat
    interior = lab & ~outline
    assert interior.any() and np.all(rgb[interior][:, 0] > 0.5)  # hot colour where the lesion is
    assert np.allclose(rgb[~lab], 0.3)  # untouched grey where the heat is at the floor


def test_the_colour_bar_has_the_heatmaps_range_and_the_png_is_written(tmp_path):
    from PIL import Image

    res = _case()
    fig = render_overview(res, np.full(res.heatmap.shape, 0.3, np.float32), n=6, stand_in=True)
    drawn = fig._himatchad
    assert drawn["colorbar"] == res.display_range() and drawn["shown"] == [1, 2, 5, 6, 7, 10]
    bar = drawn["colorbar_axes"]
    assert bar.get_ylim() == pytest.approx(res.display_range())
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "RANDOM" in texts and "case" in texts and "3" in texts
    path = write_overview(res, np.full(res.heatmap.shape, 0.3, np.float32), tmp_path / "case_overview.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    assert [p.name for p in tmp_path.iterdir()] == ["case_overview.png"]  # no temporary left


def test_a_grey_volume_of_another_shape_is_refused():
    res = _case()
    with pytest.raises(ValueError, match="differ"):
        overview_panels(res, np.zeros((3, 3, 3), np.float32))


def test_the_image_is_windowed_by_the_preset_the_detection_used(tmp_path):
    from HiMatchADLib.core.errors import HiMatchADError
    from HiMatchADLib.detector.overview import display_volume, write_case_overview
    from HiMatchADLib.io.writers import write_image

    res = _case()
    hu = np.full(res.heatmap.shape, -1000.0, np.float32)
    hu[:, 4:16, 4:20] = 40.0  # soft tissue at the window's level
    hu[:, 8:10, 8:10] = 1000.0  # bone, above the window
    write_image(hu, res.geometry, tmp_path / "ct.nii.gz")
    res.source_path, res.settings = str(tmp_path / "ct.nii.gz"), {"modality_used": "ct"}
    grey = display_volume(res)
    assert grey.dtype == np.float32 and grey.shape == res.heatmap.shape
    assert grey[0, 0, 0] == 0.0 and grey[0, 9, 9] == 1.0 and abs(float(grey[0, 5, 5]) - 0.5) < 1e-6  # level 40 -> mid-grey
    assert write_case_overview(res, tmp_path / "ct_overview.png").is_file()
    res.source_path = str(tmp_path / "gone.nii.gz")
    with pytest.raises(HiMatchADError, match="not found"):
        display_volume(res)
    small = Geometry(size=(24, 10, 12), spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    write_image(np.ascontiguousarray(hu[:, :10]), small, tmp_path / "other.nii.gz")
    res.source_path = str(tmp_path / "other.nii.gz")
    with pytest.raises(HiMatchADError, match="not on the result's grid"):
        display_volume(res)
