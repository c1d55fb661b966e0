"""DICOM SEG and Parametric Map outputs (``HiMatchADLib.outputs.dicom_seg``) on small synthetic MR series.

The series are made here with pydicom: 6 slices of 16 x 20 pixels, an oblique orientation,
anisotropic spacing, files written in a shuffled order with shuffled InstanceNumbers. The generator
knows which file lies at which slice; the objects written are read back with pydicom and highdicom
and every frame is placed three ways (the source instance it references, its own
PlanePositionSequence, highdicom's reader) onto exactly the input voxels.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from conftest import oblique_direction  # noqa: E402

from HiMatchADLib import __version__  # noqa: E402
from HiMatchADLib.outputs import dicom_seg  # noqa: E402
from HiMatchADLib.outputs.dicom_seg import write_dicom_heatmap, write_dicom_seg  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError  # noqa: E402
from HiMatchADLib.core.geometry import Geometry  # noqa: E402
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.core.result import DetectionResult  # noqa: E402

NZ, ROWS, COLS = 6, 16, 20
SPACING = (0.8, 1.3, 2.5)  # (between columns, between rows, between slices), ITK order
ORIGIN = (-12.5, 30.25, 7.0)
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def make_series(folder: Path, *, nz=NZ, spacing=SPACING, direction=None, shear=(0.0, 0.0, 0.0), seed=0) -> list:
    """Write one MR series into ``folder``; returns its files in slice order (file ``k`` lies at
    ``ORIGIN + k * spacing[2] * normal (+ k * shear)``). Files are created in a shuffled order
    under random names, with shuffled InstanceNumbers; slice ``k`` holds the pixel values
    ``1000 * k + row * COLS + column``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    d = oblique_direction() if direction is None else np.asarray(direction, dtype=float)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    numbers = rng.permutation(nz) + 1
    files = [None] * nz
    for k in rng.permutation(nz):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.Manufacturer = "MR", "Phantom Scanner"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PH-001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240105", "101500", "7", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 4, int(numbers[k])
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])]
        position = np.asarray(ORIGIN) + d[:, 2] * spacing[2] * k + np.asarray(shear) * k
        ds.ImagePositionPatient = [f"{v:.8f}" for v in position]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (np.arange(ROWS * COLS).reshape(ROWS, COLS) + 1000 * k).astype(np.uint16).tobytes()
        path = folder / f"{uid.rsplit('.', 1)[-1][-10:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[k] = path
    return files


def known_labelmap(shape) -> np.ndarray:
    """A block and a lone voxel at places that no flip or transpose maps onto themselves."""
    lab = np.zeros(shape, dtype=np.uint8)
    lab[1:3, 2:7, 4:15] = 1
    lab[-1, ROWS - 3, 1] = 1
    return lab


def make_result(image, labelmap=None, heatmap=None, method="dpmm") -> DetectionResult:
    shape = image.geometry.shape
    if heatmap is None:
        heatmap = (np.random.default_rng(7).random(shape) * 3.0).astype(np.float32)
        heatmap[:, :, 0] = 0.0  # background column
    return DetectionResult(
        heatmap=heatmap,
        foreground=np.ones(shape, dtype=bool),
        threshold=1.5,
        geometry=image.geometry,
        slice_axis=0,
        slice_scores=np.zeros(shape[0], dtype=np.float32),
        volume_score=1.0,
        method=method,
        model="/home/someone/models/dinov3-vits16",
        labelmap=known_labelmap(shape) if labelmap is None else labelmap,
    )


def shuffled(files, seed=3) -> list:
    return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """``(files in slice order, image read by imageio)``; the image's slice ``k`` is file ``k``."""
    folder = tmp_path_factory.mktemp("mr_series")
    files = make_series(folder)
    image = read_image(folder)
    # The convention the writers rely on: arrays (z, y, x) = (slice, row, column), z by position.
    assert image.array.shape == (NZ, ROWS, COLS)
    for k in range(NZ):
        assert np.array_equal(image.array[k], np.arange(ROWS * COLS).reshape(ROWS, COLS) + 1000 * k)
    assert np.allclose(image.geometry.direction, oblique_direction(), atol=1e-8)
    return files, image


