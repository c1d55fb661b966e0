"""Finding and describing DICOM series: which series a folder holds, in which slice order, under which
case name, and whether each can be read as one volume.

A folder may hold several series (a study: a localizer, T1, FLAIR, a DICOM SEG...). Every series is
described by a frozen, picklable :class:`DicomSeries` (files in slice order, modality, description,
series number, the case name its outputs get, and ``problem``: why it cannot be analysed, or ``""``).
Reading the pixels is :mod:`HiMatchADLib.io.readers`'s job (``read_image(series)`` reads exactly
``series.files``); nothing here reads pixel data.

Only headers are read, with pydicom (``stop_before_pixels``). A file is a DICOM candidate when it
carries the ``DICM`` marker at byte 128, or has a ``.dcm``/``.ima`` suffix and parses as DICOM.

Case names (:func:`find_series`): a folder whose series include exactly one image series (DICOM
SEG, SR, presentation states and other non-image objects not counted) names that series after the
folder, as before series were told apart. Otherwise each series is named
``<folder>_s<SeriesNumber>_<description>`` (sanitised), with a short hash of the series UID
instead of the number when there is none, and appended when two names would clash.

Unusable series (``problem`` set): non-image objects (by SOP Class UID), images without pixel
matrix, localizers (Image Type LOCALIZER, or a few slices in several orientations), slices of
different sizes, pixel spacings or orientations, multi-frame objects without a position and an
orientation per frame, series split over several folders, and series that no regular grid
represents: sheared (tilted gantry), several slices at one position, uneven slice steps.

Series filters (:func:`parse_series_filters`): ``KEY=VALUE`` (exact, case-insensitive),
``KEY~REGEX`` (case-insensitive regular-expression search), ``KEY!=VALUE`` and ``KEY!~REGEX``
(negations), with KEY one of ``modality``, ``description``, ``number`` (series number) and ``uid``.
Terms joined by commas must all match; a series is selected when any one of several filters
matches (the option is repeatable). Non-DICOM inputs are not filtered.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..core.errors import HiMatchADError
from ..core.geometry import DIRECTION_TOLERANCE
from .formats import DICOM_SUFFIXES, IMAGE_SUFFIXES, NON_DICOM_SUFFIXES, VOLUME_SUFFIXES
from .series_filters import matches

#: Storage SOP classes that hold no image to analyse (or a derived object of this tool's kind).
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66": "raw data",
    "1.2.840.10008.5.1.4.1.1.66.1": "a spatial registration",
    "1.2.840.10008.5.1.4.1.1.66.2": "spatial fiducials",
    "1.2.840.10008.5.1.4.1.1.66.3": "a deformable spatial registration",
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG (segmentation)",
    "1.2.840.10008.5.1.4.1.1.66.5": "a surface segmentation",
    "1.2.840.10008.5.1.4.1.1.66.6": "a tractography result",
    "1.2.840.10008.5.1.4.1.1.67": "a real world value mapping",
    "1.2.840.10008.5.1.4.1.1.30": "a parametric map",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "an encapsulated CDA document",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT dose",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set",
    "1.2.840.10008.5.1.4.1.1.481.5": "an RT plan",
    "1.2.840.10008.1.3.10": "a DICOMDIR (media directory)",
}


#: SOP class families without images: structured reports (SR, key objects), presentation states,
#: RT treatment records, waveforms.
NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.481.4": "an RT treatment record",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
}


#: Tolerances of the geometry checks: mm, and the relative tolerance of slice steps.
_POSITION_TOL_MM = 1e-3


_STEP_RTOL = 0.01


_ORIENTATION_TOL = DIRECTION_TOLERANCE


_HEADER_TAGS = [
    "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
    "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "NumberOfFrames", "Rows",
    "Columns", "PixelSpacing",
]


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of one folder, as found by :func:`find_series` (picklable, immutable).

    ``files`` are the series' files in slice order (ascending along the slice normal when the
    files carry patient positions). ``name`` is the case name its outputs get; ``problem`` says why
    the series cannot be analysed (``""`` when it can). ``origin``, ``direction`` (row-major 3x3,
    columns: row, column and slice directions, LPS) and ``slice_step`` are the grid the headers
    describe (empty when the files carry no patient geometry); reading checks ITK's grid against them.
    For a multi-frame object (one file), ``frame_order`` lists its frames in slice order.
    """

    folder: Path
    series_uid: str
    files: tuple
    name: str
    modality: str = ""
    description: str = ""
    series_number: Optional[int] = None
    sop_class_uid: str = ""
    study_uid: str = ""
    image_type: tuple = ()
    frames: int = 1
    is_image: bool = True
    problem: str = ""
    origin: tuple = ()
    direction: tuple = ()
    slice_step: float = 0.0
    frame_order: tuple = ()

    @property
    def n_files(self) -> int:
        return len(self.files)

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def uid_hash(self) -> str:
        return _short_hash(self.series_uid)

    def describe(self) -> str:
        """``name: UID (N files, MODALITY DESCRIPTION)``, as listed in messages."""
        what = " ".join(v for v in (self.modality, self.description) if v)
        number = f"series {self.series_number}" if self.series_number is not None else ""
        details = ", ".join(v for v in (f"{self.n_files} files", number, what) if v)
        return f"{self.name}: {self.series_uid} ({details})"

    def where(self) -> str:
        """``name (series N, MODALITY 'description') in FOLDER`` for error messages."""
        bits = [f"series {self.series_number}" if self.series_number is not None else f"UID {self.series_uid}"]
        what = " ".join(v for v in (self.modality, f"'{self.description}'" if self.description else "") if v)
        if what:
            bits.append(what)
        return f"{self.name} ({', '.join(bits)}) in {self.folder}"

    def unusable_error(self) -> HiMatchADError:
        return HiMatchADError(f"the DICOM series {self.where()} {self.problem}")

    def to_dict(self) -> dict:
        """What a scores JSON records about its source series."""
        return {
            "series_uid": self.series_uid, "modality": self.modality, "description": self.description,
            "series_number": self.series_number, "files": self.n_files, "frames": self.frames,
            "sop_class_uid": self.sop_class_uid, "study_uid": self.study_uid,
        }


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------- files
def is_dicom_candidate(path: Path) -> bool:
    """A plain, non-hidden file that may be DICOM (not one of the image, text or data suffixes)."""

    name = path.name.lower()
    return not path.name.startswith(".") and not name.endswith(VOLUME_SUFFIXES + IMAGE_SUFFIXES + NON_DICOM_SUFFIXES) and path.is_file()


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` carries the DICOM file marker (``DICM`` at byte 128), or has a DICOM
    suffix and parses as DICOM."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return path.name.lower().endswith(DICOM_SUFFIXES) and _read_header(path) is not None


def _read_header(path: Path, full: bool = False):
    """The header of a DICOM file (no pixel data) or None when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if full:
            return pydicom.dcmread(str(path), stop_before_pixels=True)
        force = path.name.lower().endswith(DICOM_SUFFIXES)
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=force)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError):
        return None
    if not full and "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        return None  # forced reading of a file that is not DICOM
    return ds


def pixel_header(path) -> Optional[object]:
    """The full header (no pixel data) of one DICOM file, or None when it cannot be read."""
    return _read_header(Path(path), full=True)


def monochrome1_inverted_by_reader(path, read_slice: Optional[np.ndarray]) -> bool:
    """Whether the slice ``read_slice`` that ITK/GDCM read from the MONOCHROME1 file ``path`` is the
    inverse of the file's stored values (GDCM inverts MONOCHROME1; its stored values are compared
    here, so another reader that does not is noticed). True when it cannot be told (no slice, pixel
    data pydicom cannot decode, a constant slice)."""
    if read_slice is None:
        return True
    try:
        import pydicom

        stored = np.asarray(pydicom.dcmread(str(path)).pixel_array, dtype=np.float64)
    except Exception:  # compressed pixel data without a decoder, or an unreadable file: GDCM's rule
        return True
    a = np.asarray(read_slice, dtype=np.float64)
    if stored.shape != a.shape or stored.std() == 0 or a.std() == 0:
        return True
    return bool(np.corrcoef(stored.ravel(), a.ravel())[0, 1] < 0)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _floats(ds, keyword: str, n: int) -> Optional[np.ndarray]:
    value = ds.get(keyword)
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.size == n and np.all(np.isfinite(out)) else None


def _int(ds, keyword: str) -> Optional[int]:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass
class _File:
    path: str
    series_uid: str
    sop_class: str
    study_uid: str
    modality: str
    description: str
    number: Optional[int]
    image_type: tuple
    position: Optional[np.ndarray]
    orientation: Optional[np.ndarray]
    instance: Optional[int]
    frames: int
    rows: Optional[int]
    cols: Optional[int]
    spacing: Optional[np.ndarray]


def _describe_file(path: Path) -> Optional[_File]:
    ds = _read_header(path)
    if ds is None:
        return None
    series_uid = _text(ds, "SeriesInstanceUID")
    if not series_uid:
        return None  # a DICOMDIR or a file outside any series
    image_type = tuple(v.strip().upper() for v in _text(ds, "ImageType").split("\\") if v.strip())
    return _File(
        path=str(path), series_uid=series_uid, sop_class=_text(ds, "SOPClassUID"), study_uid=_text(ds, "StudyInstanceUID"),
        modality=_text(ds, "Modality").upper(), description=_text(ds, "SeriesDescription"), number=_int(ds, "SeriesNumber"),
        image_type=image_type, position=_floats(ds, "ImagePositionPatient", 3), orientation=_floats(ds, "ImageOrientationPatient", 6),
        instance=_int(ds, "InstanceNumber"), frames=max(_int(ds, "NumberOfFrames") or 1, 1), rows=_int(ds, "Rows"),
        cols=_int(ds, "Columns"), spacing=_floats(ds, "PixelSpacing", 2),
    )


def _non_image(sop_class: str) -> str:
    """What a non-image SOP class holds ("" for image classes)."""
    if sop_class in NON_IMAGE_SOP_CLASSES:
        return NON_IMAGE_SOP_CLASSES[sop_class]
    return next((what for prefix, what in NON_IMAGE_SOP_PREFIXES.items() if sop_class.startswith(prefix)), "")


def _sop_name(sop_class: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(sop_class).name
    except (ImportError, ValueError):
        name = sop_class
    return name if name and name != sop_class else sop_class


# ------------------------------------------------------------------------------- geometry checks
def _frame_geometry(path: str) -> tuple:
    """Per-frame ``(positions, orientations, rescales)`` of a multi-frame object (None where a frame
    lacks one; a rescale is ``(slope, intercept)``)."""
    ds = _read_header(Path(path), full=True)
    if ds is None:
        return [], [], []
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if not per_frame:
        per_frame = [None] * max(_int(ds, "NumberOfFrames") or 1, 1)

    def item(groups, seq: str, keyword: str, n: int):
        for g in (groups, shared):  # a per-frame value, else the shared one
            if g is not None and seq in g and g[seq].value:
                value = _floats(g[seq][0], keyword, n) if n else g[seq][0].get(keyword)
                if value is not None:
                    return value
        return None

    positions = [item(g, "PlanePositionSequence", "ImagePositionPatient", 3) for g in per_frame]
    orientations = [item(g, "PlaneOrientationSequence", "ImageOrientationPatient", 6) for g in per_frame]
    rescales = [
        (item(g, "PixelValueTransformationSequence", "RescaleSlope", 0), item(g, "PixelValueTransformationSequence", "RescaleIntercept", 0))
        for g in per_frame
    ]
    return positions, orientations, [tuple(str(v) for v in r) for r in rescales]


def _grid_problem(positions: Sequence[np.ndarray], normal: np.ndarray, what: str = "slices") -> str:
    """Why slices at ``positions`` (in slice order, ascending along ``normal``) lie on no regular
    grid, or ""."""
    along = np.array([float(normal @ p) for p in positions])
    if len(positions) < 2:
        return ""
    gaps = np.diff(along)
    if np.min(gaps) < _POSITION_TOL_MM:
        return (
            f"has several {what} at one position ({len(positions)} {what}; several echoes, phases or a duplicated slice?). "
            "Put the slices of one volume in a series of their own, or choose another series"
        )
    first, last = positions[0], positions[-1]
    length = along[-1] - along[0]
    across = float(np.linalg.norm((last - first) - length * normal))
    if across > max(0.01 * abs(length), _POSITION_TOL_MM):
        return (
            f"is sheared: its slices are shifted sideways by {across:.3g} mm over {abs(length):.3g} mm (a tilted gantry?); "
            "read as an orthogonal grid its voxels would be misplaced. Resample it to an orthogonal grid first (e.g. 3D "
            "Slicer's DICOM import with acquisition geometry regularization) and save it as NIfTI/NRRD"
        )
    step = float(np.median(gaps))
    tol = max(_STEP_RTOL * step, _POSITION_TOL_MM)
    odd = [i for i, g in enumerate(gaps) if abs(g - step) > tol]
    if odd:
        detail = ", ".join(f"{gaps[i]:.3g} mm after slice {i + 1}" for i in odd[:5])
        return (
            f"is not evenly spaced: slices are {step:.3g} mm apart except {detail} ({len(positions)} {what}; a missing or "
            "duplicated slice?). Complete the series, or resample it to a regular grid and save it as NIfTI/NRRD first"
        )
    return ""


def _orientations_differ(orientations: Sequence[np.ndarray]) -> int:
    """How many distinct orientations ``orientations`` hold."""
    distinct: list = []
    for o in orientations:
        if not any(np.max(np.abs(o - d)) <= _ORIENTATION_TOL for d in distinct):
            distinct.append(o)
    return len(distinct)


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / max(float(np.linalg.norm(n)), 1e-12)


def _describe_series(folder: Path, files: list) -> DicomSeries:
    """One series from the headers of its files: slice order, geometry and, when it cannot be read
    as one volume, the problem."""
    first = files[0]
    sop = first.sop_class
    base = dict(
        folder=folder, series_uid=first.series_uid, name="", modality=first.modality, description=first.description,
        series_number=first.number, sop_class_uid=sop, study_uid=first.study_uid, image_type=first.image_type,
        frames=sum(f.frames for f in files),
    )
    paths = tuple(f.path for f in sorted(files, key=lambda f: (f.instance if f.instance is not None else 0, f.path)))

    def unusable(problem: str, is_image: bool = True, ordered: Optional[tuple] = None) -> DicomSeries:
        return DicomSeries(files=ordered or paths, is_image=is_image, problem=problem, **base)

    what = _non_image(sop)
    if what:
        return unusable(f"is not an image but {what} ({_sop_name(sop)}); there is nothing to analyse in it", is_image=False)
    if any(f.rows is None or f.cols is None for f in files):
        return unusable(f"holds no image matrix ({_sop_name(sop)}); there is nothing to analyse in it", is_image=False)
    if "LOCALIZER" in first.image_type:
        image_type = "\\".join(first.image_type)
        return unusable(f"is a localizer (scout; Image Type {image_type}), not a volume to analyse")
    if len({(f.rows, f.cols) for f in files}) > 1:
        sizes = sorted({f"{f.cols}x{f.rows}" for f in files})
        return unusable(f"has slices of different sizes ({', '.join(sizes[:4])}); it is not one volume")
    multi = [f for f in files if f.frames > 1]
    if multi and len(files) > 1:
        return unusable(
            f"holds {len(files)} files of which {len(multi)} are multi-frame objects; one volume is either one multi-frame "
            "object or single-frame slices. Convert it with a DICOM converter first"
        )
    if multi:
        positions, orientations, rescales = _frame_geometry(first.path)
        if not positions or any(p is None for p in positions) or any(o is None for o in orientations):
            return unusable(
                "is a multi-frame (enhanced) object without a position and an orientation for each frame; its frames "
                "cannot be placed in space. Convert it to single-frame files or NIfTI with a DICOM converter first"
            )
        if len(set(rescales)) > 1:
            return unusable("is a multi-frame object whose frames have different rescale slopes or intercepts; convert it first")
        return _placed(base, paths, positions, orientations, "frames", unusable)
    if sum(f.spacing is not None for f in files) not in (0, len(files)) or (
        files[0].spacing is not None and any(np.max(np.abs(f.spacing - files[0].spacing)) > 1e-6 for f in files)
    ):
        return unusable("has slices with different pixel spacings; it is not one volume")
    with_position = [f for f in files if f.position is not None and f.orientation is not None]
    if not with_position:
        return DicomSeries(files=paths, **base)  # no patient geometry (e.g. secondary capture): file order
    if len(with_position) < len(files):
        return unusable(f"has {len(files) - len(with_position)} of {len(files)} files without a patient position or orientation")
    return _placed(base, paths, [f.position for f in files], [f.orientation for f in files], "slices", unusable, files)


def _placed(base: dict, paths: tuple, positions: list, orientations: list, what: str, unusable, files=None) -> DicomSeries:
    """A series whose slices (or frames) carry patient positions: sorted along the slice normal and
    checked for one regular grid."""
    n_orient = _orientations_differ(orientations)
    if n_orient > 1:
        if len(positions) <= 3:
            return unusable(f"is a localizer (scout): its {len(positions)} {what} have {n_orient} different orientations")
        return unusable(f"has {what} in {n_orient} different orientations (several stacks in one series?); it is not one volume")
    o = orientations[0]
    row, col = np.asarray(o[:3], float), np.asarray(o[3:], float)
    lengths, dot = (float(np.linalg.norm(row)), float(np.linalg.norm(col))), float(row @ col)
    if max(abs(lengths[0] - 1), abs(lengths[1] - 1), abs(dot)) > _ORIENTATION_TOL:  # what ITK's grid is checked with
        return unusable(
            f"has an ImageOrientationPatient whose row and column directions are not perpendicular unit vectors "
            f"(lengths {lengths[0]:.6g} and {lengths[1]:.6g}, dot product {dot:.3g}): its {what} cannot be placed in space. "
            "Correct the headers, or convert the series with a DICOM converter first"
        )
    normal = _normal(o)
    order = sorted(range(len(positions)), key=lambda i: (float(normal @ positions[i]), i))
    ordered = tuple(files[i].path for i in order) if files is not None else paths
    sorted_positions = [positions[i] for i in order]
    problem = _grid_problem(sorted_positions, normal, what)
    if problem:
        return unusable(problem, ordered=ordered)
    length = float(normal @ (sorted_positions[-1] - sorted_positions[0]))
    direction = np.column_stack([o[:3], o[3:], normal])
    return DicomSeries(
        files=ordered, origin=tuple(float(v) for v in sorted_positions[0]), direction=tuple(direction.reshape(-1).tolist()),
        slice_step=length / (len(positions) - 1) if len(positions) > 1 else 0.0,
        frame_order=tuple(order) if files is None else (), **base,
    )


# ------------------------------------------------------------------------------- naming
def _sanitise(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("._-+")[:limit].rstrip("._-+")


def _name_series(folder: Path, series: list) -> list:
    folder_name = Path(os.path.abspath(folder)).name or "dicom"
    images = [s for s in series if s.is_image]
    if len(images) == 1:
        named = {images[0].series_uid: folder_name}
    else:
        named = {}
    names = {}
    for s in series:
        if s.series_uid in named:
            names[s.series_uid] = named[s.series_uid]
            continue
        head = f"s{s.series_number}" if s.series_number is not None else s.uid_hash
        desc = _sanitise(s.description)
        names[s.series_uid] = "_".join(p for p in (folder_name, head, desc) if p)
    counts: dict = {}
    for n in names.values():
        counts[n.casefold()] = counts.get(n.casefold(), 0) + 1
    for uid, n in names.items():
        if counts[n.casefold()] > 1:
            names[uid] = f"{n}_{_short_hash(uid)}"
    return [replace(s, name=names[s.series_uid]) for s in series]


def _series_order(s: DicomSeries) -> tuple:
    return (s.series_number is None, s.series_number if s.series_number is not None else 0, s.series_uid)


def find_series(folder: str | os.PathLike, skip_names: Iterable[str] = ()) -> list:
    """Every DICOM series directly in ``folder`` (not in its sub-folders), named and checked, in
    series-number order. ``skip_names``: file names that are not inputs (outputs of this tool)."""
    folder = Path(folder)
    skip = set(skip_names)
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise HiMatchADError(f"cannot list folder {folder}: {exc.strerror or exc}") from exc
    return describe_files(folder, [p for p in entries if p.name not in skip and is_dicom_candidate(p)])


def describe_files(folder: Path, candidates: Iterable[Path]) -> list:
    """The DICOM series formed by the DICOM files among ``candidates`` (files of ``folder``)."""
    groups: dict = {}
    for p in candidates:
        if not is_dicom_file(p):
            continue
        info = _describe_file(p)
        if info is not None:
            groups.setdefault(info.series_uid, []).append(info)
    series = [_describe_series(Path(folder), files) for files in groups.values()]
    return sorted(_name_series(Path(folder), series), key=_series_order)


def has_dicom_files(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one DICOM file (a quick check of file markers)."""
    try:
        return any(is_dicom_candidate(p) and is_dicom_file(p) for p in folder.iterdir())
    except OSError:
        return False


def mark_split_series(series: list) -> list:
    """``series`` with those whose UID was found in several folders marked unusable (a series
    split over folders is incomplete in each of them; a copy would give two cases of one scan)."""
    folders: dict = {}
    for s in series:
        folders.setdefault(s.series_uid, []).append(s.folder)
    out = []
    for s in series:
        where = folders[s.series_uid]
        if len(where) > 1 and s.is_image and not s.problem:
            others = ", ".join(str(f) for f in where if f != s.folder)
            s = replace(s, problem=(
                f"was found in several folders (also in {others}): a series split over folders, or a copy; keep its files "
                "together in one folder, once"
            ))
        out.append(s)
    return out


# ------------------------------------------------------------------------------- choosing
def select_series(folder: str | os.PathLike, filters: Sequence = ()) -> DicomSeries:
    """The one series of ``folder`` to analyse: the only image series, or the only one the
    ``filters`` select. Several candidates are refused with their list; an unusable choice is
    refused with its problem (:meth:`DicomSeries.unusable_error`)."""
    folder = Path(folder)
    series = find_series(folder)
    if not series:
        raise HiMatchADError(f"{folder} is a folder but holds no DICOM series")
    chosen = [s for s in series if matches(s, filters)]
    if not chosen:
        raise HiMatchADError(
            f"no DICOM series in {folder} matches --series-filter {' or '.join(str(f) for f in filters)}; its series: "
            + "; ".join(s.describe() for s in series)
        )
    if len(chosen) > 1 and any(s.is_image for s in chosen):
        chosen = [s for s in chosen if s.is_image]  # SEG, SR... are never what is meant
    if len(chosen) > 1:
        listed = "; ".join(s.describe() for s in chosen)
        if filters:
            raise HiMatchADError(
                f"{len(chosen)} of the {len(series)} DICOM series in {folder} match --series-filter "
                f"{' or '.join(str(f) for f in filters)}: {listed}. Narrow the filter until one series is left"
            )
        raise HiMatchADError(
            f"{folder} holds {len(chosen)} image series (of {len(series)} DICOM series): {listed}. Choose one with "
            "--series-filter (e.g. --series-filter modality=MR,description~flair), or move the series to analyse into "
            "a folder of its own"
        )
    if chosen[0].problem:
        raise chosen[0].unusable_error()
    return chosen[0]
