"""Resuming a batch: which cases are complete with the same settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..core.digest import files_digest
from ..detector.feedback import feedback_ids as detector_feedback_ids
from ..outputs.files import is_complete, output_damage, output_paths
from ..outputs.registry import check_outputs, get_writer, outputs_for
from .cases import Case, PathLike, absolute_path
from .summary import STATUS_DONE, STATUS_SKIPPED, join_notes, summary_row

#: Settings recorded in a scores JSON that do not change the result: the software version, where it
#: ran, and the modality the "auto" preset resolved to (a consequence of ``modality`` and the image).
VOLATILE_SETTINGS = frozenset({"version", "device", "batch_size", "cache_dir", "modality_used"})


_NOT_RECORDED = object()


# ------------------------------------------------------------------------------- settings
def result_settings(detector) -> dict:
    """The detector's settings that change a result, as recorded in a scores JSON's ``"settings"``.

    That is ``detector.settings()`` without :data:`VOLATILE_SETTINGS`, plus the normals folder
    (``"normals"``) and, when the detector fixes it, the minimum component size.
    """
    current = {k: v for k, v in dict(detector.settings()).items() if k not in VOLATILE_SETTINGS}
    normals = getattr(detector, "normals_dir", None)
    current.setdefault("normals", str(normals) if normals is not None else None)
    # The reader feedback the next prediction uses (results made without any record none).
    current["feedback"] = list(detector_feedback_ids(detector)) if hasattr(detector, "feedback_entries") else []
    min_size = getattr(detector, "min_component_size", None)
    if "min_component_size" not in current and min_size is not None:
        current["min_component_size"] = int(min_size)
    return json.loads(json.dumps(current, default=str))  # compare as the JSON stores them


def _same_folder(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return absolute_path(str(a)).resolve() == absolute_path(str(b)).resolve()


def _show(value) -> str:
    if value is _NOT_RECORDED:
        return "(not recorded)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def settings_changes(current: dict, scores: dict) -> list:
    """How the settings of ``current`` (from :func:`result_settings`) differ from those a scores
    JSON was written with: ``["method himatch -> knn", ...]`` (earlier value first); empty when the
    result would be the same. A setting the JSON does not record counts as changed.
    """
    stored = scores.get("settings")
    if not isinstance(stored, dict):
        return ["settings of the earlier result not recorded"]
    stored = dict(stored)
    if "min_component_size" not in stored and "min_component_size" in scores:
        stored["min_component_size"] = scores["min_component_size"]  # the value the labelmap was made with
    changes = []
    for key, now in current.items():
        before = stored.get(key, [] if key == "feedback" else _NOT_RECORDED)  # "feedback" is recorded when there was some
        same = _same_folder(before, now) if key == "normals" and before is not _NOT_RECORDED else before == now
        if not same:
            changes.append(f"{key} {_show(before)} -> {_show(now)}")
    return changes


def _input_change(case: Case, data: dict) -> str:
    """How the content of the input of ``case`` (its file, or the files of its DICOM series) differs
    from the one its earlier result was computed on ("" when it is the same). A replaced file keeps
    its old modification time under ``cp -p`` or ``rsync -a``: the JSON's ``"input_digest"``
    (size and BLAKE2b of the bytes) is what is compared."""
    before = data.get("input_digest")
    if not isinstance(before, dict):
        return "the earlier result records no digest of its input"
    files = [Path(f) for f in case.series.files] if case.series is not None else [case.path]
    try:
        if sum(p.stat().st_size for p in files) != before.get("bytes"):
            return "the input's content changed after its result was written"
        if files_digest(files) != before:
            return "the input's content changed after its result was written"
    except OSError as exc:
        return f"the input cannot be read ({exc.strerror or exc})"
    return ""


def _series_change(case: Case, data: dict) -> str:
    """How the DICOM series of ``case`` differs from the one an earlier result was computed on ("" when not)."""
    if case.series is None:
        return ""
    before = data.get("series") if isinstance(data.get("series"), dict) else {}
    if before.get("series_uid") != case.series.series_uid:
        return "the earlier result was computed on another DICOM series"
    if before.get("files") != case.series.n_files:
        return f"its DICOM series has {case.series.n_files} files now, {before.get('files')} when its result was written"
    return ""


#: Optional outputs that a "done earlier" case lacking them gets from its saved outputs, without
#: computing its maps again (:func:`HiMatchADLib.batch.run_case.earlier_row`).
REMADE_FROM_OUTPUTS = frozenset({"overview"})
#: The key of a "done earlier" row of :func:`check_earlier` naming those outputs (never in ``summary.csv``).
REMAKE_KEY = "_remake"


def case_outputs(case: Case, outputs: tuple) -> tuple:
    """``(keywords for detector.save, note)``: the optional outputs asked for that ``case`` can
    have, and, for those it cannot (a DICOM output of a non-DICOM case), the note that they were
    not written."""
    asked = check_outputs(outputs)
    if not asked:
        return {}, ""
    cannot = [k for k in asked if get_writer(k).needs == "dicom" and case.series is None]
    kept = tuple(k for k in asked if k not in cannot)
    note = f"no {' or '.join(get_writer(k).title for k in cannot)} written: the input is not DICOM" if cannot else ""
    return ({"outputs": kept} if kept else {}), note


def read_scores(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------- the runner
def check_earlier(
    case: Case, out_root: PathLike, current: dict, *, overwrite: bool = False, outputs: tuple = ()
) -> tuple:
    """Whether ``case`` was done earlier: ``(row, "")`` with its "done earlier" row when its outputs
    are complete and as written (sizes and digests recorded in its JSON; the optional ``outputs`` asked
    for included), written with the settings ``current``, on the same DICOM series, and from an input of
    the same content (digest); otherwise ``(None, note)``, where ``note`` says
    why an earlier result is recomputed ("" when there is none, or with ``overwrite``). A series
    that cannot be analysed gives its "skipped" row at once. Reads only; :func:`run_case` starts
    with this check. A done-earlier case that lacks only outputs that can be made from its saved
    ones (:data:`REMADE_FROM_OUTPUTS`: the overview picture) is done earlier too, and its row names
    them under :data:`REMAKE_KEY`: :func:`~HiMatchADLib.batch.run_case.earlier_row` makes them.
    """
    out_root = absolute_path(out_root)
    if case.skip_reason:
        return summary_row(case, out_root, STATUS_SKIPPED, None, case.skip_reason), ""
    paths = output_paths(case.out_dir, case.name, False)
    if is_complete(case.out_dir, case.name, digests=False):
        data = read_scores(paths["scores"])
        if data is not None and not overwrite:
            changes = settings_changes(current, data)
            if changes:
                return None, "recomputed: settings changed: " + ", ".join(changes)
            change = _input_change(case, data) or output_damage(paths["scores"], data)
            if change:
                return None, f"recomputed: {change}"
            change = _series_change(case, data)
            if change:
                return None, f"recomputed: {change}"
            wanted, note = case_outputs(case, outputs)
            is_2d = bool((data.get("geometry") or {}).get("is_2d"))
            missing = [k for k in outputs_for(wanted.get("outputs", ()), is_2d) if k not in (data.get("outputs") or {})]
            remake = [k for k in missing if k in REMADE_FROM_OUTPUTS]
            missing = [get_writer(k).title for k in missing if k not in remake]
            if missing:
                return None, f"recomputed: the earlier result has no {' or '.join(missing)}"
            row = summary_row(case, out_root, STATUS_DONE, data, join_notes(note, *map(str, data.get("warnings") or [])))
            if remake:
                row[REMAKE_KEY] = tuple(remake)
            return row, ""
        return None, ""
    if paths["scores"].exists() or paths["heatmap"].exists():
        data = read_scores(paths["scores"])
        damage = output_damage(paths["scores"], data) if data is not None and data.get("complete") else ""
        return None, f"recomputed: {damage}" if damage else "recomputed: earlier outputs were incomplete"
    return None, ""
