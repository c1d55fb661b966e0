"""File formats: the suffixes of volumes, 2D images and DICOM files, names without suffix, and the completeness check of NIfTI files."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

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
    if not (low.endswith(NIFTI_SUFFIXES) or low.endswith(".gz")):
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
    if low.endswith(NIFTI_SUFFIXES):
        need = _nifti_data_end(head)
        if need is not None and size < need:
            raise HiMatchADError(
                f"{p} is truncated: its header declares {need:,} bytes but it holds {size:,} "
                f"({100.0 * size / need:.0f} %); copy or download it again"
            )