def frame_slices(ds, files) -> list:
    """Slice index of each frame, from the source instance each frame references."""
    slice_of = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): k for k, f in enumerate(files)}
    out = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        refs = [src.ReferencedSOPInstanceUID for der in item.DerivationImageSequence for src in der.SourceImageSequence]
        assert len(refs) == 1
        out.append(slice_of[str(refs[0])])
    return out


def position_slices(ds, geometry: Geometry) -> list:
    """Slice index of each frame, from its own PlanePositionSequence (which must be a grid point)."""
    normal = geometry.direction[:, 2]
    out = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        k = int(round(float((ipp - np.asarray(geometry.origin)) @ normal) / geometry.spacing[2]))
        assert np.allclose(ipp, geometry.index_to_physical((0, 0, k)), atol=1e-4)
        out.append(k)
    return out


def frames(ds) -> np.ndarray:
    return np.asarray(ds.pixel_array).reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))


def check_shared_geometry(ds) -> None:
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    d = oblique_direction()
    assert np.allclose(iop, np.concatenate([d[:, 0], d[:, 1]]), atol=1e-8)
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], (SPACING[1], SPACING[0]))
    assert (int(ds.Rows), int(ds.Columns)) == (ROWS, COLS)


def test_seg_frames_lie_on_exactly_the_input_voxels(series, tmp_path):
    files, image = series
    result = make_result(image)
    out = write_dicom_seg(result, shuffled(files), tmp_path / "anomalies.dcm")
    assert out == tmp_path / "anomalies.dcm" and sorted(p.name for p in tmp_path.iterdir()) == ["anomalies.dcm"]

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == dicom_seg.SEG_SOP_CLASS and ds.SegmentationType == "BINARY"
    assert int(ds.NumberOfFrames) == NZ  # one frame per source instance, empty ones included
    check_shared_geometry(ds)
    pixels = frames(ds)
    by_reference = frame_slices(ds, files)
    assert sorted(by_reference) == list(range(NZ))
    assert position_slices(ds, image.geometry) == by_reference
    for i, k in enumerate(by_reference):
        assert np.array_equal(pixels[i], result.labelmap[k]), f"frame {i} (slice {k})"

    # highdicom's own reader, asked for the source instances in slice order.
    seg = hd.seg.segread(out)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert back.shape == (NZ, ROWS, COLS, 1)
    assert np.array_equal(back[..., 0], result.labelmap)


def test_seg_describes_the_segment_and_references_the_series(series, tmp_path):
    files, image = series
    result = make_result(image, method="himatch")
    result.labelmap = result.labelmap_at(result.threshold)  # the detection's own output
    ds = pydicom.dcmread(write_dicom_seg(result, files, tmp_path / "seg.dcm"))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)

    (segment,) = ds.SegmentSequence
    assert segment.SegmentNumber == 1 and segment.SegmentLabel == "Anomaly"
    assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == "HiMatch-AD"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue, category.CodeMeaning) == ("SCT", "49755003", "Morphologically Altered Structure")
    # The type is the category's own code: no assertion of a mass, oedema or any particular finding.
    assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "49755003", "Morphologically Altered Structure")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "HiMatch-AD" and algorithm.AlgorithmVersion == __version__
    parameters = dict(p.split("=") for p in algorithm.AlgorithmParameters.split(","))
    assert parameters["method"] == "himatch" and parameters["threshold"] == "1.5"
    assert parameters["threshold_source"] == "calibrated"
    assert parameters["model"] == "dinov3-vits16"  # a local folder's name, not the user's folders

    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (ds.PatientID, str(ds.PatientName)) == (source.PatientID, str(source.PatientName))
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = {str(r.ReferencedSOPInstanceUID) for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID not in referenced
    assert ds.Modality == "SEG" and ds.SeriesDescription == f"HiMatch-AD {__version__} himatch anomalies"
    assert ds.Manufacturer == "HiMatch-AD" and ds.SoftwareVersions == __version__
    # Every write is a new object.
    again = pydicom.dcmread(write_dicom_seg(result, files, tmp_path / "seg2.dcm"))
    assert again.SeriesInstanceUID != ds.SeriesInstanceUID and again.SOPInstanceUID != ds.SOPInstanceUID


def test_heatmap_parametric_map_holds_the_scores_at_the_same_voxels(series, tmp_path):
    files, image = series
    result = make_result(image)
    out = write_dicom_heatmap(result, shuffled(files, seed=5), tmp_path / "heatmap.dcm")
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == dicom_seg.PARAMETRIC_MAP_SOP_CLASS and int(ds.NumberOfFrames) == NZ
    assert ds.BitsAllocated == 32 and "FloatPixelData" in ds
    check_shared_geometry(ds)
    by_reference = frame_slices(ds, files)
    assert sorted(by_reference) == list(range(NZ))
    assert position_slices(ds, image.geometry) == by_reference
    pixels = frames(ds)
    for i, k in enumerate(by_reference):
        assert np.allclose(pixels[i], result.heatmap[k], rtol=0, atol=1e-6), f"frame {i} (slice {k})"

    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "anomaly score"
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodingSchemeDesignator, unit.CodeValue, unit.CodeMeaning) == ("UCUM", "1", "no units")
    assert (float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)) == (1.0, 0.0)
    assert mapping.DoubleFloatRealWorldValueFirstValueMapped == pytest.approx(float(result.heatmap.min()))
    assert mapping.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(float(result.heatmap.max()))
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert quantity.CodeMeaning == "Anomaly score"
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert ds.SeriesDescription == f"HiMatch-AD {__version__} dpmm anomaly score"

    pm = hd.pm.ParametricMap.from_dataset(ds)  # highdicom takes it for a parametric map
    assert pm.SOPInstanceUID == ds.SOPInstanceUID and pm.ContentLabel == "ANOMALY_SCORE"


