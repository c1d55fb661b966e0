"""Detections of MRML volume nodes in the worker process: the Slicer module's runs, without Qt.

The module (``HiMatchAD.py``) keeps one :class:`DetectionRunner`. On "Detect anomalies" it calls
:meth:`DetectionRunner.start_detection` on the main thread: the volume's voxels are written to a
temporary NRRD file (exact geometry) and a request goes to the worker, which keeps the model and
the normal bank loaded between runs. A ``QTimer`` calls :meth:`DetectionRunner.poll`, which never
blocks. When the worker is done, the outputs are read back and returned as a
:class:`~HiMatchADLib.core.result.DetectionResult` only if the volume node is still in its scene and still
has the grid the detection was computed on; the module then imports it with
:func:`HiMatchADLib.mrml.result_to_nodes`. :meth:`DetectionRunner.cancel` kills the worker at once
(the scene is not touched); the next run starts a new one.

Instead of a folder of normal scans, a run may use a bank file (``himatchad bank export``):
``bank=FILE`` and ``normals=None`` (exactly one of the two). A bank file fixes the model and method
settings, so its request should carry only the free ones (:data:`BANK_FREE_SETTINGS`, see
:func:`bank_request_settings`); the worker refuses one that disagrees with the file.
:func:`bank_file_info` reads what a bank file holds from its manifest (no torch, no checksums).

:class:`ReproduceCheck` runs ``himatchad reproduce --json`` for a result in a child process started
as the worker is (same interpreter and environment) and is polled like it: nothing is computed in
Slicer's process.

"Mark as normal" (reader feedback, :mod:`HiMatchADLib.detector.feedback`): :meth:`DetectionRunner.start_mark_normal`
writes the volume as a detection does and the region (a mask on the volume's voxel grid, e.g. an
exported segment) as a labelmap on exactly the grid the volume is written with, and sends a
``mark_normal`` request with the reference and settings of a detection; the worker makes the entry
(the model runs there). :meth:`DetectionRunner.request_of` gives the reference and settings a
result was computed with, so that a mark goes to the bank that made it. Removing an entry
(:func:`HiMatchADLib.bank.feedback.remove_entry`) is pure numpy/json and is done in Slicer's process.

Like :mod:`HiMatchADLib.mrml`, this module needs Slicer's MRML (the application or ``slicer-core``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..bank.bankfile import BankFile
from ..core.errors import Cancelled, HiMatchADError
from ..core.geometry import Geometry
from ..io.writers import write_image
from ..outputs.files import load_result
from ..worker.client import WorkerClient, error_from_event
from .geometry import check_result_matches, image_from_volume_node
from .nodes import input_problem, node_in_scene

RUNNING, DONE, FAILED, CANCELLED, DISCARDED = "running", "done", "failed", "cancelled", "discarded"

#: The suffix ``himatchad bank export`` files are given (any name is accepted).
BANK_FILE_SUFFIX = ".himatchad-bank"

#: Detector settings a bank file leaves free (docs/sharing.md): everything else is fixed by the
#: file, and the worker treats every setting a request carries as asked by the user. ``model`` may
#: be sent too, when the user chose one (the same weights elsewhere): see :func:`bank_request_settings`.
BANK_FREE_SETTINGS = ("device", "batch_size", "threshold", "min_component_size", "cache_dir")


@dataclass
class DetectionJob:
    """One request to the worker and what is known about it."""

    kind: str  # "detect" or "batch"
    request_id: str
    workdir: Optional[Path]
    settings: dict
    normals: Optional[str]  # the folder of normal scans, or None with a bank file
    volume_node: Any = None  # the node object itself (never its ID: IDs are reused after a scene close)
    scene: Any = None
    geometry: Optional[Geometry] = None  # the grid sent to the worker
    state: str = RUNNING
    progress: tuple = ("Starting", 0, 0)
    seconds: float = 0.0
    reused: Optional[bool] = None
    message: str = ""
    event: dict = field(default_factory=dict)  # the worker's last "done" or "error" event, whole
    error: Optional[HiMatchADError] = None  # a failed job's exception (ModelAccessError with its fields)
    bank: Optional[str] = None  # the bank file used instead of a folder of normal scans
    request: dict = field(default_factory=dict)  # reference, settings and feedback keys of the request (see request_of)
    result: Any = None  # a finished detection's result

    @property
    def finished(self) -> bool:
        return self.state != RUNNING


def safe_name(name: str) -> str:
    """A file-name-safe version of a node name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").strip("._")
    return cleaned[:80] or "volume"


