"""The cohort report of a batch: ``report.html`` in the output folder, one self-contained page.

:func:`write_report` reads ``summary.csv`` (or the rows it is given) and the scores JSON of every
case it names, and writes ``<out_dir>/report.html`` atomically: a header (the folder, the counts by
status, when it was written), a banner when the model had random weights, a histogram of the volume
scores with the calibrated threshold marked, the table of every case (thumbnail of the case's
overview picture, status, the reason of a failed or skipped case, volume score, anomalous size,
most anomalous slice, seconds, links to the heatmap, labelmap and scores JSON) and the run's
settings and provenance (from one finished case, with what the cases disagree on).

The page needs no network and no server: it works opened from the file system (``file://``). The
rows are embedded as JSON in a ``<script type="application/json">`` element and the page's own
script renders one page of them at a time (sortable by a click on a column header, filtered by a
text box over case and reason and by status, 100 rows a page), so it stays fast with 10 000 cases;
the state is in the URL's hash (``#sort=volume_score&dir=desc&page=2&q=text&status=failed``).
Pictures and outputs are relative links to the files beside the page; a file that is not there is
not linked. Every string from the data is escaped (HTML, and ``</script>`` inside the JSON).
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import json
import math
import os
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from ..core.atomic import write_text_atomic
from ..core.errors import HiMatchADError
from ..core.version import __version__
from .cases import PathLike, absolute_path
from .report_page import PAGE_SCRIPT, PAGE_STYLE, PAGE_TEMPLATE
from .summary import STATUS_DONE, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, SUMMARY_NAME, one_line

REPORT_NAME = "report.html"

PAGE_SIZE = 100

HISTOGRAM_BINS = 40

_FINISHED = (STATUS_OK, STATUS_DONE)

_NUMBERS = ("volume_score", "threshold", "anomalous_voxels", "anomalous_volume_mm3", "most_anomalous_slice", "seconds")


# ------------------------------------------------------------------------------------ reading
def read_summary(out_dir: PathLike) -> list:
    """The rows of ``<out_dir>/summary.csv`` as dicts of strings; a one-line error when there is none."""
    root = absolute_path(out_dir)
    path = root / SUMMARY_NAME
    if not root.is_dir():
        raise HiMatchADError(f"{root} is not a folder: give the output folder of a batch (himatchad batch --out-dir)")
    if not path.is_file():
        raise HiMatchADError(f"no {SUMMARY_NAME} in {root}: not the output folder of a batch (run himatchad batch first)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise HiMatchADError(f"cannot read {path}: {one_line(getattr(exc, 'strerror', None) or exc)}") from exc
    if "case" not in fields or "status" not in fields:
        raise HiMatchADError(f"{path} is not a batch summary: it has no 'case' and 'status' columns")
    return rows


def _number(value) -> Optional[float]:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _read_json(path: str) -> tuple:
    """``(data, problem)``: the scores JSON as a dict, or None and why not."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, "its scores JSON is missing"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"its scores JSON cannot be read: {one_line(getattr(exc, 'strerror', None) or exc)}"
    if not isinstance(data, dict):
        return None, "its scores JSON is not a JSON object"
    return data, ""


def _inside(root: Path, rel: str) -> Optional[str]:
    """``root / rel`` when ``rel`` is a relative path (posix) of an existing file, else None."""
    if not rel or not isinstance(rel, str) or rel.startswith(("/", "\\")) or ".." in rel.replace("\\", "/").split("/"):
        return None
    full = os.path.join(root, rel)  # strings, not Path objects: ten thousand cases make it count
    return full if os.path.isfile(full) else None


def _href(rel: str) -> str:
    return quote(rel.replace("\\", "/"), safe="/")


def _size_text(mm3: Optional[float], is_2d: bool) -> str:
    if mm3 is None:
        return ""
    if is_2d:
        return f"{mm3 / 100.0:.2f} cm²"
    return f"{mm3 / 1000.0:.2f} mL"


