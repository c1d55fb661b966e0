""""Mark as normal": a reader's feedback, made into normal evidence and used by the next prediction.

:func:`mark_normal` takes a case and the region a reader marked normal (a labelmap on the case's
grid, a range of slices, or both: the labelmap within those slices), runs the model on the marked
slices only, keeps the tokens of the marked patches (a patch is marked when at least the bank's
patch-foreground fraction of it is; a region smaller than that marks the patches it touches) and
writes an entry to the detector's feedback folder (:mod:`HiMatchADLib.bank.feedback`). Each method
uses the entries as :mod:`HiMatchADLib.methods.feedback` states.

The folder is read again before every prediction when its entries changed (an entry added by
another process, e.g. the command line beside Slicer's worker, counts from the next run); every
entry is verified, and one made with another model, precision or bank preparation is refused with
the reason. The calibrated threshold is never changed by feedback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..bank.feedback import check_compatible, entry_files, read_entries, remove_entry, write_entry
from ..core.errors import HiMatchADError
from ..core.geometry import DIRECTION_TOLERANCE, Image
from ..features.canvas import patch_foreground, to_canvas
from ..io.readers import read_image
from ..methods.base import get_method
from ..methods.feedback import build_evidence

#: The bank settings that decide how tokens are made (an entry is usable only with the same ones).
PREPARATION_KEYS = ("modality", "slice_axis", "resolution", "pixel_spacing_mm", "stages", "patch_foreground_fraction")


def feedback_folder(det) -> Optional[Path]:
    """Where ``det`` keeps its feedback: ``det.feedback_dir`` when set, else beside its bank
    (``<bank file>.feedback``, or ``<bank cache folder>.feedback``); None before a bank is loaded."""
    if getattr(det, "feedback_dir", None) is not None:
        return Path(det.feedback_dir).expanduser()
    if getattr(det, "bank_file", None) is not None:
        return Path(f"{det.bank_file}.feedback")
    if getattr(det, "bank", None) is not None:
        root = Path(det.bank.root)
        return root.parent / f"{root.name}.feedback"
    return None


def model_record(det) -> dict:
    ex = det.extractor
    return {"id": det.model, "weights_digest": ex.info.get("weights_digest"), "precision": ex.precision}


def bank_record(det) -> dict:
    s = det.bank.manifest["settings"]
    return {k: (list(s.get(k)) if k == "stages" else s.get(k)) for k in PREPARATION_KEYS}


def _state(folder: Optional[Path]) -> tuple:
    if folder is None:
        return ()
    out = []
    records = entry_files(folder)
    for p in records + [j.with_suffix(".npz") for j in records]:  # records and arrays
        try:
            st = p.stat()
            out.append((p.name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((p.name, 0, 0))
    return tuple(out)


def active_feedback(det):
    """The feedback evidence ``det`` predicts with now (None without entries), read again when
    the folder's entries changed; refuses damaged or incompatible entries."""
    if not getattr(det, "use_feedback", True):
        det._feedback = (None, (), None, [])
        return None
    folder = feedback_folder(det)
    method = get_method(det.method)
    key = (str(folder), _state(folder), det.method, det.clusters_per_slice, det.seed, id(det.bank))
    cached = getattr(det, "_feedback", None)
    if cached is not None and cached[1] == key:
        return cached[0]
    entries = read_entries(folder) if folder is not None else []
    model, bank = model_record(det), bank_record(det)
    for e in entries:
        why = check_compatible(e, model, bank)
        if why:
            raise HiMatchADError(
                f"the feedback entry {e.id} in {folder} cannot be used with this detector: {why}; use another feedback "
                "folder or remove the entry")
    evidence = build_evidence(entries, method.feedback, len(det.bank.stages), det.clusters_per_slice, det.seed)
    det._feedback = (evidence, key, folder, entries)
    return evidence


def feedback_summaries(det) -> list:
    """What a result records of the feedback it was computed with (active entries, oldest first)."""
    cached = getattr(det, "_feedback", None)
    return [e.summary() for e in cached[3]] if cached else []


def feedback_ids(det) -> list:
    """Ids of the entries the next prediction uses (the folder read now)."""
    if getattr(det, "bank", None) is None or det.extractor is None:
        return []
    active_feedback(det)
    return [e.id for e in det._feedback[3]]


def _region_mask(region, image: Image) -> np.ndarray:
    """``region`` (an array, an :class:`Image` or a path of a labelmap) as a boolean array on ``image``'s grid."""
    if region is None:
        return np.zeros(image.array.shape, bool)
    if isinstance(region, (str, os.PathLike)):
        region = read_image(region)
    if isinstance(region, Image):
        g, h = region.geometry, image.geometry
        same = (
            tuple(g.size) == tuple(h.size)
            and np.allclose(g.spacing, h.spacing, rtol=1e-4, atol=1e-4)
            and np.allclose(g.origin, h.origin, rtol=1e-4, atol=1e-3)
            and np.allclose(g.direction, h.direction, atol=DIRECTION_TOLERANCE)
        )
        if not same:
            raise HiMatchADError(
                f"the marked region {region.path or region.name} does not lie on the grid of {image.name} (size, spacing, "
                "origin and direction must be the case's); mark a labelmap of this case")
        region = region.array
    mask = np.asarray(region)
    if mask.shape != image.array.shape:
        raise HiMatchADError(f"the marked region is {mask.shape}, the case {image.name} is {image.array.shape}")
    return mask > 0