def bank_request_settings(settings: dict, model: Optional[str] = None) -> dict:
    """The settings of a request with a bank file: those of ``settings`` the file leaves free
    (:data:`BANK_FREE_SETTINGS`), and ``model`` when given (the worker then checks that its weights
    are the bank's); every other setting is the file's."""
    out = {k: settings[k] for k in BANK_FREE_SETTINGS if k in settings and settings[k] is not None}
    if model:
        out["model"] = str(model)
    return out


def check_reference(normals: Optional[str], bank: Optional[str]) -> dict:
    """The request's reference: ``{"normals": FOLDER}`` or ``{"bank": FILE}``; exactly one of the two
    must be given, and it must exist (a bank file must be one: its manifest is read). Raises
    :class:`HiMatchADError` with one message otherwise, before anything is sent."""
    normals = None if normals in (None, "") else str(normals)
    bank = None if bank in (None, "") else str(bank)
    if (normals is None) == (bank is None):
        raise HiMatchADError(
            "give either a folder of normal scans or a bank file (made by 'himatchad bank export'), not both"
            if normals is not None else "give a folder of normal scans or a bank file (made by 'himatchad bank export')"
        )
    if bank is not None:
        bank = str(Path(bank).expanduser())
        bank_file_info(bank)  # refuses a file that is not a bank file
        return {"bank": bank}
    normals = str(Path(normals).expanduser())
    if not Path(normals).is_dir():
        raise HiMatchADError(f"the folder of normal scans does not exist: {normals}")
    return {"normals": normals}


def bank_file_info(path) -> dict:
    """What the bank file ``path`` holds, from its manifest alone (a small member of the ZIP: no
    checksum of its arrays, no torch): ``path``, ``model`` (id), ``weights_digest``, ``method``,
    ``slices``, ``subjects``, ``volumes``, ``anonymised``, ``precision``, ``resolution``,
    ``modality``, ``tool_version``, ``created``, ``digest``. Raises :class:`HiMatchADError` (one
    message) for a file that is not a bank file."""
    p = Path(path).expanduser()
    if p.is_file() and not p.name.endswith(BANK_FILE_SUFFIX) and not zipfile.is_zipfile(p):
        raise HiMatchADError(f"{p} is not a HiMatch-AD bank file (one is made by 'himatchad bank export', and named *{BANK_FILE_SUFFIX})")
    bf = BankFile.open(p, verify=False)  # the worker verifies every member when it loads it
    man = bf.manifest
    model = man.get("model") if isinstance(man.get("model"), dict) else {}
    counts = man.get("counts") if isinstance(man.get("counts"), dict) else {}
    settings = man.get("settings") if isinstance(man.get("settings"), dict) else {}
    return {
        "path": str(bf.path),
        "model": model.get("id"),
        "weights_digest": model.get("weights_digest"),
        "licence": model.get("licence"),
        "method": man.get("method"),
        "slices": counts.get("slices"),
        "subjects": counts.get("subjects"),
        "volumes": counts.get("volumes"),
        "anonymised": man.get("names") != "kept",
        "precision": model.get("precision", settings.get("precision")),
        "resolution": settings.get("resolution"),
        "modality": man.get("modality", settings.get("modality")),
        "tool_version": man.get("tool_version"),
        "created": man.get("created"),
        "digest": bf.digest,
    }


def _input_array(image) -> np.ndarray:
    """The voxels in the node's own integer type where it has one (the preset choice may use it)."""
    dtype = np.dtype(image.pixel_type) if image.pixel_type in np.sctypeDict else np.dtype(np.float32)
    if dtype.kind in "iu" and np.isfinite(image.array).all():
        info = np.iinfo(dtype)
        return np.clip(np.rint(image.array), info.min, info.max).astype(dtype)
    return image.array.astype(np.float32, copy=False)


def _sent_geometry(geometry: Geometry) -> Geometry:
    """The grid a volume is written on for the worker: its own, except a 2D image's (written without
    its placement: a single oblique slice has no 2D direction matrix)."""
    return Geometry(geometry.size, geometry.spacing, (0.0, 0.0, 0.0), np.eye(3), True) if geometry.is_2d else geometry


