"""``--series-filter``: selecting DICOM series by modality, description, number or UID."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..core.errors import HiMatchADError

if TYPE_CHECKING:  # annotations only: io.dicom imports this module
    from .dicom import DicomSeries


# ------------------------------------------------------------------------------- filters
FILTER_KEYS = ("modality", "description", "number", "uid")


_TERM_RE = re.compile(r"^\s*(?P<key>[A-Za-z_]+)\s*(?P<op>!=|!~|=|~)(?P<value>.*)$")


@dataclass(frozen=True)
class SeriesFilter:
    """Terms ``(key, operator, value)`` that a series must all satisfy (see the module notes)."""

    terms: tuple
    text: str = ""

    def __str__(self) -> str:
        return self.text or ",".join(f"{k}{op}{v}" for k, op, v in self.terms)

    def matches(self, series: DicomSeries) -> bool:
        for key, op, value in self.terms:
            have = {
                "modality": series.modality, "description": series.description, "uid": series.series_uid,
                "number": "" if series.series_number is None else str(series.series_number),
            }[key]
            if op in ("~", "!~"):
                hit = re.search(value, have, flags=re.IGNORECASE) is not None
            else:
                hit = have.casefold() == value.strip().casefold()
            if hit == op.startswith("!"):
                return False
        return True


def parse_series_filter(text: str) -> SeriesFilter:
    """One ``--series-filter`` value, e.g. ``modality=MR,description~flair``; a clear
    :class:`HiMatchADError` for bad syntax, an unknown key or an invalid regular expression."""
    usage = (
        "each term is KEY=VALUE (exact, case-insensitive), KEY~REGEX (case-insensitive search), KEY!=VALUE or KEY!~REGEX, "
        f"with KEY one of {', '.join(FILTER_KEYS)}, terms joined by commas (e.g. modality=MR,description~flair)"
    )
    text = str(text)
    if not text.strip():
        raise HiMatchADError(f"invalid --series-filter '': it is empty; {usage}")
    terms = []
    for part in text.split(","):
        m = _TERM_RE.match(part)
        if m is None:
            raise HiMatchADError(f"invalid --series-filter '{text}': '{part}' is not a term; {usage}")
        key, op, value = m.group("key").lower(), m.group("op"), m.group("value").strip()
        if key not in FILTER_KEYS:
            raise HiMatchADError(f"invalid --series-filter '{text}': unknown key '{key}'; {usage}")
        if not value and "~" in op:
            raise HiMatchADError(f"invalid --series-filter '{text}': '{part}' has no regular expression; {usage}")
        if "~" in op:
            try:
                re.compile(value)
            except re.error as exc:
                raise HiMatchADError(f"invalid --series-filter '{text}': '{value}' is not a valid regular expression ({exc})") from None
        elif key == "number" and value and not value.lstrip("-").isdigit():
            raise HiMatchADError(f"invalid --series-filter '{text}': the series number '{value}' is not a whole number")
        terms.append((key, op, value))
    return SeriesFilter(tuple(terms), text.strip())


def parse_series_filters(values) -> tuple:
    """``--series-filter`` values (a string, filters, or a list of either) -> a tuple of
    :class:`SeriesFilter` (empty: every series)."""
    if values is None:
        return ()
    if isinstance(values, (str, SeriesFilter)):
        values = [values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (str, SeriesFilter)) for v in values):
        raise HiMatchADError(f"series filters must be a filter string or a list of them (e.g. \"modality=MR,description~flair\"), not {values!r}")
    return tuple(v if isinstance(v, SeriesFilter) else parse_series_filter(v) for v in values)


def matches(series: DicomSeries, filters: Sequence) -> bool:
    """True when no filter is given or any one of ``filters`` selects ``series``."""
    return not filters or any(f.matches(series) for f in filters)
