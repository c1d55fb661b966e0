"""The batch runner: detect on every case of a folder, resumably, with one ``summary.csv``.

This is the only batch runner of the project; the command line (``himatchad batch``), the Slicer
module (through its worker process) and the cohort engines call :func:`run_batch` or build on
:func:`prepare_batch`, :func:`check_earlier` and :func:`run_case`. ``run_batch(..., engine="ray")``
spreads the cases over Ray actors (:mod:`.ray`) with the same outputs; engines are registered in
:mod:`.engines`. The local
engine overlaps the stages of consecutive cases: a reading thread prepares the next case
(``detector.prepare``) and a writing thread writes the previous one while this thread computes
(``prefetch=True``, the default; at most one case ahead, one computed, one being written).

Layout: the sub-folders of the input folder are mirrored under the output folder, so
``input/a/b/x.nii.gz`` gives ``out/a/b/x_heatmap.nii.gz``, ``x_labelmap.nii.gz`` and
``x_scores.json`` (plus ``x_overlay.png`` for a 2D input). Every DICOM series is a case of its own
(:mod:`HiMatchADLib.io.dicom`): a folder with one image series gives one case named after the folder
(``case`` is the folder's path); the series of a folder with several are named
``<folder>_s<SeriesNumber>_<description>`` and their ``case`` is ``<folder path>/<name>``; the
outputs go beside the folder's mirror in both cases. ``series_filter`` keeps only the DICOM series it
selects (the others are not cases). A series that cannot be analysed (a localizer, a DICOM SEG or
SR, uneven slices...) is a row with status "skipped" and the reason, never a failure.
``summary.csv`` in the output folder has one row per case (columns :data:`SUMMARY_COLUMNS`) and is
rewritten atomically after every case; ``report.html`` beside it, the cohort page of the batch
(:mod:`.report`), is written when the cases are done (``himatchad report`` writes it again).

Optional outputs (``outputs={"dicom_seg", "dicom_heatmap"}``, :mod:`HiMatchADLib.outputs.registry`): ``<name>_seg.dcm`` (DICOM SEG of the labelmap) and
``<name>_heatmap_pm.dcm`` (parametric map) for DICOM cases; a non-DICOM case is processed and its row
says that none was written.

In ``summary.csv`` and in the returned rows, ``input`` is the absolute path of the input, and
``heatmap``, ``labelmap`` and ``scores`` are relative to the output folder (posix separators), so
the summary stays valid when the output folder is moved. ``seconds`` is the only column that can
differ between two identical runs. Empty cells are ``""``.

Resuming: a case whose outputs are complete and as they were written (sizes and digests recorded in
its scores JSON: :func:`HiMatchADLib.outputs.files.is_complete`) and whose scores JSON was
written with the same result-changing settings as the detector's (see :func:`settings_changes`) is
"done earlier" and its row is filled from that JSON. A complete case computed with other settings is
recomputed, and its row's message says which settings changed; so is a case whose input's content
(size and digest, not its modification time: ``cp -p`` keeps an old one) differs from the one its
result records, a case with a cut, emptied or missing output, a DICOM case whose series now has other
files, and a case without the DICOM outputs asked for now.

What is never read as an input: anything inside the output folder or an excluded folder (the
normal scans), hidden files and folders, and outputs of this tool found anywhere in the input tree
(files named in the ``outputs`` of one of our scores JSON next to them). Symbolic links are
followed, but a folder or file reached twice (a link loop, two links to one file) is one case.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from ..core.errors import HiMatchADError
from ..io.series_filters import parse_series_filters
from ..outputs.registry import check_outputs
from .cases import PathLike, absolute_path, find_cases
from .engines import get_engine
from .report import REPORT_NAME, write_report
from .resume import result_settings
from .summary import batch_warning, error_message


def prepare_batch(
    detector, input_dir: PathLike, out_dir: PathLike, exclude: Iterable[PathLike] = (), *, log=None, series_filter=(),
    outputs: tuple = (),
) -> tuple:
    """What every engine does before the first case: ``(out_root, cases, current)``.

    Refuses an unfitted detector (and DICOM outputs without their writer), finds the cases (the
    detector's normals folder excluded too; ``series_filter`` applied), creates the output folder
    and returns :func:`result_settings` of the detector.
    """
    say = log or batch_warning
    out_root = absolute_path(out_dir)
    normals = getattr(detector, "normals_dir", None)
    if hasattr(detector, "normals_dir") and normals is None and getattr(detector, "bank_file", None) is None:
        raise HiMatchADError("the detector has no normal bank yet: call fit(normals_dir) first")
    check_outputs(outputs, load=True)  # says how to install an output's writer before any case
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
    outputs: Iterable[str] = (),
    prefetch: bool = True,
    report: bool = True,
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

    ``engine``: a name of :func:`~HiMatchADLib.batch.engines.list_engines`: ``"local"`` (default:
    every case in this process, in order, :func:`~HiMatchADLib.batch.local.run_local`) or ``"ray"``
    (cases spread over Ray actors, see :func:`HiMatchADLib.batch.ray.run_batch_ray`), which receives
    ``engine_options``, e.g. ``{"address": "auto", "workers": 4, "gpus_per_worker": 1}``. Both give
    the same outputs and the same ``summary.csv`` (but for ``seconds``).

    ``series_filter``: ``--series-filter`` values (strings or parsed filters; see
    :func:`HiMatchADLib.io.series_filters.parse_series_filters`) selecting the DICOM series that are cases.
    ``outputs``: optional outputs (e.g. ``{"dicom_seg", "dicom_heatmap"}``: ``<name>_seg.dcm`` /
    ``<name>_heatmap_pm.dcm`` for DICOM cases). A DICOM series that cannot be analysed is a "skipped" row with the reason.

    ``prefetch`` (local engine; default True): read and prepare the next case in a second thread
    while the current one is computed, and write each case's outputs in a third thread while the
    next is computed (at most one case ahead, one computed and one being written). False runs the
    three stages one after the other; outputs and rows are the same either way. ``seconds`` of a
    case is the sum of its own stages.

    ``report`` (default True): when the cases are done, write ``report.html`` in ``out_dir``, the
    cohort page of the batch (:func:`HiMatchADLib.batch.report.write_report`; ``himatchad report
    OUT_DIR`` makes it again). A page that cannot be written is a warning through ``log``
    ("report.html not written: ..."); the batch's outputs and rows are complete either way.
    """
    filters = parse_series_filters(series_filter)  # bad syntax fails before anything else
    outputs = check_outputs(outputs)
    run = get_engine(engine).load()
    options = dict(engine_options or {})
    if engine == "local":
        options["prefetch"] = prefetch
    rows = run(
        detector, input_dir, out_dir, overwrite=overwrite, exclude=exclude, progress=progress, log=log,
        series_filter=filters, outputs=outputs, **options,
    )
    if report:
        try:
            write_report(absolute_path(out_dir), rows)
        except Exception as exc:  # the batch is finished: a page that cannot be written is only a warning
            (log or batch_warning)(f"{REPORT_NAME} not written: {error_message(exc)}")
    return rows
