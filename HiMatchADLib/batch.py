"""The batch runner: detect on every case of a folder, resumably, with one ``summary.csv``.

This is the only batch runner of the project; the command line (``himatchad batch``), the Slicer
module (through its worker process) and the cohort engines call :func:`run_batch` or build on
:func:`prepare_batch`, :func:`check_earlier` and :func:`run_case`. ``run_batch(..., engine="ray")``
spreads the cases over Ray actors (:mod:`HiMatchADLib.ray_engine`) with the same outputs. The local
engine overlaps the stages of consecutive cases: a reading thread prepares the next case
(``detector.prepare``) and a writing thread writes the previous one while this thread computes
(``prefetch=True``, the default; at most one case ahead, one computed, one being written).

Layout: the sub-folders of the input folder are mirrored under the output folder, so
``input/a/b/x.nii.gz`` gives ``out/a/b/x_heatmap.nii.gz``, ``x_labelmap.nii.gz`` and
``x_scores.json`` (plus ``x_overlay.png`` for a 2D input). Every DICOM series is a case of its own
(:mod:`HiMatchADLib.dicom`): a folder with one image series gives one case named after the folder
(``case`` is the folder's path); the series of a folder with several are named
``<folder>_s<SeriesNumber>_<description>`` and their ``case`` is ``<folder path>/<name>``; the
outputs go beside the folder's mirror in both cases. ``series_filter`` keeps only the DICOM series it
selects (the others are not cases). A series that cannot be analysed (a localizer, a DICOM SEG or
SR, uneven slices...) is a row with status "skipped" and the reason, never a failure.
``summary.csv`` in the output folder has one row per case (columns :data:`SUMMARY_COLUMNS`) and is
rewritten atomically after every case.

DICOM outputs (``dicom_seg``, ``dicom_heatmap``): ``<name>_seg.dcm`` (DICOM SEG of the labelmap) and
``<name>_heatmap_pm.dcm`` (parametric map) for DICOM cases; a non-DICOM case is processed and its row
says that none was written.

In ``summary.csv`` and in the returned rows, ``input`` is the absolute path of the input, and
``heatmap``, ``labelmap`` and ``scores`` are relative to the output folder (posix separators), so
the summary stays valid when the output folder is moved. ``seconds`` is the only column that can
differ between two identical runs. Empty cells are ``""``.

Resuming: a case whose outputs are complete (:func:`output.is_complete`) and whose scores JSON was
written with the same result-changing settings as the detector's (see :func:`settings_changes`) is
"done earlier" and its row is filled from that JSON. A complete case computed with other settings is
recomputed, and its row's message says which settings changed; so is a case whose input file was
modified after its scores JSON was written, a DICOM case whose series now has other files, and a
case without the DICOM outputs asked for now.

What is never read as an input: anything inside the output folder or an excluded folder (the
normal scans), hidden files and folders, and outputs of this tool found anywhere in the input tree
(files named in the ``outputs`` of one of our scores JSON next to them). Symbolic links are
followed, but a folder or file reached twice (a link loop, two links to one file) is one case.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional, Union

from .errors import Cancelled, HiMatchADError
from .dicom import DicomSeries, matches, parse_series_filters
from .imageio import input_path, real_path, strip_suffix, walk_inputs, write_text_atomic
from .output import is_complete, output_paths, own_outputs

SUMMARY_COLUMNS = (
    "case", "input", "status", "volume_score", "threshold", "anomalous_voxels",
    "anomalous_volume_mm3", "most_anomalous_slice", "heatmap", "labelmap", "scores", "seconds", "message",
)
STATUS_OK, STATUS_DONE, STATUS_FAILED, STATUS_SKIPPED = "ok", "done earlier", "failed", "skipped"
SUMMARY_NAME = "summary.csv"

#: Settings recorded in a scores JSON that do not change the result: the software version, where it
#: ran, and the modality the "auto" preset resolved to (a consequence of ``modality`` and the image).
VOLATILE_SETTINGS = frozenset({"version", "device", "batch_size", "cache_dir", "modality_used"})

#: Errors of one case that are recorded as "failed" while the batch goes on. ``Cancelled`` and
#: ``KeyboardInterrupt`` stop the batch.
CASE_ERRORS = (HiMatchADError, OSError, ValueError, RuntimeError, MemoryError)

_NOT_RECORDED = object()

PathLike = Union[str, os.PathLike]


@dataclass
class Case:
    """One input and where its outputs go."""

    path: Path  # the input file or the folder of a DICOM series (as found under the input folder)
    case: str  # the input's path relative to the input folder, posix separators (see the module notes)
    name: str  # the output file prefix (``x`` for ``x.nii.gz``, the series' name for DICOM)
    out_dir: Path  # the mirrored sub-folder of the output folder
    series: Optional[DicomSeries] = None  # the DICOM series of a DICOM case

    @property
    def input(self):
        """What the detector reads: the file, or the DICOM series."""
        return self.series if self.series is not None else self.path

    @property
    def skip_reason(self) -> str:
        """Why this case is not analysed ("" when it is): the problem of its DICOM series."""
        return f"the DICOM series {self.series.problem}" if self.series is not None and self.series.problem else ""


# ------------------------------------------------------------------------------- finding the cases
def _absolute(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def find_cases(
    input_dir: PathLike,
    out_dir: PathLike,
    exclude: Iterable[PathLike] = (),
    *,
    log: Optional[Callable[[str], None]] = None,
    series_filter=(),
) -> list:
    """Every case under ``input_dir`` and its output folder under ``out_dir``, sorted by ``case``.

    Walks the input folder (links followed, each real folder and file once), skipping the output
    folder, the ``exclude`` folders, hidden entries and outputs of this tool; every DICOM series is a
    case, unless ``series_filter`` (``--series-filter`` values, see
    :func:`HiMatchADLib.dicom.parse_series_filters`) leaves it out. Raises
    :class:`HiMatchADError` when the input folder is missing or lies inside the output or an excluded
    folder, when the output folder lies inside an excluded folder (its outputs would be read as
    normals), when two cases would write the same outputs, and when no case is found. Writes nothing.
    ``log(message)`` receives notes about skipped entries (default: none).
    """
    say = log or (lambda message: None)
    filters = parse_series_filters(series_filter)
    root = _absolute(input_dir)
    if not root.exists():
        raise HiMatchADError(f"input folder not found: {root}")
    if not root.is_dir():
        raise HiMatchADError(f"not a folder: {root} (use 'himatchad detect' for a single input)")
    out_root = _absolute(out_dir)
    out_real = out_root.resolve()
    root_real = root.resolve()
    excluded = []
    for e in exclude:
        if e is None:
            continue
        real = real_path(_absolute(e))
        if real is not None:
            excluded.append(real)
    if _inside(root_real, out_real):
        raise HiMatchADError(f"the input folder {root} is the output folder {out_root} or inside it; choose an output folder outside the input")
    for ex in excluded:
        if _inside(root_real, ex):
            raise HiMatchADError(f"the input folder {root} is inside the excluded folder {ex} (the normal scans); nothing would be processed")
        if _inside(out_real, ex):
            raise HiMatchADError(
                f"the output folder {out_root} is inside {ex} (the normal scans); its outputs would be read as normal scans; "
                "choose an output folder outside it"
            )
    pruned = [out_real] + excluded

    found, own = walk_inputs(root, prune=pruned, skip_names=own_outputs, log=say)
    if own:
        say(f"skipped {len(own)} outputs of this tool found in the input folder, e.g. {own[0]}")
    left_out = [x for x in found if isinstance(x, DicomSeries) and not matches(x, filters)]
    if left_out:
        found = [x for x in found if not (isinstance(x, DicomSeries) and not matches(x, filters))]
        say(f"--series-filter {' or '.join(str(f) for f in filters)} left out {len(left_out)} DICOM series")
    if not found:
        why = f"; --series-filter left out all {len(left_out)} DICOM series" if left_out else ""
        raise HiMatchADError(f"no images found in {root} (outside the output folder and the normal scans){why}")

    cases = []
    for item in found:
        path = input_path(item)
        rel = PurePosixPath(path.relative_to(root).as_posix())
        out_dir = out_root / Path(*rel.parent.parts)
        if isinstance(item, DicomSeries):
            # The one image series of a folder is named after the folder; the others after their series.
            case = rel if item.name == Path(os.path.abspath(path)).name else rel / item.name
            cases.append(Case(path=path, case=str(case), name=item.name, out_dir=out_dir, series=item))
        else:
            cases.append(Case(path=path, case=str(rel), name=strip_suffix(path), out_dir=out_dir))
    cases.sort(key=lambda c: PurePosixPath(c.case).parts)

    taken: dict = {}
    for c in cases:  # case-insensitive: the outputs may land on a case-insensitive file system
        key = (c.out_dir, c.name.casefold())
        other = taken.setdefault(key, c)
        if other is not c:
            raise HiMatchADError(
                f"two inputs would write the same outputs ({c.out_dir / c.name}_*): {_shown(other)} and {_shown(c)}; "
                "rename or move one of them"
            )
    return cases


def _shown(case: Case) -> str:
    return str(case.path) if case.series is None else f"{case.path} (DICOM series {case.series.series_uid})"


# ------------------------------------------------------------------------------- settings
def result_settings(detector) -> dict:
    """The detector's settings that change a result, as recorded in a scores JSON's ``"settings"``.

    That is ``detector.settings()`` without :data:`VOLATILE_SETTINGS`, plus the normals folder
    (``"normals"``) and, when the detector fixes it, the minimum component size.
    """
    current = {k: v for k, v in dict(detector.settings()).items() if k not in VOLATILE_SETTINGS}
    normals = getattr(detector, "normals_dir", None)
    current.setdefault("normals", str(normals) if normals is not None else None)
    min_size = getattr(detector, "min_component_size", None)
    if "min_component_size" not in current and min_size is not None:
        current["min_component_size"] = int(min_size)
    return json.loads(json.dumps(current, default=str))  # compare as the JSON stores them


def _same_folder(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return _absolute(str(a)).resolve() == _absolute(str(b)).resolve()


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
        before = stored.get(key, _NOT_RECORDED)
        same = _same_folder(before, now) if key == "normals" and before is not _NOT_RECORDED else before == now
        if not same:
            changes.append(f"{key} {_show(before)} -> {_show(now)}")
    return changes


# ------------------------------------------------------------------------------- rows and summary
def _relative(path: Path, out_root: Path) -> str:
    return path.relative_to(out_root).as_posix()


def _row(case: Case, out_root: Path, status: str, data: Optional[dict] = None, message: str = "") -> dict:
    row = {c: "" for c in SUMMARY_COLUMNS}
    row.update(case=case.case, input=str(_absolute(case.path)), status=status, message=message)
    if data is not None:
        for key in ("volume_score", "threshold", "anomalous_voxels", "anomalous_volume_mm3", "most_anomalous_slice"):
            value = data.get(key)
            row[key] = "" if value is None else value
        paths = output_paths(case.out_dir, case.name, False)
        for key in ("heatmap", "labelmap", "scores"):
            row[key] = _relative(paths[key], out_root)
    return row


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_message(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if isinstance(exc, MemoryError):
        return "out of memory" + (f": {text}" if text else "")
    if isinstance(exc, HiMatchADError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _join(*parts: str) -> str:
    return _one_line("; ".join(p for p in parts if p))


def write_summary(path: PathLike, rows: list) -> Path:
    """Write ``rows`` as CSV with the columns :data:`SUMMARY_COLUMNS` (atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in SUMMARY_COLUMNS})
    return write_text_atomic(path, buf.getvalue())


