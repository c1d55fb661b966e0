"""The detection worker (``python -m HiMatchADLib worker``) and its client, with real processes.

What the Slicer module relies on: a second request reuses the loaded model and bank, a user error
does not end the worker, a killed worker leaves no output that looks complete, cancel kills at once
and the next request starts a new worker, shutdown and end of input end it with status 0, and
nothing but events ever reaches the protocol stream.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.outputs.files import is_complete, load_result
from HiMatchADLib.worker.server import Worker, serve
from HiMatchADLib.worker.client import WorkerClient, WorkerError

TIMEOUT = 300


@pytest.fixture(scope="module")
def settings(tiny_model, cache_dir):
    # The same settings as the `fitted` fixture, so the bank comes from the shared cache.
    return {"model": tiny_model, "method": "himatch", "k": 4, "resolution": RESOLUTION, "cache_dir": str(cache_dir)}


@pytest.fixture(scope="module")
def case_file(lesion_case, tmp_path_factory):
    img, _ = lesion_case
    return write_image(img.array, img.geometry, tmp_path_factory.mktemp("case") / "case.nii.gz")


@pytest.fixture
def client():
    c = WorkerClient()
    yield c
    c.cancel()


def detect(client, case_file, normals_dir, out_dir, settings, **extra):
    events = []
    rid = client.send({"cmd": "detect", "input": str(case_file), "normals": str(normals_dir), "out_dir": str(out_dir), "settings": settings, **extra})
    final = client.wait(rid, timeout=TIMEOUT, on_event=events.append)
    return final, [e for e in events if e.get("id") == rid and e.get("event") == "progress"]


def test_two_detections_reuse_the_loaded_model_and_bank(client, case_file, normals_dir, settings, fitted, lesion_case, tmp_path):
    first, progress1 = detect(client, case_file, normals_dir, tmp_path / "a", settings, foreground=True)
    assert first["event"] == "done", first
    assert first["reused"] is False and first["model_reused"] is False
    messages1 = {e["message"] for e in progress1}
    assert "Loading model" in messages1
    assert all(e["total"] >= e["done"] >= 0 for e in progress1)
    assert is_complete(tmp_path / "a", "case")
    assert Path(first["scores"]) == tmp_path / "a" / "case_scores.json"

    # The same maps as the detector run in this process.
    expected = fitted("himatch").predict(lesion_case[0])
    got = load_result(first["scores"])
    np.testing.assert_allclose(got.heatmap, expected.heatmap, rtol=1e-4, atol=1e-5)
    assert np.array_equal(got.foreground, expected.foreground)
    assert np.array_equal(got.labelmap, expected.labelmap)
    assert got.geometry.same_as(lesion_case[0].geometry)

    pid = client.pid
    second, progress2 = detect(client, case_file, normals_dir, tmp_path / "b", settings)
    assert second["event"] == "done", second
    assert second["reused"] is True and client.pid == pid
    messages2 = {e["message"] for e in progress2}
    assert "Loading model" not in messages2
    assert not any("bank" in m.lower() for m in messages2), messages2
    assert second["timings"]["fit"] < first["timings"]["fit"]
    assert np.array_equal(read_image(tmp_path / "b" / "case_heatmap.nii.gz").array, read_image(tmp_path / "a" / "case_heatmap.nii.gz").array)


def test_a_user_error_is_reported_and_the_worker_goes_on(client, normals_dir, settings, tmp_path):
    rid = client.send({"cmd": "detect", "input": str(tmp_path / "missing.nii.gz"), "normals": str(normals_dir), "out_dir": str(tmp_path / "o"), "settings": settings})
    event = client.wait(rid, timeout=TIMEOUT)
    assert event["event"] == "error" and "not found" in event["message"] and not event.get("crashed")
    pid = client.pid
    bad = client.wait(client.send({"cmd": "detect", "input": "x", "normals": "y", "out_dir": "z", "settings": {"colour": 1}}), timeout=60)
    assert bad["event"] == "error" and "unknown setting" in bad["message"] and "model" in bad["message"]
    pong = client.request({"cmd": "ping"}, timeout=60)
    assert pong["pid"] == pid and client.running
    assert not (tmp_path / "o" / "missing_scores.json").exists()


def test_cancel_kills_at_once_and_leaves_no_complete_output(client, case_file, normals_dir, settings, tmp_path):
    # A fresh cache: the bank must be built, which takes long enough to be interrupted.
    slow = dict(settings, cache_dir=str(tmp_path / "cache"))
    rid = client.send({"cmd": "detect", "input": str(case_file), "normals": str(normals_dir), "out_dir": str(tmp_path / "out"), "settings": slow})
    pid = client.pid
    deadline = time.monotonic() + TIMEOUT
    seen = []
    while not any(e.get("event") == "progress" and "bank" in e.get("message", "").lower() for e in seen):
        seen += client.poll()
        assert not any(e.get("event") in ("done", "error") for e in seen), seen
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t = time.monotonic()
    assert client.cancel() == [rid]
    assert time.monotonic() - t < 5
    assert not client.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert client.poll() == []  # nothing is reported for a cancelled request
    assert not is_complete(tmp_path / "out", "case")
    assert not (tmp_path / "out" / "case_scores.json").exists()
    pong = client.request({"cmd": "ping"}, timeout=60)  # a new worker
    assert pong["pid"] != pid


def test_a_worker_killed_from_outside_is_reported_for_its_request(client, case_file, normals_dir, settings, tmp_path):
    rid = client.send({"cmd": "detect", "input": str(case_file), "normals": str(normals_dir), "out_dir": str(tmp_path / "out"), "settings": dict(settings, cache_dir=str(tmp_path / "cache"))})
    time.sleep(1.0)
    pid = client.pid
    os.kill(pid, signal.SIGKILL)
    event = client.wait(rid, timeout=60)
    assert event["event"] == "error" and event["crashed"] is True
    assert "ended unexpectedly" in event["message"] and str(-signal.SIGKILL) in event["message"]
    assert not client.running and client.pending == []
    assert not is_complete(tmp_path / "out", "case")
    assert client.log_path is not None and str(client.log_path) in event["message"] and client.log_path.exists()
    assert client.request({"cmd": "ping"}, timeout=60)["pid"] != pid  # the next request starts a new worker
    with pytest.raises(WorkerError, match="unknown or already answered"):
        client.wait(rid, timeout=5)


def test_shutdown_and_end_of_input_exit_with_status_zero():
    for how in ("shutdown", "eof"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "HiMatchADLib", "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        lines = [b'{"id": "p", "cmd": "ping"}\n', b"not json\n"] + ([b'{"cmd": "shutdown"}\n', b'{"id": "late", "cmd": "ping"}\n'] if how == "shutdown" else [])
        out, _ = proc.communicate(b"".join(lines), timeout=120)
        assert proc.returncode == 0, how
        events = [json.loads(line) for line in out.decode().splitlines()]
        assert [e["event"] for e in events] == ["ready", "done", "error"], events
        assert events[1]["id"] == "p" and events[2]["id"] is None and "not a JSON request" in events[2]["message"]


FAKE_WORKER = textwrap.dedent('''
    import os, sys
    from HiMatchADLib.worker import server as worker

    class Noisy:
        """A detector whose every step writes to stdout, as careless libraries do."""
        def __init__(self, **settings):
            print("print from __init__")
            self.bank = None
        def set_progress(self, progress=None, cancel_event=None):
            self.progress = progress
        def fit(self, normals):
            os.write(1, b"raw bytes on fd 1\\n")
            sys.stdout.write("stdout write\\n")
            self.progress("Fitting", 1, 1)
            raise RuntimeError("boom")

    sys.exit(worker.main(Noisy))
''')


def test_stray_output_never_reaches_the_event_stream(tmp_path):
    script = tmp_path / "noisy_worker.py"
    script.write_text(FAKE_WORKER)

    class NoisyClient(WorkerClient):
        def command(self):
            return [self.python, str(script)]

    c = NoisyClient()
    try:
        event = c.wait(c.send({"cmd": "detect", "input": "a", "normals": str(tmp_path / "normals"), "out_dir": str(tmp_path / "o")}), timeout=60)
        assert event["event"] == "error" and event["internal"] is True and "RuntimeError: boom" in event["message"]
        assert c.running  # an internal error does not end the worker
        c.poll()
        log = "\n".join(c.stderr_tail)
        assert "raw bytes on fd 1" in log and "stdout write" in log and "print from __init__" in log
        assert "Traceback" in log
    finally:
        c.shutdown()
    assert not c.running


class FakeDetector:
    made = 0

    def __init__(self, model="m", method="himatch", k=8, resolution=448, device="auto", threshold="auto", progress=None, cancel_event=None):
        FakeDetector.made += 1
        self.model, self.method, self.resolution, self.device = model, method, resolution, device
        self.extractor = object()
        self.bank = None
        self.normals_dir = None

    def set_progress(self, progress=None, cancel_event=None):
        self.progress = progress

    def fit(self, normals):
        self.normals_dir = normals
        self.bank = object()
        return self


def test_serve_keeps_one_detector_per_settings_and_shares_the_model():
    events = []
    worker = Worker(events.append, FakeDetector, max_detectors=2)
    FakeDetector.made = 0
    a, existed_a = worker.detector({"model": "m", "method": "himatch"})
    b, existed_b = worker.detector({"model": "m", "method": "himatch"})
    assert a is b and (existed_a, existed_b) == (False, True)
    c, _ = worker.detector({"model": "m", "method": "knn"})
    assert c is not a and c.extractor is a.extractor  # same model settings: the loaded model is shared
    d, _ = worker.detector({"model": "other", "method": "knn"})
    assert d.extractor is not a.extractor
    assert len(worker.detectors) == 2 and a not in worker.detectors.values()  # least recently used dropped
    assert FakeDetector.made == 3


def test_serve_answers_every_request_once():
    events = []
    lines = [
        '{"id": 1, "cmd": "ping"}',
        '{"id": 2, "cmd": "fly"}',
        '[1, 2]',
        '{"id": 3, "cmd": "detect", "normals": "n", "out_dir": "o", "settings": {"progress": 1}}',
        '{"id": 4, "cmd": "detect", "normals": "n", "out_dir": "o", "settings": {}}',
        '{"cmd": "shutdown"}',
        '{"id": 5, "cmd": "ping"}',
    ]
    assert serve(iter(lines), events.append, FakeDetector) == 0
    assert events[0]["event"] == "ready"
    answers = {e["id"]: e for e in events[1:]}
    assert answers[1]["event"] == "done"
    assert answers[2]["event"] == "error" and "unknown command" in answers[2]["message"]
    assert answers[None]["event"] == "error"
    assert answers[3]["event"] == "error" and "unknown setting(s) progress" in answers[3]["message"]
    assert answers[4]["event"] == "error" and "'input'" in answers[4]["message"]
    assert 5 not in answers  # nothing after shutdown
    assert len(events) == 6


def test_hostile_requests_are_user_errors_before_any_model_work_and_the_worker_goes_on(tmp_path):
    """A line nested too deep to parse, wrong setting types or values, a bad series filter and an
    output folder inside the normal scans: each one ``error`` event (not ``internal``), no detector
    made for the requests that fail their checks, and the next request is answered."""
    normals = tmp_path / "normals"
    (normals / "sub").mkdir(parents=True)
    import inspect

    from HiMatchADLib import HiMatchDetector

    made = []

    def factory(**settings):
        made.append(settings)
        return HiMatchDetector(**settings)

    factory.__signature__ = inspect.signature(HiMatchDetector)  # the worker allows the detector's keywords

    base = {"cmd": "batch", "input_dir": str(tmp_path), "normals": str(normals), "out_dir": str(tmp_path / "out"), "settings": {"model": "/nonexistent"}}
    lines = ["[" * 100_000, json.dumps({**base, "id": "k", "settings": {"model": "/nonexistent", "k": "abc"}}),
             json.dumps({**base, "id": "b", "settings": {"model": "/nonexistent", "batch_size": 0}}),
             json.dumps({**base, "id": "r", "settings": {"model": "/nonexistent", "resolution": 8192}}),
             json.dumps({**base, "id": "f", "series_filter": 7}),
             json.dumps({**base, "id": "o", "out_dir": str(normals / "sub")}),
             json.dumps({"id": "p", "cmd": "ping"})]
    events = []
    assert serve(lines, events.append, detector_factory=factory) == 0
    errors = [e for e in events if e.get("event") == "error"]
    assert errors[0]["id"] is None and "not a JSON request" in errors[0]["message"]
    by_id = {e["id"]: e for e in errors[1:]}
    assert set(by_id) == {"k", "b", "r", "f", "o"} and not any(e.get("internal") for e in errors)
    assert "k must be a whole number, not 'abc'" in by_id["k"]["message"]
    assert "batch_size must be at least 1, not 0" in by_id["b"]["message"]
    assert "resolution must be at most 4096" in by_id["r"]["message"]
    assert "series filters must be" in by_id["f"]["message"]
    assert "inside, the normal scans' folder" in by_id["o"]["message"] and by_id["o"]["message"].startswith("out_dir ")
    assert events[-1]["id"] == "p" and events[-1]["event"] == "done"
    # the checks of the filter and the output folder came before any detector was made for them
    assert len(made) == 3  # k, batch_size and resolution reach the detector's own checks, nothing else
