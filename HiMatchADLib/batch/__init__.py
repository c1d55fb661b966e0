"""Layer 7, ``batch``: the one batch runner.

- :mod:`.cases`: every input file and DICOM series under a folder is a case (:func:`find_cases`);
- :mod:`.resume`: which cases are complete with the same settings (:func:`check_earlier`);
- :mod:`.summary`: ``summary.csv`` rows and counts;
- :mod:`.run_case`: one case (read, detect, write; errors become a ``failed`` row);
- :mod:`.local`: the local engine (read ahead, write behind); :mod:`.ray`: the Ray engine;
- :mod:`.engines`: the engine registry; :mod:`.runner`: :func:`run_batch`.
"""

from .cases import Case, find_cases
from .engines import ENGINES, get_engine, list_engines, register_engine
from .resume import check_earlier, result_settings, settings_changes
from .run_case import run_case
from .runner import prepare_batch, run_batch
from .summary import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    SUMMARY_COLUMNS,
    SUMMARY_NAME,
    summary_counts,
    write_summary,
)

__all__ = [
    "ENGINES",
    "STATUS_DONE",
    "STATUS_FAILED",
    "STATUS_OK",
    "STATUS_SKIPPED",
    "SUMMARY_COLUMNS",
    "SUMMARY_NAME",
    "Case",
    "check_earlier",
    "find_cases",
    "get_engine",
    "list_engines",
    "prepare_batch",
    "register_engine",
    "result_settings",
    "run_batch",
    "run_case",
    "settings_changes",
    "summary_counts",
    "write_summary",
]
