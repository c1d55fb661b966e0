"""The local engine: cases in one process, the next read and the previous written while one computes."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core.errors import Cancelled, HiMatchADError
from ..outputs.files import check_output_paths
from .cases import Case
from .resume import case_outputs
from .run_case import CASE_ERRORS, case_error_message, earlier_row, failed_row, run_case, write_case
from .runner import prepare_batch
from .summary import (
    STATUS_OK,
    SUMMARY_NAME,
    batch_warning,
    join_notes,
    summary_row,
    write_summary,
)


# ------------------------------------------------------------------------------- overlapped stages
@dataclass
class _Read:
    """What the reading stage hands over for one case."""

    earlier: Optional[dict] = None  # the case's "done earlier" (or "skipped") row
    note: str = ""  # why an earlier result is recomputed
    query: object = None  # the case read and prepared (``detector.prepare``)
    error: str = ""  # why it could not be read (the summary message)
    seconds: float = 0.0


def _read_stage(detector, case: Case, out_root: Path, current: dict, overwrite: bool, outputs: tuple) -> _Read:
    """The resume check, then (unless the case was done earlier or is skipped) ``detector.prepare``:
    reading, checks, preprocessing. Runs in the reading thread: it touches no model and no shared
    state, and the errors of reading belong to the case."""
    start = time.perf_counter()
    earlier, note = earlier_row(case, out_root, current, overwrite=overwrite, outputs=outputs)
    out = _Read(earlier=earlier, note=note)
    if earlier is None:
        try:
            check_output_paths(case.out_dir, case.name, True, outputs=case_outputs(case, outputs)[0].get("outputs", ()))
            out.query = detector.prepare(case.input)
        except CASE_ERRORS as exc:
            out.error = case_error_message(exc)
    out.seconds = time.perf_counter() - start
    return out


def _write_stage(detector, case: Case, result, save_options: dict) -> tuple:
    """Write a computed case (runs in the writing thread): ``(scores JSON, "", seconds)``, or
    ``(None, error message, seconds)`` when the write failed."""
    start = time.perf_counter()
    try:
        data, error = write_case(detector, case, result, save_options), ""
    except CASE_ERRORS as exc:
        data, error = None, case_error_message(exc)
    return data, error, time.perf_counter() - start


def _run_local(
    detector, cases: list, out_root: Path, current: dict, *, overwrite: bool, progress, say, prefetch: bool, outputs: tuple
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
            row = run_case(detector, case, out_root, current, overwrite=overwrite, log=say, outputs=outputs)
            summary.add(case, row, time.perf_counter() - start)
            summary.settle(wait=False)
        return summary.rows

    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="himatchad-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="himatchad-write")

    def read(i: int):
        return reader.submit(_read_stage, detector, cases[i], out_root, current, overwrite, outputs) if i < total else None

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
                summary.add(case, failed_row(case, out_root, got.error, say), got.seconds)
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
                    summary.add(case, failed_row(case, out_root, case_error_message(exc), say), got.seconds + time.perf_counter() - start)
                del query
                if result is not None:
                    seconds = got.seconds + time.perf_counter() - start
                    save_options, dicom_note = case_outputs(case, outputs)
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


def run_local(
    detector, input_dir, out_dir, *, overwrite: bool = False, exclude=(), progress=None, log=None, series_filter=(),
    outputs: tuple = (), prefetch: bool = True, **options,
) -> list:
    """The ``local`` engine of :func:`~HiMatchADLib.batch.runner.run_batch` (same arguments): every
    case in this process, in order; with ``prefetch`` the next case is read and the previous one
    written while one computes."""
    if options:
        raise HiMatchADError(f"the local engine takes no options (got {', '.join(sorted(options))})")
    say = log or batch_warning
    out_root, cases, current = prepare_batch(detector, input_dir, out_dir, exclude, log=say, series_filter=series_filter, outputs=outputs)
    rows = _run_local(
        detector, cases, out_root, current, overwrite=overwrite, progress=progress, say=say, prefetch=prefetch, outputs=outputs
    )
    total = len(cases)
    if progress is not None:
        progress(f"{total} cases finished", total, total)
    return rows


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
                row = failed_row(case, self.out_root, error, self.say) if error else summary_row(case, self.out_root, STATUS_OK, data, join_notes(*notes))
            self._waiting.popleft()
            row["seconds"] = round(seconds, 3)
            self.rows.append(row)
            write_summary(self.path, self.rows)