def test_empty_labelmap_gives_a_valid_seg_of_empty_frames(series, tmp_path):
    files, image = series
    result = make_result(image, labelmap=np.zeros(image.geometry.shape, dtype=np.uint8))
    out = write_dicom_seg(result, files, tmp_path / "empty.dcm")
    ds = pydicom.dcmread(out)
    assert int(ds.NumberOfFrames) == NZ and not frames(ds).any()
    assert sorted(frame_slices(ds, files)) == list(range(NZ))
    seg = hd.seg.segread(out)
    assert seg.number_of_segments == 1
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    assert not seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1]).any()


def test_a_single_frame_source_gives_one_frame(tmp_path):
    files = make_series(tmp_path / "one", nz=1)
    image = read_image(files[0])
    assert image.geometry.shape == (1, ROWS, COLS)
    result = make_result(image)
    assert result.labelmap.any()
    seg = pydicom.dcmread(write_dicom_seg(result, files, tmp_path / "seg.dcm"))
    assert int(seg.NumberOfFrames) == 1 and np.array_equal(frames(seg)[0], result.labelmap[0])
    pm = pydicom.dcmread(write_dicom_heatmap(result, files, tmp_path / "pm.dcm"))
    assert int(pm.NumberOfFrames) == 1 and np.allclose(frames(pm)[0], result.heatmap[0], rtol=0, atol=1e-6)


def with_geometry(result: DetectionResult, **changes) -> DetectionResult:
    g = result.geometry
    fields = {"size": g.size, "spacing": g.spacing, "origin": g.origin, "direction": g.direction, "is_2d": g.is_2d}
    fields.update(changes)
    result.geometry = Geometry(**fields)
    return result


@pytest.mark.parametrize(
    "change, message",
    [
        ("slice spacing", "another grid"),
        ("pixel spacing", "pixel spacing"),
        ("origin", "another grid"),
        ("orientation", "orientation"),
        ("missing file", "missing"),
        ("file twice", "same instance"),
        ("other series", "different series"),
        ("not dicom", "not a readable DICOM file"),
        ("other size", "rows"),
        ("2d", "2D image"),
    ],
)
def test_a_source_that_is_not_the_results_grid_is_refused(series, tmp_path, change, message):
    files, image = series
    result = make_result(image)
    sources = list(files)
    g = image.geometry
    if change == "slice spacing":
        with_geometry(result, spacing=(g.spacing[0], g.spacing[1], 3.0))
    elif change == "pixel spacing":
        with_geometry(result, spacing=(g.spacing[0], 1.0, g.spacing[2]))
    elif change == "origin":  # half a slice along the normal
        with_geometry(result, origin=tuple(np.asarray(g.origin) + 0.5 * g.spacing[2] * g.direction[:, 2]))
    elif change == "orientation":
        with_geometry(result, direction=np.eye(3))
    elif change == "missing file":
        sources.pop(2)
    elif change == "file twice":
        sources[3] = sources[1]
    elif change == "other series":
        sources[0] = make_series(tmp_path / "other")[0]
    elif change == "not dicom":
        sources[4] = tmp_path / "notes.dcm"
        sources[4].write_text("not an image")
    elif change == "other size":
        shape = (NZ, ROWS + 1, COLS)
        result = DetectionResult(
            heatmap=np.zeros(shape, np.float32), foreground=np.ones(shape, bool), threshold=1.0,
            geometry=Geometry((COLS, ROWS + 1, NZ), g.spacing, g.origin, g.direction), slice_axis=0,
            slice_scores=np.zeros(NZ), volume_score=0.0,
        )
    elif change == "2d":
        with_geometry(result, is_2d=True)
    out = tmp_path / "out"
    for writer in (write_dicom_seg, write_dicom_heatmap):
        with pytest.raises(HiMatchADError, match=message):
            writer(result, sources, out / "x.dcm")
    assert not out.exists() or list(out.iterdir()) == []


