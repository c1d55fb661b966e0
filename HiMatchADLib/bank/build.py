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

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.atomic import process_alive, write_text_atomic
from ..core.digest import array_digest, file_digest, json_hash
from ..core.errors import HiMatchADError
from ..core.progress import Reporter
from ..features.canvas import has_physical_spacing, patch_foreground
from ..features.extractor import FeatureExtractor
from ..features.slicing import SLICE_PLANES, prepare_volume
from ..io.discovery import list_images
from ..io.readers import read_image
from ..io.subjects import source_group
from .clusters import build_codebook, codebook_size, spherical_kmeans
from .store import (
    BANK_FORMAT,
    BankSettings,
    NormalBank,
    NpyAppender,
    array_files,
    default_cache_root,
    file_fingerprint,
    save_npy,
    verify_checksums,
)


def bank_key(folder: Path, extractor: FeatureExtractor, settings: BankSettings) -> str:
    return json_hash({"folder": str(folder.resolve()), "features": extractor.cache_key(), "settings": asdict(settings), "format": BANK_FORMAT})[:20]


def scan_normals(folder: str | os.PathLike) -> tuple[Path, list[Path], list[dict]]:
    root = Path(folder).expanduser()
    files = list_images(root)
    if not files:
        raise HiMatchADError(
            f"no images found in the normal folder {root} (looked for NIfTI, NRRD, MHA/MHD, DICOM series, PNG/JPEG/TIFF)"
        )
    return root, files, [file_fingerprint(p, root) for p in files]


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
    content = json_hash(fps)
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
        if idle > _ABANDONED_S or (idle > _STALE_S and not process_alive(pid)):
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
        tok_w = NpyAppender(tmp / "tokens.npy", D, np.float16)
        cent_w = {s: NpyAppender(tmp / f"cent_{s}.npy", D, np.float16) for s in stages}
        cls_rows, tok_off, cent_off = [], [0], {s: [0] for s in stages}
        meta = {"file": [], "index": [], "group": [], "pos": [], "grid": []}
        groups: list[str] = []
        skipped: list[dict] = []
        prep_warnings: list[str] = []
        too_small: list = []  # (foreground patches, patch grid) of slices with too little foreground
        voxel_digests: dict = {}  # core.digest.array_digest of each normal image -> its path
        planes: dict = {}  # anatomical plane of the slices -> number of normal images sliced so
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
            prep_warnings += [f"normal image {w}" for w in prep.warnings]
            voxel_digests[array_digest(img.array)] = fps[fi]["path"]
            if has_physical_spacing(img) or not img.is_2d:  # a PNG's plane is not known
                plane = SLICE_PLANES[prep.slice_axis_canonical]
                planes[plane] = planes.get(plane, 0) + 1
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
                feats = extractor.extract(prep.canonical[sel], as_is=prep.plane is not None)
                pfg = patch_foreground(prep.foreground[sel], grid, settings.patch_foreground_fraction)
                for n, si in enumerate(sel):
                    m = pfg[n]
                    if int(m.sum()) < settings.min_foreground_patches:
                        too_small.append((int(m.sum()), grid))
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
            why = ""
            if too_small:
                most = max(n for n, _ in too_small)
                g = too_small[0][1]
                p = extractor.patch_size
                why = (
                    f"; the {len(too_small)} slices with foreground have at most {most} foreground patches of {p}x{p} model "
                    f"pixels (a slice needs {settings.min_foreground_patches}; the model grid is {g[0]}x{g[1]} patches at "
                    f"resolution {settings.resolution}): raise --resolution, or check that the normals show their anatomy"
                )
            elif len(skipped) < len(files):
                why = "; no slice of the images read has foreground (empty or nearly constant images?)"
            raise HiMatchADError(f"no usable normal slices in {root}" + (f" (skipped: {reasons})" if reasons else "") + why)
        save_npy(tmp / "cls.npy", np.stack(cls_rows))
        save_npy(tmp / "tok_offsets.npy", np.asarray(tok_off, np.int64))
        codebook_sizes = {}
        for si, s in enumerate(stages):
            reporter.check()
            reporter("Clustering normal features", si, len(stages))
            save_npy(tmp / f"cent_offsets_{s}.npy", np.asarray(cent_off[s], np.int64))
            if not settings.shared_codebook:  # each slice keeps its own centroids
                os.replace(tmp / f"cent_{s}.npy", tmp / f"centroids_{s}.npy")
                continue
            cents = np.load(tmp / f"cent_{s}.npy", mmap_mode="r")
            size = codebook_size(cents.shape[0], settings.codebook_factor)
            cb, codes = build_codebook(cents, size, seed=settings.seed, check=reporter.check)
            del cents
            (tmp / f"cent_{s}.npy").unlink()
            save_npy(tmp / f"codebook_{s}.npy", cb.astype(np.float16))
            save_npy(tmp / f"codes_{s}.npy", codes)
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
            "warnings": prep_warnings,
            "voxel_digests": voxel_digests,
            "slice_planes": planes,
            "content": content,
            "model": extractor.model_id,
            "model_fingerprint": extractor.fingerprint,
            "features": extractor.cache_key(),
            "settings": {**asdict(settings), "stages": stages},
            "n_slices": len(cls_rows),
            "codebook_sizes": codebook_sizes,
            "dim": D,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "checksums": {name: file_digest(tmp / name) for name in array_files(tmp)},
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
