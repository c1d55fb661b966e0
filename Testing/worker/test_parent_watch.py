"""The worker ends when the application that started it ends (``--parent-pid``), on every
operating system: real processes on this one, the Windows calls mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from HiMatchADLib.worker import server
from HiMatchADLib.worker.client import WorkerClient

REPO = Path(__file__).resolve().parents[2]


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _worker(parent_pid: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "HiMatchADLib", "worker", "--parent-pid", str(parent_pid)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )
    ready = json.loads(proc.stdout.readline())
    assert ready["event"] == "ready" and ready["pid"] == proc.pid
    return proc


def _ends_within(proc: subprocess.Popen, seconds: float):
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@pytest.mark.parametrize("reap", [True, False], ids=["collected", "not-yet-collected"])
def test_worker_exits_when_the_parent_pid_ends(reap):
    if not reap and not sys.platform.startswith("linux"):
        pytest.skip("an ended process not yet collected is recognised through /proc (Linux)")
    sleeper = _sleeper()
    worker = _worker(sleeper.pid)
    try:
        time.sleep(2.5)
        assert worker.poll() is None  # stdin still open: only the watch could end it
        sleeper.kill()
        if reap:
            sleeper.wait()
        assert _ends_within(worker, 6) == 3
    finally:
        sleeper.kill()
        sleeper.wait()
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_client_passes_the_parent_pid_and_its_worker_follows_it():
    assert WorkerClient().command()[-1] == "worker"  # no parent pid: the worker watches its parent (POSIX)
    sleeper = _sleeper()
    client = WorkerClient(parent_pid=sleeper.pid)
    try:
        assert client.command()[-3:] == ["worker", "--parent-pid", str(sleeper.pid)]
        done = client.request({"cmd": "ping"}, timeout=120)
        assert done["event"] == "done" and client.running
        sleeper.kill()
        sleeper.wait()
        deadline = time.monotonic() + 6
        while client.running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.running
    finally:
        sleeper.kill()
        sleeper.wait()
        client.cancel()


def test_process_alive_on_posix(monkeypatch):
    if os.name != "posix":
        pytest.skip("POSIX calls")
    assert server.process_alive(os.getpid())
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert not server.process_alive(done.pid)
    assert not server.process_alive(0) and not server.process_alive(-5)

    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(server.os, "kill", denied)  # another user's process: it exists
    monkeypatch.setattr(server, "_zombie", lambda pid: False)
    assert server.process_alive(12345)


class FakeKernel32:
    """Stands in for ctypes' kernel32: OpenProcess gives ``handle`` (0: failure), WaitForSingleObject ``wait``."""

    def __init__(self, handle: int, wait: int = 0x102):
        self.handle, self.wait, self.calls = handle, wait, []

    def OpenProcess(self, access, inherit, pid):
        self.calls.append(("OpenProcess", access, inherit, pid))
        return self.handle

    def WaitForSingleObject(self, handle, ms):
        self.calls.append(("WaitForSingleObject", handle, ms))
        return self.wait

    def CloseHandle(self, handle):
        self.calls.append(("CloseHandle", handle))
        return 1


@pytest.mark.parametrize(
    "handle, wait, last_error, alive",
    [
        (7, 0x102, 0, True),  # WAIT_TIMEOUT: still running
        (7, 0x0, 0, False),  # WAIT_OBJECT_0: it has ended (its handle is signalled)
        (0, None, 87, False),  # ERROR_INVALID_PARAMETER: no such process
        (0, None, 5, True),  # ERROR_ACCESS_DENIED: it exists, another user's
    ],
)
def test_process_alive_on_windows(handle, wait, last_error, alive):
    k32 = FakeKernel32(handle, wait)
    assert server._windows_process_alive(4242, kernel32=k32, last_error=lambda: last_error) is alive
    access = k32.calls[0][1]
    assert k32.calls[0][3] == 4242 and access & 0x00100000 and access & 0x1000  # SYNCHRONIZE | QUERY_LIMITED
    if handle:
        assert k32.calls[1] == ("WaitForSingleObject", 7, 0) and k32.calls[-1] == ("CloseHandle", 7)


def test_process_alive_uses_the_windows_calls_on_windows(monkeypatch):
    seen = []
    monkeypatch.setattr(server.os, "name", "nt")
    monkeypatch.setattr(server, "_windows_process_alive", lambda pid: seen.append(pid) or False)
    assert server.process_alive(99) is False and seen == [99]


def test_worker_parent_pid_must_be_a_process_id(capsys):
    from HiMatchADLib.cli.main import build_parser

    assert build_parser().parse_args(["worker", "--parent-pid", "123"]).parent_pid == 123
    assert build_parser().parse_args(["worker"]).parent_pid is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--parent-pid", "0"])
