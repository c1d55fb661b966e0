"""The normal bank: features of every normal slice, built once, cached on disk, memory-mapped.

Layout of a cache folder (no pickle anywhere; ``.npy`` arrays opened with ``allow_pickle=False``
and ``mmap_mode='r'``, plus ``manifest.json``):

- ``cls.npy`` (n_slices, D) float16: L2-normalised CLS token of the last stage (global descriptor).
- ``tokens.npy`` (n_tokens, D) float16: last-stage foreground patch tokens of every slice, slice
  after slice; ``tok_offsets.npy`` (n_slices + 1) int64 delimits each slice's rows.
- Clustered features, per stage: every slice's foreground patch tokens are summarised by seeded
  spherical k-means (``clusters_per_slice`` centroids). By default each slice keeps its own
  centroids: ``centroids_<stage>.npy`` (m, D) float16 unit rows, slice after slice, memory-mapped
  when loaded (only the rows of the retrieved supports are read), and ``cent_offsets_<stage>.npy``
  (n_slices + 1) int64 delimits each slice's rows. With ``shared_codebook`` (opt-in) all those
  centroids are instead quantised with one codebook per stage (spherical k-means with
  ``codebook_factor * sqrt(#centroids)`` entries): ``codebook_<stage>.npy`` (M, D) float16 holds
  the codebook and ``codes_<stage>.npy`` (m,) int32 the codebook entry of each slice centroid, so
  the clustered bank grows sublinearly with the normal set at the price of matching against the
  nearest shared entry rather than the slice's own centroid.
- ``slices.npz``: per slice the source file index, slice index in its volume, subject group,
  relative position within the foreground extent (NaN for 2D images) and patch grid.
- ``manifest.json``: files (relative path, size, mtime), skipped files and why, model, settings,
  content fingerprint, a BLAKE2b checksum of every array file (verified before a cached bank is
  used: a damaged array means a rebuild, never a wrong map), ``"complete": true``. Written last, in
  a temporary folder renamed into place. Temporary folders of a build that was killed are removed by
  a later build once they are stale.

The cache folder name hashes (normal folder, the extractor's :meth:`FeatureExtractor.cache_key`
(model, stage norm, precision, device type), settings); the manifest's content fingerprint
hashes (file paths, sizes, modification times). A changed, added or removed file therefore
invalidates the bank, which is rebuilt in place. An unreadable or inconsistent cache is rebuilt too.
Extras fitted on a bank (the DPMM, the calibration) live in the same folder, named by the hash of
their own settings, and disappear with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .cluster import build_codebook, codebook_size, spherical_kmeans
from .errors import HiMatchADError
from .features import FeatureExtractor
from .imageio import list_images, read_image, write_text_atomic
from .preprocess import patch_foreground, prepare_volume, source_group
from .progress import Reporter

BANK_FORMAT = 5


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
    # stretched to ``resolution``; see preprocess.plan_plane).
    pixel_spacing_mm: Optional[float] = None
    stages: tuple = ()
    clusters_per_slice: int = 64
    codebook_factor: float = 8.0
    shared_codebook: bool = False
    slice_step: int = 1
    min_foreground_patches: int = 4
    patch_foreground_fraction: float = 0.25
    seed: int = 0


def _json_hash(obj) -> str:
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


def _array_files(folder: Path) -> list:
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
    present = set(_array_files(root))
    if present != set(recorded):
        raise ValueError(f"array files differ from the manifest ({sorted(present ^ set(recorded))[:3]})")
    for name, digest in sorted(recorded.items()):
        if file_digest(root / name) != digest:
            raise ValueError(f"{name} is damaged (checksum mismatch)")


def _file_fingerprint(path: Path, root: Path) -> dict:
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in entries)
        mtime = max((p.stat().st_mtime_ns for p in entries), default=0)
        return {"path": str(path.relative_to(root)), "size": size, "mtime_ns": mtime, "n_files": len(entries)}
    st = path.stat()
    return {"path": str(path.relative_to(root)), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _NpyAppender:
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


def _save_npy(path: Path, arr: np.ndarray) -> None:
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
        return self.root / f"{kind}_{_json_hash(settings)[:16]}{suffix}"

    def describe(self) -> dict:
        m = self.manifest
        return {
            "cache": str(self.root),
            "normals": m["folder"],
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

        stages = manifest["settings"]["stages"]
        shared = bool(manifest["settings"].get("shared_codebook"))
        meta = np.load(root / "slices.npz", allow_pickle=False)
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


def bank_key(folder: Path, extractor: FeatureExtractor, settings: BankSettings) -> str:
    return _json_hash({"folder": str(folder.resolve()), "features": extractor.cache_key(), "settings": asdict(settings), "format": BANK_FORMAT})[:20]


def scan_normals(folder: str | os.PathLike) -> tuple[Path, list[Path], list[dict]]:
    root = Path(folder).expanduser()
    files = list_images(root)
    if not files:
        raise HiMatchADError(
            f"no images found in the normal folder {root} (looked for NIfTI, NRRD, MHA/MHD, DICOM series, PNG/JPEG/TIFF)"
        )
    return root, files, [_file_fingerprint(p, root) for p in files]


def build_or_load(
    folder: str | os.PathLike,
    extractor: FeatureExtractor,
    settings: BankSettings,
    cache_root: Optional[Path] = None,
    reporter: Optional[Reporter] = None,
    rebuild: bool = False,
) -> NormalBank:
    """Load the cached bank for ``folder`` if it is current, else build it (streamed) and cache it."""
    reporter = reporter or Reporter()
    root, files, fps = scan_normals(folder)
    cache_root = Path(cache_root) if cache_root else default_cache_root()
    dest = cache_root / "banks" / bank_key(root, extractor, settings)
    content = _json_hash(fps)
    if not rebuild and (dest / "manifest.json").exists():
        try:
            bank = NormalBank.load(dest, verify=False)
            if bank.manifest["content"] == content:
                verify_checksums(dest, bank.manifest)  # damaged arrays are never used
                return bank
        except Exception as exc:  # corrupt or partial cache: rebuild
            warnings.warn(f"normal bank cache at {dest} is unreadable ({exc}); rebuilding it")
    return _build(root, files, fps, content, extractor, settings, dest, reporter)


def _estimate_slices(files: list[Path], settings: BankSettings) -> int:
    import SimpleITK as sitk

    total = 0
    for p in files:
        try:
            if p.is_dir():
                total += max(1, sum(1 for _ in p.iterdir()))
                continue
            r = sitk.ImageFileReader()
            r.SetFileName(str(p))
            r.ReadImageInformation()
            size = r.GetSize()
            if len(size) < 3 or min(size[:3]) == 1:
                total += 1
            else:
                d = np.abs(np.asarray(r.GetDirection()).reshape(3, 3))
                total += int(size[int(np.argmax(d[2]))])  # index axis closest to S (axial)
        except Exception:
            total += 1
    return max(1, total // max(1, settings.slice_step))


#: A temporary bank folder left by a process that is gone is removed once nothing in it changed for
#: this long; one whose process may be alive (or runs on another machine) only after ``_ABANDONED_S``.
_STALE_S = 3600.0
_ABANDONED_S = 24 * 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _last_change(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for p in folder.iterdir():
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            pass
    return max(times)


def clean_stale_temporaries(banks_dir: Path, now: Optional[float] = None) -> list:
    """Remove temporary bank folders (``.KEY.tmp-PID-...``, ``.KEY.old-PID-...``) that a killed build
    left behind; returns the removed paths. A folder of a live process is kept unless abandoned."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(banks_dir.iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if not name.startswith(".") or (".tmp-" not in name and ".old-" not in name) or not p.is_dir():
            continue
        try:
            pid = int(name.rsplit("-", 2)[-2])
            idle = now - _last_change(p)
        except (ValueError, IndexError, OSError):
            continue
        if idle > _ABANDONED_S or (idle > _STALE_S and not _pid_alive(pid)):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    return removed


