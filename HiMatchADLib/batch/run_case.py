"""One case of a batch: read, detect, write; errors become a ``failed`` row."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import Cancelled, HiMatchADError
from ..detector.overview import add_overview
from ..outputs.files import check_output_paths, output_paths
from .cases import Case, PathLike, absolute_path
from .resume import REMAKE_KEY, case_outputs, check_earlier, read_scores
from .summary import (
    STATUS_FAILED,
    STATUS_OK,
    batch_warning,
    error_message,
    join_notes,
    one_line,
    summary_row,
)

#: Errors of one case that are recorded as "failed" while the batch goes on. ``Cancelled`` and
#: ``KeyboardInterrupt`` stop the batch.
CASE_ERRORS = (HiMatchADError, OSError, ValueError, RuntimeError, MemoryError)


def write_case(detector, case: Case, result, save_options: dict) -> dict:
    """Write the outputs of a computed case and return its scores JSON as read back."""
    paths = output_paths(case.out_dir, case.name, False)
    # From here on the case is not complete until its new scores JSON is written.
    paths["scores"].unlink(missing_ok=True)
    detector.save(result, case.out_dir, **save_options)
    data = read_scores(paths["scores"])
    if data is None:
        raise HiMatchADError(f"the scores of {case.case} were not written to {paths['scores']}")
    return data


def case_error_message(exc: BaseException) -> str:
    """The summary message of an error of one case."""
    return one_line(error_message(exc))


def failed_row(case: Case, out_root: Path, message: str, say) -> dict:
    say(f"{case.case}: {message}")
    return summary_row(case, out_root, STATUS_FAILED, None, message)


def earlier_row(case: Case, out_root: PathLike, current: dict, *, overwrite: bool = False, outputs: tuple = ()) -> tuple:
    """:func:`~HiMatchADLib.batch.resume.check_earlier`, then, for a case done earlier that lacks
    its overview picture, the picture made from its saved outputs (the maps are not computed
    again) and the row read again. When the picture cannot be made the case stays done earlier and
    its row says why."""
    row, note = check_earlier(case, out_root, current, overwrite=overwrite, outputs=outputs)
    if row is None or not row.get(REMAKE_KEY):
        return row, note
    row.pop(REMAKE_KEY)
    scores = output_paths(case.out_dir, case.name, False)["scores"]
    try:
        add_overview(scores, case.input)
    except CASE_ERRORS as exc:
        row["message"] = join_notes(row["message"], f"no overview picture: {case_error_message(exc)}")
        return row, note
    data = read_scores(scores)
    if data is None:  # pragma: no cover - written atomically just now
        raise HiMatchADError(f"the scores of {case.case} cannot be read back from {scores}")
    return summary_row(case, absolute_path(out_root), row["status"], data, join_notes(row["message"], "overview picture made from the saved outputs")), note


def run_case(
    detector, case: Case, out_root: PathLike, current: dict, *, overwrite: bool = False, log=None,
    outputs: tuple = (),
) -> dict:
    """Process one case (or find it done earlier, or skipped) and return its summary row
    (``seconds`` empty).

    ``current`` is :func:`result_settings` of ``detector``. ``outputs``: optional outputs to
    write too (e.g. the DICOM SEG / parametric map of a DICOM case). Errors of the case are recorded in the row
    (status "failed"); :class:`Cancelled` propagates. Reads, computes and writes in this thread,
    one after the other (the local engine of :func:`run_batch` overlaps them across cases).
    """
    say = log or batch_warning
    out_root = absolute_path(out_root)
    earlier, note = earlier_row(case, out_root, current, overwrite=overwrite, outputs=outputs)
    if earlier is not None:
        return earlier
    if note:
        say(f"{case.case}: {note}")
    save_options, dicom_note = case_outputs(case, outputs)
    try:
        check_output_paths(case.out_dir, case.name, True, outputs=save_options.get("outputs", ()))
        result = detector.predict(case.input)
        result.name = case.name
        data = write_case(detector, case, result, save_options)
    except Cancelled:
        raise
    except CASE_ERRORS as exc:
        return failed_row(case, out_root, case_error_message(exc), say)
    return summary_row(case, out_root, STATUS_OK, data, join_notes(note, dicom_note, *map(str, result.warnings)))
