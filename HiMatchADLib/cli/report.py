"""``himatchad report OUT_DIR``: write ``report.html`` again for a batch's output folder.

Reads ``summary.csv`` and the scores JSONs it names (:func:`HiMatchADLib.batch.report.write_report`)
and prints the path of the page. A folder without ``summary.csv`` is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse

from ..batch.report import write_report


def add_subparser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser(
        "report",
        help="write report.html, the cohort page of a batch, from its output folder (summary.csv and scores JSONs)",
        description="Write OUT_DIR/report.html from the summary.csv and the scores JSONs of a batch's output folder: "
        "the table of every case (sortable, filterable, paged), a histogram of the volume scores with the calibrated "
        "threshold, and the run's settings and provenance. The page works opened from the file system.",
    )
    r.add_argument("folder", metavar="OUT_DIR", help="the output folder of 'himatchad batch' (the one with summary.csv)")
    r.set_defaults(func=cmd_report)
    return r


def cmd_report(args) -> int:
    print(write_report(args.folder))
    return 0
