"""DICOM outputs: the labelmap as a DICOM Segmentation, the heatmap as a DICOM Parametric Map.

Both objects are derived from the DICOM series the result was computed on (``source_files``, the
series' single-frame instances): they carry its patient, study and frame of reference, reference
its instances frame by frame, and place every frame exactly on its source instance, so that a PACS
viewer, OHIF or 3D Slicer shows them over the images.

- :func:`write_dicom_seg`: ``result.labelmap`` as a BINARY Segmentation (SOP class
  1.2.840.10008.5.1.4.1.1.66.4) with one segment "Anomaly" (algorithm type from
  :func:`segment_algorithm_type`, algorithm "HiMatch-AD" with the version that computed the result
  (AlgorithmVersion), and AlgorithmParameters: the method and its revision, the model, the first
  16 hex digits of its weights digest (``weights=sha256:...``), the precision, and the threshold
  with where it came from; category and type SCT 49755003 "Morphologically Altered
  Structure", the terminology the Slicer module gives its segment, see :data:`SEGMENT_TYPE`).
  Every source instance gets one frame, empty or not (``omit_empty_frames=False``): the frame count
  is always the number of slices, an empty labelmap gives a valid object of empty frames, and
  viewers that expect one frame per slice show it.
- :func:`write_dicom_heatmap`: ``result.heatmap`` (float32) as a Parametric Map (SOP class
  1.2.840.10008.5.1.4.1.1.30) with 32-bit float pixels and a Real World Value Mapping (identity,
  unit UCUM "1" "no units", LUT label "anomaly score") and a window from
  :meth:`DetectionResult.display_range`.

Both carry the result's provenance where DICOM has a place for it: SeriesDescription
``HiMatch-AD <version> <method> anomalies`` / ``... anomaly score``, ContentCreatorName
``HiMatch-AD^`` (the algorithm, no person), SoftwareVersions (the package writing the object), and
for the parametric map, which has no algorithm identification, the weights digest's first 16 hex
digits and the model (as much as fits) in ContentDescription (:func:`heatmap_content_description`). The whole provenance is in the scores JSON.

Geometry. ``result`` arrays are ``(nz, ny, nx)`` = (slice, row, column), as
``SimpleITK.GetArrayFromImage`` returns a series read by :func:`HiMatchADLib.io.readers.read_image`:
a row of a DICOM frame runs along ``direction[:, 0]`` (first three values of
ImageOrientationPatient), a column along ``direction[:, 1]``, PixelSpacing is ``(spacing[1],
spacing[0])`` (between rows, between columns) and Rows x Columns is ``ny x nx``. Before anything is
written, each source instance's ImagePositionPatient is expressed as a grid index of
``result.geometry``; it must fall on a grid point of the first row and column of one slice
(within :data:`TOLERANCE` of a voxel), and every slice must have exactly one instance. Slice ``k``
is written with the instance found at ``k``, whatever the order of the files or their
InstanceNumbers. Another grid, a missing or extra instance, a sheared or multi-frame series is
refused with :class:`HiMatchADError`.

Writing follows :func:`HiMatchADLib.io.writers.write_image`: a temporary name beside the destination,
read back with pydicom and checked (SOP class and instance, number of frames, the pixels of every
frame against the slice of the source instance it references), then renamed.

highdicom and pydicom are optional (``pip install "himatchad[dicom]"``) and imported only here,
inside the functions.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import HiMatchADError
from ..core.geometry import DIRECTION_TOLERANCE  # source direction cosines vs the result's direction matrix
from ..core.result import DetectionResult
from ..core.version import __version__

SEGMENT_LABEL = "Anomaly"


#: The same codes as the "Anomaly" segment of the Slicer module (``mrml.SEGMENT_CATEGORY`` /
#: ``mrml.SEGMENT_TYPE``): (scheme, value, meaning). The category is the one of Slicer's DICOM
#: master list (CID 7150) for findings; the code meaning is Slicer's, so that its terminology
#: resolves the code.
SEGMENT_CATEGORY = ("SCT", "49755003", "Morphologically Altered Structure")


#: The type is the category's own code, SNOMED's root of morphologic abnormalities: the map flags
#: voxels unlike the normal scans and says nothing about what they are (oedema, artefact, tumour
#: alike). Every type that Slicer's terminologies list under this category (a subset of CID 7159:
#: Mass, Nodule, Cyst, Edema, Hemorrhage, Necrosis, Neoplasm, ...) names a particular finding, and
#: "Lesion" (SCT 52988006, in CID 7159 but not in Slicer's lists) still asserts a lesion.
SEGMENT_TYPE = ("SCT", "49755003", "Morphologically Altered Structure")


AUTOMATIC = "AUTOMATIC"


SEMIAUTOMATIC = "SEMIAUTOMATIC"


def detector_threshold(result: DetectionResult) -> float:
    """The threshold the detection itself chose for ``result``: the calibrated one, or the fixed
    number it was configured with (``--threshold``).

    Read from ``threshold_info["calibrated_threshold"]`` when the detector recorded it, else from a
    fixed threshold in ``settings["threshold"]``, else the result's current threshold (a result
    that records neither is taken as the detector made it).
    """
    info = result.threshold_info or {}
    for value in (info.get("calibrated_threshold"), (result.settings or {}).get("threshold")):
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value):
            return value
    return float(result.threshold)


def algorithm_type(threshold: float, chosen_by_detector: float, edited: bool) -> str:
    """DICOM SegmentAlgorithmType of an anomaly segment.

    AUTOMATIC ("calculated automatically, no user intervention"): the segment is what the detection
    computed, at the threshold it chose before anyone saw the map (calibrated on normals, or a fixed
    number given as a setting of the run, e.g. ``--threshold``: that is a parameter of the algorithm,
    recorded in AlgorithmParameters, not an intervention in the calculation). SEMIAUTOMATIC
    ("calculated with user assistance"): a person changed the result afterwards, by editing the
    segment or by moving the threshold away from the one of the run while looking at the map.
    """
    if edited or float(threshold) != float(chosen_by_detector):
        return SEMIAUTOMATIC
    return AUTOMATIC


def segment_algorithm_type(result: DetectionResult) -> str:
    """:func:`algorithm_type` of the segment :func:`write_dicom_seg` writes for ``result``: the
    labelmap counts as edited when it is not the one the result's threshold gives."""
    labelmap = np.asarray(result.labelmap) > 0
    edited = not np.array_equal(labelmap, result.labelmap_at(result.threshold) > 0)
    return algorithm_type(result.threshold, detector_threshold(result), edited)


