"""Content digests: of files (SHA-256, chunked) and of JSON-able settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def json_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path, chunk: int = 1 << 23) -> str:
    """BLAKE2b digest of a file's bytes (streamed): what the manifest records for each array."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def files_digest(paths) -> dict:
    """``{"bytes": total size, "blake2b": digest}`` of the bytes of ``paths`` in their order (a file,
    or the files of a DICOM series): what a result records of its input and of each of its outputs,
    so that a rerun knows the same content from a replaced file with an old modification time."""
    h = hashlib.blake2b(digest_size=16)
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while True:
                block = f.read(1 << 23)
                if not block:
                    break
                total += len(block)
                h.update(block)
        h.update(b"\0")  # file boundary: two files are not their concatenation
    return {"bytes": total, "blake2b": h.hexdigest()}


def array_digest(array) -> str:
    """BLAKE2b of an image's voxel values and shape (not of its file): the same scan stored as a
    copy, under another name or in another format has the same digest."""
    a = np.ascontiguousarray(array)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((a.shape, a.dtype.str)).encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()
