"""Writing and reading back a detection result (what the worker hands to the Slicer module)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import oblique_direction
from HiMatchADLib.outputs import files as output
from HiMatchADLib.core.errors import HiMatchADError
from HiMatchADLib.core.geometry import Geometry
from HiMatchADLib.outputs.files import is_complete, load_result, save_result
from HiMatchADLib.core.result import DetectionResult, Support


def make_result(is_2d=False, seed=0, name="case") -> DetectionResult:
    rng = np.random.default_rng(seed)
    shape = (1, 20, 24) if is_2d else (7, 20, 24)
    fg = np.zeros(shape, bool)
    fg[:, 3:17, 4:20] = True
    heat = np.where(fg, rng.gamma(2.0, 0.5, shape), 0.0).astype(np.float32)
    heat[fg] += 1e-3  # strictly positive inside the foreground
    # knn-like zeros inside the foreground: only the written mask can tell them from background
    heat[0, 5, 6] = 0.0
    if is_2d:
        geo = Geometry((24, 20, 1), (0.8, 0.6, 1.0), (3.5, -2.0, 0.0), np.eye(3), True)
    else:
        geo = Geometry((24, 20, 7), (0.7, 0.9, 2.3), (-41.25, 17.5, 63.0), oblique_direction())
    n = shape[0]
    supports = [[Support("normal_1.nii.gz", i, 0.9 - 0.01 * i), Support("normal_2.nii.gz", i + 1, 0.8)] for i in range(n)]
    scores = rng.normal(size=n).astype(np.float32)
    scores[0] = np.nan
    return DetectionResult(
        heatmap=heat, foreground=fg, threshold=1.7, geometry=geo, slice_axis=0, slice_scores=scores,
        volume_score=2.5, supports=supports, min_component_size=3, method="himatch", model="m", name=name,
        threshold_info={"mode": "auto", "normal_pixel_median": 0.4},
    )


@pytest.mark.parametrize("is_2d", [False, True])
def test_load_result_gives_back_what_was_saved(tmp_path, is_2d):
    res = make_result(is_2d)
    paths = save_result(res, tmp_path, foreground=True)
    assert paths["foreground"].exists() and is_complete(tmp_path, "case")
    back = load_result(paths["scores"])
    assert back.geometry.same_as(res.geometry, tol=1e-12)  # the JSON's full-precision geometry
    assert back.geometry.is_2d == is_2d
    np.testing.assert_array_equal(back.heatmap, res.heatmap)
    np.testing.assert_array_equal(back.foreground, res.foreground)
    np.testing.assert_array_equal(back.labelmap, res.labelmap)
    assert back.threshold == pytest.approx(1.7) and back.volume_score == pytest.approx(2.5)
    assert np.isnan(back.slice_scores[0]) and np.allclose(back.slice_scores[1:], res.slice_scores[1:], atol=1e-6)
    assert [[s.to_dict() for s in sl] for sl in back.supports] == [[s.to_dict() for s in sl] for sl in res.supports]
    assert back.display_floor == pytest.approx(0.4)
    # Re-thresholding what was read gives what re-thresholding the original gives (the mask is exact).
    np.testing.assert_array_equal(back.labelmap_at(0.9), res.labelmap_at(0.9))


def test_without_the_mask_the_foreground_is_the_positive_heatmap(tmp_path):
    res = make_result()
    paths = save_result(res, tmp_path)
    assert "foreground" not in paths
    back = load_result(paths["scores"])
    np.testing.assert_array_equal(back.foreground, res.heatmap > 0)


def test_incomplete_or_inconsistent_results_are_refused(tmp_path):
    res = make_result()
    paths = save_result(res, tmp_path, foreground=True)
    data = json.loads(paths["scores"].read_text())
    # Not complete (an interrupted run).
    paths["scores"].write_text(json.dumps({**data, "complete": False}))
    with pytest.raises(HiMatchADError, match="not a complete result"):
        load_result(paths["scores"])
    # A heatmap of another grid beside the JSON.
    other = make_result(is_2d=True)
    save_result(other, tmp_path / "other")
    (tmp_path / "other" / "case_heatmap.nii.gz").replace(paths["heatmap"])
    paths["scores"].write_text(json.dumps(data))
    with pytest.raises(HiMatchADError, match="heatmap output case_heatmap.nii.gz was changed or damaged"):
        load_result(paths["scores"])
    assert not is_complete(tmp_path, "case")
    # ... and by the grid check when the JSON records no digests (a result of an earlier version).
    paths["scores"].write_text(json.dumps({k: v for k, v in data.items() if k != "output_digests"}))
    with pytest.raises(HiMatchADError, match="does not lie on the grid"):
        load_result(paths["scores"])
    # A missing output file.
    paths["heatmap"].unlink()
    assert not is_complete(tmp_path, "case")
    with pytest.raises(HiMatchADError):
        load_result(paths["scores"])


def test_a_failed_rewrite_never_leaves_the_old_json_beside_new_maps(tmp_path, monkeypatch):
    first = make_result(seed=1)
    paths = save_result(first, tmp_path, foreground=True)
    assert is_complete(tmp_path, "case")
    real = output.write_image

    def failing(array, geometry, path, *a, **k):
        if str(path).endswith("_labelmap.nii.gz"):
            raise HiMatchADError("disk full")
        return real(array, geometry, path, *a, **k)

    monkeypatch.setattr(output, "write_image", failing)
    second = make_result(seed=2)
    with pytest.raises(HiMatchADError, match="disk full"):
        save_result(second, tmp_path, foreground=True)
    # The new heatmap is there, the old labelmap too, but nothing says the set is complete.
    assert not paths["scores"].exists()
    assert not is_complete(tmp_path, "case")