def threshold_source(result: DetectionResult) -> str:
    """What AlgorithmParameters says about the threshold: ``calibrated``, ``fixed`` or ``adjusted``."""
    if float(result.threshold) != detector_threshold(result):
        return "adjusted"
    return "fixed" if (result.threshold_info or {}).get("mode") == "fixed" else "calibrated"


ALGORITHM_NAME = "HiMatch-AD"


MANUFACTURER = "HiMatch-AD"


#: What the heatmap's values are. No standard code names an anomaly score, so a private coding
#: scheme (DICOM reserves designators starting with "99" for them) says it.
QUANTITY = ("99HIMATCHAD", "ANOMALY_SCORE", "Anomaly score")


UNIT = ("UCUM", "1", "no units")


LUT_LABEL = "anomaly score"


#: What each object's SeriesDescription says after ``HiMatch-AD <version> <method>``
#: (:func:`series_description`).
SEG_WHAT = "anomalies"


HEATMAP_WHAT = "anomaly score"


#: ContentCreatorName (PN) of both objects: no person made them, the algorithm did (the name's
#: family-name component); the model and weights are in AlgorithmParameters (SEG) and
#: ContentDescription (parametric map), the whole provenance in the scores JSON.
CONTENT_CREATOR = "HiMatch-AD^"  # a single-component name: the trailing caret says so


#: Series numbers of the written objects (a viewer lists them after the usual acquisition series).
SEG_SERIES_NUMBER = 901


HEATMAP_SERIES_NUMBER = 902


