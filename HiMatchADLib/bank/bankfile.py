"""Bank files: a normal bank in one shareable file (``himatchad bank export``, ``detect --bank``).

A bank file is a single **uncompressed ZIP** (``ZIP_STORED``): every member's bytes lie as they are
in the file, so the ``.npy`` arrays are memory-mapped straight from it (no extraction, no copy,
nothing decompressed) and a reader needs only the standard library and numpy. Members:

- ``himatchad-bank.json``: the manifest (first member): ``kind``, ``format``
  (:data:`BANK_FILE_FORMAT`), provenance (model id, weights digest, licence, precision, tool
  version, creation time), the settings the bank fixes, the method it was calibrated for, counts,
  the normal bank's own manifest (file names replaced by opaque identifiers unless the names were
  kept) and ``members``: the SHA-256 and size of every other member;
- ``bank/*.npy``, ``bank/slices.npz``: the bank's arrays as cached (features, offsets, clusters);
- ``subjects.npy``: the subject index of every bank slice;
- ``calibration.json``: the calibration record (threshold, per-stage statistics);
- ``dpmm.npz`` (``dpmm`` banks): the fitted mixture.

The ZIP comment holds ``himatchad-bank sha256:<hex>`` of the manifest's bytes, so the manifest is
checked too. No voxel data is stored. :func:`write_bank_file` writes to a temporary name in the
target folder, re-opens and verifies it, then renames it; :meth:`BankFile.open` refuses a file that
is not a bank file, is truncated, made by a newer format, or whose members' bytes differ from the
manifest's checksums (naming the member), with :class:`HiMatchADError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import HiMatchADError

#: Version of the bank-file layout; a reader refuses a file of a higher version.
BANK_FILE_FORMAT = 1
KIND = "himatchad-normal-bank"
MANIFEST_NAME = "himatchad-bank.json"
_COMMENT_PREFIX = b"himatchad-bank sha256:"


def _sha256_file(fh, n: int, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    while n > 0:
        b = fh.read(min(chunk, n))
        if not b:
            raise EOFError
        h.update(b)
        n -= len(b)
    return h.hexdigest()


def write_bank_file(dest: Union[str, os.PathLike], manifest: dict, members: dict) -> Path:
    """Write the bank file ``dest``: ``manifest`` (``members`` added: SHA-256 and size of each) and
    ``members`` (archive name -> a file :class:`Path` or ``bytes``). Written under a temporary name
    beside ``dest``, verified by :meth:`BankFile.open`, then renamed."""
    dest = Path(dest).expanduser()
    recorded = {}
    for name, src in members.items():
        if isinstance(src, (bytes, bytearray)):
            recorded[name] = {"sha256": hashlib.sha256(src).hexdigest(), "bytes": len(src)}
        else:
            with open(src, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                recorded[name] = {"sha256": _sha256_file(fh, size), "bytes": size}
    manifest = {**manifest, "members": recorded}
    head = json.dumps(manifest, indent=1).encode("utf-8")
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.comment = _COMMENT_PREFIX + hashlib.sha256(head).hexdigest().encode()
            zf.writestr(zipfile.ZipInfo(MANIFEST_NAME, (1980, 1, 1, 0, 0, 0)), head)
            for name, src in members.items():
                info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
                if isinstance(src, (bytes, bytearray)):
                    zf.writestr(info, bytes(src))
                else:
                    with open(src, "rb") as fin, zf.open(info, "w", force_zip64=recorded[name]["bytes"] > 2**31) as fout:
                        for chunk in iter(lambda: fin.read(1 << 22), b""):
                            fout.write(chunk)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        BankFile.open(tmp, what=str(dest))  # re-read and checked before it takes the final name
    return dest


class BankFile:
    """An opened, verified bank file: :attr:`manifest`, and members read by :meth:`array`, :meth:`json`
    and :meth:`npz` (``.npy`` members are memory-mapped read-only from the file itself)."""

    def __init__(self, path: Path, manifest: dict, offsets: dict, digest: str = ""):
        self.path = path
        self.manifest = manifest
        # "sha256:<hex>" of the manifest's bytes, which record every member's SHA-256: names the content
        self.digest = digest
        self._offsets = offsets  # member name -> (offset of its bytes in the file, size)

    @classmethod
    def open(cls, path: Union[str, os.PathLike], verify: bool = True, what: Optional[str] = None) -> "BankFile":
        """Open ``path`` and check it (``verify``: every member's SHA-256); :class:`HiMatchADError` otherwise."""
        path = Path(path).expanduser()
        what = what or str(path)
        if not path.is_file():
            raise HiMatchADError(f"bank file not found: {what}" if not path.exists() else f"{what} is not a file (a bank file is one file, made by 'himatchad bank export')")
        damaged = f"{what} is not a readable HiMatch-AD bank file"
        try:
            with zipfile.ZipFile(path) as zf:
                infos = {i.filename: i for i in zf.infolist()}
                comment = zf.comment
                if MANIFEST_NAME not in infos:
                    raise HiMatchADError(f"{damaged}: it has no {MANIFEST_NAME} (is it a bank file made by 'himatchad bank export'?)")
                head = zf.read(MANIFEST_NAME)
        except zipfile.BadZipFile as exc:
            raise HiMatchADError(f"{damaged} (truncated or damaged: {exc}); export it again or copy it again") from None
        except (OSError, EOFError, ValueError) as exc:  # zipfile's CRC check raises BadZipFile; a short read EOFError
            raise HiMatchADError(f"{damaged} (truncated or damaged: {exc}); export it again or copy it again") from None
        try:
            manifest = json.loads(head.decode("utf-8"))
        except ValueError:
            raise HiMatchADError(f"{damaged}: its manifest is not valid JSON") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            raise HiMatchADError(f"{damaged}: its manifest does not describe a normal bank")
        fmt = manifest.get("format")
        if not isinstance(fmt, int) or fmt < 1:
            raise HiMatchADError(f"{damaged}: its manifest has no valid format version")
        if fmt > BANK_FILE_FORMAT:
            raise HiMatchADError(
                f"the bank file {what} was made by a newer HiMatch-AD (format {fmt}; this version reads format "
                f"{BANK_FILE_FORMAT} and older); upgrade HiMatch-AD to use it"
            )
        if comment != _COMMENT_PREFIX + hashlib.sha256(head).hexdigest().encode():
            raise HiMatchADError(f"{damaged}: its manifest {MANIFEST_NAME} was changed after export (checksum mismatch)")
        recorded = manifest.get("members")
        if not isinstance(recorded, dict) or not all(isinstance(r, dict) for r in recorded.values()):
            raise HiMatchADError(f"{damaged}: its manifest has no valid list of members")
        extra = sorted(set(infos) - set(recorded) - {MANIFEST_NAME})
        missing = sorted(set(recorded) - set(infos))
        if missing or extra:
            raise HiMatchADError(f"{damaged}: members {', '.join(missing) or ''}{' missing' if missing else ''}{'; ' if missing and extra else ''}{', '.join(extra)}{' not in the manifest' if extra else ''}")
        offsets = {}
        size_total = path.stat().st_size
        with open(path, "rb") as fh:
            for name, rec in recorded.items():
                info = infos[name]
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != rec.get("bytes"):
                    raise HiMatchADError(f"{damaged}: member {name} is compressed or has another size than recorded")
                fh.seek(info.header_offset)
                local = fh.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise HiMatchADError(f"{damaged}: member {name} is damaged (no local header)")
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + n_name + n_extra
                if start + info.file_size > size_total:
                    raise HiMatchADError(f"{damaged} (truncated: member {name} ends beyond the end of the file); copy it again")
                offsets[name] = (start, info.file_size)
                if verify:
                    fh.seek(start)
                    try:
                        digest = _sha256_file(fh, info.file_size)
                    except EOFError:
                        raise HiMatchADError(f"{damaged} (truncated in member {name}); copy it again") from None
                    if digest != rec.get("sha256"):
                        raise HiMatchADError(
                            f"the bank file {what} is damaged: member {name} differs from the checksum recorded at export "
                            "(SHA-256 mismatch); export it again or copy it again"
                        )
        return cls(path, manifest, offsets, "sha256:" + hashlib.sha256(head).hexdigest())

    def names(self) -> list:
        return sorted(self._offsets)

    def has(self, name: str) -> bool:
        return name in self._offsets

    def read(self, name: str) -> bytes:
        start, size = self._member(name)
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(size)

    def _member(self, name: str) -> tuple:
        if name not in self._offsets:
            raise HiMatchADError(f"the bank file {self.path} has no member {name}")
        return self._offsets[name]

    def json(self, name: str):
        return json.loads(self.read(name).decode("utf-8"))

    def npz(self, name: str) -> dict:
        with np.load(io.BytesIO(self.read(name)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def array(self, name: str) -> np.ndarray:
        """A ``.npy`` member, memory-mapped read-only from the bank file (no copy)."""
        start, size = self._member(name)
        with open(self.path, "rb") as fh:
            fh.seek(start)
            try:
                version = np.lib.format.read_magic(fh)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"npy format {version}")
                shape, fortran, dtype = read_header(fh)
            except ValueError as exc:
                raise HiMatchADError(f"the bank file {self.path}: member {name} is not a numpy array ({exc})") from None
            data = fh.tell()
        if dtype.hasobject:
            raise HiMatchADError(f"the bank file {self.path}: member {name} holds Python objects, which are never loaded")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if data + nbytes > start + size:
            raise HiMatchADError(f"the bank file {self.path}: member {name} is shorter than its array header says")
        if nbytes == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=data, shape=shape, order="F" if fortran else "C")
