"""The batch summary: one row per case, ``summary.csv`` written atomically, counts."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Optional

from ..core.atomic import write_text_atomic
from ..core.errors import HiMatchADError
from ..outputs.files import output_paths
from .cases import Case, PathLike, absolute_path

SUMMARY_COLUMNS = (
    "case", "input", "status", "volume_score", "threshold", "anomalous_voxels",
    "anomalous_volume_mm3", "most_anomalous_slice", "heatmap", "labelmap", "scores", "overview", "seconds", "message",
)

STATUS_OK, STATUS_DONE, STATUS_FAILED, STATUS_SKIPPED = "ok", "done earlier", "failed", "skipped"


SUMMARY_NAME = "summary.csv"


# ------------------------------------------------------------------------------- rows and summary
def _relative(path: Path, out_root: Path) -> str:
    return path.relative_to(out_root).as_posix()


def summary_row(case: Case, out_root: Path, status: str, data: Optional[dict] = None, message: str = "") -> dict:
    row = {c: "" for c in SUMMARY_COLUMNS}
    row.update(case=case.case, input=str(absolute_path(case.path)), status=status, message=message)
    if data is not None:
        for key in ("volume_score", "threshold", "anomalous_voxels", "anomalous_volume_mm3", "most_anomalous_slice"):
            value = data.get(key)
            row[key] = "" if value is None else value
        paths = output_paths(case.out_dir, case.name, False)
        for key in ("heatmap", "labelmap", "scores"):
            row[key] = _relative(paths[key], out_root)
        written = data.get("outputs") if isinstance(data.get("outputs"), dict) else {}
        picture = written.get("overview") or written.get("overlay")  # a volume's overview, a 2D input's overlay
        if isinstance(picture, str):
            row["overview"] = _relative(case.out_dir / picture, out_root)
    return row


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_message(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if isinstance(exc, MemoryError):
        return "out of memory" + (f": {text}" if text else "")
    if isinstance(exc, HiMatchADError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def join_notes(*parts: str) -> str:
    return one_line("; ".join(p for p in parts if p))


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


def batch_warning(message: str) -> None:
    warnings.warn(message, stacklevel=3)
