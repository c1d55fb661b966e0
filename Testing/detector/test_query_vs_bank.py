"""A query and a normal bank that do not belong together are refused with the reason: the query
(or a copy of it, in any format) among the normals, a single slice in another plane than the normal
slices, and a threshold that would be calibrated on a single subject."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image


def _kw(tiny_model, tmp_path, **extra):
    return dict(model=tiny_model, method="knn", k=2, resolution=RESOLUTION, cache_dir=tmp_path / "cache", **extra)


def test_the_query_or_a_copy_of_it_among_the_normals_is_refused(tiny_model, normals_dir, tmp_path):
    normals = tmp_path / "normals"
    shutil.copytree(normals_dir, normals)
    query = read_image(normals_dir / "normal_3.nii.gz")
    write_image(query.array, query.geometry, normals / "copy_in_nrrd.nrrd")  # another name and format
    det = HiMatchDetector(**_kw(tiny_model, tmp_path)).fit(normals)
    for path in (normals_dir / "normal_3.nii.gz", normals / "normal_3.nii.gz"):
        with pytest.raises(HiMatchADError, match=r"is one of the normal images \((normal_3.nii.gz|copy_in_nrrd.nrrd) in the normal folder"):
            det.predict(path)
    other, _ = make_phantom((16, 64, 64), seed=77, lesion=True)
    assert np.isfinite(det.predict(other).volume_score)  # another scan is analysed


def test_a_single_sagittal_slice_against_axial_normals_is_refused(tiny_model, normals_dir, tmp_path):
    det = HiMatchDetector(**_kw(tiny_model, tmp_path)).fit(normals_dir)
    vol = read_image(normals_dir / "normal_1.nii.gz")
    g = vol.geometry
    from HiMatchADLib.core.geometry import Geometry, Image

    for plane, arr, size in [("sagittal", vol.array[:, :, 30:31], (1, g.size[1], g.size[2])), ("axial", vol.array[8:9], (g.size[0], g.size[1], 1))]:
        one = Image(np.ascontiguousarray(arr), Geometry(size, g.spacing, g.origin, g.direction), name=f"{plane}_slice")
        if plane == "sagittal":
            with pytest.raises(HiMatchADError, match="a single sagittal slice but the normal bank holds axial slices only"):
                det.predict(one)
        else:
            assert np.isfinite(det.predict(one).volume_score)


def test_no_threshold_is_calibrated_on_a_single_subject(tiny_model, tmp_path):
    one = tmp_path / "one"
    img, _ = make_phantom((16, 64, 64), seed=12)
    write_image(img.array, img.geometry, one / "only_subject.nii.gz")
    with pytest.raises(HiMatchADError, match="holds one subject .*at least two subjects.*--threshold"):
        HiMatchDetector(**_kw(tiny_model, tmp_path)).fit(one)
    det = HiMatchDetector(**_kw(tiny_model, tmp_path, threshold=0.5)).fit(one)  # a fixed threshold is the user's
    other, _ = make_phantom((16, 64, 64), seed=78)
    assert det.predict(other).threshold == 0.5
