"""Reading and writing images with their physical geometry (SimpleITK, ITK's LPS space).

Arrays follow SimpleITK/numpy order: a 3D volume is ``(nz, ny, nx)`` (slice, row, column), a 2D image
is stored as ``(1, ny, nx)`` with ``Geometry.is_2d`` set. Geometry follows ITK: ``spacing`` and
``origin`` are ``(x, y, z)``, ``direction`` is a 3x3 matrix whose column ``j`` is the LPS direction
of index axis ``j`` (i, j, k), so that ``physical = origin + direction @ (spacing * index_ijk)``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import socket
import stat
import struct
import tempfile
import threading
import time
import warnings
import zlib
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .dicom import DICOM_SUFFIXES, DicomSeries
from .errors import HiMatchADError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
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
    #: For a DICOM input: its files in slice order, and the series they form (else empty / None).
    dicom_files: tuple = ()
    dicom_series: Optional[DicomSeries] = None

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


def real_path(path: Path) -> Optional[Path]:
    """``path`` with every link resolved, or None for a link loop or an unreachable target."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):  # "Symlink loop" is a RuntimeError before Python 3.13
        return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def walk_inputs(
    root: Path,
    *,
    recursive: bool = True,
    prune: Iterable[Path] = (),
    skip_names: Optional[Callable[[list], set]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> tuple[list, list[Path]]:
    """The inputs under the folder ``root``, in the order found, and the files left out by
    ``skip_names``. An input is an image file (a ``Path``) or a DICOM series
    (:class:`~HiMatchADLib.dicom.DicomSeries`): every series of every folder is an input of its
    own, whether it can be analysed or not (its ``problem`` says).

    Breadth first, links followed, but every real folder is entered once and every real input kept
    once (of two ways to one input, the shorter). Skipped: hidden entries, link loops and dangling
    links, anything whose real path lies in one of the real folders ``prune``, and in each folder the
    file names returned by ``skip_names(entries)``. ``log(message)`` hears about loops and
    duplicates. A series found in several folders is marked unusable in each.
    """
    from .dicom import describe_files, is_dicom_candidate, mark_split_series

    say = log or (lambda message: None)
    pruned = list(prune)
    root_real = real_path(root) or root
    found: list = []
    skipped: list[Path] = []
    seen_dirs = {root_real}
    seen_inputs: dict = {}

    def add(item, key, shown) -> None:
        first = seen_inputs.get(key)
        if first is not None:
            say(f"{shown} is the same input as {first}; processed once")
            return
        seen_inputs[key] = shown
        found.append(item)

    queue = deque([root])
    while queue:
        d = queue.popleft()
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            raise HiMatchADError(f"cannot list folder {d}: {exc.strerror or exc}") from exc
        names = skip_names(entries) if skip_names is not None else set()
        candidates = []
        for p in entries:
            if p.name.startswith("."):
                continue
            real = real_path(p)
            if real is None:
                say(f"{p} is a symbolic link loop or a broken link; skipped")
                continue
            if any(_inside(real, q) for q in pruned):
                continue
            if p.is_dir():
                if recursive and real not in seen_dirs:
                    seen_dirs.add(real)
                    queue.append(p)
            elif p.name in names and (is_image_file(p) or is_dicom_candidate(p)):
                skipped.append(p)
            elif is_image_file(p):
                add(p, real, p)
            elif is_dicom_candidate(p):
                candidates.append(p)
        d_real = real_path(d) or d
        for series in describe_files(d, candidates):
            add(series, (d_real, series.series_uid), f"DICOM series {series.series_uid} in {d}")
    series_found = mark_split_series([x for x in found if isinstance(x, DicomSeries)])
    marked = iter(series_found)
    found = [next(marked) if isinstance(x, DicomSeries) else x for x in found]
    return found, skipped


def input_path(item) -> Path:
    """The path of an input found by :func:`walk_inputs`: the file, or the folder of a DICOM series."""
    return Path(item.folder) if isinstance(item, DicomSeries) else Path(item)


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Every input under ``folder``: image files and folders holding DICOM series, sorted (a folder
    once, however many series it holds: reading it picks its one image series or says why not).

    Hidden files and folders (our cache, ``.DS_Store``) and outputs of this tool (heatmaps, labelmaps,
    overlays named by one of our scores JSON beside them) are skipped. Symbolic links are followed,
    but a link loop or two links to one file give one input (:func:`walk_inputs`).
    """
    root = Path(folder)
    if not root.exists():
        raise HiMatchADError(f"folder not found: {root}")
    if not root.is_dir():
        raise HiMatchADError(f"not a folder: {root}")
    from .output import own_outputs  # outputs of this tool are never inputs (e.g. an out-dir inside the folder)

    found, own = walk_inputs(root, recursive=recursive, skip_names=own_outputs)
    if own:
        warn(f"{root}: skipped {len(own)} outputs of this tool (e.g. {own[0].name}); they are not input images")
    return sorted(dict.fromkeys(input_path(x) for x in found))


_quiet_lock = threading.Lock()
_quiet_state = {"depth": 0, "previous": True}


@contextlib.contextmanager
def _quiet_itk():
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


_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nifti_data_end(header: bytes) -> Optional[int]:
    """Where the voxel data of a single-file NIfTI-1/-2 ends (bytes from the start), or None when
    the header is not one this check understands (ITK then decides)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            offset = max(struct.unpack(endian + "q", header[168:176])[0], 544)
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8:
        return None
    n = 1
    for d in dim[1 : ndim + 1]:
        n *= max(int(d), 1)
    return int(offset) + n * bitpix // 8


def check_complete(path: str | os.PathLike) -> None:
    """Refuse a truncated file that ITK would read without complaint.

    ITK's NIfTI reader fills the missing part of a cut file with zeros and does not check the gzip
    stream, so a partly copied or downloaded ``.nii``/``.nii.gz`` would be analysed as if it were
    whole. Checked here: a gzip stream must be complete (end marker, CRC and length), and a NIfTI
    file must hold as many bytes as its header declares. (NRRD and MetaImage readers already raise.)
    """
    p = Path(path)
    low = p.name.lower()
    if not (low.endswith(_NIFTI_SUFFIXES) or low.endswith(".gz")):
        return
    try:
        with open(p, "rb") as f:
            head = f.read(544)
        size = p.stat().st_size
        if low.endswith(".gz") and head[:2] == b"\x1f\x8b":  # not gzip at all: ITK's to judge
            head, size = b"", 0
            with gzip.open(p, "rb") as f:
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    if len(head) < 544:
                        head += chunk[: 544 - len(head)]
                    size += len(chunk)
        elif low.endswith(".gz"):
            return
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise HiMatchADError(
            f"{p} is truncated or corrupt (its compressed data is incomplete or damaged: {exc}); copy or download it again"
        ) from exc
    except OSError as exc:
        raise HiMatchADError(f"cannot read {p}: {exc.strerror or exc}") from exc
    if low.endswith(_NIFTI_SUFFIXES):
        need = _nifti_data_end(head)
        if need is not None and size < need:
            raise HiMatchADError(
                f"{p} is truncated: its header declares {need:,} bytes but it holds {size:,} "
                f"({100.0 * size / need:.0f} %); copy or download it again"
            )


def read_sitk(path):
    """Read a file, a DICOM series folder or a :class:`~HiMatchADLib.dicom.DicomSeries` into a
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
        check_complete(p)
        with _quiet_itk():
            return sitk.ReadImage(str(p))
    except HiMatchADError:
        raise
    except RuntimeError as exc:
        raise HiMatchADError(f"cannot read {p}: not a readable image ({_itk_detail(exc)})") from exc


def dicom_input(path, filters=()) -> Optional[DicomSeries]:
    """The DICOM series a path given as input stands for: for a folder, its one image series (or
    the one ``filters`` select; :func:`HiMatchADLib.dicom.select_series`), for a DICOM file, the
    file alone (named after it); None for other files. A missing path is refused."""
    from .dicom import describe_files, is_dicom_file, matches, select_series

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
        with _quiet_itk():
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
        elif not np.allclose(direction[:, :2], want[:, :2], atol=1e-4) or (size[2] > 1 and not np.allclose(direction[:, 2], want[:, 2], atol=1e-4)):
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
    out = Image(arr, geo, name=name, path=path, pixel_type="uint8" if eight_bit else pixel_type)
    return out


def read_image(path) -> Image:
    """Read NIfTI, NRRD, MHA/MHD, a DICOM series (a :class:`~HiMatchADLib.dicom.DicomSeries`, or a
    folder holding one image series), or a 2D PNG/JPEG/TIFF/BMP slice.

    Non-finite voxels (NaN/Inf) are kept in the array as NaN; they are treated as background by the
    preprocessing and a warning is recorded on the image. An image with no finite voxel is refused.
    A DICOM image keeps its series and files (``dicom_series``, ``dicom_files``, in slice order).
    """
    series = path if isinstance(path, DicomSeries) else dicom_input(path)
    p = Path(series.folder) if isinstance(path, DicomSeries) else Path(path)
    img = read_sitk(series if series is not None else p)
    name = series.name if series is not None else strip_suffix(p)
    out = image_from_sitk(img, name=name, path=str(p))
    if series is not None:
        out.dicom_series, out.dicom_files = series, tuple(series.files)
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


#: A temporary file of :func:`atomic_path` older than this is an orphan (no single write takes so
#: long) and is removed by the next write into its folder, whoever left it.
STALE_TEMP_SECONDS = 6 * 3600
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
# ".<final name>.<pid>@<host>.<random>.tmp<suffix>" (and ".<final name>.<random>.tmp<suffix>" from
# earlier versions, which carry no owner).
_TEMP_RE = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*))?\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[A-Za-z0-9.]+)?$")
_cleaned_folders: set = set()


def _umask() -> int:
    try:  # without changing the process's umask (other threads may be creating files)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there; rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, now: Optional[float] = None) -> list[Path]:
    """Remove temporary files of :func:`atomic_path` in ``folder`` left by a killed process.

    A temporary is stale when its owner process (recorded in its name) is gone from this host, or
    when it is older than :data:`STALE_TEMP_SECONDS`. Returns the removed paths.
    """
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None or not m.group("name").lower().endswith((m.group("suffix") or "").lower()):
            continue  # not named as atomic_path names its temporaries
        try:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            pid = m.group("pid")
            dead = pid is not None and m.group("host") == _HOST and int(pid) != os.getpid() and not _process_alive(int(pid))
            if dead or now - st.st_mtime > STALE_TEMP_SECONDS:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same extension); rename it to ``final`` on success.

    On any error the temporary file is removed, so a reader never sees a half-written output. The
    final file gets the permissions a plain ``open()`` would give it (those of the file it replaces,
    else ``0666`` less the umask), not the private ``0600`` of a temporary file. The first write
    into a folder removes the stale temporaries of killed runs there
    (:func:`remove_stale_temporaries`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(final.parent)
    if folder not in _cleaned_folders:
        remove_stale_temporaries(folder)
        _cleaned_folders.add(folder)
    name = final.name
    suffix = next((s for s in VOLUME_SUFFIXES + IMAGE_SUFFIXES if name.lower().endswith(s)), final.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}@{_HOST}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            mode = stat.S_IMODE(final.stat().st_mode)
        except OSError:
            mode = 0o666 & ~_umask()
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _orthogonality_error(direction: np.ndarray) -> float:
    d = np.asarray(direction, dtype=float)
    return float(np.max(np.abs(d.T @ d - np.eye(d.shape[0]))))


def check_storable(geometry: Geometry, path: str | os.PathLike) -> None:
    """Refuse a geometry that the format of ``path`` cannot store exactly (before any work is done).

    NIfTI stores the orientation as a rotation: a sheared (non-orthogonal) direction matrix would
    be silently made orthogonal, and the output would no longer overlay its input.
    """
    d = geometry.direction[:2, :2] if geometry.is_2d else geometry.direction
    if str(path).lower().endswith(_NIFTI_SUFFIXES) and _orthogonality_error(d) > 1e-4:
        cols = d / np.linalg.norm(d, axis=0, keepdims=True)
        angles = np.degrees(np.arccos(np.clip(np.abs(cols.T @ cols), 0, 1)))
        worst = float(np.min(angles[np.triu_indices(len(d), 1)]))
        raise HiMatchADError(
            f"the image's axes are not perpendicular (sheared grid, {worst:.2f} degrees between two axes); "
            f"{Path(path).name} (NIfTI) cannot store such a geometry and the result would not overlay the input. "
            "Resample the input onto an orthogonal grid first (e.g. 3D Slicer's Resample Scalar/Vector/DWI Volume)"
        )


def _verify_written(tmp: Path, img: dict, voxels: np.ndarray, final: Path, lossy: bool) -> None:
    """Read a written file back and compare it with what was meant: ``img`` holds the written
    image's ``size``, ``components``, ``spacing``, ``origin`` and ``direction``, ``voxels`` its array
    (numpy order), which ITK's copy was made from (freed before the read-back)."""
    import SimpleITK as sitk

    try:
        back = read_sitk(tmp)
    except HiMatchADError as exc:
        raise HiMatchADError(f"writing {final} failed: the file read back is incomplete (disk full?): {exc}") from exc
    problem = None
    if back.GetSize() != img["size"] or back.GetNumberOfComponentsPerPixel() != img["components"]:
        problem = f"size {back.GetSize()} instead of {img['size']}"
    elif not np.allclose(back.GetSpacing(), img["spacing"], rtol=1e-5, atol=1e-6):
        problem = f"spacing {back.GetSpacing()} instead of {img['spacing']}"
    elif not np.allclose(back.GetOrigin(), img["origin"], rtol=1e-5, atol=1e-4):
        problem = f"origin {back.GetOrigin()} instead of {img['origin']}"
    elif not np.allclose(back.GetDirection(), img["direction"], atol=1e-5):
        problem = "a different direction matrix"
    elif not lossy:
        a, b = voxels, sitk.GetArrayViewFromImage(back)
        nan = a.dtype.kind == "f"
        step = max(1, (1 << 22) // max(1, a[0].size))  # by blocks: no full-size temporaries
        same = a.shape == b.shape and all(
            np.array_equal(a[i : i + step], b[i : i + step], equal_nan=nan) for i in range(0, a.shape[0], step)
        )
        if not same:
            problem = "different voxel values"
    if problem is not None:
        raise HiMatchADError(f"writing {final} failed: the file read back has {problem}; check the disk and write again")


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``array`` with ``geometry`` to ``path`` atomically and verified.

    The file is written under a temporary name, read back and compared with ``array`` and
    ``geometry`` (writers may not report a full disk: ITK's NIfTI writer does not), then renamed.
    """
    import SimpleITK as sitk

    check_storable(geometry, path)
    img = to_sitk(array, geometry)
    meant = {
        "size": img.GetSize(), "components": img.GetNumberOfComponentsPerPixel(), "spacing": img.GetSpacing(),
        "origin": img.GetOrigin(), "direction": img.GetDirection(),
    }
    lossy = str(path).lower().endswith((".jpg", ".jpeg"))
    with atomic_path(path) as tmp:
        try:
            with _quiet_itk():
                sitk.WriteImage(img, str(tmp), compress)
        except RuntimeError as exc:
            raise HiMatchADError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
        del img  # ITK's copy of the voxels goes before the file is read back
        voxels = np.asarray(array)
        _verify_written(tmp, meant, voxels[0] if geometry.is_2d else voxels, Path(path), lossy)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=2)