def summary_counts(rows: list) -> dict:
    """``{"ok": n, "done earlier": n, "failed": n}`` over the rows of a batch, plus ``"skipped": n``
    when some series were skipped."""
    counts = {STATUS_OK: 0, STATUS_DONE: 0, STATUS_FAILED: 0}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def _modified_after(case: Case, result: Path) -> bool:
    """True when the input (a file, or any file of a DICOM series) is newer than its result."""
    try:
        files = [Path(f) for f in case.series.files] if case.series is not None else [case.path]
        return max(p.stat().st_mtime_ns for p in files) > result.stat().st_mtime_ns
    except OSError:
        return True


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


#: The DICOM outputs a batch can ask for, and how a message names them.
DICOM_OUTPUTS = {"dicom_seg": "DICOM SEG", "dicom_heatmap": "DICOM parametric map"}


def _dicom_outputs(case: Case, dicom_seg: bool, dicom_heatmap: bool) -> tuple:
    """``(keywords for detector.save, note)``: the DICOM outputs asked for that ``case`` can have,
    and, for a non-DICOM case, the note that none was written."""
    asked = [k for k, on in (("dicom_seg", dicom_seg), ("dicom_heatmap", dicom_heatmap)) if on]
    if not asked:
        return {}, ""
    if case.series is None:
        names = " or ".join(DICOM_OUTPUTS[k] for k in asked)
        return {}, f"no {names} written: the input is not DICOM"
    return {k: True for k in asked}, ""


