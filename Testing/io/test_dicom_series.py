"""DICOM studies in a folder tree: one case per series, case names, series filters, unusable series
skipped with their reason (localizers, non-image objects, uneven or sheared series, multi-frame
objects without per-frame geometry), exact geometry read back, resume, ``detect`` on a folder with
several series, and the wiring of the DICOM SEG / parametric map outputs (tested with a stand-in
writer module; the real writer is tested on its own)."""

from __future__ import annotations

import csv
import dataclasses
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import one_error_line, oblique_direction
from HiMatchADLib import HiMatchADError
from HiMatchADLib.batch import STATUS_DONE, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, run_batch
from HiMatchADLib.batch.cases import find_cases
from HiMatchADLib.batch.summary import summary_counts
from HiMatchADLib.io.dicom import DicomSeries, find_series, select_series
from HiMatchADLib.io.series_filters import matches, parse_series_filter, parse_series_filters
from HiMatchADLib.core.atomic import atomic_path
from HiMatchADLib.io.discovery import list_images, walk_inputs
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.outputs.files import is_complete
from HiMatchADLib.io.discovery import own_outputs
from HiMatchADLib.evaluation.phantom import make_phantom

pydicom = pytest.importorskip("pydicom")

SHAPE = (8, 48, 48)
MR, CT = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2"
SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.22"
ORIGIN = (-20.5, 13.25, 40.0)
SPACING = (0.9, 0.8)  # (column, row) spacing: x, y
STEP = 2.0


# ------------------------------------------------------------------------------- writing DICOM
def _dataset(sop: str, series_uid: str, study_uid: str, modality: str, description: str, number, instance: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = f"{series_uid}.{instance}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop, f"{series_uid}.{instance}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.SeriesDescription, ds.InstanceNumber = modality, description, instance
    if number is not None:
        ds.SeriesNumber = number
    ds.PatientID, ds.PatientName = "P1", "Test^Patient"
    ds.FrameOfReferenceUID = f"{study_uid}.9"  # one patient frame per study, as a scanner writes it
    return ds


def write_series(
    folder: Path, series_uid: str, *, number=1, description="", modality="MR", study_uid="1.2.826.0.1.3680043.2.1125.1",
    volume=None, seed=0, direction=None, origin=ORIGIN, step=STEP, slices=None, orientations=None, positions=None,
    image_type="ORIGINAL\\PRIMARY\\AXIAL", sop=None, shuffle=True, prefix=None,
) -> np.ndarray:
    """One single-frame-per-file series; returns the volume (``(nz, ny, nx)``, real values) on its grid.

    ``slices``: the indices of ``volume`` written (a gap or a repeat makes a broken series). Files are
    named in a shuffled order with shuffled instance numbers, so only the positions give the order."""
    folder.mkdir(parents=True, exist_ok=True)
    if volume is None:
        volume = np.clip(make_phantom(SHAPE, seed=seed)[0].array, 0, 3000).astype(np.int16)
    d = np.eye(3) if direction is None else np.asarray(direction, float)
    nz, ny, nx = volume.shape
    slices = list(range(nz)) if slices is None else list(slices)
    rng = np.random.default_rng(seed)
    names = rng.permutation(len(slices)) if shuffle else np.arange(len(slices))
    for i, z in enumerate(slices):
        ds = _dataset(sop or (CT if modality == "CT" else MR), series_uid, study_uid, modality, description, number, int(names[i]) + 1)
        ds.ImageType = image_type
        pos = np.asarray(origin, float) + d[:, 2] * step * z if positions is None else np.asarray(positions[i], float)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        o = (d[:, 0].tolist() + d[:, 1].tolist()) if orientations is None else list(orientations[i])
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in o]
        ds.PixelSpacing = [str(SPACING[1]), str(SPACING[0])]  # DICOM: row spacing, column spacing
        ds.SliceThickness = str(step)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        stored = volume[z].astype(np.int16)
        if modality == "CT":  # stored values + rescale: the reader must apply it
            ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
            stored = (volume[z] + 1024).astype(np.int16)
        ds.PixelData = stored.tobytes()
        name = f"{prefix or series_uid.rsplit('.', 1)[-1]}_{int(names[i]):03d}"
        ds.save_as(folder / (name if i % 2 else name + ".dcm"), enforce_file_format=True)  # with and without suffix
    return volume


