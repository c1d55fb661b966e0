"""The bank records its intensity preset and dimensionality; queries are checked against them."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import PHANTOM_SHAPE, RESOLUTION
from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.core.geometry import Image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.evaluation.phantom import make_phantom


def _ct(seed, lesion=False):
    """A phantom in Hounsfield units: air -1000 around soft tissue of 0-80 HU."""
    img, mask = make_phantom(PHANTOM_SHAPE, seed=seed, lesion=lesion)
    a = img.array
    hu = np.where(a > 1.0, a / a.max() * 80.0, -1000.0).astype(np.float32)
    return Image.from_array(hu, spacing=img.geometry.spacing, name=f"ct{seed}"), mask


@pytest.fixture(scope="module")
def ct_normals(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct_normals")
    for i in range(4):
        img, _ = _ct(40 + i)
        write_image(img.array, img.geometry, d / f"ct_{i}.nii.gz")
    return d


def test_auto_resolves_to_the_bank_preset_and_a_clear_mismatch_is_an_error(tiny_model, ct_normals, tmp_path):
    det = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path).fit(ct_normals)
    st = det.bank.manifest["settings"]
    assert st["modality"] == "ct" and st["dims"] == "3d"
    res = det.predict(_ct(99)[0])
    assert res.settings["modality_used"] == "ct" and not any("normal bank" in w for w in res.warnings)
    mri, _ = make_phantom(PHANTOM_SHAPE, seed=99)  # positive intensities: not CT
    with pytest.raises(HiMatchADError, match="looks like mri but the normal bank is ct"):
        det.predict(mri)
    # An explicit modality other than the bank's preset is refused.
    det.modality = "mri"
    with pytest.raises(HiMatchADError, match="modality mri was given but the normal bank was built with the ct preset"):
        det.predict(_ct(99)[0])


def test_explicit_modality_makes_the_mismatch_a_warning(tiny_model, ct_normals, tmp_path):
    det = HiMatchDetector(model=tiny_model, method="knn", modality="ct", resolution=RESOLUTION, cache_dir=tmp_path).fit(ct_normals)
    mri, _ = make_phantom(PHANTOM_SHAPE, seed=99)
    mri = Image.from_array(mri.array + 300.0, spacing=mri.geometry.spacing, name="mri")  # inside the CT window's body rule
    res = det.predict(mri)
    assert res.settings["modality_used"] == "ct"
    assert any("looks like mri but the normal bank is ct" in w for w in res.warnings)


def test_a_folder_mixing_ct_and_mri_needs_an_explicit_modality(tiny_model, ct_normals, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(ct_normals, mixed)
    for i in range(3):
        img, _ = make_phantom(PHANTOM_SHAPE, seed=60 + i)
        write_image(img.array, img.geometry, mixed / f"zz_mri_{i}.nii.gz")
    with pytest.raises(HiMatchADError, match="mixes modalities"):
        HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path).fit(mixed)


def test_mri_bank_with_an_8bit_slice_is_a_warning(fitted, lesion_case):
    img, _ = lesion_case
    z = PHANTOM_SHAPE[0] // 2
    sl8 = np.clip(img.array[z] / img.array.max() * 255, 0, 255).astype(np.uint8)
    res = fitted("knn").predict(Image.from_array(sl8, name="slice8"))
    assert res.settings["modality_used"] == "mri"  # the bank's preset, not the slice's own 8-bit
    assert any("looks like 8bit but the normal bank is mri" in w for w in res.warnings)
