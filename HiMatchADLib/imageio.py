"""Reading and writing images with their physical geometry (SimpleITK, ITK's LPS space).

Arrays follow SimpleITK/numpy order: a 3D volume is ``(nz, ny, nx)`` (slice, row, column), a 2D image
is stored as ``(1, ny, nx)`` with ``Geometry.is_2d`` set. Geometry follows ITK: ``spacing`` and
``origin`` are ``(x, y, z)``, ``direction`` is a 3x3 matrix whose column ``j`` is the LPS direction
of index axis ``j`` (i, j, k), so that ``physical = origin + direction @ (spacing * index_ijk)``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .errors import HiMatchADError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".ima")
#: Largest volume accepted (voxels). Larger inputs are refused with a clear message rather than
#: exhausting memory: 2**30 voxels are 4 GiB as float32.
MAX_VOXELS = 2**30


@dataclass
class Geometry:
    """Physical placement of an image grid (ITK/LPS conventions)."""

    size: tuple[int, int, int]  # (nx, ny, nz)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    is_2d: bool = False

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(s) for s in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy shape ``(nz, ny, nx)`` of arrays on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return np.asarray(self.origin) + self.direction @ (np.asarray(self.spacing) * ijk)

    def same_as(self, other: "Geometry", tol: float = 1e-6) -> bool:
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.reshape(-1).tolist(),
            "is_2d": self.is_2d,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(d["size"], d["spacing"], d["origin"], np.asarray(d["direction"]).reshape(3, 3), d.get("is_2d", False))


@dataclass
class Image:
    """An image as a float32 array ``(nz, ny, nx)`` plus its geometry and provenance."""

    array: np.ndarray
    geometry: Geometry
    name: str = "image"
    path: Optional[str] = None
    pixel_type: str = "float32"  # pixel type on disk, e.g. "uint8" for 8-bit PNGs
    warnings: list = field(default_factory=list)

    @property
    def is_2d(self) -> bool:
        return self.geometry.is_2d

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=None,
        name: str = "image",
        is_2d: Optional[bool] = None,
    ) -> "Image":
        """Wrap a numpy array (``(ny, nx)`` or ``(nz, ny, nx)``) with a geometry given in ITK order."""
        arr = np.asarray(array)
        if arr.ndim == 2:
            arr = arr[None]
            is_2d = True if is_2d is None else is_2d
        if arr.ndim != 3:
            raise HiMatchADError(f"expected a 2D or 3D array, got shape {arr.shape}")
        spacing = tuple(spacing) + (1.0,) * (3 - len(tuple(spacing)))
        origin = tuple(origin) + (0.0,) * (3 - len(tuple(origin)))
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
        if d.shape == (2, 2):
            d3 = np.eye(3)
            d3[:2, :2] = d
            d = d3
        geo = Geometry((arr.shape[2], arr.shape[1], arr.shape[0]), spacing, origin, d.reshape(3, 3), bool(is_2d))
        pixel_type = str(arr.dtype)
        return cls(arr.astype(np.float32, copy=False), geo, name=name, pixel_type=pixel_type)


def strip_suffix(path: str | os.PathLike) -> str:
    """File name without its extension(s): ``a/b/case1.nii.gz`` -> ``case1``."""
    name = Path(path).name
    low = name.lower()
    for suf in VOLUME_SUFFIXES + IMAGE_SUFFIXES + DICOM_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem if "." in name else name


def is_image_file(path: Path) -> bool:
    low = path.name.lower()
    return path.is_file() and not path.name.startswith(".") and low.endswith(VOLUME_SUFFIXES + IMAGE_SUFFIXES)


def _dicom_series_files(folder: Path) -> list[str]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    with _quiet_itk():
        ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        return []
    # The largest series when a folder holds several (localisers are small).
    best = max(ids, key=lambda sid: len(reader.GetGDCMSeriesFileNames(str(folder), sid)))
    return list(reader.GetGDCMSeriesFileNames(str(folder), best))


def is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file()]
    if not files:
        return False
    if not any(p.suffix.lower() in DICOM_SUFFIXES or p.suffix == "" for p in files):
        return False
    return bool(_dicom_series_files(path))


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Every readable input under ``folder``: image files and DICOM series folders, sorted.

    Hidden files and folders (our cache, ``.DS_Store``) are skipped.
    """
    root = Path(folder)
    if not root.exists():
        raise HiMatchADError(f"folder not found: {root}")
    if not root.is_dir():
        raise HiMatchADError(f"not a folder: {root}")
    found: list[Path] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            raise HiMatchADError(f"cannot list folder {d}: {exc}") from exc
        if d != root and is_dicom_folder(d):
            found.append(d)
            continue
        for p in entries:
            if p.name.startswith("."):
                continue
            if p.is_dir():
                if recursive:
                    stack.append(p)
            elif is_image_file(p):
                found.append(p)
        if d == root and not found and is_dicom_folder(d):
            found.append(d)
    return sorted(found)