def _build(root, files, fps, content, extractor, settings, dest: Path, reporter: Reporter) -> NormalBank:
    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dest.parent)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    stages = list(extractor.stages)
    last = stages[-1]
    D = extractor.dim
    try:
        tok_w = _NpyAppender(tmp / "tokens.npy", D, np.float16)
        cent_w = {s: _NpyAppender(tmp / f"cent_{s}.npy", D, np.float16) for s in stages}
        cls_rows, tok_off, cent_off = [], [0], {s: [0] for s in stages}
        meta = {"file": [], "index": [], "group": [], "pos": [], "grid": []}
        groups: list[str] = []
        skipped: list[dict] = []
        estimate = _estimate_slices(files, settings)
        done = 0
        msg = "Building normal bank"
        reporter(msg, 0, estimate)
        for fi, path in enumerate(files):
            reporter.check()
            try:
                img = read_image(path)
                prep = prepare_volume(
                    img, settings.modality, settings.slice_axis, settings.pixel_spacing_mm, settings.resolution, extractor.patch_size
                )
            except HiMatchADError as exc:
                skipped.append({"path": fps[fi]["path"], "reason": str(exc)})
                warnings.warn(f"skipping normal image {path}: {exc}")
                continue
            group = source_group(img.name, img.is_2d)
            if group not in groups:
                groups.append(group)
            gi = groups.index(group)
            idx = prep.slices_with_foreground()[:: max(1, settings.slice_step)]
            grid_size = extractor.grid_for(prep.canonical.shape[1], prep.canonical.shape[2])
            grid = (grid_size[0] // extractor.patch_size, grid_size[1] // extractor.patch_size)
            for b in range(0, len(idx), extractor.batch_size):
                reporter.check()
                sel = idx[b : b + extractor.batch_size]
                feats = extractor.extract(prep.canonical[sel])
                pfg = patch_foreground(prep.foreground[sel], grid, settings.patch_foreground_fraction)
                for n, si in enumerate(sel):
                    m = pfg[n]
                    if int(m.sum()) < settings.min_foreground_patches:
                        continue
                    cls_rows.append(feats.cls[n].astype(np.float16))
                    for st, tok in zip(stages, feats.stages):
                        t = tok[n][m]
                        if st == last:
                            tok_w.append(t)
                            tok_off.append(tok_off[-1] + t.shape[0])
                        c = spherical_kmeans(t, settings.clusters_per_slice, seed=settings.seed)
                        cent_w[st].append(c)
                        cent_off[st].append(cent_off[st][-1] + c.shape[0])
                    meta["file"].append(fi)
                    meta["index"].append(int(si))
                    meta["group"].append(gi)
                    meta["pos"].append(float(prep.positions[si]))
                    meta["grid"].append(grid)
                done += len(sel)
                reporter(msg, min(done, estimate), max(estimate, done))
        for w in [tok_w, *cent_w.values()]:
            w.close()
        if not cls_rows:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
            raise HiMatchADError(f"no usable normal slices in {root}" + (f" (skipped: {reasons})" if reasons else ""))
        _save_npy(tmp / "cls.npy", np.stack(cls_rows))
        _save_npy(tmp / "tok_offsets.npy", np.asarray(tok_off, np.int64))
        codebook_sizes = {}
        for si, s in enumerate(stages):
            reporter.check()
            reporter("Clustering normal features", si, len(stages))
            _save_npy(tmp / f"cent_offsets_{s}.npy", np.asarray(cent_off[s], np.int64))
            if not settings.shared_codebook:  # each slice keeps its own centroids
                os.replace(tmp / f"cent_{s}.npy", tmp / f"centroids_{s}.npy")
                continue
            cents = np.load(tmp / f"cent_{s}.npy", mmap_mode="r")
            size = codebook_size(cents.shape[0], settings.codebook_factor)
            cb, codes = build_codebook(cents, size, seed=settings.seed, check=reporter.check)
            del cents
            (tmp / f"cent_{s}.npy").unlink()
            _save_npy(tmp / f"codebook_{s}.npy", cb.astype(np.float16))
            _save_npy(tmp / f"codes_{s}.npy", codes)
            codebook_sizes[str(s)] = int(cb.shape[0])
        reporter("Clustering normal features", len(stages), len(stages))
        np.savez(
            tmp / "slices.npz",
            source=np.asarray(meta["file"], np.int32),
            index=np.asarray(meta["index"], np.int32),
            group=np.asarray(meta["group"], np.int32),
            pos=np.asarray(meta["pos"], np.float32),
            grid=np.asarray(meta["grid"], np.int32).reshape(-1, 2),
        )
        manifest = {
            "format": BANK_FORMAT,
            "folder": str(root.resolve()),
            "files": fps,
            "groups": groups,
            "skipped": skipped,
            "content": content,
            "model": extractor.model_id,
            "model_fingerprint": extractor.fingerprint,
            "features": extractor.cache_key(),
            "settings": {**asdict(settings), "stages": stages},
            "n_slices": len(cls_rows),
            "codebook_sizes": codebook_sizes,
            "dim": D,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "checksums": {name: file_digest(tmp / name) for name in _array_files(tmp)},
            "complete": True,
        }
        write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
        reporter(msg, max(estimate, done), max(estimate, done))
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return NormalBank.load(dest, verify=False)  # just written and hashed


def _replace_dir(src: Path, dest: Path) -> None:
    """Move a finished folder into place; an older one is moved aside first, then deleted."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(dest, old)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