def write_object(folder: Path, series_uid: str, sop: str, modality: str, *, number=None, description="", with_matrix=True, name=None) -> Path:
    """A non-image object (a DICOM SEG, an SR) of one file."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = _dataset(sop, series_uid, "1.2.826.0.1.3680043.2.1125.1", modality, description, number, 1)
    if with_matrix:
        ds.Rows, ds.Columns, ds.NumberOfFrames = 8, 8, 1
    path = folder / (name or f"{series_uid.rsplit('.', 1)[-1]}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.2.1125.9.{n}"


@pytest.fixture()
def study_tree(tmp_path):
    """Two studies, six series: an MR study (T1, FLAIR, a localizer, an SR report) in one folder and a
    CT study (one axial series and a DICOM SEG) in another; the MR series on an oblique grid."""
    root = tmp_path / "in"
    mr, ct = root / "patient1" / "mrstudy", root / "patient1" / "ctstudy"
    rot = oblique_direction()
    vols = {
        "t1": write_series(mr, uid(101), number=3, description="T1 MPRAGE", seed=1, direction=rot),
        "flair": write_series(mr, uid(102), number=5, description="AX FLAIR", seed=2, direction=rot),
        "ct": write_series(ct, uid(201), number=2, description="Axial 2.0", modality="CT", seed=3, study_uid="1.2.826.0.1.3680043.2.1125.2"),
    }
    loc = [[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]]
    write_series(mr, uid(100), number=1, description="Localizer", seed=4, volume=vols["t1"][:3], orientations=loc,
                 positions=[(0, 0, 0), (0, 0, 0), (0, 0, 0)], image_type="ORIGINAL\\PRIMARY\\OTHER")
    write_object(mr, uid(900), SR, "SR", number=900, description="Report", with_matrix=False)
    write_object(ct, uid(300), SEG, "SEG", number=300, description="Lesions")
    return root, mr, ct, vols


def _grid(series: DicomSeries, shape=SHAPE) -> tuple:
    d = np.asarray(series.direction).reshape(3, 3)
    return d, np.asarray(series.origin)


# ------------------------------------------------------------------------------- discovery
def test_every_series_of_a_study_is_described_named_and_checked(study_tree):
    root, mr, ct, _ = study_tree
    found = {s.name: s for s in find_series(mr)}
    assert list(found) == ["mrstudy_s1_Localizer", "mrstudy_s3_T1_MPRAGE", "mrstudy_s5_AX_FLAIR", "mrstudy_s900_Report"]
    t1 = found["mrstudy_s3_T1_MPRAGE"]
    assert (t1.modality, t1.description, t1.series_number, t1.n_files, t1.series_uid) == ("MR", "T1 MPRAGE", 3, 8, uid(101))
    assert t1.usable and found["mrstudy_s5_AX_FLAIR"].usable
    assert "is a localizer (scout): its 3 slices have 3 different orientations" in found["mrstudy_s1_Localizer"].problem
    report = found["mrstudy_s900_Report"]
    assert not report.is_image and report.problem.startswith("is not an image but a structured report (SR)")
    # the CT study has one image series: it keeps the folder's name; its SEG is not an image
    ct_found = find_series(ct)
    assert [(s.name, s.is_image, bool(s.problem)) for s in ct_found] == [("ctstudy", True, False), ("ctstudy_s300_Lesions", False, True)]
    assert "a DICOM SEG (segmentation)" in ct_found[1].problem
    # frozen and picklable (it travels to Ray workers)
    assert pickle.loads(pickle.dumps(t1)) == t1
    with pytest.raises(dataclasses.FrozenInstanceError):
        t1.name = "other"


def test_files_are_in_slice_order_and_the_grid_reads_back_exactly(study_tree):
    _, mr, ct, vols = study_tree
    t1 = next(s for s in find_series(mr) if s.series_number == 3)
    rot = oblique_direction()
    normal = rot[:, 2]
    along = [float(normal @ np.asarray(pydicom.dcmread(f).ImagePositionPatient, float)) for f in t1.files]
    assert along == sorted(along) and len(set(np.round(along, 3))) == 8
    img = read_image(t1)
    assert img.name == "mrstudy_s3_T1_MPRAGE" and img.dicom_series == t1 and img.dicom_files == t1.files
    assert img.path == str(mr)
    g = img.geometry
    assert g.size == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert np.allclose(g.spacing, (*SPACING, STEP), atol=1e-6)
    assert np.allclose(g.origin, ORIGIN, atol=1e-5)
    assert np.allclose(g.direction, rot, atol=1e-6)  # an oblique (non-identity) orientation kept exactly
    assert np.array_equal(img.array, vols["t1"].astype(np.float32))
    # CT: stored values + rescale intercept read back as the real values
    ct_img = read_image(find_series(ct)[0])
    assert np.array_equal(ct_img.array, vols["ct"].astype(np.float32)) and np.allclose(ct_img.geometry.direction, np.eye(3))
    # a folder with one image series (and a SEG) reads as that series, named after the folder
    assert read_image(ct).name == "ctstudy" and read_image(ct).dicom_files == find_series(ct)[0].files


def test_walk_and_find_cases_give_one_case_per_series(study_tree, tmp_path):
    root, mr, ct, _ = study_tree
    found, _ = walk_inputs(root)
    assert sorted(s.name for s in found) == [
        "ctstudy", "ctstudy_s300_Lesions", "mrstudy_s1_Localizer", "mrstudy_s3_T1_MPRAGE", "mrstudy_s5_AX_FLAIR", "mrstudy_s900_Report",
    ]
    cases = find_cases(root, tmp_path / "out")
    assert [(c.case, c.name, c.out_dir, bool(c.skip_reason)) for c in cases] == [
        ("patient1/ctstudy", "ctstudy", tmp_path / "out" / "patient1", False),
        ("patient1/ctstudy/ctstudy_s300_Lesions", "ctstudy_s300_Lesions", tmp_path / "out" / "patient1", True),
        ("patient1/mrstudy/mrstudy_s1_Localizer", "mrstudy_s1_Localizer", tmp_path / "out" / "patient1", True),
        ("patient1/mrstudy/mrstudy_s3_T1_MPRAGE", "mrstudy_s3_T1_MPRAGE", tmp_path / "out" / "patient1", False),
        ("patient1/mrstudy/mrstudy_s5_AX_FLAIR", "mrstudy_s5_AX_FLAIR", tmp_path / "out" / "patient1", False),
        ("patient1/mrstudy/mrstudy_s900_Report", "mrstudy_s900_Report", tmp_path / "out" / "patient1", True),
    ]
    assert all(c.path in (mr, ct) for c in cases)
    # normal-bank listings keep one entry per folder
    assert list_images(root) == [ct, mr]


def test_names_stay_unique_without_series_numbers_or_with_twins(tmp_path):
    d = tmp_path / "study"
    write_series(d, uid(1), number=None, description="T2 / TSE (fs)", seed=1)
    write_series(d, uid(2), number=7, description="DWI", seed=2)
    write_series(d, uid(3), number=7, description="DWI", seed=3)
    names = [s.name for s in find_series(d)]
    h = lambda u: __import__("hashlib").sha1(u.encode()).hexdigest()[:8]  # noqa: E731
    assert names == [f"study_s7_DWI_{h(uid(2))}", f"study_s7_DWI_{h(uid(3))}", f"study_{h(uid(1))}_T2_TSE_fs"]
    assert len({n.casefold() for n in names}) == 3


# ------------------------------------------------------------------------------- unusable series
@pytest.mark.parametrize(
    "kind, expected",
    [
        ("gap", "is not evenly spaced: slices are 2 mm apart except 4 mm after slice 3"),
        ("duplicate", "has several slices at one position"),
        ("tilt", "is sheared: its slices are shifted sideways by 3.5 mm over 14 mm"),
        ("localizer-type", "is a localizer (scout; Image Type ORIGINAL\\PRIMARY\\LOCALIZER)"),
        ("stacks", "has slices in 2 different orientations"),
        ("sizes", "has slices of different sizes"),
        ("no-position", "has 1 of 8 files without a patient position or orientation"),
    ],
    ids=["gap", "duplicate", "tilt", "localizer-type", "stacks", "sizes", "no-position"],
)
def test_unusable_series_have_a_one_line_reason_and_are_refused_when_read(tmp_path, kind, expected):
    d = tmp_path / "s"
    kwargs = {}
    if kind == "gap":
        kwargs["slices"] = [0, 1, 2, 4, 5, 6, 7]
    elif kind == "duplicate":
        kwargs["slices"] = [0, 1, 2, 3, 3, 4, 5, 6, 7]
    elif kind == "tilt":
        kwargs["positions"] = [(ORIGIN[0], ORIGIN[1] + 0.5 * z, ORIGIN[2] + STEP * z) for z in range(8)]
    elif kind == "localizer-type":
        kwargs["image_type"] = "ORIGINAL\\PRIMARY\\LOCALIZER"
    elif kind == "stacks":
        kwargs["orientations"] = [[1, 0, 0, 0, 1, 0]] * 4 + [[1, 0, 0, 0, 0, -1]] * 4
    write_series(d, uid(5), number=2, description="T1", **kwargs)
    if kind == "sizes":
        write_series(d, uid(5), number=2, description="T1", volume=np.zeros((1, 40, 48), np.int16), origin=(0, 0, 99), prefix="odd")
    if kind == "no-position":
        f = next(iter(sorted(d.iterdir())))
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f, enforce_file_format=True)
    (series,) = find_series(d)
    assert expected in series.problem and "\n" not in series.problem
    with pytest.raises(HiMatchADError) as info:
        read_image(series)
    assert expected in str(info.value) and "the DICOM series s (series 2, MR 'T1')" in str(info.value)
    with pytest.raises(HiMatchADError, match="the DICOM series s "):
        read_image(d)  # the folder: its one image series, refused with the same reason


def _multiframe(folder: Path, per_frame_geometry: bool, shuffled: bool = True) -> tuple:
    """An enhanced (multi-frame) MR object converted from a single-frame series by highdicom."""
    hd = pytest.importorskip("highdicom")
    src = folder.parent / (folder.name + "-src")
    vol = write_series(src, uid(7), number=4, description="T1", seed=5, direction=oblique_direction(), shuffle=False)
    datasets = [pydicom.dcmread(p) for p in sorted(src.iterdir())]
    if shuffled:
        datasets = [datasets[i] for i in (3, 0, 6, 1, 7, 2, 5, 4)]
    for ds in datasets:
        for k, v in dict(
            Manufacturer="x", StudyDate="20240101", StudyTime="000000", ReferringPhysicianName="", StudyID="1", AccessionNumber="",
            PatientBirthDate="", PatientSex="O", SeriesDate="20240101", SeriesTime="000000", ContentDate="20240101", ContentTime="000000",
            FrameOfReferenceUID="1.2.826.0.1.3680043.2.1125.9.99", ScanningSequence="SE", SequenceVariant="NONE", ScanOptions="",
            MRAcquisitionType="2D", EchoTime="10", RepetitionTime="100", EchoTrainLength="1", ImagedNucleus="1H",
            MagneticFieldStrength="3", PatientPosition="HFS", AcquisitionNumber=1,
        ).items():
            setattr(ds, k, v)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = hd.legacy.LegacyConvertedEnhancedMRImage(datasets, series_instance_uid=uid(8), series_number=9, sop_instance_uid=uid(8) + ".1", instance_number=1)
    if not per_frame_geometry:
        for item in mf.PerFrameFunctionalGroupsSequence:
            if "PlanePositionSequence" in item:
                del item.PlanePositionSequence
    folder.mkdir(parents=True)
    mf.save_as(folder / "enhanced.dcm")
    return vol, read_image(src)


def test_a_multi_frame_object_is_read_in_slice_order_on_its_grid(tmp_path):
    vol, single = _multiframe(tmp_path / "mf", per_frame_geometry=True)
    (series,) = find_series(tmp_path / "mf")
    assert series.usable and series.frames == 8 and series.n_files == 1
    img = read_image(series)
    assert img.geometry.same_as(single.geometry, tol=1e-5) and np.array_equal(img.array, single.array)
    assert np.array_equal(img.array, vol.astype(np.float32))


def test_a_multi_frame_object_without_per_frame_positions_is_unusable(tmp_path):
    _multiframe(tmp_path / "mf", per_frame_geometry=False)
    (series,) = find_series(tmp_path / "mf")
    assert "multi-frame (enhanced) object without a position and an orientation for each frame" in series.problem
    with pytest.raises(HiMatchADError, match="without a position and an orientation for each frame"):
        read_image(tmp_path / "mf" / "enhanced.dcm")  # the file given alone is checked the same way


def test_a_series_found_in_two_folders_is_unusable_in_both(tmp_path):
    write_series(tmp_path / "in" / "a", uid(11), number=2, slices=range(4))
    write_series(tmp_path / "in" / "b", uid(11), number=2, slices=range(4, 8), prefix="rest")
    cases = find_cases(tmp_path / "in", tmp_path / "out")
    assert [c.case for c in cases] == ["a", "b"]
    assert all("was found in several folders" in c.skip_reason for c in cases)


# ------------------------------------------------------------------------------- filters
def test_series_filters_select_by_modality_and_description(study_tree):
    _, mr, ct, _ = study_tree
    series = find_series(mr) + find_series(ct)

    def pick(*values):
        filters = parse_series_filters(list(values))
        return sorted(s.name for s in series if matches(s, filters))

    assert pick("modality=MR,description~flair") == ["mrstudy_s5_AX_FLAIR"]
    assert pick("modality=mr") == ["mrstudy_s1_Localizer", "mrstudy_s3_T1_MPRAGE", "mrstudy_s5_AX_FLAIR"]  # case-insensitive
    assert pick("description~^t1", "modality=CT") == ["ctstudy", "mrstudy_s3_T1_MPRAGE"]  # repeated: any of them
    assert pick("modality=MR,description!~localizer") == ["mrstudy_s3_T1_MPRAGE", "mrstudy_s5_AX_FLAIR"]
    assert pick("number=5") == ["mrstudy_s5_AX_FLAIR"] and pick("description=flair") == []  # '=' is exact
    assert pick(f"uid={uid(201)}") == ["ctstudy"]
    assert str(parse_series_filter(" modality=MR,description~flair ")) == "modality=MR,description~flair"


@pytest.mark.parametrize(
    "text, message",
    [
        ("modality:MR", "'modality:MR' is not a term"),
        ("protocol=T1", "unknown key 'protocol'"),
        ("description~(flair", "is not a valid regular expression"),
        ("number=five", "is not a whole number"),
        ("", "it is empty"),
        ("description~", "has no regular expression"),
    ],
)
def test_invalid_filters_are_refused_with_the_syntax(text, message):
    with pytest.raises(HiMatchADError) as info:
        parse_series_filters([text])
    assert message in str(info.value) and str(info.value).startswith(f"invalid --series-filter '{text}'")
    if "term" in message or "key" in message:
        assert "KEY=VALUE" in str(info.value)  # the syntax, when the syntax is wrong


def test_select_series_picks_one_or_lists_the_candidates(study_tree):
    _, mr, ct, _ = study_tree
    with pytest.raises(HiMatchADError) as info:
        select_series(mr)
    msg = str(info.value)
    assert "holds 3 image series (of 4 DICOM series)" in msg and "--series-filter" in msg
    assert f"mrstudy_s3_T1_MPRAGE: {uid(101)} (8 files, series 3, MR T1 MPRAGE)" in msg and "Report" not in msg
    assert select_series(mr, parse_series_filters("description~flair")).name == "mrstudy_s5_AX_FLAIR"
    with pytest.raises(HiMatchADError, match=r"2 of the 4 DICOM series in .* match --series-filter description~t1\|flair: "):
        select_series(mr, parse_series_filters("description~t1|flair"))
    with pytest.raises(HiMatchADError, match="no DICOM series in .* matches --series-filter modality=CT"):
        select_series(mr, parse_series_filters("modality=CT"))
    with pytest.raises(HiMatchADError, match="is a localizer"):
        select_series(mr, parse_series_filters("description~local"))
    assert select_series(ct).name == "ctstudy"  # the SEG beside it is not a candidate


# ------------------------------------------------------------------------------- batch
@pytest.fixture()
def det(fitted):
    return fitted("knn")


def _csv(path: Path) -> list:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_batch_processes_each_series_and_skips_the_unusable_ones(det, study_tree, tmp_path):
    root, mr, ct, _ = study_tree
    out = tmp_path / "out"
    notes = []
    rows = run_batch(det, root, out, series_filter=["modality=MR"], log=notes.append)
    assert [(r["case"], r["status"]) for r in rows] == [
        ("patient1/mrstudy/mrstudy_s1_Localizer", STATUS_SKIPPED),
        ("patient1/mrstudy/mrstudy_s3_T1_MPRAGE", STATUS_OK),
        ("patient1/mrstudy/mrstudy_s5_AX_FLAIR", STATUS_OK),
    ]
    assert any("left out 3 DICOM series" in n for n in notes)  # CT, SEG, SR
    skipped = rows[0]
    assert skipped["message"].startswith("the DICOM series is a localizer (scout)") and skipped["heatmap"] == ""
    assert skipped["input"] == str(mr)
    assert _csv(out / "summary.csv")[0]["status"] == STATUS_SKIPPED
    assert summary_counts(rows) == {STATUS_OK: 2, STATUS_DONE: 0, STATUS_FAILED: 0, STATUS_SKIPPED: 1}
    # outputs overlay their series exactly (oblique grid), beside the mirror of the study folder
    t1 = next(s for s in find_series(mr) if s.series_number == 3)
    heat = read_image(out / "patient1" / "mrstudy_s3_T1_MPRAGE_heatmap.nii.gz")
    assert heat.geometry.same_as(read_image(t1).geometry, tol=1e-4)
    data = json.loads((out / "patient1" / "mrstudy_s3_T1_MPRAGE_scores.json").read_text())
    assert data["series"]["series_uid"] == uid(101) and data["series"]["files"] == 8 and data["input"] == str(mr)

    # resume: the series are done earlier, the localizer is skipped again (never a failure)
    stamp = (out / "patient1" / "mrstudy_s3_T1_MPRAGE_heatmap.nii.gz").stat().st_mtime_ns
    again = run_batch(det, root, out, series_filter=["modality=MR"], log=lambda m: None)
    assert [r["status"] for r in again] == [STATUS_SKIPPED, STATUS_DONE, STATUS_DONE]
    assert (out / "patient1" / "mrstudy_s3_T1_MPRAGE_heatmap.nii.gz").stat().st_mtime_ns == stamp

    # without a filter: the CT series is a case too, the SEG and the SR are skipped rows
    rows = run_batch(det, root, out, log=lambda m: None)
    status = {r["case"].rsplit("/", 1)[-1]: (r["status"], r["message"]) for r in rows}
    assert status["ctstudy"][0] == STATUS_OK and status["mrstudy_s3_T1_MPRAGE"][0] == STATUS_DONE
    assert status["ctstudy_s300_Lesions"] == (STATUS_SKIPPED, status["ctstudy_s300_Lesions"][1])
    assert "is not an image but a DICOM SEG" in status["ctstudy_s300_Lesions"][1]
    assert "is not an image but a structured report" in status["mrstudy_s900_Report"][1]

    # a slice added to a series: its result is recomputed
    extra = pydicom.dcmread(t1.files[-1])
    extra.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(ORIGIN) + oblique_direction()[:, 2] * STEP * 8]
    extra.SOPInstanceUID = uid(101) + ".99"
    extra.save_as(mr / "added.dcm", enforce_file_format=True)
    rows = run_batch(det, root, out, series_filter=["description~mprage"], log=lambda m: None)
    assert [(r["status"], r["message"].split(";")[0]) for r in rows] == [(STATUS_OK, "recomputed: the input's content changed after its result was written")]
    assert json.loads((out / "patient1" / "mrstudy_s3_T1_MPRAGE_scores.json").read_text())["series"]["files"] == 9


def test_broken_series_in_a_batch_are_skipped_not_failed(det, tmp_path):
    root = tmp_path / "in"
    write_series(root / "gap", uid(21), number=2, slices=[0, 1, 2, 4, 5, 6, 7])
    write_series(root / "tilted", uid(22), number=2, positions=[(ORIGIN[0], ORIGIN[1] + 0.5 * z, ORIGIN[2] + STEP * z) for z in range(8)])
    write_series(root / "echoes", uid(23), number=2, slices=[0, 1, 2, 3, 3, 4, 5, 6, 7])
    rows = run_batch(det, root, tmp_path / "out", log=lambda m: None)
    assert [(r["case"], r["status"]) for r in rows] == [("echoes", STATUS_SKIPPED), ("gap", STATUS_SKIPPED), ("tilted", STATUS_SKIPPED)]
    assert "several slices at one position" in rows[0]["message"] and "not evenly spaced" in rows[1]["message"]
    assert "is sheared" in rows[2]["message"]
    assert not (tmp_path / "out" / "gap_scores.json").exists()


def test_series_with_orientation_faults_are_skipped_like_other_unusable_series(det, tmp_path):
    """Row and column directions that are not perpendicular unit vectors used to pass the headers'
    checks and fail when ITK read the series (a ``failed`` row after other unusable series were
    ``skipped``): they are unusable series, with the reason, before any work."""
    root = tmp_path / "in"
    write_series(root / "a_skewed", uid(31), number=2, orientations=[[1, 0, 0, 0.001, 1, 0]] * SHAPE[0])
    write_series(root / "b_long", uid(32), number=2, orientations=[[1, 0, 0, 0, 1.01, 0]] * SHAPE[0])
    write_series(root / "c_zero", uid(33), number=2, orientations=[[1, 0, 0, 0, 0, 0]] * SHAPE[0])
    write_series(root / "d_fine", uid(34), number=2, orientations=[[1, 0, 0, 0.00005, 1, 0]] * SHAPE[0])  # within tolerance
    rows = run_batch(det, root, tmp_path / "out", log=lambda m: None)
    assert [(r["case"], r["status"]) for r in rows] == [
        ("a_skewed", STATUS_SKIPPED), ("b_long", STATUS_SKIPPED), ("c_zero", STATUS_SKIPPED), ("d_fine", STATUS_OK),
    ], [r["message"] for r in rows]
    assert all("not perpendicular unit vectors" in r["message"] for r in rows[:3])


def test_a_filter_that_leaves_nothing_is_an_error_before_any_work(det, study_tree, tmp_path):
    root = study_tree[0]
    with pytest.raises(HiMatchADError, match="--series-filter left out all 6 DICOM series"):
        run_batch(det, root, tmp_path / "out", series_filter="modality=PT", log=lambda m: None)
    with pytest.raises(HiMatchADError, match="unknown key"):
        run_batch(det, root, tmp_path / "out", series_filter="kind=PT")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- command line




def test_detect_on_a_study_folder_needs_a_filter_that_picks_one_series(cli, study_tree, tmp_path):
    _, mr, _, _ = study_tree
    cache = tmp_path / "fresh-cache"
    code, out, err = cli("detect", str(mr), "--out-dir", str(tmp_path / "o"), cache=cache)
    line = one_error_line(err)
    assert code == 2 and "holds 3 image series (of 4 DICOM series)" in line and "--series-filter" in line
    assert "mrstudy_s5_AX_FLAIR" in line and not cache.exists()  # refused before the bank
    code, _, err = cli("detect", str(mr), "--out-dir", str(tmp_path / "o"), "--series-filter", "modality=MR,description~local", cache=cache)
    assert code == 2 and "is a localizer" in one_error_line(err)
    code, _, err = cli("detect", str(mr), "--out-dir", str(tmp_path / "o"), "--series-filter", "modality~(", cache=cache)
    assert code == 2 and "not a valid regular expression" in one_error_line(err) and not cache.exists()

    code, out, err = cli("detect", str(mr), "--out-dir", str(tmp_path / "o"), "--series-filter", "modality=MR,description~flair")
    assert code == 0, err
    assert out.startswith("mrstudy_s5_AX_FLAIR: volume score")
    flair = select_series(mr, parse_series_filters("description~flair"))
    heat = read_image(tmp_path / "o" / "mrstudy_s5_AX_FLAIR_heatmap.nii.gz")
    assert heat.geometry.same_as(read_image(flair).geometry, tol=1e-4)


def test_batch_command_counts_skipped_series(cli, study_tree, tmp_path):
    root = study_tree[0]
    code, out, err = cli("batch", str(root), "--out-dir", str(tmp_path / "o"), "--series-filter", "modality=MR", "--series-filter", "modality=SEG")
    assert code == 0, err
    assert out.strip() == f"2 processed, 0 already done, 2 skipped, 0 failed; summary: {tmp_path / 'o' / 'summary.csv'}; report: {tmp_path / 'o' / 'report.html'}"
    code, _, err = cli("batch", str(root), "--out-dir", str(tmp_path / "o"), "--series-filter", "modality")
    assert code == 2 and "is not a term" in one_error_line(err)


# ------------------------------------------------------------------------------- DICOM outputs
@pytest.fixture()
def fake_writer(monkeypatch):
    """A stand-in ``HiMatchADLib.outputs.dicom_seg``: writes a small DICOM SEG-class file (so the input walk
    can meet it) and records each call."""
    calls = []

    def _write(kind):
        def writer(result, source_files, path):
            path = Path(path)
            scores = path.parent / f"{result.name}_scores.json"
            calls.append({"kind": kind, "name": result.name, "files": list(source_files), "scores_existed": scores.exists(),
                          "labelmap_sum": int(result.labelmap.sum())})
            with atomic_path(path) as tmp:
                write_object(tmp.parent, uid(7000 + len(calls)), SEG, "SEG", number=7000 + len(calls), name=tmp.name)
            return path
        return writer

    module = types.ModuleType("HiMatchADLib.outputs.dicom_seg")
    module.write_dicom_seg = _write("seg")
    module.write_dicom_heatmap = _write("heatmap")
    module.require = lambda: None
    monkeypatch.setitem(sys.modules, "HiMatchADLib.outputs.dicom_seg", module)
    import HiMatchADLib

    monkeypatch.setattr(HiMatchADLib.outputs, "dicom_seg", module, raising=False)
    return calls


def test_dicom_outputs_are_written_before_the_scores_and_listed(det, fake_writer, study_tree, tmp_path):
    root, mr, _, _ = study_tree
    write_image(make_phantom(SHAPE, seed=9)[0].array, make_phantom(SHAPE, seed=9)[0].geometry, root / "volume.nii.gz")
    out = tmp_path / "out"
    rows = run_batch(det, root, out, series_filter=["description~mprage"], outputs=("dicom_seg", "dicom_heatmap"), log=lambda m: None)
    assert [(r["case"], r["status"]) for r in rows] == [("patient1/mrstudy/mrstudy_s3_T1_MPRAGE", STATUS_OK), ("volume.nii.gz", STATUS_OK)]
    assert "no DICOM SEG or DICOM parametric map written: the input is not DICOM" in rows[1]["message"]
    t1 = next(s for s in find_series(mr) if s.series_number == 3)
    assert [c["kind"] for c in fake_writer] == ["seg", "heatmap"]
    assert all(c["files"] == list(t1.files) and not c["scores_existed"] for c in fake_writer)  # slice order; before the JSON
    data = json.loads((out / "patient1" / "mrstudy_s3_T1_MPRAGE_scores.json").read_text())
    assert data["outputs"]["dicom_seg"] == "mrstudy_s3_T1_MPRAGE_seg.dcm"
    assert data["outputs"]["dicom_heatmap"] == "mrstudy_s3_T1_MPRAGE_heatmap_pm.dcm"
    assert (out / "patient1" / "mrstudy_s3_T1_MPRAGE_seg.dcm").is_file()
    assert {"mrstudy_s3_T1_MPRAGE_seg.dcm", "mrstudy_s3_T1_MPRAGE_heatmap_pm.dcm"} <= own_outputs(list((out / "patient1").iterdir()))
    # the SEG beside our scores JSON is an output, not an input; without the JSON it is a skipped non-image series
    assert not [s for s in walk_inputs(out, skip_names=own_outputs)[0] if not isinstance(s, Path)]
    (out / "patient1" / "mrstudy_s3_T1_MPRAGE_scores.json").unlink()
    found = [s for s in walk_inputs(out)[0] if not isinstance(s, Path)]
    assert found and all("is not an image but a DICOM SEG" in s.problem for s in found)


def test_resume_recomputes_a_case_without_the_dicom_outputs_asked_for(det, fake_writer, study_tree, tmp_path):
    root = study_tree[0]
    out = tmp_path / "out"
    pick = ["description~flair"]
    assert [r["status"] for r in run_batch(det, root, out, series_filter=pick, log=lambda m: None)] == [STATUS_OK]
    assert fake_writer == []
    rows = run_batch(det, root, out, series_filter=pick, outputs=("dicom_seg",), log=lambda m: None)
    assert rows[0]["status"] == STATUS_OK and rows[0]["message"].startswith("recomputed: the earlier result has no DICOM SEG")
    assert (out / "patient1" / "mrstudy_s5_AX_FLAIR_seg.dcm").is_file()
    assert run_batch(det, root, out, series_filter=pick, outputs=("dicom_seg",), log=lambda m: None)[0]["status"] == STATUS_DONE
    # recomputed without the SEG: the old SEG (which would not match the new maps) is removed
    run_batch(det, root, out, series_filter=pick, overwrite=True, log=lambda m: None)
    assert not (out / "patient1" / "mrstudy_s5_AX_FLAIR_seg.dcm").exists() and is_complete(out / "patient1", "mrstudy_s5_AX_FLAIR")


def test_a_failing_dicom_writer_leaves_the_case_incomplete(det, fake_writer, study_tree, tmp_path, monkeypatch):
    def mismatch(result, source_files, path):
        raise HiMatchADError("the result's geometry does not match the source series")

    monkeypatch.setattr(sys.modules["HiMatchADLib.outputs.dicom_seg"], "write_dicom_seg", mismatch)
    out = tmp_path / "out"
    rows = run_batch(det, study_tree[0], out, series_filter="description~flair", outputs=("dicom_seg",), log=lambda m: None)
    assert rows[0]["status"] == STATUS_FAILED and "does not match the source series" in rows[0]["message"]
    assert not is_complete(out / "patient1", "mrstudy_s5_AX_FLAIR")


def test_without_the_writer_dicom_outputs_are_refused_up_front(det, study_tree, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # highdicom is not installed
    with pytest.raises(HiMatchADError, match=r'pip install "himatchad\[dicom\]"'):
        run_batch(det, study_tree[0], tmp_path / "out", outputs=("dicom_seg",))
    assert not (tmp_path / "out").exists()


def test_detect_writes_the_dicom_seg_and_refuses_it_for_other_inputs(cli, fake_writer, study_tree, tmp_path):
    _, mr, ct, _ = study_tree
    code, _, err = cli("detect", str(ct), "--out-dir", str(tmp_path / "o"), "--dicom-seg")
    assert code == 0, err
    assert (tmp_path / "o" / "ctstudy_seg.dcm").is_file() and fake_writer[0]["files"] == list(find_series(ct)[0].files)
    vol = tmp_path / "v.nii.gz"
    img = make_phantom(SHAPE, seed=3)[0]
    write_image(img.array, img.geometry, vol)
    cache = tmp_path / "fresh-cache"
    code, _, err = cli("detect", str(vol), "--out-dir", str(tmp_path / "o2"), "--dicom-seg", cache=cache)
    assert code == 2 and "--dicom-seg and --dicom-heatmap need a DICOM input" in one_error_line(err)
    assert not cache.exists() and not (tmp_path / "o2").exists()
    code, _, err = cli("detect", str(vol), "--out-dir", str(tmp_path / "o2"), "--series-filter", "modality=MR", cache=cache)
    assert code == 2 and "is not DICOM" in one_error_line(err)


def test_the_worker_passes_batch_options_through(study_tree, tmp_path, monkeypatch):
    from HiMatchADLib.worker import server as batch
    from HiMatchADLib.worker.server import Worker

    seen = {}

    def fake_run_batch(det, input_dir, out_dir, **kwargs):
        seen.update(kwargs)
        return []

    class FakeDetector:
        def __init__(self, **kw):
            self.bank = None

        def set_progress(self, *a, **k):
            pass

        def fit(self, normals):
            return self

    monkeypatch.setattr(batch, "run_batch", fake_run_batch)
    events = []
    Worker(events.append, detector_factory=FakeDetector).handle({
        "id": "1", "cmd": "batch", "input_dir": str(study_tree[0]), "normals": str(tmp_path / "normals"), "out_dir": str(tmp_path / "o"),
        "series_filter": ["modality=MR"], "dicom_seg": True, "dicom_heatmap": False,
    })
    assert events[-1]["event"] == "done", events
    assert seen["series_filter"] == ["modality=MR"] and seen["outputs"] == ("dicom_seg",)


# ------------------------------------------------------------------------------- Ray engine
def test_a_ray_worker_passes_the_dicom_outputs_to_the_case(det, fake_writer, study_tree, tmp_path):
    from HiMatchADLib.batch.ray import CaseWorker, detector_spec

    worker = CaseWorker()
    worker.setup(detector_spec(det))  # in this process: the stand-in writer is importable
    (case,) = find_cases(study_tree[0], tmp_path / "out", series_filter="description~flair")
    row, _, _ = worker.process(case, str(tmp_path / "out"), False, ("dicom_seg",))
    assert row["status"] == STATUS_OK and [c["kind"] for c in fake_writer] == ["seg"]
    assert fake_writer[0]["files"] == list(case.series.files)


@pytest.mark.slow
def test_the_ray_engine_gives_the_local_rows_for_a_study_tree(det, study_tree, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    root = study_tree[0]
    local = run_batch(det, root, tmp_path / "local", series_filter="modality=MR", log=lambda m: None)
    remote = run_batch(det, root, tmp_path / "ray", series_filter="modality=MR", log=lambda m: None, engine="ray", engine_options={"workers": 1})
    assert not ray.is_initialized()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "volume_score", "threshold", "anomalous_volume_mm3")} for r in rows]  # noqa: E731
    assert strip(remote) == strip(local) and [r["status"] for r in remote] == [STATUS_SKIPPED, STATUS_OK, STATUS_OK]
    for a, b in zip(local, remote):
        if a["status"] == STATUS_OK:
            assert float(a["volume_score"]) == pytest.approx(float(b["volume_score"]), rel=1e-5)
    # resumed by the Ray engine: done earlier and skipped, decided by the driver
    again = run_batch(det, root, tmp_path / "ray", series_filter="modality=MR", log=lambda m: None, engine="ray", engine_options={"workers": 1})
    assert [r["status"] for r in again] == [STATUS_SKIPPED, STATUS_DONE, STATUS_DONE]


# ------------------------------------------------------------------------------- end to end, real writers
def test_batch_writes_real_dicom_seg_and_parametric_map_on_the_input_voxels(det, study_tree, tmp_path, monkeypatch):
    """A batch with --dicom-seg --dicom-heatmap on the study tree: each SEG frame, found through the
    source instance it references, holds exactly the labelmap's slice of that instance's voxels, and
    the parametric map holds the heatmap there (oblique MR grid included)."""
    hd = pytest.importorskip("highdicom")
    import pydicom

    from HiMatchADLib.outputs.files import load_result

    root, mr, _, _ = study_tree
    out = tmp_path / "out"
    monkeypatch.setattr(det, "threshold", 0.0)  # a fixed threshold that marks part of each volume
    rows = run_batch(det, root, out, series_filter="modality=MR", outputs=("dicom_seg", "dicom_heatmap"))
    done = [r for r in rows if r["status"] == "ok"]
    assert {Path(r["case"]).name for r in done} == {"mrstudy_s3_T1_MPRAGE", "mrstudy_s5_AX_FLAIR"}
    scores = {Path(r["case"]).name: out / r["scores"] for r in done}
    for series in (s for s in find_series(mr) if s.usable):
        case_dir = scores[series.name].parent
        result = load_result(scores[series.name])
        seg = hd.seg.segread(case_dir / f"{series.name}_seg.dcm")
        pm = pydicom.dcmread(case_dir / f"{series.name}_heatmap_pm.dcm")
        by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(series.files)}
        assert seg.SeriesInstanceUID != series.series_uid
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
        assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
        assert seg.SegmentSequence[0].SegmentAlgorithmName == "HiMatch-AD"
        frames = seg.pixel_array.reshape(-1, *result.labelmap.shape[1:])
        pm_frames = pm.pixel_array.reshape(-1, *result.heatmap.shape[1:])
        assert frames.shape[0] == pm_frames.shape[0] == len(series.files)
        for f in range(frames.shape[0]):
            src = seg.PerFrameFunctionalGroupsSequence[f].DerivationImageSequence[0].SourceImageSequence[0]
            k = by_uid[src.ReferencedSOPInstanceUID]  # files are in slice order: index k is slice k
            np.testing.assert_array_equal(frames[f] > 0, result.labelmap[k] > 0)
            psrc = pm.PerFrameFunctionalGroupsSequence[f].DerivationImageSequence[0].SourceImageSequence[0]
            np.testing.assert_allclose(pm_frames[f], result.heatmap[by_uid[psrc.ReferencedSOPInstanceUID]], rtol=1e-6, atol=1e-6)
        assert 0 < (result.labelmap > 0).sum() < result.labelmap.size  # the frames carry a pattern to check
        # provenance: the JSON names the DICOM writers' versions, the objects the weights that made them
        libraries = result.provenance["libraries"]
        assert libraries["highdicom"] == hd.__version__ and libraries["pydicom"] == pydicom.__version__
        digest = result.provenance["model"]["weights_digest"]
        assert digest.startswith("sha256:") and result.provenance["input_digest"] == result.input_digest
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert f"weights={digest[:23]}" in algorithm.AlgorithmParameters
        assert digest[:23] in pm.ContentDescription and pm.SeriesDescription.startswith("HiMatch-AD ")


# ------------------------------------------------------------------------------- pixel semantics
@pytest.mark.parametrize("signed", [True, False])
def test_monochrome1_is_read_as_displayed(tmp_path, signed):
    """The same displayed image stored as MONOCHROME1 (stored = 3000 - v) reads as the MONOCHROME2 one."""
    ref_vol = write_series(tmp_path / "m2", "1.2.3.4.1")
    write_series(tmp_path / "m1", "1.2.3.4.2", volume=ref_vol)
    for f in (tmp_path / "m1").iterdir():
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelRepresentation = int(signed)
        ds.PixelData = (3000 - ds.pixel_array.astype(np.int32)).astype(np.int16 if signed else np.uint16).tobytes()
        ds.save_as(f)
    ref, img = read_image(tmp_path / "m2"), read_image(tmp_path / "m1")
    np.testing.assert_array_equal(img.array - img.array.min(), ref.array - ref.array.min())
    assert img.array.min() == 0
    assert any("MONOCHROME1" in w for w in img.warnings)
    from HiMatchADLib.features.slicing import prepare_volume

    assert prepare_volume(img).modality == "mri"  # not read as negative Hounsfield units
    np.testing.assert_allclose(prepare_volume(img).canonical, prepare_volume(ref).canonical, atol=1e-6)


def test_a_series_without_pixel_spacing_is_not_taken_for_1_mm(tmp_path):
    write_series(tmp_path / "s", "1.2.3.4.5")
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        del ds.PixelSpacing
        ds.save_as(f)
    img = read_image(tmp_path / "s")
    assert not img.spacing_recorded
    assert [w for w in img.warnings if "no PixelSpacing" in w and "1 mm pixels are assumed" in w]
    from HiMatchADLib.features.canvas import has_physical_spacing

    assert not has_physical_spacing(img)
    assert read_image(tmp_path / "s").warnings and read_image(_first_series(tmp_path)).spacing_recorded


def _first_series(tmp_path):
    write_series(tmp_path / "ok", "1.2.3.4.6")
    return tmp_path / "ok"
