"""BMAD variant detection, the volumes layout, and deterministic subsampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from HiMatchADLib.evaluation.datasets import TestCase, detect_layout, evenly_spaced, load_dataset, subsample_cases
from HiMatchADLib.core.errors import HiMatchADError
from HiMatchADLib.core.geometry import Image
from HiMatchADLib.io.writers import write_image

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _png(path: Path, value: int = 100, lesion: bool = False) -> Path:
    from PIL import Image as PILImage

    a = np.full((16, 16), value, np.uint8)
    if lesion:
        a[4:8, 4:8] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(a).save(path)
    return path


def _files(folder: Path, names, **kw):
    return [_png(folder / n, **kw) for n in names]


def make_brain(root: Path, split: str = "test", mask_dir: str = "label") -> Path:
    _files(root / "train" / "good", ["n1_1.png", "n1_2.png", "n2_1.png"])
    _files(root / split / "good" / "img", ["g1_1.png", "g1_2.png"])
    _files(root / split / "Ungood" / "img", ["b1_5.png", "b1_6.png"], lesion=True)
    _files(root / split / "Ungood" / mask_dir, ["b1_5.png", "b1_6.png"], value=0, lesion=True)
    return root


def make_liver(root: Path) -> Path:
    _files(root / "train" / "good", ["a.png", "b.png"])
    _files(root / "test" / "img" / "good", ["g.png"])
    _files(root / "test" / "img" / "Ungood", ["u1.png", "u2.png"], lesion=True)
    _files(root / "test" / "label" / "Ungood", ["u1.png"], value=0, lesion=True)  # u2 has no mask
    _files(root / "test" / "label" / "good", ["g.png"], value=0)
    return root


def make_resc(root: Path) -> Path:
    _files(root / "Train" / "train" / "good", ["t1.png", "t2.png"])
    _files(root / "Test" / "test" / "good", ["g1.png"])
    _files(root / "Test" / "test" / "Ungood", ["u1.png"], lesion=True)
    _files(root / "Test" / "test_label" / "Ungood", ["u1_mask.png"], value=0, lesion=True)
    _files(root / "Val" / "val" / "good", ["vg.png"])
    _files(root / "Val" / "val" / "Ungood", ["vu.png"], lesion=True)
    _files(root / "Val" / "val_label" / "Ungood", ["vu.png"], value=0, lesion=True)
    return root


def make_volumes(root: Path) -> Path:
    geo = Image.from_array(np.zeros((4, 8, 8), np.float32), spacing=(1.0, 1.0, 2.0)).geometry
    for n in ("n1", "n2"):
        write_image(np.ones((4, 8, 8), np.float32), geo, root / "normal" / f"{n}.nii.gz")
    for n, lesion in (("a", True), ("b", False), ("c", True)):
        write_image(np.ones((4, 8, 8), np.float32), geo, root / "test" / "img" / f"{n}.nii.gz")
        m = np.zeros((4, 8, 8), np.uint8)
        if lesion:
            m[1, 2:4, 2:4] = 1
        write_image(m, geo, root / "test" / "label" / f"{n}.nii.gz")
    return root


def test_brain_variant(tmp_path):
    root = make_brain(tmp_path / "Brain")
    assert detect_layout(root) == ("bmad", "brain")
    ds = load_dataset(root)
    assert ds.variant == "brain" and len(ds.normals) == 3
    assert [(c.name, c.label) for c in ds.cases] == [("g1_1", 0), ("g1_2", 0), ("b1_5", 1), ("b1_6", 1)]
    assert all(c.mask is None for c in ds.cases if not c.label)
    assert [c.mask.name for c in ds.cases if c.label] == ["b1_5.png", "b1_6.png"]
    assert ds.notes == []


def test_brain_anomaly_mask_folder_and_valid_split(tmp_path):
    root = make_brain(tmp_path / "Brain", split="valid", mask_dir="anomaly_mask")
    with pytest.raises(HiMatchADError, match="--split valid"):
        load_dataset(root)  # the default split is test; this set only has valid
    ds = load_dataset(root, split="valid")
    assert sum(c.mask is not None for c in ds.cases) == 2


def test_liver_variant_and_missing_mask(tmp_path):
    root = make_liver(tmp_path / "Liver")
    assert detect_layout(root) == ("bmad", "liver")
    ds = load_dataset(root, layout="bmad")
    assert [(c.name, c.label, c.mask is not None) for c in ds.cases] == [("g", 0, False), ("u1", 1, True), ("u2", 1, False)]
    assert ds.summary()["n_anomalous_without_mask"] == 1
    assert "image-level metrics only" in ds.notes[0]


def test_resc_variant_splits_and_mask_suffix(tmp_path):
    root = make_resc(tmp_path / "RESC")
    assert detect_layout(root) == ("bmad", "resc")
    ds = load_dataset(root)
    assert [(c.name, c.label) for c in ds.cases] == [("g1", 0), ("u1", 1)]
    assert ds.cases[1].mask.name == "u1_mask.png"
    val = load_dataset(root, split="valid")
    assert [c.name for c in val.cases] == ["vg", "vu"] and val.cases[1].mask.name == "vu.png"
    assert [p.name for p in val.normals] == ["t1.png", "t2.png"]


def test_volumes_layout_labels_from_masks(tmp_path):
    root = make_volumes(tmp_path / "vols")
    assert detect_layout(root) == ("volumes", "volumes")
    ds = load_dataset(root)
    assert [(c.name, c.label) for c in ds.cases] == [("b", 0), ("a", 1), ("c", 1)]
    assert all(c.mask is not None for c in ds.cases)
    with pytest.raises(HiMatchADError, match="looks like the 'volumes' layout"):
        load_dataset(root, layout="bmad")


def test_volumes_layout_requires_every_mask(tmp_path):
    root = make_volumes(tmp_path / "vols")
    (root / "test" / "label" / "c.nii.gz").unlink()
    with pytest.raises(HiMatchADError, match="no mask in test/label/"):
        load_dataset(root)


def test_unknown_folder_error_names_the_layouts_and_a_nested_dataset(tmp_path):
    make_brain(tmp_path / "bmad" / "Brain")
    with pytest.raises(HiMatchADError, match="no known data set layout") as e:
        load_dataset(tmp_path / "bmad")
    assert "Brain" in str(e.value) and "volumes layout" in str(e.value)
    with pytest.raises(HiMatchADError, match="not found"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(HiMatchADError, match="unknown layout"):
        load_dataset(tmp_path / "bmad" / "Brain", layout="nifti")


def test_evenly_spaced_and_stratified_subsample():
    assert evenly_spaced(range(10), 3) == [1, 5, 8]
    assert evenly_spaced(range(4), 10) == [0, 1, 2, 3]
    assert evenly_spaced(range(5), None) == [0, 1, 2, 3, 4]
    cases = [TestCase(Path(f"n{i}.png"), None, 0) for i in range(8)] + [TestCase(Path(f"a{i}.png"), None, 1) for i in range(2)]
    sub = subsample_cases(cases, 5)
    # 5 * 2/10 = 1 anomalous; normals at floor((i + 0.5) * 8 / 4) = 1, 3, 5, 7; anomalous at floor(0.5 * 2) = 1.
    assert [c.name for c in sub] == ["n1", "n3", "n5", "n7", "a1"]
    assert subsample_cases(cases, 5) == sub  # deterministic
    tiny = subsample_cases(cases, 2)
    assert sorted(c.label for c in tiny) == [0, 1]  # both classes kept
    with pytest.raises(HiMatchADError):
        subsample_cases(cases, 0)


def test_max_normals_and_max_test(tmp_path):
    root = make_brain(tmp_path / "Brain")
    ds = load_dataset(root, max_normals=2, max_test=2)
    assert len(ds.normals) == 2 and not ds.all_normals
    assert sorted(c.label for c in ds.cases) == [0, 1]
    assert ds.n_cases_available == 4 and len(ds.all_test_images) == 4


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "lgg-flair-dev").is_dir(), reason="../shared/data/lgg-flair-dev not present")
def test_lgg_flair_dev_is_read_as_bmad_brain():
    ds = load_dataset(SHARED / "lgg-flair-dev")
    assert (ds.layout, ds.variant) == ("bmad", "brain")
    assert len(ds.normals) == 1403 and ds.n_normal_test == 416 and ds.n_anomalous == 267
    assert all(c.mask is not None and c.mask.stem == c.image.stem for c in ds.cases if c.label)
    small = load_dataset(SHARED / "lgg-flair-dev", max_normals=100, max_test=40)
    assert len(small.normals) == 100 and len(small.cases) == 40
    assert small.n_anomalous == round(40 * 267 / 683)