def write_input(volume_node, folder) -> tuple:
    """Write the voxels of ``volume_node`` as the worker is sent them: ``(path, geometry)``, an
    uncompressed NRRD ``folder/<node name>.nrrd`` (the same voxels give the same bytes) and the
    node's exact grid. A 2D image is written without its placement (a single oblique slice has no
    2D direction matrix); a result is put back on ``geometry`` when it comes back."""
    image = image_from_volume_node(volume_node)
    geometry = image.geometry
    path = write_image(_input_array(image), _sent_geometry(geometry), Path(folder) / f"{safe_name(volume_node.GetName())}.nrrd", compress=False)
    return path, geometry


def write_region(mask, geometry: Geometry, folder, name: str = "region") -> Path:
    """Write ``mask`` (a ``(k, j, i)`` array on the voxel grid ``geometry`` of a volume written by
    :func:`write_input`) as a uint8 labelmap NRRD on exactly the grid the volume was written with."""
    mask = np.asarray(mask)
    if mask.shape != tuple(geometry.shape):
        raise HiMatchADError(f"the marked region is {mask.shape}, the volume's voxel grid is {tuple(geometry.shape)}")
    return write_image((mask > 0).astype(np.uint8), _sent_geometry(geometry), Path(folder) / f"{safe_name(name)}.nrrd", compress=False)


def feedback_keys(feedback_dir=None, use_feedback: bool = True) -> dict:
    """The reader-feedback keys of a detect or batch request: ``feedback_dir`` when given,
    ``"use_feedback": false`` when the feedback is not to be used (nothing otherwise)."""
    out: dict = {}
    if feedback_dir not in (None, ""):
        out["feedback_dir"] = str(Path(feedback_dir).expanduser())
    if not use_feedback:
        out["use_feedback"] = False
    return out


