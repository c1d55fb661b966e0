"""The normal bank on disk: settings, manifest, checksummed arrays, loading and verification."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.digest import file_digest, json_hash

BANK_FORMAT = 7


def default_cache_root() -> Path:
    env = os.environ.get("HIMATCHAD_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "himatchad"


@dataclass(frozen=True)
class BankSettings:
    """Everything about how a bank is built (part of its cache key)."""

    # The intensity preset the normals were prepared with ("auto" resolved by the detector from the
    # normal set) and their dimensionality ("2d", "3d" or "mixed"; "" when not recorded).
    modality: str = "auto"
    dims: str = ""
    slice_axis: str = "auto"
    resolution: int = 448
    # In-plane pixel spacing (mm) of the model canvas every slice is resampled to (None: each slice
    # stretched to ``resolution``, its shorter side; see features.canvas.plan_plane).
    pixel_spacing_mm: Optional[float] = None
    stages: tuple = ()
    clusters_per_slice: int = 64
    codebook_factor: float = 8.0
    shared_codebook: bool = False
    slice_step: int = 1
    min_foreground_patches: int = 4
    patch_foreground_fraction: float = 0.25
    seed: int = 0


def array_files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".npy", ".npz") and p.is_file() and _is_bank_array(p.name))


def _is_bank_array(name: str) -> bool:
    """Arrays of the bank itself (extras fitted later, such as ``dpmm_*.npz``, carry their own checks)."""
    return not name.startswith(("dpmm_", "calib_", "."))


def verify_checksums(root: Path, manifest: dict) -> None:
    """Raise ``ValueError`` naming the first array whose bytes differ from the manifest's record
    (a damaged disk, a truncated copy, a file overwritten by hand)."""
    recorded = manifest.get("checksums")
    if not isinstance(recorded, dict) or not recorded:
        raise ValueError("the manifest records no checksums")
    present = set(array_files(root))
    if present != set(recorded):
        raise ValueError(f"array files differ from the manifest ({sorted(present ^ set(recorded))[:3]})")
    for name, digest in sorted(recorded.items()):
        if file_digest(root / name) != digest:
            raise ValueError(f"{name} is damaged (checksum mismatch)")


def file_fingerprint(path: Path, root: Path) -> dict:
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in entries)
        mtime = max((p.stat().st_mtime_ns for p in entries), default=0)
        return {"path": str(path.relative_to(root)), "size": size, "mtime_ns": mtime, "n_files": len(entries)}
    st = path.stat()
    return {"path": str(path.relative_to(root)), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class NpyAppender:
    """Append rows to a ``.npy`` file whose length is unknown in advance (header patched at the end)."""

    HEADER_BYTES = 128

    def __init__(self, path: Path, dim: int, dtype):
        self.path = path
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.fh = open(path, "wb")
        self.fh.write(self._header(0))

    def _header(self, rows: int) -> bytes:
        shape = (rows, self.dim) if self.dim else (rows,)
        d = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (self.dtype.str, shape)
        pre = b"\x93NUMPY\x01\x00"
        body_len = self.HEADER_BYTES - len(pre) - 2
        body = d.encode("latin1").ljust(body_len - 1) + b"\n"
        return pre + len(body).to_bytes(2, "little") + body

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self.fh.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        self.fh.seek(0)
        self.fh.write(self._header(self.rows))
        self.fh.close()


def save_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)


@dataclass
class NormalBank:
    """A built or loaded bank (arrays memory-mapped from the cache folder)."""

    root: Path
    manifest: dict
    cls: np.ndarray
    tokens: np.ndarray
    tok_offsets: np.ndarray
    codebooks: dict
    codes: dict
    cent_offsets: dict
    slice_file: np.ndarray
    slice_index: np.ndarray
    slice_group: np.ndarray
    slice_pos: np.ndarray
    slice_grid: np.ndarray
    centroids: dict = field(default_factory=dict)
    # What a bank file brings besides the bank (e.g. ``"dpmm"``: the fitted mixture), used instead of
    # the extras cached in ``root``.
    extras: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_slices(self) -> int:
        return int(self.cls.shape[0])

    @property
    def files(self) -> list[str]:
        return [f["path"] for f in self.manifest["files"]]

    @property
    def groups(self) -> list[str]:
        return self.manifest["groups"]

    @property
    def stages(self) -> list[int]:
        return list(self.manifest["settings"]["stages"])

    @property
    def has_positions(self) -> bool:
        return bool(np.isfinite(self.slice_pos).any())

    @property
    def skipped(self) -> list[dict]:
        return self.manifest.get("skipped", [])

    @property
    def warnings(self) -> list[str]:
        """What preparing the normal images warned about (extreme voxels clipped, padding, NaN)."""
        return list(self.manifest.get("warnings", []))

    def slice_tokens(self, i: int) -> np.ndarray:
        return self.tokens[self.tok_offsets[i] : self.tok_offsets[i + 1]]

    @property
    def uses_codebook(self) -> bool:
        """True when the slices' centroids were replaced by entries of shared codebooks."""
        return bool(self.manifest["settings"].get("shared_codebook"))

    def slice_codes(self, stage: int, i: int) -> np.ndarray:
        """Codebook entries (indices) that summarise slice ``i`` at ``stage`` (shared codebooks only)."""
        if not self.uses_codebook:
            raise ValueError("this bank keeps each slice's own centroids; it has no codebook")
        o = self.cent_offsets[stage]
        return self.codes[stage][o[i] : o[i + 1]]

    def slice_centroids(self, stage: int, i: int) -> np.ndarray:
        """Clustered features of slice ``i`` at ``stage`` (float32 unit rows)."""
        if self.uses_codebook:
            return self.codebook_f32(stage)[self.slice_codes(stage, i)]
        o = self.cent_offsets[stage]
        return np.asarray(self.centroids[stage][o[i] : o[i + 1]], dtype=np.float32)

    def codebook_f32(self, stage: int) -> np.ndarray:
        key = f"cb32_{stage}"
        if key not in self._cache:
            self._cache[key] = np.ascontiguousarray(self.codebooks[stage], dtype=np.float32)
        return self._cache[key]

    def clustered_nbytes(self) -> int:
        """Bytes of what ``himatch`` searches: CLS rows, clustered features (per-slice centroids, or
        codebooks and codes) and offsets."""
        arrays = [self.cls, *self.centroids.values(), *self.codebooks.values(), *self.codes.values(), *self.cent_offsets.values()]
        return int(sum(a.nbytes for a in arrays))

    def cls_f32(self) -> np.ndarray:
        if "cls32" not in self._cache:
            self._cache["cls32"] = np.asarray(self.cls, dtype=np.float32)
        return self._cache["cls32"]

    def extra_path(self, kind: str, settings: dict, suffix: str) -> Path:
        return self.root / f"{kind}_{json_hash(settings)[:16]}{suffix}"

    def describe(self) -> dict:
        m = self.manifest
        return {
            "cache": str(self.root),
            "normals": m.get("folder"),
            "files": len(m["files"]),
            "skipped": len(m.get("skipped", [])),
            "slices": self.n_slices,
            "tokens": int(self.tokens.shape[0]),
            "model": m["model"],
            "build_seconds": m.get("build_seconds"),
        }

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, root: Path, verify: bool = True) -> "NormalBank":
        """Open a cached bank (memory-mapped). With ``verify`` every array's checksum is compared
        with the manifest first, so damaged content is never used; ``ValueError`` otherwise."""
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        if not manifest.get("complete") or manifest.get("format") != BANK_FORMAT:
            raise ValueError("incomplete bank or other format")
        if verify:
            verify_checksums(root, manifest)

        def ld(name):
            return np.load(root / name, mmap_mode="r", allow_pickle=False)

        return cls.assemble(root, manifest, ld, np.load(root / "slices.npz", allow_pickle=False))

    @classmethod
    def assemble(cls, root: Path, manifest: dict, ld, meta) -> "NormalBank":
        """The bank of ``manifest`` from its arrays: ``ld(name)`` opens the ``.npy`` array ``name``,
        ``meta`` maps the names of ``slices.npz``; ``ValueError`` when their shapes disagree."""
        stages = manifest["settings"]["stages"]
        shared = bool(manifest["settings"].get("shared_codebook"))
        bank = cls(
            root=root,
            manifest=manifest,
            cls=np.asarray(ld("cls.npy")),
            tokens=ld("tokens.npy"),
            tok_offsets=np.asarray(ld("tok_offsets.npy")),
            codebooks={s: ld(f"codebook_{s}.npy") for s in stages} if shared else {},
            codes={s: np.asarray(ld(f"codes_{s}.npy")) for s in stages} if shared else {},
            centroids={} if shared else {s: ld(f"centroids_{s}.npy") for s in stages},
            cent_offsets={s: np.asarray(ld(f"cent_offsets_{s}.npy")) for s in stages},
            slice_file=meta["source"],
            slice_index=meta["index"],
            slice_group=meta["group"],
            slice_pos=meta["pos"],
            slice_grid=meta["grid"],
        )
        n = bank.n_slices
        ok = (
            n == manifest["n_slices"]
            and bank.tok_offsets.shape == (n + 1,)
            and int(bank.tok_offsets[-1]) == bank.tokens.shape[0]
            and all(bank.cent_offsets[s].shape == (n + 1,) for s in stages)
            and all(
                int(bank.cent_offsets[s][-1]) == bank.codes[s].shape[0]
                and (bank.codes[s].size == 0 or 0 <= int(bank.codes[s].min()) <= int(bank.codes[s].max()) < bank.codebooks[s].shape[0])
                if shared
                else int(bank.cent_offsets[s][-1]) == bank.centroids[s].shape[0] and bank.centroids[s].shape[1:] == bank.cls.shape[1:]
                for s in stages
            )
            and bank.slice_file.shape == (n,)
        )
        if not ok:
            raise ValueError("inconsistent array shapes")
        return bank
