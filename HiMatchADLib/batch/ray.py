"""Batch detection on a Ray cluster: ``himatchad batch --engine ray`` and ``run_batch(..., engine="ray")``.

The driver (the process that calls :func:`run_batch_ray`) finds the cases, checks which were done
earlier, and owns ``summary.csv``: it rewrites it after every finished case, with the rows in case
order. Each Ray actor (a worker process) loads the model and the normal bank once, then processes
one case at a time with :func:`HiMatchADLib.batch.run_case`, which writes the case's outputs exactly
as ``himatchad detect`` does (maps first, the scores JSON last, each file atomically). The outputs
and ``summary.csv`` are the same as with the local engine, except the ``seconds`` column.

The normal bank is built (or loaded) once, by the driver, in the bank cache folder (``cache_dir``);
the workers load it from there. On a cluster of several machines, the bank cache folder, the normals
folder, the model folder (for a local model), the input folder and the output folder must be on a
file system shared by all of them, at the same paths; a worker that cannot see the bank refuses to
start with a message that says so. Each worker checks that it imports the same ``HiMatchADLib`` as
the driver (the engine ships the driver's copy to the cluster when it connects) and that its detector
has the same result-changing settings.

Faults: a case that fails (unreadable input...) is recorded as "failed" with its message and the
batch goes on. A DICOM series that cannot be analysed is a "skipped" row, decided by the driver (no
worker sees it), as with the local engine. When a worker process dies (killed, out of memory), a fresh worker replaces it and the
case it was processing is retried once; if the worker dies again the case is recorded as failed with
the reason. ``KeyboardInterrupt`` (Ctrl-C) or :class:`Cancelled` in the driver kills the workers
before it propagates; a case interrupted while being written has no scores JSON, so it never looks
complete and the next run redoes it.

Ray is an optional dependency: ``pip install "himatchad[ray]"``.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..bank.build import scan_normals
from ..bank.store import NormalBank
from ..core.digest import json_hash
from ..core.errors import HiMatchADError
from ..core.version import __version__
from ..detector.detector import HiMatchDetector
from ..outputs.registry import check_outputs
from .cases import Case, PathLike
from .resume import result_settings, settings_changes
from .run_case import earlier_row, run_case
from .runner import prepare_batch
from .summary import (
    STATUS_FAILED,
    SUMMARY_NAME,
    batch_warning,
    summary_row,
    write_summary,
)

#: Object store of a local cluster started by the engine: only case descriptions and summary rows
#: travel through it.
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024


#: Worker starts in a row that may die before the engine gives up.
MAX_FAILED_STARTS = 3


INSTALL_HINT = 'the Ray engine needs Ray: pip install "himatchad[ray]" (or pip install "ray>=2.9")'


_CONSTRUCTOR_ONLY = ("progress", "cancel_event")


def import_ray():
    """The ``ray`` module, or :class:`HiMatchADError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise HiMatchADError(INSTALL_HINT) from None
    return ray


def library_fingerprint() -> str:
    """Version and hash of the ``HiMatchADLib`` sources this process imports."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


def detector_spec(detector) -> dict:
    """What a worker needs to rebuild ``detector`` (fitted) exactly: constructor arguments, the
    normals folder, the bank's folder and content fingerprint, and the result-changing settings."""
    if getattr(detector, "bank", None) is None or getattr(detector, "normals_dir", None) is None:
        raise HiMatchADError("the detector has no normal bank yet: call fit(normals_dir) first")
    params = inspect.signature(type(detector).__init__).parameters
    kwargs = {n: getattr(detector, n) for n in params if n != "self" and n not in _CONSTRUCTOR_ONLY and hasattr(detector, n)}
    bank_root = Path(detector.bank.root).resolve()
    kwargs["cache_dir"] = str(bank_root.parents[1])  # <cache>/banks/<key>: absolute, the driver's
    return {
        "kwargs": kwargs,
        "normals": str(detector.normals_dir),
        "bank": str(bank_root),
        "content": detector.bank.manifest["content"],
        "settings": result_settings(detector),
        "feedback_dir": str(detector.feedback_folder) if getattr(detector, "feedback_folder", None) is not None else None,
        "use_feedback": bool(getattr(detector, "use_feedback", True)),
        "library": library_fingerprint(),
        "cwd": os.getcwd(),
    }


class CaseWorker:
    """One worker: a detector rebuilt from :func:`detector_spec`, then one case after the other.

    Plain Python (the engine runs it as a Ray actor), so it can be used and tested without Ray.
    """

    def __init__(self):
        self.detector = None
        self.current: Optional[dict] = None

    def setup(self, spec: dict) -> dict:
        """Load the model and the driver's bank; raise :class:`HiMatchADError` when this worker
        cannot reproduce the driver's detector. Returns where it runs."""

        host = socket.gethostname()
        here = library_fingerprint()
        if here != spec["library"]:
            raise HiMatchADError(
                f"the worker on {host} imports HiMatchADLib {here} from {Path(__file__).resolve().parent}, "
                f"the driver {spec['library']}; install the same version on every node"
            )
        if spec.get("threads"):
            import torch

            torch.set_num_threads(int(spec["threads"]))  # the CPUs this worker was given
        if os.path.isdir(spec["cwd"]):
            os.chdir(spec["cwd"])  # relative paths of the driver mean the same here
        bank_root = Path(spec["bank"])
        shared = "on a cluster of several machines it must be on a file system shared by all of them, at the same path (--cache-dir)"
        try:
            bank = NormalBank.load(bank_root)
        except (OSError, ValueError, KeyError) as exc:
            raise HiMatchADError(f"the worker on {host} cannot read the normal bank at {bank_root} ({exc}); {shared}") from None
        if bank.manifest.get("content") != spec["content"]:
            raise HiMatchADError(f"the normal bank at {bank_root} changed after the batch started; run the batch again")
        try:
            _, _, fingerprints = scan_normals(spec["normals"])
        except HiMatchADError as exc:
            raise HiMatchADError(f"the worker on {host}: {exc}; on a cluster the normals folder must be shared too") from None
        if json_hash(fingerprints) != spec["content"]:
            raise HiMatchADError(
                f"the normal scans in {spec['normals']} seen by the worker on {host} differ from those of the bank "
                "(changed after the batch started, or another copy); run the batch again"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver reported the bank's warnings already
            det = HiMatchDetector(**spec["kwargs"]).fit(spec["normals"])
        if spec.get("feedback_dir"):  # the driver's reader feedback (the same entries: compared below)
            det.feedback_dir = Path(spec["feedback_dir"])
        det.use_feedback = spec.get("use_feedback", True)
        if Path(det.bank.root).resolve() != bank_root or det.bank.manifest["content"] != spec["content"]:
            raise HiMatchADError(f"the worker on {host} loaded another normal bank ({det.bank.root}) than the driver ({bank_root})")
        changes = settings_changes(spec["settings"], {"settings": result_settings(det)})
        if changes:
            raise HiMatchADError(f"the worker's detector differs from the driver's: {', '.join(changes)}")
        self.detector = det
        self.current = spec["settings"]
        return {"host": host, "pid": os.getpid(), "device": det.extractor.device}

    def process(self, case: Case, out_root: str, overwrite: bool, outputs: tuple = ()) -> tuple:
        """Run one case; returns ``(row, messages, seconds)``. ``outputs``: the optional outputs asked
        for (names of :mod:`HiMatchADLib.outputs.registry`)."""
        if self.detector is None:
            raise HiMatchADError("the worker was not set up")
        messages: list = []
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row = run_case(self.detector, case, out_root, self.current, overwrite=overwrite, log=messages.append, outputs=outputs)
        package = Path(__file__).resolve().parent
        messages += [str(w.message) for w in caught if Path(w.filename).resolve().parent == package]  # ours, as the local run shows them
        return row, messages, round(time.perf_counter() - start, 3)


# ------------------------------------------------------------------------------- the cluster
def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


def connect(ray, address: Optional[str], num_cpus: float, runtime_env: Optional[dict] = None) -> bool:
    """Connect to the cluster at ``address`` ("auto", "ray://host:10001", "host:6379") or, when it
    is None, start a local one with ``num_cpus`` CPUs. Returns True when this call connected (the
    caller then disconnects), False when Ray was already initialised in this process.

    The driver's ``HiMatchADLib`` is shipped to the workers (``py_modules``), so they import the same
    code; ``runtime_env`` is merged into the job's runtime environment.
    """
    if ray.is_initialized():
        return False
    env = dict(runtime_env or {})
    env["py_modules"] = [*env.get("py_modules", []), _package_dir()]
    kwargs = dict(runtime_env=env, log_to_driver=False, logging_level="ERROR")
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs.update(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise HiMatchADError(f"cannot connect to {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return True


def _death_errors(ray) -> tuple:
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "ObjectLostError", "NodeDiedError") if hasattr(ex, n))


def _reason(ray, exc: BaseException) -> str:
    """One line on why a worker died, from Ray's error."""
    text = " ".join(str(exc).split())
    if isinstance(exc, getattr(ray.exceptions, "OutOfMemoryError", ())) or "low on memory" in text:
        return "the worker was killed for lack of memory"
    if "killed by `ray.kill`" in text:
        return "the worker was killed"
    if "Worker exit detail:" in text:
        detail = text.split("Worker exit detail:", 1)[1].split("Some common causes", 1)[0].strip().rstrip(".")
        return f"the worker process died ({detail[:200]}; killed by the system, e.g. out of memory, or crashed)"
    if isinstance(exc, getattr(ray.exceptions, "NodeDiedError", ())) or "node" in text.lower() and "died" in text.lower():
        return f"the worker's node died ({text[:200]})"
    return f"the worker process died ({text[:200]})"


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


class _Pool:
    """The workers (Ray actors): each is starting, idle or busy with one case."""

    def __init__(self, ray, spec: dict, workers: int, cpus: float, gpus: float, actor_env: Optional[dict]):
        self.ray = ray
        self.spec = spec
        options = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)
        if actor_env:
            options["runtime_env"] = actor_env
        self.actor_class = ray.remote(CaseWorker).options(**options)
        self.slots = list(range(workers))
        self.actors: dict = {}
        self.starting: dict = {}  # setup ref -> slot
        self.idle: deque = deque()
        self.info: dict = {}
        self.failed_starts = 0
        self.last_death = ""

    def start(self, slot: int) -> None:
        actor = self.actor_class.remote()
        self.actors[slot] = actor
        self.starting[actor.setup.remote(self.spec)] = slot

    def start_all(self) -> None:
        for s in self.slots:
            self.start(s)

    def replace(self, slot: int) -> None:
        self.kill(slot)
        self.start(slot)

    def kill(self, slot: int) -> None:
        actor = self.actors.pop(slot, None)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass

    def started(self, ref) -> None:
        """A setup finished: the slot is idle, or the error says why workers cannot start."""
        slot = self.starting.pop(ref)
        try:
            self.info[slot] = self.ray.get(ref)
        except _death_errors(self.ray) as exc:
            self.failed_starts += 1
            self.last_death = _reason(self.ray, exc)
            if self.failed_starts >= MAX_FAILED_STARTS:
                raise HiMatchADError(f"Ray workers keep dying while they start ({self.last_death}); check the memory of the nodes") from None
            self.replace(slot)
            return
        except self.ray.exceptions.RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, HiMatchADError):
                raise HiMatchADError(str(cause)) from None
            raise HiMatchADError(f"a Ray worker could not start: {type(cause).__name__}: {cause}") from None
        self.failed_starts = 0
        self.idle.append(slot)

    def shutdown(self) -> None:
        for slot in list(self.actors):
            self.kill(slot)
        self.idle.clear()


def run_batch_ray(
    detector,
    input_dir: PathLike,
    out_dir: PathLike,
    *,
    address: Optional[str] = None,
    workers: int = 2,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    overwrite: bool = False,
    exclude: Iterable[PathLike] = (),
    progress: Optional[Callable[[str, int, int], None]] = None,
    log: Optional[Callable[[str], None]] = None,
    runtime_env: Optional[dict] = None,
    start_timeout: float = 600.0,
    series_filter=(),
    outputs: tuple = (),
) -> list:
    """:func:`HiMatchADLib.batch.run_batch` on Ray actors: same arguments, outputs and rows.

    ``detector`` is fitted (its bank built or loaded) in this process, the driver. ``address``: a
    running cluster ("auto", "ray://head:10001", "head:6379"), or None to start a local cluster for
    this batch (``workers * cpus_per_worker`` CPUs; it is shut down at the end). When Ray is already
    initialised in this process, that connection is used as it is and left open (the workers must
    then be able to import ``HiMatchADLib``). ``workers`` actors are started, each with
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs (a fraction shares a GPU);
    ``runtime_env`` is added to the job's Ray runtime environment (e.g. ``{"env_vars": {...}}``).
    Processing starts as soon as one worker is ready; when none is ready after ``start_timeout``
    seconds (the cluster lacks the CPUs/GPUs asked for), :class:`HiMatchADError` is raised.

    Cases that were done earlier are recognised here without starting Ray. See the module notes
    for the shared file system, dying workers and interruption.
    """
    say = log or batch_warning
    if int(workers) < 1:
        raise HiMatchADError(f"workers must be at least 1, not {workers}")
    if float(gpus_per_worker) < 0 or float(cpus_per_worker) <= 0:
        raise HiMatchADError("gpus_per_worker must be 0 or more and cpus_per_worker more than 0")
    if getattr(detector, "device", None) == "cuda" and float(gpus_per_worker) == 0:
        raise HiMatchADError("device 'cuda' with the Ray engine needs GPUs for the workers: set gpus_per_worker (--gpus-per-worker)")
    ray = import_ray()
    outputs = check_outputs(outputs)
    out_root, cases, current = prepare_batch(detector, input_dir, out_dir, exclude, log=say, series_filter=series_filter, outputs=outputs)
    spec = detector_spec(detector)
    reporter = getattr(detector, "reporter", None)
    summary = out_root / SUMMARY_NAME
    total = len(cases)
    rows: list = [None] * total
    todo: deque = deque()
    for i, case in enumerate(cases):
        start = time.perf_counter()
        row, _ = earlier_row(case, out_root, current, overwrite=overwrite, outputs=outputs)
        if row is None:
            todo.append((i, 0))
        else:
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows[i] = row
    done = total - len(todo)

    def flush() -> None:
        write_summary(summary, [r for r in rows if r is not None])

    if done:
        flush()
    if not todo:
        if progress is not None:
            progress(f"{total} cases finished", total, total)
        return rows

    owner = False
    pool = None
    busy: dict = {}  # case ref -> (slot, index, attempt, time sent)
    try:
        owner = connect(ray, address, float(workers) * float(cpus_per_worker), runtime_env)
        actor_env = None
        if not owner:  # the caller's connection: make this library importable where it is on this machine
            path = os.pathsep.join(p for p in (str(Path(_package_dir()).parent), os.environ.get("PYTHONPATH", "")) if p)
            actor_env = {"env_vars": {"PYTHONPATH": path}}
        spec["threads"] = max(1, int(cpus_per_worker))
        pool = _Pool(ray, spec, int(workers), float(cpus_per_worker), float(gpus_per_worker), actor_env)
        _check_resources(ray, int(workers), float(cpus_per_worker), float(gpus_per_worker))
        pool.start_all()
        begun = time.monotonic()
        while todo or busy:
            if reporter is not None and hasattr(reporter, "check"):
                reporter.check()
            if busy or pool.idle:
                begun = time.monotonic()  # the start timeout counts while no worker is ready
            while todo and pool.idle:
                i, attempt = todo.popleft()
                slot = pool.idle.popleft()
                if progress is not None:
                    progress(f"Case {i + 1}/{total}: {cases[i].case}", done, total)
                ref = pool.actors[slot].process.remote(cases[i], str(out_root), overwrite, outputs)
                busy[ref] = (slot, i, attempt, time.perf_counter())
            waiting = [*busy, *pool.starting]
            if not waiting:  # every worker gone and none starting: cannot happen, but never spin
                raise HiMatchADError("no Ray worker is left to process the remaining cases")
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            if not ready:
                if time.monotonic() - begun > start_timeout:
                    raise HiMatchADError(
                        f"no Ray worker started within {start_timeout:.0f} s; the cluster may lack the "
                        f"{cpus_per_worker:g} CPUs and {gpus_per_worker:g} GPUs each worker asks for"
                    )
                continue
            ref = ready[0]
            if ref in pool.starting:
                pool.started(ref)
                continue
            slot, i, attempt, sent = busy.pop(ref)
            try:
                row, messages, seconds = ray.get(ref)
            except _death_errors(ray) as exc:
                reason = _reason(ray, exc)
                pool.replace(slot)
                if attempt == 0:
                    say(f"{cases[i].case}: {reason} while processing this case; retrying it on another worker")
                    todo.appendleft((i, 1))
                    continue
                message = f"the worker died twice while processing this case; the second time: {reason}"
                say(f"{cases[i].case}: {message}")
                row, seconds = summary_row(cases[i], out_root, STATUS_FAILED, None, message), round(time.perf_counter() - sent, 3)
            else:
                for m in messages:
                    say(m)
                pool.idle.append(slot)
            row["seconds"] = seconds
            rows[i] = row
            done += 1
            flush()
        if progress is not None:
            progress(f"{total} cases finished", total, total)
    except BaseException:
        if pool is not None:
            _stop(ray, pool, busy)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if owner:
            ray.shutdown()
    return rows


def _check_resources(ray, workers: int, cpus: float, gpus: float) -> None:
    """Refuse what the cluster can never give one worker (more GPUs or CPUs than it has)."""
    have = ray.cluster_resources()
    if gpus > have.get("GPU", 0.0):
        raise HiMatchADError(f"each worker asks for {gpus:g} GPUs but the Ray cluster has {have.get('GPU', 0.0):g}; lower --gpus-per-worker")
    if cpus > have.get("CPU", 0.0):
        raise HiMatchADError(f"each worker asks for {cpus:g} CPUs but the Ray cluster has {have.get('CPU', 0.0):g}")


def _stop(ray, pool: _Pool, busy: dict) -> None:
    """Kill the workers and wait (briefly) until their cases have ended, so nothing is written after."""
    pool.shutdown()
    refs = list(busy)
    if refs:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=30)
        except Exception:
            pass