# ------------------------------------------------------------------------------ the page's data
def _case_entry(row: dict, root: Path, data: Optional[dict], problem: str) -> dict:
    """One row of the embedded table: display values, sort values and relative links."""
    status = str(row.get("status", ""))
    entry = {"case": str(row.get("case", "")), "status": status, "message": one_line(row.get("message", "") or "")}
    for key in _NUMBERS:
        entry[key] = _number(row.get(key))
    if entry["most_anomalous_slice"] is not None:
        entry["most_anomalous_slice"] = int(entry["most_anomalous_slice"])
    outputs = (data or {}).get("outputs") or {}
    folder = str(row.get("scores", "") or "").rpartition("/")[0]

    def beside(name) -> str:
        if not isinstance(name, str) or not name:
            return ""
        return f"{folder}/{name}" if folder else name

    links = {}
    for key in ("heatmap", "labelmap", "scores"):
        rel = str(row.get(key, "") or "")
        if _inside(root, rel):
            links[key] = _href(rel)
    picture = str(row.get("overview", "") or "")
    if not _inside(root, picture):
        candidates = [beside(outputs.get(k)) for k in ("overview", "overlay")]
        picture = next((c for c in candidates if c and _inside(root, c)), "")
    entry["picture"] = _href(picture) if picture else ""
    entry["links"] = links
    is_2d = bool(((data or {}).get("geometry") or {}).get("is_2d", False))
    entry["size"] = _size_text(entry["anomalous_volume_mm3"], is_2d)
    if status in _FINISHED and problem:
        entry["note"] = problem
    return entry


def _distinct(values: list) -> dict:
    """``{value: count}`` over ``values`` (in order of first appearance)."""
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _provenance_view(finished: list) -> dict:
    """What the finished cases' JSONs say about the run: one reference case, and their disagreements."""
    if not finished:
        return {}
    case, ref = finished[0]
    prov = ref.get("provenance") or {}
    model = prov.get("model") or {}
    models = _distinct([(
        str((d.get("provenance") or {}).get("model", {}).get("id") or d.get("model") or ""),
        str((d.get("provenance") or {}).get("model", {}).get("weights_digest") or ""),
    ) for _, d in finished])
    settings_list = [d.get("settings") or {} for _, d in finished]
    keys = sorted({k for s in settings_list for k in s})
    if len(_distinct([json.dumps(s, sort_keys=True, default=str) for s in settings_list])) == 1:
        keys = []  # all the same: no key differs
    differ = {}
    for k in keys:
        counts = _distinct([json.dumps(s.get(k), sort_keys=True, default=str) for s in settings_list])
        if len(counts) > 1:
            differ[k] = counts
    random_cases = [c for c, d in finished if ((d.get("provenance") or {}).get("model") or {}).get("random_weights")]
    return {
        "case": case, "data": ref, "provenance": prov, "model": model, "models": models, "settings_differ": differ,
        "random_cases": random_cases, "versions": _distinct([str((d.get("provenance") or {}).get("version", "")) for _, d in finished]),
    }


def _threshold(finished: list, entries: list) -> Optional[float]:
    """The calibrated threshold of the run (the most common one; the rows' threshold when none recorded)."""
    values = [_number((d.get("threshold_info") or {}).get("calibrated_threshold")) for _, d in finished]
    values = [v for v in values if v is not None] or [e["threshold"] for e in entries if e["threshold"] is not None]
    if not values:
        return None
    counts = _distinct(values)
    return max(counts, key=counts.get)