@contextlib.contextmanager
def _quiet_itk():
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def read_sitk(path: str | os.PathLike):
    """Read a file or DICOM series folder into a ``SimpleITK.Image`` (clear errors, no tracebacks)."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise HiMatchADError(f"input not found: {p}")
    try:
        with _quiet_itk():
            if p.is_dir():
                files = _dicom_series_files(p)
                if not files:
                    raise HiMatchADError(f"{p} is a folder but holds no DICOM series")
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
                return reader.Execute()
            return sitk.ReadImage(str(p))
    except HiMatchADError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Unable" in ln or "Could not" in ln), first[-1] if first else "")
        raise HiMatchADError(f"cannot read {p}: not a readable image ({detail.strip()[:200]})") from exc


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
    arr = sitk.GetArrayFromImage(img)
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
    arr = np.asarray(arr, dtype=np.float32)
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
    out = Image(arr, geo, name=name, path=path, pixel_type="uint8" if eight_bit else pixel_type)
    return out


def read_image(path: str | os.PathLike) -> Image:
    """Read NIfTI, NRRD, MHA/MHD, a DICOM series folder, or a 2D PNG/JPEG/TIFF/BMP slice.

    Non-finite voxels (NaN/Inf) are kept in the array as NaN; they are treated as background by the
    preprocessing and a warning is recorded on the image. An image with no finite voxel is refused.
    """
    p = Path(path)
    img = read_sitk(p)
    name = p.name if p.is_dir() else strip_suffix(p)
    out = image_from_sitk(img, name=name, path=str(p))
    finite = np.isfinite(out.array)
    if not finite.all():
        n_bad = int((~finite).sum())
        if n_bad == finite.size:
            raise HiMatchADError(f"{p}: every voxel is NaN or infinite; nothing to analyse")
        out.array = np.where(finite, out.array, np.nan).astype(np.float32)
        out.warnings.append(f"{p.name}: {n_bad} non-finite voxels (NaN/Inf) treated as background")
    return out


def to_sitk(array: np.ndarray, geometry: Geometry):
    """Wrap ``array`` (numpy shape ``geometry.shape``) into a SimpleITK image carrying ``geometry``."""
    import SimpleITK as sitk

    arr = np.asarray(array)
    if tuple(arr.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {arr.shape} does not match geometry {geometry.shape}")
    if geometry.is_2d:
        img = sitk.GetImageFromArray(arr[0])
        img.SetSpacing(geometry.spacing[:2])
        img.SetOrigin(geometry.origin[:2])
        img.SetDirection(tuple(geometry.direction[:2, :2].reshape(-1)))
    else:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(geometry.spacing)
        img.SetOrigin(geometry.origin)
        img.SetDirection(tuple(geometry.direction.reshape(-1)))
    return img


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same extension); rename it to ``final`` on success.

    On any error the temporary file is removed, so a reader never sees a half-written output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    name = final.name
    suffix = next((s for s in VOLUME_SUFFIXES + IMAGE_SUFFIXES if name.lower().endswith(s)), final.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``array`` with ``geometry`` to ``path`` atomically (temporary name, then rename)."""
    import SimpleITK as sitk

    img = to_sitk(array, geometry)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), compress)
        except RuntimeError as exc:
            raise HiMatchADError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=2)
