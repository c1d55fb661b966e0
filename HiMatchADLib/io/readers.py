"""Readers: NIfTI, NRRD, MHA/MHD, DICOM series and 2D images into :class:`~HiMatchADLib.core.geometry.Image`, geometry kept exactly."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import HiMatchADError
from ..core.geometry import DIRECTION_TOLERANCE, Geometry, Image
from .dicom import DicomSeries, describe_files, is_dicom_file, monochrome1_inverted_by_reader, pixel_header, select_series
from .formats import IMAGE_SUFFIXES, VOLUME_SUFFIXES, check_complete, strip_suffix
from .series_filters import matches

#: Largest volume accepted (voxels). Larger inputs are refused with a clear message rather than
#: exhausting memory: 2**30 voxels are 4 GiB as float32.
MAX_VOXELS = 2**30

_quiet_lock = threading.Lock()


_quiet_state = {"depth": 0, "previous": True}


@contextlib.contextmanager
def quiet_itk():
    """ITK's warnings off inside (a process-wide switch: threads that read and write at the same
    time share it, and the last one out restores it)."""
    import SimpleITK as sitk

    with _quiet_lock:
        if _quiet_state["depth"] == 0:
            _quiet_state["previous"] = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        _quiet_state["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_state["depth"] -= 1
            if _quiet_state["depth"] == 0:
                sitk.ProcessObject.SetGlobalWarningDisplay(_quiet_state["previous"])


def read_sitk(path, nonfinite: Optional[list] = None):
    """Read a file, a DICOM series folder or a :class:`~HiMatchADLib.io.dicom.DicomSeries` into a
    ``SimpleITK.Image`` (clear errors, no tracebacks).

    Truncated files (:func:`check_complete`) are refused. A folder is read as its one image series
    (:func:`HiMatchADLib.dicom.select_series`: several series are refused with their list), a
    series exactly from its files, and an unusable series (uneven slices, a localizer...) is
    refused with its problem.
    """
    import SimpleITK as sitk

    series = path if isinstance(path, DicomSeries) else dicom_input(path)
    if series is not None:
        return _read_series(series)
    p = Path(path)
    try:
        bad = check_complete(p)
        if nonfinite is not None and bad is not None:
            nonfinite.append(bad)  # ITK's NIfTI reader makes them 0: where they were, from the file
        with quiet_itk():
            return sitk.ReadImage(str(p))
    except HiMatchADError:
        raise
    except RuntimeError as exc:
        raise HiMatchADError(f"cannot read {p}: not a readable image ({_itk_detail(exc)})") from exc


def dicom_input(path, filters=()) -> Optional[DicomSeries]:
    """The DICOM series a path given as input stands for: for a folder, its one image series (or
    the one ``filters`` select; :func:`HiMatchADLib.dicom.select_series`), for a DICOM file, the
    file alone (named after it); None for other files. A missing path is refused."""

    p = Path(path)
    if not p.exists():
        raise HiMatchADError(f"input not found: {p}")
    if p.is_dir():
        return select_series(p, filters)
    if not p.name.lower().endswith(VOLUME_SUFFIXES + IMAGE_SUFFIXES) and is_dicom_file(p):
        found = describe_files(p.parent, [p])
        if found:
            series = replace(found[0], name=strip_suffix(p))
            if not matches(series, filters):
                raise HiMatchADError(f"the DICOM file {p} ({series.describe()}) does not match --series-filter")
            return series
    return None


def _itk_detail(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    detail = next((ln for ln in first if "ERROR" in ln or "Unable" in ln or "Could not" in ln), first[-1] if first else "")
    return detail.strip()[:200]


def _read_series(series: DicomSeries):
    """Read exactly the files of ``series`` and check ITK's grid against the one its headers describe."""
    import SimpleITK as sitk

    if series.problem:
        raise series.unusable_error()
    missing = [f for f in series.files if not os.path.isfile(f)]
    if missing:
        raise HiMatchADError(f"the DICOM series {series.where()} lost {len(missing)} files since it was found (e.g. {missing[0]})")
    try:
        with quiet_itk():
            if len(series.files) == 1:
                img = sitk.ReadImage(series.files[0])
            else:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(list(series.files))
                img = reader.Execute()
    except RuntimeError as exc:
        raise HiMatchADError(f"cannot read the DICOM series {series.where()}: {_itk_detail(exc)}") from exc
    if series.frame_order and img.GetDimension() == 3 and img.GetSize()[2] == len(series.frame_order):
        # A multi-frame object: ITK keeps its frames in file order; put them in slice order, on the
        # grid of the per-frame positions.
        arr = sitk.GetArrayFromImage(img)[list(series.frame_order)]
        placed = sitk.GetImageFromArray(arr, isVector=img.GetNumberOfComponentsPerPixel() > 1)
        placed.SetSpacing((*img.GetSpacing()[:2], series.slice_step or img.GetSpacing()[2]))
        placed.SetOrigin(series.origin)
        placed.SetDirection(series.direction)
        img = placed
    if series.origin and img.GetDimension() == 3:
        size = img.GetSize()
        direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
        want = np.asarray(series.direction, dtype=float).reshape(3, 3)
        problem = None
        if size[2] != series.frames:
            problem = f"{size[2]} slices instead of {series.frames}"
        elif not np.allclose(img.GetOrigin(), series.origin, atol=1e-3):
            problem = f"origin {tuple(round(v, 3) for v in img.GetOrigin())} instead of {tuple(round(v, 3) for v in series.origin)}"
        elif not np.allclose(direction[:, :2], want[:, :2], rtol=0, atol=DIRECTION_TOLERANCE) or (
            size[2] > 1 and not np.allclose(direction[:, 2], want[:, 2], rtol=0, atol=DIRECTION_TOLERANCE)
        ):
            problem = "another orientation"
        elif size[2] > 1 and not np.isclose(img.GetSpacing()[2], series.slice_step, rtol=0.01, atol=1e-4):  # steps are even to 1 %
            problem = f"slice spacing {img.GetSpacing()[2]:.4g} mm instead of {series.slice_step:.4g} mm"
        if problem is not None:
            raise HiMatchADError(
                f"the DICOM series {series.where()} is read by ITK on another grid than its headers describe ({problem}); "
                "convert it to NIfTI/NRRD with a DICOM converter (e.g. 3D Slicer's DICOM module) first"
            )
    return img