#: Largest distance, in voxels along each grid axis, between a source instance's position and the
#: grid point of its slice (DICOM stores positions as decimal strings; a real mismatch is larger).
TOLERANCE = 0.05



SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


PARAMETRIC_MAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"


PathLike = Union[str, os.PathLike]


def require():
    """Raise :class:`HiMatchADError` with the install command when highdicom is missing (checked
    before any work is done)."""
    _dicom_modules()


def _dicom_modules():
    """``(highdicom, pydicom)``, or a :class:`HiMatchADError` that says how to install them."""
    try:
        import highdicom
        import pydicom
    except ImportError as exc:
        raise HiMatchADError(
            f'writing DICOM SEG or Parametric Map objects needs highdicom ({exc}); install it with: pip install "himatchad[dicom]" '
            "(or pip install highdicom)"
        ) from exc
    return highdicom, pydicom


#: Type 2 attributes (required, may be empty) of the patient, study and series modules that the
#: derived objects copy from their source. Anonymised series often drop them; an empty value is what
#: the standard prescribes when the value is unknown.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


def _read_source(pydicom, path: Path):
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        return ds
    except FileNotFoundError as exc:
        raise HiMatchADError(f"DICOM source file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise HiMatchADError(f"{path} is a folder; give the DICOM files of the series, one per slice") from exc
    except OSError as exc:
        raise HiMatchADError(f"cannot read the DICOM file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # pydicom's InvalidDicomError and decoding errors
        raise HiMatchADError(f"{path} is not a readable DICOM file: {exc}") from exc


def _floats(ds, keyword: str, n: int, path: Path) -> np.ndarray:
    value = getattr(ds, keyword, None)
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.size != n or not np.all(np.isfinite(out)):
        raise HiMatchADError(f"{path} has no valid {keyword}; a DICOM SEG or Parametric Map needs the patient geometry of every slice")
    return out


def match_source_instances(result: DetectionResult, source_files: Sequence[PathLike]) -> list:
    """The pydicom datasets (without pixel data) of ``source_files`` ordered by the result's slice
    index: item ``k`` is the instance that lies at slice ``k`` of ``result.geometry``.

    Raises :class:`HiMatchADError` when the files are not one series of single-frame images whose
    grid is exactly the result's (size, pixel spacing, orientation and each instance's position).
    """
    _, pydicom = _dicom_modules()
    geometry = result.geometry
    nz, ny, nx = geometry.shape
    for name in ("labelmap", "heatmap"):
        shape = tuple(np.shape(getattr(result, name)))
        if shape != (nz, ny, nx):
            raise HiMatchADError(f"the result's {name} has shape {shape}, not the shape {(nz, ny, nx)} of its geometry")
    if geometry.is_2d:
        raise HiMatchADError(
            "the result was computed on a 2D image file, which has no patient position to match with a DICOM series; "
            "run the detection on the DICOM file or series folder itself"
        )
    paths = [Path(p) for p in source_files]
    if not paths:
        raise HiMatchADError("no DICOM source files given; a DICOM SEG or Parametric Map references the series it was computed on")
    datasets = [_read_source(pydicom, p) for p in paths]

    first, first_path = datasets[0], paths[0]
    seen_uids: dict = {}
    for ds, p in zip(datasets, paths):
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not str(getattr(ds, key, "")).strip():
                raise HiMatchADError(f"{p} has no {key}; it cannot be referenced by a DICOM object")
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if getattr(ds, key, None) != getattr(first, key, None):
                raise HiMatchADError(f"{p} and {first_path} belong to different series ({key} differs); give the files of one series")
        uid = str(getattr(ds, "SOPInstanceUID", ""))
        if uid in seen_uids:
            raise HiMatchADError(f"{p} and {seen_uids[uid]} are the same instance (SOPInstanceUID {uid}); give each file once")
        seen_uids[uid] = p
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames != 1:
            raise HiMatchADError(f"{p} is a multi-frame instance ({frames} frames); only series of single-frame images are supported")
        rows, cols = int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))
        if (rows, cols) != (ny, nx):
            raise HiMatchADError(f"{p} has {rows} rows x {cols} columns but the result has {ny} x {nx}: it was computed on another image")

    # The source's grid, told by its own attributes, against the result's geometry.
    direction = geometry.direction
    spacing = np.asarray(geometry.spacing, dtype=float)
    for ds, p in zip(datasets, paths):
        iop = _floats(ds, "ImageOrientationPatient", 6, p)
        row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
        if max(np.max(np.abs(row_dir - direction[:, 0])), np.max(np.abs(col_dir - direction[:, 1]))) > DIRECTION_TOLERANCE:
            raise HiMatchADError(
                f"{p} has the orientation {np.round(iop, 5).tolist()} but the result's rows and columns run along "
                f"{np.round(direction[:, 0], 5).tolist()} and {np.round(direction[:, 1], 5).tolist()}: it was computed on another grid"
            )
        pixel_spacing = _floats(ds, "PixelSpacing", 2, p)  # (between rows, between columns)
        if not np.allclose(pixel_spacing, (spacing[1], spacing[0]), rtol=1e-4, atol=1e-6):
            raise HiMatchADError(
                f"{p} has the pixel spacing {pixel_spacing.tolist()} mm but the result's is {[spacing[1], spacing[0]]} mm "
                "(between rows, between columns): it was computed on another grid"
            )

    # Each instance's position as an index of the result's grid: (i, j) = (0, 0), k = its slice.
    to_index = np.linalg.inv(direction * spacing)  # physical = origin + (direction * spacing) @ ijk
    origin = np.asarray(geometry.origin, dtype=float)
    at_slice: dict = {}
    for ds, p in zip(datasets, paths):
        ijk = to_index @ (_floats(ds, "ImagePositionPatient", 3, p) - origin)
        k = int(np.rint(ijk[2]))
        off = np.abs(ijk - (0.0, 0.0, k))
        if off[0] > TOLERANCE or off[1] > TOLERANCE:
            raise HiMatchADError(
                f"{p} lies {off[0]:.3g} columns and {off[1]:.3g} rows beside the result's grid (a sheared series, or "
                "another grid); the result cannot be placed on it"
            )
        if off[2] > TOLERANCE or not 0 <= k < nz:
            raise HiMatchADError(
                f"{p} lies at slice {ijk[2]:.3f} of the result's grid of {nz} slices, not on one of its slices: "
                "it was computed on another grid (other spacing or position)"
            )
        if k in at_slice:
            raise HiMatchADError(f"{p} and {at_slice[k][1]} both lie at slice {k}; give the files of one volume, each once")
        at_slice[k] = (ds, p)
    missing = [k for k in range(nz) if k not in at_slice]
    if missing:
        shown = ", ".join(str(k) for k in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise HiMatchADError(
            f"the DICOM source has no instance at slice {shown} of the result's {nz} slices ({len(paths)} files given); "
            "a file of the series is missing"
        )
    return [at_slice[k][0] for k in range(nz)]


def _frame_source_uid(item) -> str:
    """ReferencedSOPInstanceUID of one per-frame functional group item's derivation."""
    try:
        return str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
    except (AttributeError, IndexError):
        return ""


def _save_verified(pydicom, dataset, path: Path, sop_class: str, expected: np.ndarray, sources: list) -> Path:
    """Write ``dataset`` atomically to ``path`` and check what was written: its SOP class and
    instance, one frame per source instance, and each frame's pixels equal to ``expected[k]`` for
    the source instance ``sources[k]`` it references."""
    slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(sources)}
    if path.is_dir():
        raise HiMatchADError(f"cannot write {path}: it is a folder; give a file name (e.g. {path / 'anomalies.dcm'})")
    try:
        with atomic_path(path) as tmp:
            if int(pydicom.__version__.split(".")[0]) >= 3:
                dataset.save_as(str(tmp), enforce_file_format=True)
            else:  # pragma: no cover - pydicom 2
                dataset.save_as(str(tmp), write_like_original=False)
            try:
                back = pydicom.dcmread(str(tmp))
                frames = back.pixel_array
            except Exception as exc:
                raise HiMatchADError(f"writing {path} failed: the file read back is incomplete (disk full?): {exc}") from exc
            n = int(getattr(back, "NumberOfFrames", 1) or 1)
            frames = np.asarray(frames).reshape(n, *expected.shape[1:])
            problem = None
            if str(back.SOPClassUID) != sop_class or str(back.SOPInstanceUID) != str(dataset.SOPInstanceUID):
                problem = f"SOP class {back.SOPClassUID} instead of {sop_class}"
            elif n != expected.shape[0]:
                problem = f"{n} frames instead of {expected.shape[0]}"
            else:
                groups = back.PerFrameFunctionalGroupsSequence
                ks = [slice_of.get(_frame_source_uid(item), -1) for item in groups]
                if sorted(ks) != list(range(expected.shape[0])):
                    problem = "frames that do not reference each source instance once"
                elif any(not np.array_equal(frames[i], expected[k]) for i, k in enumerate(ks)):
                    problem = "different pixel values"
            if problem is not None:
                raise HiMatchADError(f"writing {path} failed: the file read back has {problem}; check the disk and write again")
    except OSError as exc:
        raise HiMatchADError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def _equipment(result: DetectionResult) -> dict:
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": f"{ALGORITHM_NAME} {result.method}",
        "software_versions": __version__,
        # Type 1 in the Enhanced General Equipment module; software has no serial number.
        "device_serial_number": __version__,
        "instance_number": 1,
    }