class ReproduceCheck:
    """``himatchad reproduce --json`` for one result, in a child process (see :meth:`DetectionRunner.check_reproduction`).

    :meth:`poll` never blocks: None while it runs, then the report ``{"reproducible": "yes" | "no"
    | "not confirmed", "items": [{"item", "status", "before", "now", "why", "decides"}, ...]}``, or
    ``{"error": MESSAGE}`` when the check itself failed. :meth:`cancel` kills it.
    """

    def __init__(self, proc, workdir: Path):
        self._proc = proc
        self.workdir = workdir
        self.report: Optional[dict] = None

    @classmethod
    def start(cls, python: str, env: dict, result, volume_node=None, workdir_root: Optional[str] = None) -> "ReproduceCheck":
        data = result.to_dict()
        if not isinstance(data.get("provenance"), dict) or not data["provenance"]:
            raise HiMatchADError("this result records no provenance (it was made before provenance was recorded); nothing to check")
        workdir = Path(tempfile.mkdtemp(prefix="himatchad-reproduce-", dir=workdir_root))
        try:
            scores = workdir / f"{safe_name(result.name)}_scores.json"
            scores.write_text(json.dumps(data, default=str), encoding="utf-8")
            cmd = [python, "-m", "HiMatchADLib", "reproduce", "--json", str(scores)]
            if volume_node is not None and node_in_scene(volume_node):
                path, _ = write_input(volume_node, workdir / "input")
                cmd += ["--input", str(path)]
            kwargs: dict = {}
            if os.name == "nt":
                kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
            else:
                kwargs["start_new_session"] = True
            with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, **kwargs)
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise HiMatchADError(f"cannot start the reproducibility check ({python}): {exc}") from exc
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(proc, workdir)

    @property
    def running(self) -> bool:
        return self.report is None and self._proc is not None and self._proc.poll() is None

    def poll(self) -> Optional[dict]:
        if self.report is not None or self.running:
            return self.report
        code = self._proc.returncode
        try:
            out = (self.workdir / "stdout").read_text(encoding="utf-8", errors="replace")
            err = (self.workdir / "stderr").read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            out, err = "", str(exc)
        report = None
        if code in (0, 1):
            with contextlib.suppress(ValueError):
                report = json.loads(out)
        if not isinstance(report, dict) or "reproducible" not in report:
            lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
            message = lines[-1] if lines else f"exit status {code}"
            report = {"error": message[len("error: "):] if message.startswith("error: ") else message}
        self.report = report
        self._cleanup()
        return report

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> dict:
        """Block until the check ends (scripts and tests); returns :meth:`poll`'s report."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise HiMatchADError(f"the reproducibility check took longer than {timeout} s and was stopped")
            time.sleep(interval)
        return self.report

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        if self.report is None:
            self.report = {"error": "cancelled"}
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


class DetectionRunner:
    """One detection (or batch) at a time in a worker process; see the module docstring.

    ``client``: a :class:`~HiMatchADLib.worker.client.WorkerClient` (one is made on first use).
    """

    def __init__(self, client: Optional[WorkerClient] = None, workdir_root: Optional[str] = None):
        self._client = client
        self.workdir_root = workdir_root
        self.job: Optional[DetectionJob] = None
        self._finished: list = []  # finished detections, for request_of

    @property
    def client(self) -> WorkerClient:
        if self._client is None:
            self._client = WorkerClient()
        return self._client

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.finished

    def _check_idle(self) -> None:
        if self.busy:
            raise HiMatchADError("a detection is already running; wait for it or cancel it")

    #: How many finished detections :meth:`request_of` remembers.
    REMEMBERED = 16

    def request_of(self, result) -> Optional[dict]:
        """The reference, settings and feedback keys of the detection that computed ``result``
        (``{"normals" | "bank": ..., "settings": {...}, "feedback_dir"?: ...}``), or None when it
        was not computed by this runner (e.g. loaded from a file)."""
        for job in reversed(self._finished):
            if job.result is result:
                return json.loads(json.dumps(job.request))
        return None

    # ------------------------------------------------------------------ starting
    def start_detection(self, volume_node, normals: Optional[str], settings: dict, bank: Optional[str] = None,
                        feedback_dir=None, use_feedback: bool = True) -> DetectionJob:
        """Write the volume to a temporary file and send it to the worker (main thread, returns at once).

        The reference is ``normals`` (a folder of normal scans) or ``bank`` (a bank file, with
        ``normals=None``): exactly one. ``settings`` go to the worker as they are (with a bank
        file, see :func:`bank_request_settings`). ``feedback_dir``: the reader feedback folder
        (default: beside the bank); ``use_feedback=False``: the feedback is not used."""
        self._check_idle()
        reference = check_reference(normals, bank)
        scene = self._check_volume(volume_node)
        extra = feedback_keys(feedback_dir, use_feedback)
        workdir = Path(tempfile.mkdtemp(prefix="himatchad-job-", dir=self.workdir_root))
        try:
            path, geometry = write_input(volume_node, workdir / "input")
            rid = self.client.send({
                "cmd": "detect", "input": str(path), **reference, "out_dir": str(workdir / "out"),
                "settings": dict(settings), "foreground": True, **extra,
            })
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.job = DetectionJob("detect", rid, workdir, dict(settings), reference.get("normals"), volume_node, scene, geometry,
                                bank=reference.get("bank"), request={**reference, "settings": dict(settings), **extra})
        return self.job

    @staticmethod
    def _check_volume(volume_node):
        problem = input_problem(volume_node)
        if problem:
            raise HiMatchADError(problem)
        scene = volume_node.GetScene()
        if scene is None:
            raise HiMatchADError(f"'{volume_node.GetName()}' is not in a scene")
        return scene

    def start_mark_normal(self, volume_node, normals: Optional[str], settings: dict, bank: Optional[str] = None,
                          region=None, slices=None, note: str = "", feedback_dir=None) -> DetectionJob:
        """Send a "mark as normal" of ``volume_node`` to the worker (main thread, returns at once):
        ``region`` (a ``(k, j, i)`` mask on the node's voxel grid) and/or ``slices`` (indices along
        the detector's slice axis) are normal. The volume is written as :meth:`start_detection`
        writes it and the region as a labelmap on that same grid (:func:`write_region`); reference
        and settings are those of a detection (:meth:`request_of`). The job's ``done`` payload is the
        worker's event: ``entry`` (the entry's record) and ``feedback_folder``."""
        self._check_idle()
        reference = check_reference(normals, bank)
        scene = self._check_volume(volume_node)
        if region is None and slices is None:
            raise HiMatchADError("say what is normal: a region of the volume or slices of it")
        if region is not None and not np.any(region):
            raise HiMatchADError("the marked region is empty: nothing to mark as normal")
        if slices is not None:
            slices = sorted({int(i) for i in slices})
            if not slices:
                raise HiMatchADError("no slice to mark as normal")
        extra = feedback_keys(feedback_dir)
        workdir = Path(tempfile.mkdtemp(prefix="himatchad-job-", dir=self.workdir_root))
        try:
            path, geometry = write_input(volume_node, workdir / "input")
            request = {"cmd": "mark_normal", "input": str(path), **reference, "settings": dict(settings), "note": str(note or ""), **extra}
            if region is not None:
                request["region"] = str(write_region(region, geometry, workdir / "region", f"{volume_node.GetName()}_normal_region"))
            if slices is not None:
                request["slices"] = slices
            rid = self.client.send(request)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.job = DetectionJob("mark_normal", rid, workdir, dict(settings), reference.get("normals"), volume_node, scene, geometry,
                                bank=reference.get("bank"), request={**reference, "settings": dict(settings), **extra})
        return self.job

    def start_batch(self, input_dir: str, normals: Optional[str], out_dir: str, settings: dict, overwrite: bool = False,
                    engine: str = "local", engine_options: Optional[dict] = None, batch_options: Optional[dict] = None,
                    bank: Optional[str] = None) -> DetectionJob:
        """Run the library's batch runner on a folder in the worker (returns at once); ``engine="ray"``
        spreads the cases over a Ray cluster (``engine_options``: address, workers, gpus_per_worker...);
        ``batch_options`` go into the request as they are (``series_filter``, ``dicom_seg``, ``dicom_heatmap``).
        ``bank``: a bank file instead of the folder ``normals`` (then None), as :meth:`start_detection`."""
        self._check_idle()
        reference = check_reference(normals, bank)
        rid = self.client.send({
            **dict(batch_options or {}),
            "cmd": "batch", "input_dir": str(input_dir), **reference, "out_dir": str(out_dir),
            "settings": dict(settings), "overwrite": bool(overwrite), "engine": engine, "engine_options": dict(engine_options or {}),
        })
        self.job = DetectionJob("batch", rid, None, dict(settings), reference.get("normals"), bank=reference.get("bank"),
                                request={**reference, "settings": dict(settings)})
        return self.job

    def check_reproduction(self, result, volume_node=None) -> "ReproduceCheck":
        """Start ``himatchad reproduce --json`` for ``result`` (a :class:`DetectionResult` with its
        provenance) in a child process, with the worker's interpreter and environment; returns at
        once (follow it with :meth:`ReproduceCheck.poll`). ``volume_node``: the node it was computed
        on, written again as the input file the worker was sent (its content is compared)."""
        return ReproduceCheck.start(self.client.python, self.client.environment(), result, volume_node, workdir_root=self.workdir_root)

    # ------------------------------------------------------------------ following
    def poll(self) -> list:
        """What happened since the last call (never blocks): a list of ``(kind, job, payload)``.

        - ``("progress", job, (message, done, total))``
        - ``("done", job, DetectionResult)`` for a detection (safe to import into ``job.scene``), or
          ``("done", job, event)`` for a batch (``event["summary"]`` is the CSV) or a mark as normal
          (``event["entry"]``, ``event["feedback_folder"]``);
        - ``("dropped", job, reason)``: finished, but the volume left the scene or changed its grid;
        - ``("error", job, message)``: the worker reported an error or died; ``job.event`` is the
          whole error event and ``job.error`` the exception it stands for
          (:func:`~HiMatchADLib.worker.client.error_from_event`: a
          :class:`~HiMatchADLib.core.errors.ModelAccessError` with its fields when the event has
          ``model_access``, else :class:`HiMatchADError`).
        """
        out = []
        job = self.job
        for event in self.client.poll():
            if job is None or job.finished or str(event.get("id")) != job.request_id:
                continue  # events of a request that was cancelled or discarded
            kind = event.get("event")
            if kind == "progress":
                job.progress = (str(event.get("message", "")), int(event.get("done", 0)), int(event.get("total", 0)))
                out.append(("progress", job, job.progress))
            elif kind == "done":
                job.event, job.seconds, job.reused = event, float(event.get("seconds", 0.0)), event.get("reused")
                if job.kind in ("batch", "mark_normal"):
                    job.state = DONE
                    self._remove_workdir(job)
                    out.append(("done", job, event))
                    continue
                try:
                    result = self._collect(job, event)
                except HiMatchADError as exc:
                    job.state, job.message = DISCARDED, str(exc)
                    out.append(("dropped", job, str(exc)))
                else:
                    job.state, job.result = DONE, result
                    self._finished = (self._finished + [job])[-self.REMEMBERED:]
                    out.append(("done", job, result))
                finally:
                    self._remove_workdir(job)
            elif kind == "error":
                job.state, job.message = FAILED, str(event.get("message", "the detection failed"))
                job.event, job.error = event, error_from_event(dict(event, message=job.message))
                self._remove_workdir(job)
                out.append(("error", job, job.message))
        return out

    def _collect(self, job: DetectionJob, event: dict):
        if not node_in_scene(job.volume_node, job.scene):
            raise HiMatchADError("the input volume was removed, or its scene closed, while the detection ran; the result was discarded")
        result = load_result(event["scores"])
        got, sent = result.geometry, job.geometry
        axes = slice(0, 2) if sent.is_2d else slice(0, 3)  # a 2D file has no slice thickness
        if got.size != sent.size or not np.allclose(got.spacing[axes], sent.spacing[axes], rtol=1e-5, atol=1e-6):
            raise HiMatchADError("the worker's result is not on the grid of the volume it was given; run the detection again")
        result.geometry = sent  # exact placement, 2D slices included
        check_result_matches(result, job.volume_node)  # the node's grid may have changed meanwhile
        return result

    # ------------------------------------------------------------------ stopping
    def cancel(self) -> bool:
        """Stop the running job at once by killing the worker; True if one was running.

        The scene is not changed, and no event of that job is reported afterwards.
        """
        job = self.job
        if job is None or job.finished:
            return False
        self.client.cancel()
        job.state, job.message = CANCELLED, "cancelled"
        self._remove_workdir(job)
        return True

    def discard(self) -> None:
        """Forget the job (the scene it belongs to is closing): a running one is cancelled."""
        if self.cancel():
            self.job.state = DISCARDED
        self.job = None

    def shutdown(self) -> None:
        """Cancel any job and end the worker (module reload, application exit)."""
        self.cancel()
        if self._client is not None:
            self._client.shutdown(timeout=2.0)

    def _remove_workdir(self, job: DetectionJob) -> None:
        if job.workdir is not None:
            shutil.rmtree(job.workdir, ignore_errors=True)
            job.workdir = None

    # ------------------------------------------------------------------ blocking use
    def wait(self, progress: Optional[Callable[[str, int, int], None]] = None, timeout: Optional[float] = None,
             interval: float = 0.05, cancel_event=None, idle: Optional[Callable[[], None]] = None):
        """Block until the current job ends; returns its result (or batch event).

        ``progress(message, done, total)``; ``cancel_event.is_set()`` cancels; ``idle()`` is called
        between polls (e.g. ``slicer.app.processEvents``). Raises the job's error on errors
        (``job.error``: a :class:`~HiMatchADLib.core.errors.ModelAccessError` when the model could not
        be loaded), :class:`HiMatchADError` on dropped results, :class:`Cancelled` when cancelled.
        """
        job = self.job
        if job is None:
            raise HiMatchADError("nothing is running")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for kind, _job, payload in self.poll():
                if kind == "progress" and progress is not None:
                    progress(*payload)
                elif kind == "done":
                    return payload
                elif kind == "error":
                    raise _job.error or HiMatchADError(payload)
                elif kind == "dropped":
                    raise HiMatchADError(payload)
            if cancel_event is not None and cancel_event.is_set():
                self.cancel()
                raise Cancelled()
            if job.finished:  # cancelled from elsewhere
                raise Cancelled() if job.state == CANCELLED else HiMatchADError(job.message or job.state)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise HiMatchADError(f"the detection took longer than {timeout} s and was cancelled")
            if idle is not None:
                with contextlib.suppress(Exception):
                    idle()
            time.sleep(interval)