def test_a_sheared_series_is_refused(tmp_path):
    straight = make_series(tmp_path / "straight", seed=1)
    result = make_result(read_image(tmp_path / "straight"))
    sheared = make_series(tmp_path / "sheared", shear=(0.4, 0.0, 0.0), seed=1)  # a tilted gantry
    assert write_dicom_seg(result, straight, tmp_path / "ok.dcm").exists()
    with pytest.raises(HiMatchADError, match="sheared"):
        write_dicom_seg(result, sheared, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_a_heatmap_with_nan_is_refused(series, tmp_path):
    files, image = series
    result = make_result(image)
    result.heatmap[2, 3, 4] = np.nan
    with pytest.raises(HiMatchADError, match="NaN"):
        write_dicom_heatmap(result, files, tmp_path / "pm.dcm")
    assert list(tmp_path.iterdir()) == []


def test_missing_highdicom_gives_the_install_hint(series, tmp_path, monkeypatch):
    files, image = series
    monkeypatch.setitem(sys.modules, "highdicom", None)  # "import highdicom" raises ImportError
    for writer in (write_dicom_seg, write_dicom_heatmap):
        with pytest.raises(HiMatchADError, match=r'pip install "himatchad\[dicom\]"'):
            writer(make_result(image), files, tmp_path / "x.dcm")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_leaves_nothing_behind(series, tmp_path, monkeypatch):
    files, image = series

    def disk_full(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"DICM")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", disk_full)
    with pytest.raises(HiMatchADError, match="No space left"):
        write_dicom_seg(make_result(image), files, tmp_path / "seg.dcm")
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_write_is_caught_by_the_read_back(series, tmp_path, monkeypatch):
    files, image = series
    save_as = pydicom.dataset.Dataset.save_as

    def truncating(self, filename, *args, **kwargs):  # a writer that does not report a full disk
        save_as(self, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) - 200])

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", truncating)
    (tmp_path / "pm.dcm").write_bytes(b"earlier result")
    with pytest.raises(HiMatchADError, match="read back"):
        write_dicom_heatmap(make_result(image), files, tmp_path / "pm.dcm")
    assert [p.name for p in tmp_path.iterdir()] == ["pm.dcm"]
    assert (tmp_path / "pm.dcm").read_bytes() == b"earlier result"  # the earlier file is untouched


def test_the_segment_terminology_is_the_slicer_modules():
    pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
    from HiMatchADLib import mrml

    assert dicom_seg.SEGMENT_CATEGORY == mrml.SEGMENT_CATEGORY
    assert dicom_seg.SEGMENT_TYPE == mrml.SEGMENT_TYPE
    assert dicom_seg.SEGMENT_LABEL == mrml.SEGMENT_NAME
    assert dicom_seg.ALGORITHM_NAME == mrml.ALGORITHM_NAME


def segment_of(path):
    (segment,) = pydicom.dcmread(path).SegmentSequence
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    return segment.SegmentAlgorithmType, dict(p.split("=") for p in algorithm.AlgorithmParameters.split(","))