def _model_name(result: DetectionResult) -> str:
    """The model as a DICOM text may show it: a Hub id, or a local folder's name."""
    text = str(result.model or "")
    return Path(text).name if os.path.isabs(text) else text


def heatmap_content_description(result: DetectionResult) -> str:
    """ContentDescription of the parametric map (LO, at most 64 characters): ``HiMatch-AD <method>;
    sha256:<16 hex of the weights digest>; <model>``, the model cut where it does not fit (the
    digest names the weights; the scores JSON has the whole provenance). Without a digest:
    ``HiMatch-AD <method> anomaly score; <model>``."""
    digest = weights_digest_prefix(result)
    parts = [f"{ALGORITHM_NAME} {result.method}" + ("" if digest else " anomaly score")] + [x for x in (digest, _model_name(result)) if x]
    return "; ".join(parts)[:64]


def _parameter(value) -> str:
    """A value for AlgorithmParameters, which highdicom writes as ``key=value,key=value``."""
    text = str(value)
    if os.path.isabs(text):  # a local model folder: its name, not the user's folders
        text = Path(text).name
    return text.replace(",", ";").replace("=", ":")


#: Hex digits of the weights digest that AlgorithmParameters and ContentDescription carry (enough to
#: tell two sets of weights apart; the scores JSON's provenance has the whole digest).
DIGEST_PREFIX = 16


