"""Subjects of the normal bank's slices: what calibration holds out together.

With ``subject_pattern`` the pattern's group names the subject of each normal file; otherwise a
volume is its own subject and 2D files named ``<subject>_<n>`` share ``<subject>``.
"""

from __future__ import annotations

import numpy as np

from ..io.subjects import compile_subject_pattern, subject_of


def subject_groups(bank, subject_pattern=None) -> tuple[np.ndarray, list, list]:
    """Subject of every bank slice: (index per slice, subject names, warnings).

    With ``subject_pattern`` the pattern's group names the subject of each normal file (a file
    it does not match is an error); otherwise the bank's grouping (a volume is its own subject;
    2D files named ``<subject>_<n>`` share ``<subject>``).
    """
    warn: list = []
    rx = compile_subject_pattern(subject_pattern)
    if rx is not None:
        files = bank.files
        used = np.unique(bank.slice_file)
        name_of = {int(f): subject_of(files[int(f)], rx) for f in used}
        names = sorted(set(name_of.values()))
        index = {n: i for i, n in enumerate(names)}
        per_file = np.zeros(len(files), np.int64)
        for f, n in name_of.items():
            per_file[f] = index[n]
        return per_file[np.asarray(bank.slice_file, np.int64)], names, warn
    groups = np.asarray(bank.slice_group, np.int64)
    flat = ~np.isfinite(np.asarray(bank.slice_pos, float))  # slices of 2D images (no position)
    files_2d = np.unique(np.asarray(bank.slice_file)[flat])
    if files_2d.size > 1:
        subjects_2d = np.unique(groups[np.isin(bank.slice_file, files_2d)])
        if subjects_2d.size == files_2d.size:
            warn.append(
                f"every 2D normal file is its own subject ({files_2d.size} files, none named <subject>_<n>): slices of one "
                "patient can calibrate against each other and the threshold may be optimistic; give subject_pattern "
                "(--subject-pattern, a regular expression with one group) to group the files by subject"
            )
    return groups, list(bank.groups), warn
