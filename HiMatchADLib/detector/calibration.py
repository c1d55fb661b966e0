"""Calibration: the threshold from held-out normal slices, leave-one-subject-out.

:func:`calibration_plan` chooses the held-out slices (whole subjects, in a seeded order);
:func:`calibrate` scores each against the normal model without its own subject, lets the method
add statistics of its own (``Scorer.calibrate``), and takes the threshold as the ``1 - target_fpr``
quantile of the held-out foreground pixel scores. The record is cached beside the bank under
:data:`CALIBRATION_FORMAT` and the detector's ``method_key``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import HiMatchADError
from ..features.slicing import prepare_volume
from ..io.readers import read_image
from ..methods.base import QuerySlice, SliceScores, get_method
from ..methods.maps import fuse_one, top_percent_mean, window

#: Version of the cached calibration (4: per-stage reliability weights, smoothing in image pixels;
#: 3: subjects from ``subject_pattern``, at least
#: ``calibration_slices`` held-out slices when the normal set has them, warnings kept with it).
CALIBRATION_FORMAT = 4
#: Fewer held-out calibration slices than this is reported as a warning (the threshold is uncertain).
MIN_CALIBRATION_SLICES = 8


def calibration_plan(det) -> tuple[list, list]:
    """Held-out normal slices: (chosen bank slice ids, held-out subject ids).

    Subjects are taken in a seeded random order: first ``min(n - 1, 12)`` of them (``dpmm``:
    ``max(2, n/5)``, at most 12), each giving up to ``ceil(calibration_slices / that number)``
    slices spread evenly through it; then more subjects, with the same budget each, until
    ``calibration_slices`` slices are held out. Every held-out slice is scored against the
    normal model without its own subject, so for ``himatch`` and ``knn`` holding out more
    subjects costs nothing and spreads the threshold over more anatomy. The ``dpmm`` mixture is
    fitted without all held-out subjects, so at most half of them are held out.
    """
    subj = det.slice_subject
    groups = np.unique(subj)
    rng = np.random.default_rng(det.seed)
    order = rng.permutation(groups)
    if len(groups) < 2:
        n_base, n_max = len(groups), len(groups)
    else:
        if get_method(det.method).held_out_of_fit:  # the scorer is fitted without every held-out subject
            n_base = max(1, min(len(groups) - 1, max(2, len(groups) // 5), 12))
            n_max = max(1, len(groups) // 2)
        else:  # each held-out slice excludes only its own subject: spread over up to 12 subjects
            n_base = min(len(groups) - 1, 12)
            n_max = len(groups)
        n_base = min(n_base, n_max)
    per_group = max(1, math.ceil(det.calibration_slices / max(n_base, 1)))
    ids: list = []
    chosen: list = []
    for n, g in enumerate(order[:n_max]):
        if n >= n_base and len(ids) >= det.calibration_slices:
            break
        members = np.flatnonzero(subj == g)
        if members.size > per_group:  # evenly spread through the volume / subject
            members = members[np.linspace(0, members.size - 1, per_group).round().astype(int)]
        ids.extend(members.tolist())
        chosen.append(int(g))
    return ids[: max(det.calibration_slices, len(chosen))], sorted(chosen)


@dataclass
class _Held:
    """One scored held-out slice: its scores, query, native foreground mask, where its map goes
    (plane, native slice shape), its file, whether it is calibrated on (else a neighbour a centre
    slice's map is fused with) and its file's slice spacing."""

    scores: SliceScores
    query: QuerySlice
    mask: np.ndarray
    where: tuple
    file: int
    centre: bool
    spacing: float


def calibrate(det, cal_ids: list, cal_groups: list) -> dict:
    """Score held-out normal slices (each against the bank without its own subject)."""
    bank = det.bank
    single = len(np.unique(det.slice_subject)) < 2
    msg = "Calibrating on held-out normal slices"
    det.reporter(msg, 0, len(cal_ids))
    by_file: dict = {}
    for i in cal_ids:
        by_file.setdefault(int(bank.slice_file[i]), []).append(i)
    root = Path(bank.manifest["folder"])
    collected: list = []
    done = 0
    for fi, ids in by_file.items():
        img = read_image(root / bank.files[fi])
        prep = prepare_volume(img, **det._prep_settings())
        sl = np.asarray([int(bank.slice_index[i]) for i in ids])
        centres = set(sl.tolist())
        w = window(prep.slice_spacing, det.consistency_mm, prep.n_slices) if det._fuses_slices(img, prep) else 0
        if w:  # the neighbours a centre slice's map is fused with are scored too
            scorable = set(prep.slices_with_foreground().tolist())
            sl = np.asarray(sorted({j for i in centres for j in range(i - w, i + w + 1) if j in scorable or j == i}))
        queries, masks = [], []
        for b in range(0, len(sl), det.batch_size):
            sel = sl[b : b + det.batch_size]
            qs, fgs = det._queries(prep, sel)
            for q in qs:
                q.group = None if single else int(det.slice_subject[ids[0]])
            queries += qs
            masks += fgs
        scores = det.scorer.calibration_scores(queries)
        where = (prep.plane, prep.native_shape[1:])
        collected += [_Held(s, q, m, where, fi, q.index in centres, prep.slice_spacing) for s, q, m in zip(scores, queries, masks)]
        done += len(ids)
        det.reporter(msg, done, len(cal_ids))
    centre = [h for h in collected if h.centre]
    if not centre:
        raise HiMatchADError("no held-out normal slice could be scored for calibration: the normal set is too small")
    cal_warn: list = []
    cal: dict = {"n_slices": len(centre), "held_out_groups": [det.subjects[g] for g in cal_groups], "single_subject": single, "warnings": cal_warn}
    cal.update(det.scorer.calibrate([h.scores for h in centre], [h.scores for h in collected]))
    values, slice_scores = [], []
    maps: dict = {}  # file -> (pixel map by slice index, foreground by slice index, slice spacing)
    for h in collected:
        maps.setdefault(h.file, ({}, {}, h.spacing))
        maps[h.file][0][h.query.index] = det._pixel_map(h.scores.patch, h.query, *h.where)
        maps[h.file][1][h.query.index] = h.mask
    for h in centre:
        by_index, fgs, spacing = maps[h.file]
        i = h.query.index
        pix = fuse_one(i, by_index, fgs, spacing, det.consistency_mm) if len(by_index) > 1 and det.consistency_mm else by_index[i]
        values.append(pix[h.mask])
        slice_scores.append(top_percent_mean(h.scores.patch))
    vals = np.concatenate(values) if values else np.zeros(1, np.float32)
    cal["threshold"] = float(np.quantile(vals, 1.0 - det.target_fpr))
    cal["target_fpr"] = det.target_fpr
    cal["normal_pixel_quantiles"] = {str(p): float(np.quantile(vals, p)) for p in (0.5, 0.9, 0.95, 0.99, 0.999)}
    ss = np.asarray(slice_scores, dtype=float)
    cal["normal_slice_score"] = {"median": float(np.median(ss)), "p95": float(np.quantile(ss, 0.95)), "max": float(ss.max())}
    if single:
        cal_warn.append("only one normal subject: the normal score statistics are computed without holding it out and will be optimistic")
    elif len(collected) < MIN_CALIBRATION_SLICES:
        cal_warn.append(
            f"only {len(collected)} held-out normal slices for calibration (fewer than {MIN_CALIBRATION_SLICES}): "
            "the threshold is uncertain; add normal scans"
        )
    cal_warn += det.scorer.calibration_warnings()
    return cal
