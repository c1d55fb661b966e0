"""The detection worker: a long-lived process that keeps the model and the normal bank loaded.

Started as ``python -m HiMatchADLib worker`` (inside 3D Slicer: ``PythonSlicer -m HiMatchADLib
worker``), it reads one JSON request per line on stdin and writes one JSON event per line on stdout;
logs go to stderr. The protocol is described in ``docs/api-contract.md``; the client that starts,
feeds, polls and cancels it is :class:`HiMatchADLib.worker.client.WorkerClient`.

Requests::

    {"id": "1", "cmd": "detect", "input": PATH, "normals": FOLDER, "out_dir": FOLDER,
     "settings": {...HiMatchDetector keywords...}, "foreground": false}
    {"id": "2", "cmd": "batch", "input_dir": FOLDER, "normals": FOLDER, "out_dir": FOLDER,
     "settings": {...}, "overwrite": false, "engine": "local", "engine_options": {},
     "series_filter": ["modality=MR,description~flair"], "dicom_seg": false, "dicom_heatmap": false}
    (instead of "normals": "bank": FILE, a bank file made by ``himatchad bank export``; exactly one of the two;
     "feedback_dir": FOLDER, the reader feedback folder (default: beside the bank); "use_feedback": false ignores it)
    {"id": "4", "cmd": "mark_normal", "input": PATH, "region": LABELMAP (optional), "slices": [i, ...] (optional),
     "note": "...", "normals": FOLDER | "bank": FILE, "settings": {...}, "feedback_dir": FOLDER (optional)}
                                             (answer: "entry", the feedback entry's record, and "feedback_folder")
    {"id": "3", "cmd": "ping"}               (answer: pid, version, detectors, devices, hub_token)
    {"cmd": "shutdown"}                      (end of stdin does the same)

Events: ``ready`` once at start; per request ``progress`` events, then exactly one ``done`` or
``error``. An error a user can cause (bad path, unreadable file, unknown setting) does not end the
worker. A model that cannot be loaded from the Hugging Face Hub (gated, refused token, unknown id,
offline) gives an ``error`` whose ``model_access`` holds the fields of
:class:`~HiMatchADLib.core.errors.ModelAccessError` (``kind``, ``model``, ``url``, ``alternative``,
``panel_message``...). Detectors (model + bank) are kept for the most recent settings, so a second request with
the same settings reuses them; ``done`` says so in ``"reused"``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from ..bank.store import default_cache_root
from ..batch.runner import run_batch
from ..batch.summary import summary_counts
from ..core.atomic import folder_write_problem
from ..core.errors import Cancelled, HiMatchADError, ModelAccessError
from ..core.version import __version__
from ..detector.detector import HiMatchDetector
from ..features.backbone import available_devices
from ..features.models import hub_token_status
from ..io.discovery import check_output_folder
from ..io.readers import read_image
from ..io.series_filters import parse_series_filters
from ..outputs.files import save_result
from ..outputs.registry import check_outputs
from .protocol import (
    EXTRACTOR_SETTINGS,
    PROGRESS_INTERVAL_S,
    PROTOCOL,
    RESERVED_SETTINGS,
    requested_outputs,
)

log = logging.getLogger("HiMatchAD.worker")


def _check_cache_folder(cache_dir) -> None:
    """Refuse, before a detector is made, a cache folder that is a file or cannot be created (the
    normal bank could be neither read from it nor built into it)."""
    cache = Path(cache_dir).expanduser() if isinstance(cache_dir, (str, os.PathLike)) and str(cache_dir) else default_cache_root()
    if cache.is_dir():
        return  # an existing one may be read-only: a complete bank can be read from it
    problem = folder_write_problem(cache)
    if problem is not None:
        raise HiMatchADError(f"the cache folder {cache} (cache_dir) cannot be created: {problem}; give cache_dir a folder you can write to")


def _default_factory():
    return HiMatchDetector


class Worker:
    """Serves requests (dicts) and reports events through ``emit(dict)``; no I/O of its own.

    ``detector_factory`` builds a detector from keyword settings (default ``HiMatchDetector``);
    ``max_detectors`` detectors are kept, the least recently used is dropped first.
    """

    def __init__(self, emit: Callable[[dict], None], detector_factory=None, max_detectors: int = 2):
        self.emit = emit
        self._factory = detector_factory
        self.max_detectors = max(1, int(max_detectors))
        self.detectors: "OrderedDict[str, object]" = OrderedDict()
        self._devices: "list | None" = None

    # ------------------------------------------------------------------ detectors
    @property
    def factory(self):
        if self._factory is None:
            self._factory = _default_factory()
        return self._factory

    def allowed_settings(self) -> list:
        params = inspect.signature(self.factory).parameters
        return sorted(
            n for n, p in params.items()
            if n not in RESERVED_SETTINGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

    def _check_settings(self, settings) -> dict:
        if settings is None:
            return {}
        if not isinstance(settings, dict):
            raise HiMatchADError("'settings' must be a JSON object of detector keywords")
        allowed = set(self.allowed_settings())
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise HiMatchADError(f"unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(allowed))}")
        return dict(settings)

    def detector(self, settings: dict, bank=None):
        """``(detector, existed)``: the kept detector for these settings (and bank file: a detector
        that loaded one holds the settings the file fixes), or a new one."""
        key = json.dumps(settings if bank is None else [settings, str(bank)], sort_keys=True, default=str)
        det = self.detectors.get(key)
        if det is not None:
            self.detectors.move_to_end(key)
            return det, True
        det = self.factory(**settings)
        # A detector with the same model settings lends its loaded model (no second load).
        for other in reversed(self.detectors.values()):
            if getattr(other, "extractor", None) is not None and all(
                getattr(other, a, None) == getattr(det, a, None) for a in EXTRACTOR_SETTINGS
            ):
                det.extractor = other.extractor
                break
        self.detectors[key] = det
        while len(self.detectors) > self.max_detectors:
            self.detectors.popitem(last=False)
        return det, False

    def devices(self) -> list:
        """:func:`~HiMatchADLib.features.backbone.available_devices`, found once (torch is imported
        here); ``[{"device": "cpu", ...}]`` with an ``error`` when torch cannot be imported."""
        if self._devices is None:
            try:
                self._devices = available_devices()
            except Exception as exc:  # a broken torch: say so, keep serving
                self._devices = [{"device": "cpu", "kind": "cpu", "label": "cpu", "error": f"{type(exc).__name__}: {exc}"[:300]}]
        return self._devices

    def forget(self, det) -> None:
        for key, value in list(self.detectors.items()):
            if value is det:
                del self.detectors[key]

    # ------------------------------------------------------------------ requests
    def _progress(self, rid):
        last = {"t": 0.0, "message": None}

        def callback(message: str, done: int, total: int) -> None:
            now = time.monotonic()
            if message != last["message"] or done <= 0 or done >= total or now - last["t"] >= PROGRESS_INTERVAL_S:
                last.update(t=now, message=message)
                self.emit({"id": rid, "event": "progress", "message": str(message), "done": int(done), "total": int(total)})

        return callback

    @staticmethod
    def _path(req: dict, key: str) -> str:
        value = req.get(key)
        if not isinstance(value, str) or not value:
            raise HiMatchADError(f"request needs '{key}' (a path)")
        return value

    def handle(self, req) -> bool:
        """Serve one request; returns False when the worker should stop."""
        if not isinstance(req, dict):
            self.emit({"id": None, "event": "error", "message": "a request must be a JSON object"})
            return True
        rid = req.get("id")
        cmd = req.get("cmd")
        if cmd == "shutdown":
            return False
        if cmd == "ping":
            self.emit({
                "id": rid, "event": "done", "pid": os.getpid(), "version": __version__, "detectors": len(self.detectors),
                "devices": self.devices(), "hub_token": hub_token_status(),
            })
            return True
        if cmd not in ("detect", "batch", "mark_normal"):
            self.emit({"id": rid, "event": "error", "message": f"unknown command {cmd!r}; expected detect, batch, mark_normal, ping or shutdown"})
            return True
        det = None
        try:
            settings = self._check_settings(req.get("settings"))
            # What the request asks that cannot be done fails before any model work, as on the command
            # line: unknown outputs or a missing writer package, bad series filters, an output
            # folder that is the input folder or inside the normal scans.
            outputs = check_outputs(requested_outputs(req), load=True) if cmd != "mark_normal" else ()
            if cmd == "batch":
                parse_series_filters(req.get("series_filter") or ())
            if cmd != "mark_normal":
                check_output_folder(req.get("out_dir"), input=req.get("input"), input_dir=req.get("input_dir"), normals=req.get("normals"), name="out_dir")
            _check_cache_folder(settings.get("cache_dir"))
            if (req.get("bank") is None) == (req.get("normals") is None):
                raise HiMatchADError(f"a {cmd} request needs exactly one of 'normals' (a folder of normal scans) and 'bank' (a bank file)")
            det, existed = self.detector(settings, req.get("bank"))
            det.feedback_dir = Path(self._path(req, "feedback_dir")).expanduser() if req.get("feedback_dir") else None
            det.use_feedback = bool(req.get("use_feedback", True))
            if cmd == "mark_normal":
                self._mark_normal(rid, req, det)
            elif cmd == "detect":
                self._detect(rid, req, det, existed, outputs)
            else:
                self._batch(rid, req, det, existed, outputs)
        except Cancelled:
            self.emit({"id": rid, "event": "error", "message": "cancelled"})
        except ModelAccessError as exc:
            if det is not None:
                self.forget(det)  # its model never loaded: the next request tries again
            self.emit({"id": rid, "event": "error", "message": str(exc), "model_access": exc.to_dict()})
        except HiMatchADError as exc:
            self.emit({"id": rid, "event": "error", "message": str(exc)})
        except MemoryError:
            if det is not None:
                self.forget(det)
            self.emit({"id": rid, "event": "error", "message": "out of memory; try a smaller resolution or batch size, or crop the volume"})
        except Exception as exc:  # a bug: report it, drop the detector it may have damaged, keep serving
            log.error("internal error while serving %s:\n%s", cmd, traceback.format_exc())
            if det is not None:
                self.forget(det)
            self.emit({"id": rid, "event": "error", "message": f"internal error: {type(exc).__name__}: {exc}", "internal": True})
        return True

    def _fit(self, rid, req, det) -> tuple:
        if req.get("bank") is not None:  # a bank file: loaded again when it changed
            path = Path(self._path(req, "bank")).expanduser()
            try:
                st = path.stat()
                stamp = (str(path), st.st_size, st.st_mtime_ns)
            except OSError:
                stamp = None
            loaded = stamp is not None and getattr(det, "bank", None) is not None and getattr(det, "_worker_bank_stamp", None) == stamp
            det.set_progress(self._progress(rid))
            t = time.perf_counter()
            if not loaded:
                det._worker_bank_stamp = None
                det.load_bank(path, asked=set(req.get("settings") or {}))  # the request's settings must agree with the file
                det._worker_bank_stamp = stamp
            return None, loaded, time.perf_counter() - t
        normals = Path(self._path(req, "normals")).expanduser()
        loaded = getattr(det, "bank", None) is not None and getattr(det, "normals_dir", None) == normals
        det.set_progress(self._progress(rid))
        t = time.perf_counter()
        det.fit(normals)
        return normals, loaded, time.perf_counter() - t

    def _detect(self, rid, req, det, existed, outputs: tuple) -> None:
        inp = self._path(req, "input")
        out_dir = self._path(req, "out_dir")
        t0 = time.perf_counter()
        # A bad input fails in seconds, before the model and the normal bank are loaded.
        query = det.check_query(inp) if hasattr(det, "check_query") else inp
        _, loaded, fit_s = self._fit(rid, req, det)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the result carries its own warnings
            res = det.predict(query)
        predict_s = time.perf_counter() - t
        t = time.perf_counter()
        paths = save_result(res, out_dir, foreground=bool(req.get("foreground", False)), outputs=outputs)
        self.emit({
            "id": rid, "event": "done",
            "scores": str(paths["scores"]),
            "outputs": {k: str(v) for k, v in paths.items()},
            "seconds": round(time.perf_counter() - t0, 3),
            "reused": bool(existed and loaded),
            "model_reused": bool(existed),
            "name": res.name,
            "volume_score": _finite(res.volume_score),
            "threshold": _finite(res.threshold),
            "anomalous_voxels": int(res.anomalous_voxels),
            "warnings": list(res.warnings),
            "feedback": list(res.settings.get("feedback", [])),  # the reader feedback entries it was computed with
            "timings": {"fit": round(fit_s, 3), "predict": round(predict_s, 3), "save": round(time.perf_counter() - t, 3)},
        })

    def _mark_normal(self, rid, req, det) -> None:
        """A feedback entry: the region (a labelmap file on the input's grid) and/or slices of the input are normal."""
        t0 = time.perf_counter()
        inp = self._path(req, "input")
        # Read here: the file is a temporary one of the client's, its path is not worth recording in the entry.
        region = read_image(self._path(req, "region")) if req.get("region") else None
        slices = req.get("slices")
        if slices is not None and (not isinstance(slices, list) or not all(isinstance(i, int) for i in slices)):
            raise HiMatchADError("'slices' must be a list of slice indices")
        self._fit(rid, req, det)
        entry = det.mark_normal(inp, region=region, slices=slices, note=str(req.get("note") or ""))
        self.emit({
            "id": rid, "event": "done", "entry": entry, "feedback_folder": str(det.feedback_folder),
            "seconds": round(time.perf_counter() - t0, 3),
        })

    def _batch(self, rid, req, det, existed, outputs: tuple) -> None:
        input_dir = Path(self._path(req, "input_dir")).expanduser()
        out_dir = Path(self._path(req, "out_dir")).expanduser()
        t0 = time.perf_counter()
        normals, loaded, _ = self._fit(rid, req, det)
        rows = run_batch(
            det, input_dir, out_dir, overwrite=bool(req.get("overwrite", False)), exclude=[normals] if normals else [],
            progress=self._progress(rid), log=lambda m: log.warning("%s", m),
            engine=str(req.get("engine") or "local"), engine_options=req.get("engine_options") or None,
            series_filter=req.get("series_filter") or (), outputs=outputs,
        )
        self.emit({
            "id": rid, "event": "done",
            "summary": str(out_dir / "summary.csv"),
            "counts": summary_counts(rows),
            "rows": len(rows),
            "seconds": round(time.perf_counter() - t0, 3),
            "reused": bool(existed and loaded),
            "model_reused": bool(existed),
        })


def _finite(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if x == x and abs(x) != float("inf") else None


def serve(lines, emit: Callable[[dict], None], detector_factory=None) -> int:
    """Read requests from the iterable ``lines`` until shutdown or its end; returns the exit status."""
    worker = Worker(emit, detector_factory)
    emit({"event": "ready", "pid": os.getpid(), "version": __version__, "protocol": PROTOCOL})
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
            emit({"id": None, "event": "error", "message": f"not a JSON request: {str(exc)[:200]}"})
            continue
        if not worker.handle(req):
            break
    return 0


def _windows_process_alive(pid: int, kernel32=None, last_error=None) -> bool:
    """Windows: whether process ``pid`` runs (OpenProcess + WaitForSingleObject; access denied
    means it exists). ``kernel32`` / ``last_error`` stand in for ctypes' in tests."""
    if kernel32 is None:
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        last_error = ctypes.get_last_error
    SYNCHRONIZE, PROCESS_QUERY_LIMITED_INFORMATION = 0x00100000, 0x1000
    ERROR_ACCESS_DENIED, WAIT_TIMEOUT = 5, 0x102
    handle = kernel32.OpenProcess(SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION, False, int(pid))
    if not handle:
        return last_error() == ERROR_ACCESS_DENIED  # otherwise (ERROR_INVALID_PARAMETER): no such process
    try:
        return kernel32.WaitForSingleObject(handle, 0) == WAIT_TIMEOUT  # still running
    finally:
        kernel32.CloseHandle(handle)


def _zombie(pid: int) -> bool:
    """Linux: the process has ended but its parent has not collected it yet (state Z)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3] in (b"Z", b"X")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: POSIX ``os.kill(pid, 0)`` (PermissionError: it exists, owned by
    another user; an ended process not yet collected by its parent counts as gone on Linux),
    Windows ``OpenProcess`` / ``WaitForSingleObject``."""
    pid = int(pid)
    if pid <= 0:
        return False
    if os.name == "nt":
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return not _zombie(pid)


def _watch_parent(parent: int) -> None:
    """End the worker when the process that started it is gone (it would otherwise run on alone)."""
    while True:
        time.sleep(2.0)
        if os.getppid() != parent:
            os._exit(3)


def _watch_pid(pid: int, interval: float = 1.0) -> None:
    """End the worker when process ``pid`` (``--parent-pid``: the application) is gone."""
    while True:
        if not process_alive(pid):
            log.warning("process %s (--parent-pid) has ended: the worker exits", pid)
            os._exit(3)
        time.sleep(interval)


def main(detector_factory=None, parent_pid: "int | None" = None) -> int:
    """Entry point of ``python -m HiMatchADLib worker [--parent-pid PID]``.

    With ``parent_pid`` the worker exits (status 3) within about a second of that process ending,
    on every operating system; without it, on POSIX, when its parent process changes.

    File descriptor 1 is kept for the protocol alone: everything else that writes to stdout (a print
    in a library, a C extension) is sent to stderr, so it can never corrupt an event line.
    """
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", newline="\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    lock = threading.Lock()

    def emit(event: dict) -> None:
        text = json.dumps(event, allow_nan=False, default=str)
        with lock:
            proto.write(text + "\n")
            proto.flush()

    if parent_pid is not None:
        threading.Thread(target=_watch_pid, args=(int(parent_pid),), daemon=True, name="parent watch").start()
    elif os.name == "posix":
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="parent watch").start()
    stdin = iter(sys.stdin.readline, "")
    try:
        return serve(stdin, emit, detector_factory)
    except (BrokenPipeError, KeyboardInterrupt):  # the client went away
        return 0