def image_from_sitk(img, name: str = "image", path: Optional[str] = None) -> Image:
    """Convert a ``SimpleITK.Image`` (2D or 3D, scalar or RGB) to :class:`Image`."""
    import SimpleITK as sitk

    dim = img.GetDimension()
    if dim not in (2, 3, 4):
        raise HiMatchADError(f"{path or name}: {dim}D images are not supported (expected 2D or 3D)")
    if dim == 4:
        if img.GetSize()[3] != 1:
            raise HiMatchADError(f"{path or name}: 4D images (time series) are not supported; extract one 3D volume first")
        img = img[:, :, :, 0]
        dim = 3
    pixel_type = img.GetPixelIDTypeAsString()
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayViewFromImage(img)  # valid while img lives: copied to float32 below
    if ncomp > 1:
        # Colour (RGB/RGBA) slices: luminance of the first three channels.
        rgb = arr[..., :3].astype(np.float32)
        arr = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if rgb.shape[-1] == 3 else rgb[..., 0]
    if arr.size > MAX_VOXELS:
        raise HiMatchADError(
            f"{path or name}: {arr.size:,} voxels is more than this tool handles in memory ({MAX_VOXELS:,}); "
            "crop or resample the volume first"
        )
    eight_bit = "8-bit" in pixel_type
    warn = []
    if np.iscomplexobj(arr):  # e.g. raw MR reconstructions: the magnitude is the image
        arr = np.abs(arr)
        warn.append(f"{Path(path).name if path else name}: complex-valued voxels: their magnitude is analysed")
    arr = np.array(arr, dtype=np.float32)  # a copy, never the view of img's buffer
    if dim == 2:
        sp = img.GetSpacing() + (1.0,)
        org = img.GetOrigin() + (0.0,)
        d2 = np.asarray(img.GetDirection(), dtype=float).reshape(2, 2)
        d = np.eye(3)
        d[:2, :2] = d2
        geo = Geometry((arr.shape[1], arr.shape[0], 1), sp, org, d, is_2d=True)
        arr = arr[None]
    else:
        geo = Geometry(img.GetSize(), img.GetSpacing(), img.GetOrigin(), np.asarray(img.GetDirection()).reshape(3, 3))
    if eight_bit:
        pixel_type = "uint8"
    elif "16-bit unsigned" in pixel_type and ncomp == 1 and path is not None and str(path).lower().endswith(IMAGE_SUFFIXES):
        pixel_type = "uint16"  # a 16-bit PNG/TIFF: --modality 8bit scales it by its full range, 65535
    return Image(arr, geo, name=name, path=path, pixel_type=pixel_type, warnings=warn)


