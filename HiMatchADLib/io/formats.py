"""File formats: the suffixes of volumes, 2D images and DICOM files, names without suffix, and the completeness check of NIfTI files."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import HiMatchADError

#: File suffixes that are never DICOM, besides the image formats of :mod:`HiMatchADLib.io.readers`.
NON_DICOM_SUFFIXES = (".raw", ".json", ".csv", ".txt", ".md", ".xml", ".html", ".pdf", ".zip", ".gz", ".npy", ".npz", ".py")


DICOM_SUFFIXES = (".dcm", ".ima")


VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


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


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nifti_layout(header: bytes) -> Optional[tuple]:
    """``(endian, datatype, data start, data end)`` of a single-file NIfTI-1/-2 (bytes from the
    start), or None when the header is not one this check understands (ITK then decides)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
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
    return endian, int(datatype), int(offset), int(offset) + n * bitpix // 8


#: NIfTI datatype codes of real floating-point voxels and their numpy types.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


class _NonFiniteScan:
    """Finds the NaN / infinite voxels of a floating-point NIfTI while its bytes stream past (ITK's
    reader makes them 0 without a word): flat voxel indices in file order (numpy's C order).
    ``dtype`` is None for a file that holds no floating-point voxels (nothing to find)."""

    def __init__(self, header: bytes):
        layout = _nifti_layout(header)
        self.dtype = None
        if layout is not None and layout[1] in _NIFTI_FLOATS:
            endian, datatype, self.start, self.end = layout
            self.dtype = np.dtype(endian + _NIFTI_FLOATS[datatype])
        self.rest, self.found, self.next_voxel = b"", [], 0

    def feed(self, chunk: bytes, at: int) -> None:
        """``chunk``: the file's (decompressed) bytes from offset ``at`` on."""
        if self.dtype is None:
            return
        lo, hi = max(at, self.start), min(at + len(chunk), self.end)
        if hi <= lo:
            return
        data = self.rest + chunk[lo - at : hi - at]
        usable = len(data) - len(data) % self.dtype.itemsize
        vals = np.frombuffer(data[:usable], self.dtype)
        bad = np.flatnonzero(~np.isfinite(vals))
        if bad.size:
            self.found.append(bad + self.next_voxel)
        self.next_voxel += vals.size
        self.rest = data[usable:]

    def result(self) -> Optional[np.ndarray]:
        if self.dtype is None:
            return None
        return np.concatenate(self.found) if self.found else np.zeros(0, np.int64)


def check_complete(path: str | os.PathLike) -> Optional[np.ndarray]:
    """Refuse a truncated file that ITK would read without complaint; return, for a floating-point
    NIfTI, the flat indices of its NaN and infinite voxels (None for other files).

    ITK's NIfTI reader fills the missing part of a cut file with zeros and does not check the gzip
    stream, so a partly copied or downloaded ``.nii``/``.nii.gz`` would be analysed as if it were
    whole. Checked here: a gzip stream must be complete (end marker, CRC and length), and a NIfTI
    file must hold as many bytes as its header declares. (NRRD and MetaImage readers already raise.)
    The same pass over the bytes finds the non-finite voxels, which ITK's reader turns into 0.
    """
    p = Path(path)
    low = p.name.lower()
    nifti = low.endswith(NIFTI_SUFFIXES)
    if not (nifti or low.endswith(".gz")):
        return None
    scan = None
    try:
        with open(p, "rb") as f:
            head = f.read(544)
        size = p.stat().st_size
        gz = low.endswith(".gz")
        if gz and head[:2] != b"\x1f\x8b":
            return None  # not gzip at all: ITK's to judge
        if nifti and not gz:
            scan = _NonFiniteScan(head)
        if gz or (scan is not None and scan.dtype is not None):  # stream the bytes once
            with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
                at = 0
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    if at == 0 and nifti and gz:
                        head = chunk[:544]
                        scan = _NonFiniteScan(head)
                    if scan is not None:
                        scan.feed(chunk, at)
                    at += len(chunk)
            if gz:
                size = at
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise HiMatchADError(
            f"{p} is truncated or corrupt (its compressed data is incomplete or damaged: {exc}); copy or download it again"
        ) from exc
    except OSError as exc:
        raise HiMatchADError(f"cannot read {p}: {exc.strerror or exc}") from exc
    if nifti:
        layout = _nifti_layout(head)
        need = layout[3] if layout is not None else None
        if need is not None and size < need:
            raise HiMatchADError(
                f"{p} is truncated: its header declares {need:,} bytes but it holds {size:,} "
                f"({100.0 * size / need:.0f} %); copy or download it again"
            )
    return scan.result() if scan is not None else None
