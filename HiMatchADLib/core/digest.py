"""Content digests: of files (SHA-256, chunked) and of JSON-able settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


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
