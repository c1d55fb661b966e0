"""Pre-flight checks of the command line: paths and folders checked before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..bank.store import default_cache_root
from ..core.atomic import folder_write_problem
from ..core.errors import HiMatchADError
from ..core.geometry import Geometry
from ..io.dicom import DicomSeries
from ..io.discovery import check_links, check_output_folder
from ..io.readers import quiet_itk
from ..io.series_filters import parse_series_filters
from ..io.writers import check_storable
from ..outputs.registry import check_outputs, list_writers


def _check_dicom_options(args) -> None:
    """Parse ``--series-filter`` (bad syntax is refused before any work) and check that the DICOM
    writer is installed when ``--dicom-seg``/``--dicom-heatmap`` ask for it."""
    if not hasattr(args, "series_filter"):
        return

    args.series_filter = parse_series_filters(args.series_filter)
    args.outputs = check_outputs([name for name in list_writers() if getattr(args, name, False)], load=True)


def check_out_dir(out_dir: str) -> Path:
    """The output folder, refused before any computation when it is a file or cannot be written."""
    out = Path(out_dir).expanduser()
    check_links(out_dir, "--out-dir")
    if out.exists() and not out.is_dir():
        raise HiMatchADError(f"--out-dir {out} exists and is not a folder")
    _check_writable(out, "--out-dir")
    return out


def _check_writable(folder: Path, option: str) -> None:
    """Refuse a folder this process cannot create files in (or, when it does not exist yet, whose
    nearest existing parent it cannot create it in). Nothing is left behind."""
    problem = folder_write_problem(folder)
    if problem is None:
        return
    if problem.endswith("is a file, not a folder"):
        raise HiMatchADError(f"{option} {folder} cannot be created: {problem}; choose another {option}")
    raise HiMatchADError(f"{option} {folder} is not writable: {problem}; choose a folder you can write to")


def _check_cache_dir(args) -> None:
    """A cache folder that is a file is refused. A read-only cache is allowed (a complete bank can
    be read from it); building into it then fails with one clear message."""
    if not hasattr(args, "cache_dir"):
        return
    cache = args.cache_dir

    root = Path(cache).expanduser() if cache else default_cache_root()
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "--cache-dir" if cache else "the cache folder ($HIMATCHAD_CACHE or ~/.cache/himatchad)"
        raise HiMatchADError(f"{what} {root} cannot be used: {probe} is a file, not a folder; give --cache-dir a folder")


def check_input_direction(query) -> None:
    """Refuse, from its header, an input whose direction matrix the NIfTI outputs cannot store (not
    orthonormal within :data:`~HiMatchADLib.core.geometry.DIRECTION_TOLERANCE`), naming it. ``query``
    is a file or a :class:`~HiMatchADLib.io.dicom.DicomSeries`; a header that cannot be read is left
    to the reader, which says why."""
    if isinstance(query, DicomSeries):
        if not query.direction:
            return
        geometry = Geometry((1, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.asarray(query.direction, dtype=float).reshape(3, 3))
        check_storable(geometry, "map.nii.gz", source=f"the DICOM series {query.where()}")
        return
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(query))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        return
    dim = reader.GetDimension()
    if dim not in (2, 3):
        return
    d = np.eye(3)
    d[:dim, :dim] = np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)
    check_storable(Geometry((1, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), d, is_2d=dim == 2), "map.nii.gz", source=str(query))


def _holds_calibrated_bank(cache: Path, normals, method_key: dict) -> bool:
    """Whether ``cache`` holds a bank of the folder ``normals`` with a calibration for ``method_key``
    (what a run with a read-only cache needs, so that it writes nothing there)."""
    folder = str(Path(normals).expanduser().resolve())
    want = json.loads(json.dumps(method_key))
    for manifest in sorted((cache / "banks").glob("*/manifest.json")):
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("folder") != folder:
                continue
            for calib in manifest.parent.glob("calib_*.json"):
                if json.loads(calib.read_text(encoding="utf-8")).get("key") == want:
                    return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def check_cache_for_run(detector, normals, rebuild: bool = False) -> None:
    """Refuse, before the model is loaded, a cache folder that cannot be created or written when the
    run must write into it: a read-only cache serves a run only when it already holds the normal
    bank of ``normals`` calibrated for the detector's method and settings (``--method knn``,
    ``dpmm`` or an ``hnsw`` index need a calibration of their own); otherwise the bank, the
    calibration or the DPMM fit would be computed first and refused only when saved."""
    cache = Path(detector.cache_dir).expanduser() if detector.cache_dir else default_cache_root()
    problem = folder_write_problem(cache)
    if problem is None:
        return
    what = "--cache-dir" if detector.cache_dir else "the cache folder ($HIMATCHAD_CACHE or ~/.cache/himatchad)"
    if not cache.is_dir():
        raise HiMatchADError(f"{what} {cache} cannot be created: {problem}; give --cache-dir a folder you can write to")
    if not rebuild and _holds_calibrated_bank(cache, normals, detector.method_key()):
        return
    index = f" --knn-index {detector.knn_index}" if getattr(detector, "knn_index", "exact") != "exact" else ""
    need = "--rebuild needs to write a new bank" if rebuild else f"it holds no normal bank of {normals} calibrated for --method {detector.method}{index} with these settings"
    raise HiMatchADError(
        f"{what} {cache} is not writable ({problem}) and {need}; give --cache-dir a folder you can write to"
    )


def _check_out_dir_against_inputs(args) -> None:
    check_output_folder(getattr(args, "out_dir", None), input=getattr(args, "input", None), input_dir=getattr(args, "input_dir", None),
                        normals=getattr(args, "normals", None))


def preflight(args) -> None:
    """Checks of a command's folders and input that fail fast, before any model or bank work."""
    _check_dicom_options(args)
    _check_cache_dir(args)
    _check_out_dir_against_inputs(args)


def write_folders(args) -> list:
    """The folders a command writes to, as the user named them (for messages)."""
    found = []
    if isinstance(getattr(args, "out_dir", None), str):
        found.append(f"--out-dir {args.out_dir}")
    if hasattr(args, "cache_dir"):
        found.append(f"--cache-dir {args.cache_dir or default_cache_root()}")
    return found
