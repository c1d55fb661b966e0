"""Client of the detection worker process (:mod:`HiMatchADLib.worker`): start, send, poll, cancel.

Free of Qt and of Slicer, so it is tested with plain pytest. Inside 3D Slicer the module calls
:meth:`WorkerClient.poll` from a ``QTimer`` on the main thread: it never blocks, because Slicer's
main thread holds Python's GIL while the Qt event loop idles, so the computation must not run in a
Python thread of the application; it runs in the worker's own process.

- stdout of the worker carries the JSON events. On POSIX the pipe is read without blocking from
  :meth:`poll` (no thread at all); on Windows a reader thread only moves lines into a queue.
- stderr of the worker goes to a log file; :meth:`poll` forwards its new lines to ``log`` and keeps
  the last ones, which are quoted when the worker dies.
- :meth:`cancel` kills the worker's whole process tree at once, whatever it is doing (a model
  download included); the next :meth:`send` starts a new worker.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Optional

from ..core.errors import HiMatchADError, ModelAccessError

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


TERMINAL_EVENTS = ("done", "error")


_LIVE: "weakref.WeakSet[WorkerClient]" = weakref.WeakSet()


class WorkerError(HiMatchADError):
    """The worker could not be started or stopped answering."""


class WorkerClient:
    """Starts ``python -m HiMatchADLib worker`` and exchanges JSON lines with it.

    Parameters:
        python: interpreter that runs the worker (default: this one; in Slicer: ``PythonSlicer``).
        env: variables added to the worker's environment.
        base_env: the environment to start from (default ``os.environ``; in Slicer the startup
            environment, as ``slicer.util.launchConsoleProcess`` uses).
        log: called with each line the worker writes to stderr (default: the ``HiMatchAD.worker`` logger).
        parent_pid: the process whose end ends the worker (``--parent-pid``); in Slicer
            ``os.getpid()`` of the application, so a crashed Slicer leaves no worker behind on any
            operating system. None (default): the worker watches its parent process (POSIX only).
    """

    def __init__(
        self,
        python: Optional[str] = None,
        env: Optional[dict] = None,
        base_env: Optional[dict] = None,
        log: Optional[Callable[[str], None]] = None,
        parent_pid: Optional[int] = None,
    ):
        self.python = python or sys.executable
        self.parent_pid = None if parent_pid is None else int(parent_pid)
        self.env = dict(env or {})
        self.base_env = base_env
        self.log = log or logging.getLogger("HiMatchAD.worker").info
        self.ready: Optional[dict] = None
        self._proc: Optional[subprocess.Popen] = None
        self._pending: dict = {}
        self._counter = 0
        self._buffer = b""
        self._eof = False
        self._lines: Optional[queue.Queue] = None
        self._stderr_path: Optional[Path] = None
        self._stderr_pos = 0
        self._stderr_rest = b""
        self.stderr_tail: collections.deque = collections.deque(maxlen=30)
        _LIVE.add(self)

    # ------------------------------------------------------------------ process
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def pending(self) -> list:
        """Ids of the requests sent and not yet answered with ``done`` or ``error``."""
        return list(self._pending)

    def command(self) -> list:
        cmd = [self.python, "-m", "HiMatchADLib", "worker"]
        if self.parent_pid is not None:
            cmd += ["--parent-pid", str(self.parent_pid)]
        return cmd

    def environment(self) -> dict:
        env = dict(os.environ if self.base_env is None else self.base_env)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = PACKAGE_PARENT + (os.pathsep + path if path else "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update({k: str(v) for k, v in self.env.items()})
        return env

    def start(self) -> None:
        """Start the worker unless it is running."""
        if self.running:
            return
        self._discard_process()
        fd, name = tempfile.mkstemp(prefix="himatchad-worker-", suffix=".log")
        self._stderr_path, self._stderr_pos, self._stderr_rest = Path(name), 0, b""
        self.stderr_tail.clear()
        kwargs: dict = {}
        if os.name == "nt":
            flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
            kwargs["creationflags"] = flags
        else:
            kwargs["start_new_session"] = True  # its own process group: cancel kills the whole tree
        try:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fd,
                env=self.environment(), bufsize=0, **kwargs,
            )
        except OSError as exc:
            raise WorkerError(f"cannot start the worker process ({self.python}): {exc}") from exc
        finally:
            os.close(fd)
        self._buffer, self._eof, self.ready = b"", False, None
        if os.name == "posix":
            os.set_blocking(self._proc.stdout.fileno(), False)
            self._lines = None
        else:
            self._lines = queue.Queue()
            threading.Thread(target=self._reader, args=(self._proc.stdout, self._lines), daemon=True, name="HiMatchAD worker reader").start()

    @staticmethod
    def _reader(stream, lines: queue.Queue) -> None:
        for line in iter(stream.readline, b""):
            lines.put(line)
        lines.put(None)

    # ------------------------------------------------------------------ requests
    def send(self, request: dict) -> str:
        """Send a request (starting the worker if needed); returns its id (one is given if missing)."""
        self.start()
        request = dict(request)
        if request.get("id") in (None, ""):
            self._counter += 1
            request["id"] = f"r{os.getpid()}-{self._counter}"
        rid = str(request["id"])
        request["id"] = rid
        self._pending[rid] = request.get("cmd")
        try:
            self._proc.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            self._proc.stdin.flush()
        except OSError:
            pass  # the worker is gone: the next poll reports it for this request
        return rid

    def poll(self) -> list:
        """Events that arrived since the last call (never blocks).

        When the worker has died, each unanswered request gets an ``error`` event with
        ``"crashed": true`` and a message that quotes the end of the worker's log.
        """
        events = []
        if self._proc is None:
            return events
        for line in self._read_lines():
            try:
                event = json.loads(line)
            except ValueError:
                self.log(f"unexpected worker output: {line[:200]!r}")
                continue
            if not isinstance(event, dict):
                continue
            if event.get("event") == "ready":
                self.ready = event
            if event.get("event") in TERMINAL_EVENTS:
                self._pending.pop(str(event.get("id")), None)
            events.append(event)
        self._read_stderr()
        if self._eof and self._proc.poll() is not None:
            code = self._proc.returncode
            if self._pending:
                tail = "\n".join(list(self.stderr_tail)[-8:])
                message = f"the worker process ended unexpectedly (exit status {code}; log {self._stderr_path})" + (
                    f"; its last messages:\n{tail}" if tail else ""
                )
                for rid in list(self._pending):
                    events.append({"id": rid, "event": "error", "message": message, "crashed": True, "returncode": code})
                self._pending.clear()
            self._discard_process(keep_log=code != 0)
        return events

    def wait(self, request_id: str, timeout: Optional[float] = None, on_event: Optional[Callable[[dict], None]] = None, interval: float = 0.05) -> dict:
        """Block until the request ends; returns its ``done`` or ``error`` event.

        Every event polled meanwhile goes to ``on_event``. For scripts and tests: a user interface
        polls instead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
                if str(event.get("id")) == str(request_id) and event.get("event") in TERMINAL_EVENTS:
                    return event
            if str(request_id) not in self._pending:
                raise WorkerError(f"request {request_id} is unknown or already answered")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no answer to request {request_id} within {timeout} s")
            time.sleep(interval)

    def request(self, request: dict, timeout: Optional[float] = None, on_event=None) -> dict:
        """Send and wait (blocking); raises :class:`HiMatchADError` with the worker's message on error
        (:class:`~HiMatchADLib.core.errors.ModelAccessError` when the event has ``model_access``)."""
        event = self.wait(self.send(request), timeout=timeout, on_event=on_event)
        if event.get("event") == "error":
            raise error_from_event(event)
        return event

    # ------------------------------------------------------------------ stopping
    def cancel(self) -> list:
        """Kill the worker and everything it started, at once. Returns the ids that were pending.

        Nothing is reported for them afterwards; the next :meth:`send` starts a new worker.
        """
        ids = list(self._pending)
        self._pending.clear()
        if self._proc is not None:
            _kill_tree(self._proc)
        self._discard_process()
        return ids

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit (kills it if it has not within ``timeout`` seconds)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.stdin.write(b'{"cmd": "shutdown"}\n')
                proc.stdin.flush()
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
        self._pending.clear()
        self._discard_process()

    # ------------------------------------------------------------------ internals
    def _read_lines(self) -> list:
        chunks = []
        if self._lines is not None:  # Windows: lines from the reader thread
            while True:
                try:
                    item = self._lines.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._eof = True
                    break
                chunks.append(item)
        else:
            fd = self._proc.stdout.fileno()
            while True:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self._eof = True
                    break
                chunks.append(data)
        self._buffer += b"".join(chunks)
        *lines, self._buffer = self._buffer.split(b"\n")
        if self._eof and self._buffer:
            lines.append(self._buffer)
            self._buffer = b""
        return [ln.decode("utf-8", "replace").strip() for ln in lines if ln.strip()]

    def _read_stderr(self) -> None:
        if self._stderr_path is None:
            return
        try:
            with open(self._stderr_path, "rb") as f:
                f.seek(self._stderr_pos)
                data = f.read()
        except OSError:
            return
        if not data:
            return
        self._stderr_pos += len(data)
        *lines, self._stderr_rest = (self._stderr_rest + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                self.log(line)

    def _discard_process(self, keep_log: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._read_stderr()
        if self._stderr_path is not None and not keep_log:
            with contextlib.suppress(OSError):
                self._stderr_path.unlink()
        if not keep_log:
            self._stderr_path = None

    @property
    def log_path(self) -> Optional[Path]:
        """The worker's log file (kept after a crash, removed after a normal end)."""
        return self._stderr_path


def error_from_event(event: dict) -> HiMatchADError:
    """The exception an ``error`` event stands for: :class:`WorkerError` when the worker crashed,
    :class:`~HiMatchADLib.core.errors.ModelAccessError` (its fields restored) when the event has
    ``model_access``, else :class:`HiMatchADError` with the worker's message."""
    if event.get("crashed"):
        return WorkerError(event.get("message", "the worker failed"))
    access = event.get("model_access")
    if isinstance(access, dict):
        return ModelAccessError.from_dict(access)
    return HiMatchADError(event.get("message", "the worker failed"))


def _kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0), check=False,
            )
    except OSError:
        pass
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@atexit.register
def _stop_all() -> None:  # no worker outlives the process that started it
    for client in list(_LIVE):
        with contextlib.suppress(Exception):
            client.cancel()