# ------------------------------------------------------------------------------------ histogram
def histogram_svg(scores: list, threshold: Optional[float], bins: int = HISTOGRAM_BINS) -> str:
    """An inline SVG histogram of ``scores`` with a dashed line at ``threshold`` (same scale)."""
    scores = [s for s in scores if s is not None]
    if not scores:
        return '<p class="muted">No volume scores yet (no finished case).</p>'
    lo, hi = min(scores), max(scores)
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    span = (hi - lo) / bins
    counts = [0] * bins
    for s in scores:
        counts[min(int((s - lo) / span), bins - 1)] += 1
    width, height, left, bottom, top = 720.0, 220.0, 40.0, 30.0, 12.0
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max(counts)

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    parts = [
        f'<svg id="histogram" viewBox="0 0 {width:g} {height:g}" width="{width:g}" height="{height:g}" role="img" '
        f'aria-label="Histogram of {len(scores)} volume scores">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>',
        f'<text x="{left - 4}" y="{top + 8}" class="tick" text-anchor="end">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" class="tick" text-anchor="end">0</text>',
    ]
    bar_w = plot_w / bins
    for i, c in enumerate(counts):
        if c:
            h = c / peak * plot_h
            a, b = lo + i * span, lo + (i + 1) * span
            parts.append(
                f'<rect class="bar" x="{left + i * bar_w + 0.5:.2f}" y="{top + plot_h - h:.2f}" width="{max(bar_w - 1, 0.5):.2f}" '
                f'height="{h:.2f}"><title>{a:.4g} to {b:.4g}: {c} case{"s" if c != 1 else ""}</title></rect>'
            )
    for v, anchor in ((lo, "start"), (hi, "end")):
        parts.append(f'<text x="{x_of(v):.2f}" y="{height - 10}" class="tick" text-anchor="{anchor}">{v:.4g}</text>')
    if threshold is not None:
        x = x_of(threshold)
        above = sum(1 for s in scores if s > threshold)
        parts.append(
            f'<line id="threshold-line" data-threshold="{threshold!r}" x1="{x:.2f}" y1="{top - 6}" x2="{x:.2f}" '
            f'y2="{top + plot_h}" class="threshold"><title>calibrated threshold {threshold:.4g}</title></line>'
        )
        right = x > left + plot_w * 0.7
        parts.append(
            f'<text x="{x + (-4 if right else 4):.2f}" y="{top + 10}" class="tick threshold-label" '
            f'text-anchor="{"end" if right else "start"}">threshold {threshold:.4g}</text>'
        )
        caption = (f"{len(scores)} volume scores; calibrated threshold {threshold:.4g} (dashed), "
                   f"{above} case{'s' if above != 1 else ''} above it")
    else:
        caption = f"{len(scores)} volume scores; no calibrated threshold recorded"
    parts.append("</svg>")
    return "".join(parts) + f'<p class="muted" id="histogram-caption">{html.escape(caption)}</p>'


# --------------------------------------------------------------------------------- page pieces
def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(pairs: list) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{body}</table>'