def _read_scores(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------- the runner
def check_earlier(
    case: Case, out_root: PathLike, current: dict, *, overwrite: bool = False, dicom_seg: bool = False, dicom_heatmap: bool = False
) -> tuple:
    """Whether ``case`` was done earlier: ``(row, "")`` with its "done earlier" row when its outputs
    are complete (the DICOM outputs asked for included), written with the settings ``current``, on
    the same DICOM series, and newer than its input; otherwise ``(None, note)``, where ``note`` says
    why an earlier result is recomputed ("" when there is none, or with ``overwrite``). A series
    that cannot be analysed gives its "skipped" row at once. Reads only; :func:`run_case` starts
    with this check.
    """
    out_root = _absolute(out_root)
    if case.skip_reason:
        return _row(case, out_root, STATUS_SKIPPED, None, case.skip_reason), ""
    paths = output_paths(case.out_dir, case.name, False)
    if is_complete(case.out_dir, case.name):
        data = _read_scores(paths["scores"])
        if data is not None and not overwrite:
            changes = settings_changes(current, data)
            if changes:
                return None, "recomputed: settings changed: " + ", ".join(changes)
            if _modified_after(case, paths["scores"]):
                return None, "recomputed: the input changed after its result was written"
            change = _series_change(case, data)
            if change:
                return None, f"recomputed: {change}"
            wanted, note = _dicom_outputs(case, dicom_seg, dicom_heatmap)
            missing = [DICOM_OUTPUTS[k] for k in wanted if k not in (data.get("outputs") or {})]
            if missing:
                return None, f"recomputed: the earlier result has no {' or '.join(missing)}"
            return _row(case, out_root, STATUS_DONE, data, _join(note, *map(str, data.get("warnings") or []))), ""
        return None, ""
    if paths["scores"].exists() or paths["heatmap"].exists():
        return None, "recomputed: earlier outputs were incomplete"
    return None, ""


def _write_case(detector, case: Case, result, save_options: dict) -> dict:
    """Write the outputs of a computed case and return its scores JSON as read back."""
    paths = output_paths(case.out_dir, case.name, False)
    # From here on the case is not complete until its new scores JSON is written.
    paths["scores"].unlink(missing_ok=True)
    detector.save(result, case.out_dir, **save_options)
    data = _read_scores(paths["scores"])
    if data is None:
        raise HiMatchADError(f"the scores of {case.case} were not written to {paths['scores']}")
    return data


def _case_error(exc: BaseException) -> str:
    """The summary message of an error of one case."""
    return _one_line(_error_message(exc))


def _failed_row(case: Case, out_root: Path, message: str, say) -> dict:
    say(f"{case.case}: {message}")
    return _row(case, out_root, STATUS_FAILED, None, message)


def run_case(
    detector, case: Case, out_root: PathLike, current: dict, *, overwrite: bool = False, log=None,
    dicom_seg: bool = False, dicom_heatmap: bool = False,
) -> dict:
    """Process one case (or find it done earlier, or skipped) and return its summary row
    (``seconds`` empty).

    ``current`` is :func:`result_settings` of ``detector``. ``dicom_seg`` / ``dicom_heatmap``: also
    write the DICOM SEG / parametric map of a DICOM case. Errors of the case are recorded in the row
    (status "failed"); :class:`Cancelled` propagates. Reads, computes and writes in this thread,
    one after the other (the local engine of :func:`run_batch` overlaps them across cases).
    """
    say = log or _warn
    out_root = _absolute(out_root)
    dicom = dict(dicom_seg=dicom_seg, dicom_heatmap=dicom_heatmap)
    earlier, note = check_earlier(case, out_root, current, overwrite=overwrite, **dicom)
    if earlier is not None:
        return earlier
    if note:
        say(f"{case.case}: {note}")
    save_options, dicom_note = _dicom_outputs(case, **dicom)
    try:
        result = detector.predict(case.input)
        result.name = case.name
        data = _write_case(detector, case, result, save_options)
    except Cancelled:
        raise
    except CASE_ERRORS as exc:
        return _failed_row(case, out_root, _case_error(exc), say)
    return _row(case, out_root, STATUS_OK, data, _join(note, dicom_note, *map(str, result.warnings)))


# ------------------------------------------------------------------------------- overlapped stages
@dataclass
class _Read:
    """What the reading stage hands over for one case."""

    earlier: Optional[dict] = None  # the case's "done earlier" (or "skipped") row
    note: str = ""  # why an earlier result is recomputed
    query: object = None  # the case read and prepared (``detector.prepare``)
    error: str = ""  # why it could not be read (the summary message)
    seconds: float = 0.0


def _read_stage(detector, case: Case, out_root: Path, current: dict, overwrite: bool, dicom: dict) -> _Read:
    """The resume check, then (unless the case was done earlier or is skipped) ``detector.prepare``:
    reading, checks, preprocessing. Runs in the reading thread: it touches no model and no shared
    state, and the errors of reading belong to the case."""
    start = time.perf_counter()
    earlier, note = check_earlier(case, out_root, current, overwrite=overwrite, **dicom)
    out = _Read(earlier=earlier, note=note)
    if earlier is None:
        try:
            out.query = detector.prepare(case.input)
        except CASE_ERRORS as exc:
            out.error = _case_error(exc)
    out.seconds = time.perf_counter() - start
    return out


def _write_stage(detector, case: Case, result, save_options: dict) -> tuple:
    """Write a computed case (runs in the writing thread): ``(scores JSON, "", seconds)``, or
    ``(None, error message, seconds)`` when the write failed."""
    start = time.perf_counter()
    try:
        data, error = _write_case(detector, case, result, save_options), ""
    except CASE_ERRORS as exc:
        data, error = None, _case_error(exc)
    return data, error, time.perf_counter() - start


class _Summary:
    """The rows of a batch in case order, and ``summary.csv`` rewritten after each new row.

    Rows whose case is still being written wait in line (a future of :func:`_write_stage`); a row
    enters the summary once every case before it has its row."""

    def __init__(self, path: Path, out_root: Path, say):
        self.path, self.out_root, self.say = path, out_root, say
        self.rows: list = []
        self._waiting: deque = deque()  # (case, row or None, write future or None, seconds, notes)

    def add(self, case: Case, row: dict, seconds: float) -> None:
        self._waiting.append((case, row, None, seconds, ()))

    def add_write(self, case: Case, future, seconds: float, notes) -> None:
        """A case being written (``future`` of :func:`_write_stage`); ``notes``: its row's message if ok."""
        self._waiting.append((case, None, future, seconds, tuple(notes)))

    def settle(self, wait: bool) -> None:
        """Record the rows at the head of the line whose cases are finished (``wait``: all of them,
        waiting for the write under way)."""
        while self._waiting:
            case, row, future, seconds, notes = self._waiting[0]
            if future is not None:
                if not wait and not future.done():
                    return
                if future.cancelled():  # stopped before its write began: neither it nor later cases are recorded
                    self._waiting.clear()
                    return
                data, error, write_s = future.result()
                seconds += write_s
                row = _failed_row(case, self.out_root, error, self.say) if error else _row(case, self.out_root, STATUS_OK, data, _join(*notes))
            self._waiting.popleft()
            row["seconds"] = round(seconds, 3)
            self.rows.append(row)
            write_summary(self.path, self.rows)


def _run_local(
    detector, cases: list, out_root: Path, current: dict, *, overwrite: bool, progress, say, prefetch: bool, dicom: dict
) -> list:
    """The local engine: every case in this process, in order.

    With ``prefetch`` (and a detector with ``prepare``), three stages overlap across cases: a
    reading thread reads and prepares the next case while this thread computes the current one,
    and a writing thread writes the previous one. At most one case is read ahead, one computed and
    one written at a time, so memory stays bounded. The rows, ``summary.csv`` and the outputs are
    those of the sequential run. On cancellation or an interrupt both threads are joined: a write
    under way is finished and its case recorded as the write ended ("ok" only with its scores JSON
    written), a write not yet begun is dropped with the cases after it, and nothing more is read.
    """
    reporter = getattr(detector, "reporter", None)
    summary = _Summary(out_root / SUMMARY_NAME, out_root, say)
    total = len(cases)

    def begin(i: int, case: Case) -> None:
        if reporter is not None and hasattr(reporter, "check"):
            reporter.check()  # the detector's cancel event stops the batch between cases too
        if progress is not None:
            progress(f"Case {i + 1}/{total}: {case.case}", i, total)

    if not prefetch or not callable(getattr(detector, "prepare", None)):
        for i, case in enumerate(cases):
            begin(i, case)
            start = time.perf_counter()
            row = run_case(detector, case, out_root, current, overwrite=overwrite, log=say, **dicom)
            summary.add(case, row, time.perf_counter() - start)
            summary.settle(wait=False)
        return summary.rows

    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="himatchad-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="himatchad-write")

    def read(i: int):
        return reader.submit(_read_stage, detector, cases[i], out_root, current, overwrite, dicom) if i < total else None

    ahead = read(0)
    try:
        for i, case in enumerate(cases):
            begin(i, case)
            got = ahead.result()
            ahead = read(i + 1)  # read the next case while this one is computed
            if got.note:
                say(f"{case.case}: {got.note}")
            if got.earlier is not None:
                summary.add(case, got.earlier, got.seconds)
            elif got.error:
                summary.add(case, _failed_row(case, out_root, got.error, say), got.seconds)
            else:
                start = time.perf_counter()
                query, got.query = got.query, None
                try:
                    result = detector.predict(query)
                    result.name = case.name
                except Cancelled:
                    raise
                except CASE_ERRORS as exc:
                    result = None
                    summary.add(case, _failed_row(case, out_root, _case_error(exc), say), got.seconds + time.perf_counter() - start)
                del query
                if result is not None:
                    seconds = got.seconds + time.perf_counter() - start
                    save_options, dicom_note = _dicom_outputs(case, **dicom)
                    summary.settle(wait=True)  # the previous case is written: one case in writing at a time
                    written = writer.submit(_write_stage, detector, case, result, save_options)
                    summary.add_write(case, written, seconds, (got.note, dicom_note, *map(str, result.warnings)))
                    del result
            summary.settle(wait=False)
        summary.settle(wait=True)
    except BaseException:
        if ahead is not None:
            ahead.cancel()
        _shut_down(reader, writer)
        with contextlib.suppress(Exception):  # record the case whose write was under way, as it ended
            summary.settle(wait=True)
        raise
    finally:
        _shut_down(reader, writer)
    return summary.rows


def _shut_down(*pools: ThreadPoolExecutor) -> None:
    """Cancel what has not started and join the threads."""
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


ENGINES = ("local", "ray")


def prepare_batch(
    detector, input_dir: PathLike, out_dir: PathLike, exclude: Iterable[PathLike] = (), *, log=None, series_filter=(),
    dicom_seg: bool = False, dicom_heatmap: bool = False,
) -> tuple:
    """What every engine does before the first case: ``(out_root, cases, current)``.

    Refuses an unfitted detector (and DICOM outputs without their writer), finds the cases (the
    detector's normals folder excluded too; ``series_filter`` applied), creates the output folder
    and returns :func:`result_settings` of the detector.
    """
    say = log or _warn
    out_root = _absolute(out_dir)
    normals = getattr(detector, "normals_dir", None)
    if hasattr(detector, "normals_dir") and normals is None:
        raise HiMatchADError("the detector has no normal bank yet: call fit(normals_dir) first")
    if dicom_seg or dicom_heatmap:
        from .output import dicom_writers

        dicom_writers()  # says how to install the DICOM writer before any case
    cases = find_cases(
        input_dir, out_root, [*exclude, *([normals] if normals is not None else [])], log=say, series_filter=series_filter
    )
    if out_root.exists() and not out_root.is_dir():
        raise HiMatchADError(f"the output folder {out_root} exists and is not a folder")
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HiMatchADError(f"cannot create the output folder {out_root}: {exc.strerror or exc}") from exc
    return out_root, cases, result_settings(detector)


def run_batch(
    detector,
    input_dir: PathLike,
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    exclude: Iterable[PathLike] = (),
    progress: Optional[Callable[[str, int, int], None]] = None,
    log: Optional[Callable[[str], None]] = None,
    engine: str = "local",
    engine_options: Optional[dict] = None,
    series_filter=(),
    dicom_seg: bool = False,
    dicom_heatmap: bool = False,
    prefetch: bool = True,
) -> list:
    """Detect anomalies in every case of ``input_dir``; outputs mirrored under ``out_dir``.

    ``detector`` is a fitted :class:`~HiMatchADLib.detector.HiMatchDetector` (``predict``, ``save``,
    ``settings``). Its normals folder is excluded from the inputs in addition to ``exclude``.
    Resumable (see the module notes); ``overwrite=True`` recomputes every case. A case that fails is
    recorded with status "failed" and the batch goes on; :class:`Cancelled` and ``KeyboardInterrupt``
    stop it. ``summary.csv`` in ``out_dir`` is rewritten atomically after each case.

    ``progress(message, done, total)`` is called before each case (``done`` = cases before it) and
    once at the end; it may raise :class:`Cancelled`. ``log(message)`` receives warnings (default
    :func:`warnings.warn`). Returns the rows of ``summary.csv`` as dicts (keys
    :data:`SUMMARY_COLUMNS`).

    ``engine``: ``"local"`` (default: every case in this process, in order) or ``"ray"``
    (cases spread over Ray actors, see :func:`HiMatchADLib.ray_engine.run_batch_ray`, which receives
    ``engine_options``, e.g. ``{"address": "auto", "workers": 4, "gpus_per_worker": 1}``). Both give
    the same outputs and the same ``summary.csv`` (but for ``seconds``).

    ``series_filter``: ``--series-filter`` values (strings or parsed filters; see
    :func:`HiMatchADLib.dicom.parse_series_filters`) selecting the DICOM series that are cases.
    ``dicom_seg`` / ``dicom_heatmap``: also write ``<name>_seg.dcm`` / ``<name>_heatmap_pm.dcm`` for
    DICOM cases. A DICOM series that cannot be analysed is a "skipped" row with the reason.

    ``prefetch`` (local engine; default True): read and prepare the next case in a second thread
    while the current one is computed, and write each case's outputs in a third thread while the
    next is computed (at most one case ahead, one computed and one being written). False runs the
    three stages one after the other; outputs and rows are the same either way. ``seconds`` of a
    case is the sum of its own stages.
    """
    filters = parse_series_filters(series_filter)  # bad syntax fails before anything else
    dicom = dict(dicom_seg=bool(dicom_seg), dicom_heatmap=bool(dicom_heatmap))
    if engine not in ENGINES:
        raise HiMatchADError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    if engine == "ray":
        from .ray_engine import run_batch_ray

        return run_batch_ray(
            detector, input_dir, out_dir, overwrite=overwrite, exclude=exclude, progress=progress, log=log,
            series_filter=filters, **dicom, **(engine_options or {}),
        )
    if engine_options:
        raise HiMatchADError(f"the local engine takes no options (got {', '.join(sorted(engine_options))})")
    say = log or _warn
    out_root, cases, current = prepare_batch(detector, input_dir, out_dir, exclude, log=say, series_filter=filters, **dicom)
    rows = _run_local(
        detector, cases, out_root, current, overwrite=overwrite, progress=progress, say=say, prefetch=prefetch, dicom=dicom
    )
    total = len(cases)
    if progress is not None:
        progress(f"{total} cases finished", total, total)
    return rows
