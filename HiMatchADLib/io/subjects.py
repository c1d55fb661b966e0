"""Subjects of normal files: from ``<subject>_<n>`` names or a ``subject_pattern`` regular expression."""

from __future__ import annotations

import re
from typing import Optional

from ..core.errors import HiMatchADError

_GROUP_RE = re.compile(r"[_\-. ]*\d+$")


def source_group(name: str, is_2d: bool) -> str:
    """Group key for leave-one-subject-out calibration.

    2D slices exported from one volume are usually named ``<subject>_<slice number>``; dropping the
    trailing number groups them, so that a held-out slice is never matched against its neighbours.
    A volume is its own group.
    """
    if not is_2d:
        return name
    stripped = _GROUP_RE.sub("", name)
    return stripped or name


def compile_subject_pattern(pattern: Optional[str]):
    """Check a subject pattern: a regular expression with exactly one group (the subject's name)."""
    if pattern is None or pattern == "":
        return None
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise HiMatchADError(f"subject pattern '{pattern}' is not a valid regular expression: {exc}") from None
    if rx.groups != 1:
        raise HiMatchADError(f"subject pattern '{pattern}' must have exactly one group (the subject), not {rx.groups}")
    return rx


def subject_of(path: str, rx) -> str:
    """Subject named by ``rx`` (see :func:`compile_subject_pattern`) in a normal file's relative path.

    The pattern is searched (``re.search``) in the path relative to the normal folder, with ``/``
    separators; its group is the subject. A path it does not match is an error.
    """
    rel = str(path).replace("\\", "/")
    m = rx.search(rel)
    if m is None or not m.group(1):
        raise HiMatchADError(f"subject pattern '{rx.pattern}' does not match the normal file '{rel}' (or its group is empty)")
    return m.group(1)