def _value(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return "" if v is None else str(v)


def _run_section(view: dict) -> str:
    if not view:
        return '<p class="muted">No finished case: nothing records the run\'s settings and provenance.</p>'
    prov, model, data = view["provenance"], view["model"], view["data"]
    bank = prov.get("bank") or {}
    info = data.get("threshold_info") or {}
    libs = prov.get("libraries") or {}
    pairs = [
        ("from the scores JSON of", view["case"]),
        ("himatchad version", prov.get("version", (data.get("settings") or {}).get("version"))),
        ("method", prov.get("method", data.get("method"))),
        ("method revision", prov.get("method_revision")),
        ("model", model.get("id", data.get("model"))),
        ("weights digest", model.get("weights_digest")),
        ("model licence", model.get("licence")),
        ("random weights", "yes" if model.get("random_weights") else ("no" if model else "")),
        ("device", " ".join(str(x) for x in (prov.get("device"), prov.get("device_name")) if x)),
        ("precision", prov.get("precision")),
        ("normal bank", bank.get("bank_file") or bank.get("folder")),
        ("bank", f"{bank.get('files', '?')} files, {bank.get('slices', '?')} slices, digest {bank.get('digest', '?')}" if bank else ""),
        ("threshold", f"{info.get('mode', '')} (target false-positive rate {info.get('target_fpr', '')}); "
                      f"calibrated {info.get('calibrated_threshold', '')}" if info else data.get("threshold")),
        ("libraries", ", ".join(f"{k} {v}" for k, v in libs.items())),
        ("platform", prov.get("platform")),
    ]
    out = [_table([(k, _value(v)) for k, v in pairs if v not in (None, "")])]
    notes = []
    if len(view["models"]) > 1:
        items = "".join(
            f"<li>{_e(m or '(unknown)')} — weights {_e(d or '(no digest)')}: {n} case{'s' if n != 1 else ''}</li>"
            for (m, d), n in view["models"].items()
        )
        notes.append(f"<p><strong>The cases were made with {len(view['models'])} different models:</strong></p><ul>{items}</ul>")
    if len(view["versions"]) > 1:
        items = ", ".join(f"{_e(v or '?')} ({n})" for v, n in view["versions"].items())
        notes.append(f"<p><strong>The cases were made by different himatchad versions:</strong> {items}</p>")
    if view["settings_differ"]:
        items = "".join(
            f"<li><code>{_e(k)}</code>: " + ", ".join(f"{_e(v)} ({n} case{'s' if n != 1 else ''})" for v, n in counts.items()) + "</li>"
            for k, counts in view["settings_differ"].items()
        )
        notes.append(f"<p><strong>The cases disagree on these settings:</strong></p><ul>{items}</ul>")
    if notes:
        out.insert(0, '<div class="disagree" id="disagreement">' + "".join(notes) + "</div>")
    else:
        out.append('<p class="muted" id="agreement">Every finished case was made with the same model and settings.</p>')
    settings = data.get("settings") or {}
    if settings:
        out.append(
            "<details><summary>settings</summary>" + _table([(k, _value(v)) for k, v in sorted(settings.items())]) + "</details>"
        )
    return "".join(out)


def _banner(view: dict, n_finished: int) -> str:
    if not view or not view["random_cases"]:
        return ""
    n = len(view["random_cases"])
    return (
        '<div class="banner" id="random-weights-banner" role="alert"><strong>Random model weights.</strong> '
        f"{n} of {n_finished} finished case{'s' if n_finished != 1 else ''} {'was' if n == 1 else 'were'} computed with a "
        "random stand-in model, not pretrained weights: their scores and maps say nothing about anomalies.</div>"
    )


def embed_json(value) -> str:
    """JSON safe inside a ``<script>`` element: no ``<``, ``>``, ``&`` or line separators left raw."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text


def report_html(out_dir: PathLike, rows: list, now: Optional[_dt.datetime] = None) -> str:
    """The page for the batch in ``out_dir`` with ``rows`` (summary rows; see :func:`write_report`)."""
    root = absolute_path(out_dir)
    entries, finished = [], []
    for row in rows:
        data, problem = None, ""
        rel = str(row.get("scores", "") or "")
        if rel:
            path = _inside(root, rel)
            data, problem = _read_json(path) if path else (None, "its scores JSON is missing")
        entries.append(_case_entry(row, root, data, problem))
        if data is not None and row.get("status") in _FINISHED:
            finished.append((str(row.get("case", "")), data))
    counts = _distinct([e["status"] for e in entries])
    ordered = [s for s in (STATUS_OK, STATUS_DONE, STATUS_FAILED, STATUS_SKIPPED) if s in counts] + [
        s for s in counts if s not in (STATUS_OK, STATUS_DONE, STATUS_FAILED, STATUS_SKIPPED)
    ]
    view = _provenance_view(finished)
    threshold = _threshold(finished, entries)
    scores = [e["volume_score"] for e in entries if e["status"] in _FINISHED]
    when = (now or _dt.datetime.now().astimezone()).isoformat(timespec="seconds")
    count_text = ", ".join(f"{counts[s]} {s}" for s in ordered) or "no cases"
    payload = {
        "rows": entries, "statuses": ordered, "pageSize": PAGE_SIZE, "threshold": threshold,
    }
    title = f"HiMatch-AD batch report: {root.name}"
    return PAGE_TEMPLATE.format(
        title=_e(title),
        style=PAGE_STYLE,
        folder=_e(root),
        folder_uri=_e(root.as_uri()),
        total=len(entries),
        counts=_e(count_text),
        counts_json=_e(json.dumps(counts)),
        when=_e(when),
        version=_e(__version__),
        banner=_banner(view, len(finished)),
        histogram=histogram_svg(scores, threshold),
        run=_run_section(view),
        data=embed_json(payload),
        script=PAGE_SCRIPT,
    )


def write_report(out_dir: PathLike, rows: Optional[list] = None) -> Path:
    """Write ``<out_dir>/report.html`` (atomically) from ``rows`` or ``summary.csv``; returns its path.

    ``rows``: summary rows as :func:`~HiMatchADLib.batch.runner.run_batch` returns them (dicts with
    the keys :data:`~HiMatchADLib.batch.summary.SUMMARY_COLUMNS`, plus ``overview`` when the
    summary has it); default: read ``summary.csv`` in ``out_dir`` (a one-line
    :class:`HiMatchADError` when there is none). The scores JSON of each row is read for its
    provenance, settings, calibrated threshold and pictures; one that is missing or unreadable is
    noted on its row, never an error.
    """
    root = absolute_path(out_dir)
    if rows is None:
        rows = read_summary(root)
    elif not root.is_dir():
        raise HiMatchADError(f"{root} is not a folder: give the output folder of a batch")
    return write_text_atomic(root / REPORT_NAME, report_html(root, rows))


__all__ = ["REPORT_NAME", "embed_json", "histogram_svg", "read_summary", "report_html", "write_report"]