def weights_digest_prefix(result: DetectionResult) -> str:
    """``"sha256:<first 16 hex digits>"`` of the weights the result was computed with ("" when its
    provenance records none)."""
    digest = ((result.provenance or {}).get("model") or {}).get("weights_digest")
    if not isinstance(digest, str) or not digest:
        return ""
    algo, _, hexdigits = digest.partition(":")
    return f"{algo}:{hexdigits[:DIGEST_PREFIX]}" if hexdigits else digest[:DIGEST_PREFIX]


def series_description(result: DetectionResult, what: str) -> str:
    """SeriesDescription (LO, at most 64 characters): ``HiMatch-AD <version> <method> <what>``."""
    return f"{ALGORITHM_NAME} {_version(result)} {result.method} {what}"[:64]


def _version(result: DetectionResult) -> str:
    """The tool version that made the result (its provenance's, else this package's)."""
    return str((result.provenance or {}).get("version") or __version__)


def write_dicom_seg(result: DetectionResult, source_files: Sequence[PathLike], path: PathLike) -> Path:
    """Write ``result.labelmap`` as a DICOM Segmentation (BINARY, one segment "Anomaly") of the
    series ``source_files`` (its DICOM files; any order) to ``path``; returns ``path``.

    See the module docstring for what the object holds and what is checked. Raises
    :class:`HiMatchADError` when the series is not the result's grid, when highdicom is missing,
    or when the file cannot be written.
    """

    hd, pydicom = _dicom_modules()
    sources = match_source_instances(result, source_files)
    labelmap = (np.asarray(result.labelmap) > 0).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"),
        version=_version(result),
        source=MANUFACTURER,
        parameters={
            key: _parameter(value)
            for key, value in (
                ("method", result.method),
                ("method_revision", (result.provenance or {}).get("method_revision", "")),
                ("model", result.model),
                ("weights", weights_digest_prefix(result)),
                ("precision", (result.provenance or {}).get("precision", "")),
                ("threshold", f"{float(result.threshold):.6g}"),
                ("threshold_source", threshold_source(result)),
                ("min_component_size", int(result.min_component_size)),
            )
            if str(value)
        },
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=hd.sr.CodedConcept(SEGMENT_CATEGORY[1], SEGMENT_CATEGORY[0], SEGMENT_CATEGORY[2]),
        segmented_property_type=hd.sr.CodedConcept(SEGMENT_TYPE[1], SEGMENT_TYPE[0], SEGMENT_TYPE[2]),
        algorithm_type=getattr(hd.seg.SegmentAlgorithmTypeValues, segment_algorithm_type(result)),
        algorithm_identification=algorithm,
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=labelmap,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            series_description=series_description(result, SEG_WHAT),
            content_label="ANOMALIES",
            content_description=f"{ALGORITHM_NAME} {result.method}: voxels above the threshold {float(result.threshold):.6g}"[:64],
            content_creator_name=CONTENT_CREATOR,
            omit_empty_frames=False,
            **_equipment(result),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise HiMatchADError(f"cannot build a DICOM SEG from {len(sources)} source instances: {exc}") from exc
    return _save_verified(pydicom, seg, Path(path), SEG_SOP_CLASS, labelmap, sources)