def mark_normal(det, image, region=None, slices=None, note: str = "", case: Optional[dict] = None) -> dict:
    """Add a feedback entry: ``region`` (labelmap: array, :class:`Image` or path, on the grid of
    ``image``) and/or ``slices`` (input slice indices along the axis the detector slices, e.g.
    ``range(10, 14)``) of ``image`` are normal. Returns the entry's record."""
    det._check_fitted()
    if region is None and slices is None:
        raise HiMatchADError("say what is normal: a region (a labelmap of the case) and/or a range of slices")
    query = det.prepare(image)
    img, prep = query.image, query.prep
    mask = _region_mask(region, img)
    n = prep.n_slices
    axis_in = prep.slice_axis_input
    flipped = bool(prep.reorientation.flips[prep.slice_axis_canonical])
    if slices is not None:
        chosen = sorted({int(i) for i in slices})
        bad = [i for i in chosen if not 0 <= i < n]
        if not chosen or bad:
            raise HiMatchADError(f"slices must lie in 0..{n - 1} (axis {axis_in} of {img.name}); got {bad or 'none'}")
        keep = np.zeros(n, bool)
        keep[chosen] = True
        shape = [1] * mask.ndim
        shape[axis_in] = n
        in_slices = np.broadcast_to(keep.reshape(shape), mask.shape) if not img.is_2d else np.ones(mask.shape, bool)
        mask = (mask & in_slices) if region is not None else in_slices.copy()
    canon = np.ascontiguousarray(np.moveaxis(prep.reorientation.to_canonical(mask), prep.slice_axis_canonical, 0))
    canon &= prep.native_foreground
    if not canon.any():
        raise HiMatchADError(f"the marked region has no voxel in the foreground of {img.name}: nothing to mark")
    marked_canvas = to_canvas(canon, prep.plane, threshold=0.5) if prep.plane is not None else canon
    sel = np.flatnonzero(marked_canvas.reshape(n, -1).any(1) | canon.reshape(n, -1).any(1))
    frac = det.bank.manifest["settings"]["patch_foreground_fraction"]
    ex = det.extractor
    cls, offsets, stages, in_idx, n_patches = [], [0], None, [], 0
    for b in range(0, len(sel), det.batch_size):
        part = sel[b : b + det.batch_size]
        feats = ex.extract(prep.canonical[part], as_is=prep.plane is not None)
        fg = patch_foreground(prep.foreground[part], feats.grid, frac)
        m = patch_foreground(marked_canvas[part], feats.grid, frac)
        touched = patch_foreground(marked_canvas[part], feats.grid, 1e-6)
        if stages is None:
            stages = [[] for _ in feats.stages]
        for k, si in enumerate(part):
            chosen = m[k] & fg[k]
            if not chosen.any():
                chosen = touched[k] & fg[k]  # a region smaller than a patch marks the patches it touches
            if not chosen.any():
                continue
            for s, t in enumerate(feats.stages):
                stages[s].append(np.asarray(t[k][chosen], np.float32))
            cls.append(np.asarray(feats.cls[k], np.float32))
            offsets.append(offsets[-1] + int(chosen.sum()))
            n_patches += int(chosen.sum())
            in_idx.append(int(n - 1 - si) if flipped else int(si))
    if not cls:
        raise HiMatchADError(f"the marked region of {img.name} covers no model patch of its foreground: mark a larger region")
    meta = {
        "note": str(note or ""),
        "case": {
            "name": (case or {}).get("name", img.name),
            "input": (case or {}).get("input", str(img.path) if img.path else None),
            "input_digest": (case or {}).get("input_digest") or det._input_digest(img) or None,
        },
        "region": {
            "kind": "labelmap and slices" if region is not None and slices is not None else ("labelmap" if region is not None else "slices"),
            "slice_axis": int(axis_in),
            "slices": sorted(in_idx),
            "voxels": int(mask.sum()),
            "patches": n_patches,
            **({"labelmap": str(region)} if isinstance(region, (str, os.PathLike)) else {}),
        },
        "model": model_record(det),
        "bank": bank_record(det),
        "method": det.method,
    }
    folder = feedback_folder(det)
    entry = write_entry(folder, meta, np.stack(cls), np.asarray(offsets), [np.concatenate(t) for t in stages])
    det._feedback = None  # read again (verified) by the next prediction
    return dict(entry.meta)


def list_feedback(det_or_folder) -> list:
    """The records of the entries of a detector's feedback folder (or of a folder), verified, oldest first."""
    folder = det_or_folder if isinstance(det_or_folder, (str, os.PathLike)) else feedback_folder(det_or_folder)
    if folder is None:
        return []
    return [dict(e.meta) for e in read_entries(folder)]


def remove_feedback(det_or_folder, entry_id: str) -> dict:
    """Remove one entry (by id or a unique start of it); returns its record."""
    folder = det_or_folder if isinstance(det_or_folder, (str, os.PathLike)) else feedback_folder(det_or_folder)
    if folder is None:
        raise HiMatchADError("the detector has no normal bank yet, so no feedback folder: fit it or give the folder")
    meta = remove_entry(folder, entry_id)
    if not isinstance(det_or_folder, (str, os.PathLike)):
        det_or_folder._feedback = None
    return meta