def test_seg_algorithm_type_says_whether_a_person_changed_the_result(series, tmp_path):
    """AUTOMATIC for the detection's output at the threshold it chose (calibrated, or a fixed
    --threshold: a setting of the run), SEMIAUTOMATIC for a threshold moved afterwards or an
    edited labelmap; read back from the files written."""
    files, image = series
    calibrated = make_result(image)
    calibrated.threshold_info = {"mode": "auto", "calibrated_threshold": 1.5}
    calibrated.labelmap = calibrated.labelmap_at(1.5)
    kind, parameters = segment_of(write_dicom_seg(calibrated, files, tmp_path / "a.dcm"))
    assert kind == "AUTOMATIC" and parameters["threshold_source"] == "calibrated"

    calibrated.set_threshold(2.0)  # moved by a person after the run
    kind, parameters = segment_of(write_dicom_seg(calibrated, files, tmp_path / "b.dcm"))
    assert kind == "SEMIAUTOMATIC" and parameters["threshold"] == "2" and parameters["threshold_source"] == "adjusted"

    fixed = make_result(image)  # himatchad detect --threshold 1.5
    fixed.threshold_info, fixed.settings = {"mode": "fixed"}, {"threshold": 1.5}
    fixed.labelmap = fixed.labelmap_at(1.5)
    kind, parameters = segment_of(write_dicom_seg(fixed, files, tmp_path / "c.dcm"))
    assert kind == "AUTOMATIC" and parameters["threshold_source"] == "fixed"
    fixed.set_threshold(1.0)
    assert segment_of(write_dicom_seg(fixed, files, tmp_path / "d.dcm"))[0] == "SEMIAUTOMATIC"

    edited = make_result(image)  # a labelmap that is not the heatmap's at its threshold
    assert not np.array_equal(edited.labelmap, edited.labelmap_at(edited.threshold))
    assert segment_of(write_dicom_seg(edited, files, tmp_path / "e.dcm"))[0] == "SEMIAUTOMATIC"
    assert dicom_seg.segment_algorithm_type(edited) == "SEMIAUTOMATIC"


PROVENANCE = {
    "version": "9.8.7", "method_revision": 2, "precision": "bf16",
    "model": {"id": "facebook/dinov3-vits16-pretrain-lvd1689m", "weights_digest": "sha256:" + "0123456789abcdef" * 4},
}


def test_both_objects_record_the_results_provenance(series, tmp_path):
    """Version, method, model and weights digest are where DICOM has a place for them."""
    files, image = series
    result = make_result(image, method="knn")
    result.model = "facebook/dinov3-vits16-pretrain-lvd1689m"
    result.provenance = PROVENANCE
    seg = pydicom.dcmread(write_dicom_seg(result, files, tmp_path / "seg.dcm"))
    assert seg.SeriesDescription == "HiMatch-AD 9.8.7 knn anomalies"
    assert str(seg.ContentCreatorName) == "HiMatch-AD^" and seg.ContentLabel == "ANOMALIES"
    assert seg.SoftwareVersions == __version__  # the package that wrote the object
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == "9.8.7" and algorithm.AlgorithmSource == "HiMatch-AD"
    parameters = dict(p.split("=") for p in algorithm.AlgorithmParameters.split(","))
    assert parameters["weights"] == "sha256:0123456789abcdef"
    assert parameters["model"] == "facebook/dinov3-vits16-pretrain-lvd1689m"
    assert parameters["method_revision"] == "2" and parameters["precision"] == "bf16" and parameters["threshold"] == "1.5"

    pm = pydicom.dcmread(write_dicom_heatmap(result, files, tmp_path / "pm.dcm"))
    assert pm.SeriesDescription == "HiMatch-AD 9.8.7 knn anomaly score"
    assert str(pm.ContentCreatorName) == "HiMatch-AD^" and pm.ContentLabel == "ANOMALY_SCORE"
    assert pm.ContentDescription.startswith("HiMatch-AD knn; sha256:0123456789abcdef; facebook/dinov3")
    assert len(pm.ContentDescription) <= 64
    result.model = "/home/someone/models/dinov3-vits16"  # a local folder: its name
    pm = pydicom.dcmread(write_dicom_heatmap(result, files, tmp_path / "pm2.dcm"))
    assert pm.ContentDescription == "HiMatch-AD knn; sha256:0123456789abcdef; dinov3-vits16"


def test_a_result_without_provenance_still_writes(series, tmp_path):
    files, image = series
    result = make_result(image)
    seg = pydicom.dcmread(write_dicom_seg(result, files, tmp_path / "seg.dcm"))
    parameters = dict(p.split("=") for p in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters.split(","))
    assert "weights" not in parameters and "precision" not in parameters
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == __version__