def write_dicom_heatmap(result: DetectionResult, source_files: Sequence[PathLike], path: PathLike) -> Path:
    """Write ``result.heatmap`` as a DICOM Parametric Map (float32 pixels, identity Real World
    Value Mapping "anomaly score", no units) of the series ``source_files`` to ``path``; returns
    ``path``. Checks and errors as :func:`write_dicom_seg`; a heatmap with NaN or infinite values
    is refused."""
    hd, pydicom = _dicom_modules()
    sources = match_source_instances(result, source_files)
    heatmap = np.ascontiguousarray(result.heatmap, dtype=np.float32)
    if not np.all(np.isfinite(heatmap)):
        raise HiMatchADError("the heatmap holds NaN or infinite values; a Parametric Map of it would be unreadable. Run the detection again")
    low_value, high_value = float(heatmap.min()), float(heatmap.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation=f"{ALGORITHM_NAME} {result.method} anomaly score (threshold {float(result.threshold):.6g})"[:64],
        unit=hd.sr.CodedConcept(UNIT[1], UNIT[0], UNIT[2]),
        value_range=(low_value, high_value),
        slope=1.0,
        intercept=0.0,
        quantity_definition=hd.sr.CodedConcept(QUANTITY[1], QUANTITY[0], QUANTITY[2]),
    )
    low, high = result.display_range()
    window = {"window_center": (low + high) / 2.0, "window_width": high - low}
    if "voi_lut_transformations" in inspect.signature(hd.pm.ParametricMap.__init__).parameters:  # newer highdicom: the window arguments are deprecated
        window = {"voi_lut_transformations": [hd.VOILUTTransformation(**window)]}
    try:
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=heatmap,
            series_instance_uid=hd.UID(),
            series_number=HEATMAP_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            **window,
            series_description=series_description(result, HEATMAP_WHAT),
            content_label="ANOMALY_SCORE",
            content_description=heatmap_content_description(result),
            content_creator_name=CONTENT_CREATOR,
            **_equipment(result),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise HiMatchADError(f"cannot build a DICOM Parametric Map from {len(sources)} source instances: {exc}") from exc
    return _save_verified(pydicom, pm, Path(path), PARAMETRIC_MAP_SOP_CLASS, heatmap, sources)