def read_image(path) -> Image:
    """Read NIfTI, NRRD, MHA/MHD, a DICOM series (a :class:`~HiMatchADLib.io.dicom.DicomSeries`, or a
    folder holding one image series), or a 2D PNG/JPEG/TIFF/BMP slice.

    Non-finite voxels (NaN/Inf) are kept in the array as NaN; they are treated as background by the
    preprocessing and a warning is recorded on the image. An image with no finite voxel is refused.
    A DICOM image keeps its series and files (``dicom_series``, ``dicom_files``, in slice order).
    """
    series = path if isinstance(path, DicomSeries) else dicom_input(path)
    p = Path(series.folder) if isinstance(path, DicomSeries) else Path(path)
    nonfinite: list = []
    img = read_sitk(series if series is not None else p, nonfinite)
    name = series.name if series is not None else strip_suffix(p)
    out = image_from_sitk(img, name=name, path=str(p))
    if series is not None:
        out.dicom_series, out.dicom_files = series, tuple(series.files)
        _dicom_semantics(out, series)
    elif nonfinite and nonfinite[0].size and int(nonfinite[0].max()) < out.array.size:
        out.array.reshape(-1)[nonfinite[0]] = np.nan
    finite = np.isfinite(out.array)
    if not finite.all():
        n_bad = int((~finite).sum())
        if n_bad == finite.size:
            raise HiMatchADError(f"{p}: every voxel is NaN or infinite; nothing to analyse")
        out.array = np.where(finite, out.array, np.nan).astype(np.float32)
        out.warnings.append(f"{p.name}: {n_bad} non-finite voxels (NaN/Inf) treated as background")
    return out


def _dicom_semantics(out: Image, series: DicomSeries) -> None:
    """What the pixel values of a DICOM series mean, applied to ``out``.

    MONOCHROME1 (the lowest value is white, as in many radiographs): the grey scale is read as it is
    displayed. GDCM inverts such files already (``max - v``, or ``-1 - v`` for signed pixels, which
    makes every value negative and would pass for Hounsfield units); the image is inverted here
    only if it was not, and shifted to start at 0 either way. Without PixelSpacing (or
    ImagerPixelSpacing) the reader's 1 mm is a placeholder: the image is treated as one without a
    recorded spacing (:attr:`Image.spacing_recorded`), with a warning.
    """
    header = pixel_header(series.files[0])
    if header is None:
        return
    photometric = str(header.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric == "MONOCHROME1":
        inverted = monochrome1_inverted_by_reader(series.files[0], out.array[0] if len(series.files) > 1 or not series.frame_order else None)
        arr = out.array if inverted else -out.array
        finite = np.isfinite(arr)
        low = float(np.min(arr, where=finite, initial=np.inf)) if finite.any() else 0.0
        out.array = (arr - low).astype(np.float32)
        out.warnings.append(f"{out.name}: MONOCHROME1 (low values are white): its grey scale is read as displayed (inverted, from 0)")
    if not header.get("PixelSpacing") and not header.get("ImagerPixelSpacing"):
        out.spacing_recorded = False
        out.warnings.append(
            f"{out.name}: its DICOM files record no PixelSpacing: 1 mm pixels are assumed, so sizes in mm and mm³ are not physical"
        )


def is_2d_file(path) -> bool:
    """Whether an image file holds a 2D slice (from its header; PNG/JPEG/TIFF/BMP always do)."""
    import SimpleITK as sitk

    p = Path(path)
    if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES):
        return True
    if p.is_dir():
        return read_image(p).is_2d
    r = sitk.ImageFileReader()
    r.SetFileName(str(p))
    r.ReadImageInformation()
    return r.GetDimension() == 2
