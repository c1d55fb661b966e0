"""The local batch engine overlaps reading, computing and writing across cases: the same outputs and
summary as one stage after the other, errors recorded in their own rows, bounded look-ahead, and a
clean stop (threads joined, nothing that looks complete left half-done) on cancel or interrupt."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from HiMatchADLib import Cancelled
from HiMatchADLib.batch import STATUS_DONE, STATUS_FAILED, STATUS_OK, run_batch
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.outputs.files import is_complete
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.core.progress import Reporter

SHAPE = (8, 48, 48)
WAIT = 60  # seconds: a safety net for the event waits below, never reached when the stages overlap


def _phantom(path: Path, seed: int, lesion: bool = False) -> Path:
    img, _ = make_phantom(SHAPE, seed=seed, lesion=lesion, lesion_radius=0.35)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(img.array, img.geometry, path)
    return path


def _cases(folder: Path) -> Path:
    """Four cases: a, an unreadable b, sub/c with a lesion, and a constant d (refused by preparation)."""
    _phantom(folder / "a.nii.gz", 1)
    (folder / "b.nii.gz").write_bytes(b"\x00 not an image")
    _phantom(folder / "sub" / "c.nii.gz", 3, lesion=True)
    img, _ = make_phantom(SHAPE, seed=4)
    write_image(np.full(SHAPE, 7.0, np.float32), img.geometry, folder / "d.nii.gz")
    return folder


def _without_seconds(rows: list) -> list:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _summary_without_seconds(path: Path) -> list:
    lines = path.read_text(encoding="utf-8").splitlines()
    col = lines[0].split(",").index("seconds")
    import csv

    return [r[:col] + r[col + 1 :] for r in csv.reader(lines)]


def _our_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("himatchad-")]


class Trace:
    """Records the stages of each case (thread-safe), keyed by the input's file name."""

    def __init__(self, det, monkeypatch):
        self.events: list = []
        self.lock = threading.Lock()
        self.det = det
        self.real = {"prepare": det.prepare, "predict": det.predict, "save": det.save}
        monkeypatch.setattr(det, "prepare", self.prepare)
        monkeypatch.setattr(det, "predict", self.predict)
        monkeypatch.setattr(det, "save", self.save)
        self.hooks: dict = {}  # (stage, name) -> callable run at the start of that stage

    def log(self, what: str, name: str) -> None:
        with self.lock:
            self.events.append((what, name, threading.current_thread().name))

    def _hook(self, stage: str, name: str) -> None:
        hook = self.hooks.get((stage, name))
        if hook is not None:
            hook()

    def prepare(self, path):
        name = Path(path).name
        self.log("read-start", name)
        try:
            self._hook("read", name)
            return self.real["prepare"](path)
        finally:
            self.log("read-end", name)

    def predict(self, query):
        name = Path(query).name  # a prepared query stands for its file
        self.log("compute-start", name)
        try:
            self._hook("compute", name)
            return self.real["predict"](query)
        finally:
            self.log("compute-end", name)

    def save(self, result, out_dir):
        name = result.name
        self.log("write-start", name)
        try:
            self._hook("write", name)
            return self.real["save"](result, out_dir)
        finally:
            self.log("write-end", name)

    def index(self, what: str, name: str) -> int:
        return next(i for i, e in enumerate(self.events) if e[:2] == (what, name))

    def names(self, what: str) -> list:
        return [e[1] for e in self.events if e[0] == what]


@pytest.fixture()
def det(fitted):
    return fitted("knn")


def test_prepared_query_gives_the_result_of_a_path(det, fitted, tiny_model, cache_dir, normals_dir, tmp_path):
    from HiMatchADLib import HiMatchDetector

    path = _phantom(tmp_path / "q.nii.gz", 5, lesion=True)
    query = det.prepare(path)
    assert os.fspath(query) == str(path) and query.read_s >= 0 and query.preprocess_s >= 0
    from_path = det.predict(path)
    from_query = det.predict(query)
    assert np.array_equal(from_query.heatmap, from_path.heatmap)
    assert np.array_equal(from_query.labelmap, from_path.labelmap)
    assert from_query.volume_score == from_path.volume_score
    assert query.prep is None  # taken by predict, so that its memory goes with the maps made
    assert np.array_equal(det.predict(query).heatmap, from_path.heatmap)  # prepared again from its image
    # prepared before the bank was loaded: prepared again with the bank's pixel spacing
    fresh = HiMatchDetector(model=tiny_model, method="knn", k=4, resolution=det.resolution, cache_dir=cache_dir)
    early = fresh.prepare(path)
    fresh.fit(normals_dir)
    assert early.settings != fresh._prep_settings()
    assert np.array_equal(fresh.predict(early).heatmap, from_path.heatmap)


def test_overlapped_batch_gives_the_outputs_and_summary_of_the_sequential_one(det, tmp_path, monkeypatch):
    inp = _cases(tmp_path / "in")
    logs: dict = {}
    rows = {}
    for mode in (False, True):
        logs[mode] = []
        rows[mode] = run_batch(det, inp, tmp_path / f"out-{mode}", prefetch=mode, log=logs[mode].append)
    seq, ovl = rows[False], rows[True]
    assert [r["status"] for r in ovl] == [STATUS_OK, STATUS_FAILED, STATUS_FAILED, STATUS_OK]
    assert [r["case"] for r in ovl] == ["a.nii.gz", "b.nii.gz", "d.nii.gz", "sub/c.nii.gz"]
    assert _without_seconds(ovl) == _without_seconds(seq)
    assert "not a readable image" in ovl[1]["message"] and "constant" in ovl[2]["message"]
    assert sorted(logs[True]) == sorted(logs[False])
    assert _summary_without_seconds(tmp_path / "out-True" / "summary.csv") == _summary_without_seconds(tmp_path / "out-False" / "summary.csv")
    for stem in ("a", "sub/c"):
        for kind in ("heatmap", "labelmap"):
            a = read_image(tmp_path / "out-False" / f"{stem}_{kind}.nii.gz")
            b = read_image(tmp_path / "out-True" / f"{stem}_{kind}.nii.gz")
            assert np.array_equal(a.array, b.array) and a.geometry.same_as(b.geometry)
        ja, jb = (json.loads((tmp_path / f"out-{m}" / f"{stem}_scores.json").read_text()) for m in (False, True))
        ja.pop("timings_s"), jb.pop("timings_s")
        assert ja == jb
    assert sorted(p.name for p in (tmp_path / "out-True").rglob("*")) == sorted(p.name for p in (tmp_path / "out-False").rglob("*"))
    assert not _our_threads()

    # resumed: cases done earlier are never read; the failed ones are read again
    trace = Trace(det, monkeypatch)
    again = run_batch(det, inp, tmp_path / "out-True", log=lambda m: None)
    assert [r["status"] for r in again] == [STATUS_DONE, STATUS_FAILED, STATUS_FAILED, STATUS_DONE]
    assert sorted(trace.names("read-start")) == ["b.nii.gz", "d.nii.gz"]
    assert trace.names("compute-start") == []


def test_the_next_case_is_read_while_this_one_is_computed_and_written_while_the_next_is(det, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    for i, name in enumerate("abcd"):
        _phantom(inp / f"{name}.nii.gz", i)
    trace = Trace(det, monkeypatch)
    b_read = threading.Event()
    b_computing = threading.Event()
    waited = {}
    trace.hooks[("read", "b.nii.gz")] = b_read.set
    trace.hooks[("compute", "b.nii.gz")] = b_computing.set
    # a's computation goes on only once b is being read, a's write only once b is being computed
    trace.hooks[("compute", "a.nii.gz")] = lambda: waited.setdefault("read", b_read.wait(WAIT))
    trace.hooks[("write", "a")] = lambda: waited.setdefault("write", b_computing.wait(WAIT))
    rows = run_batch(det, inp, tmp_path / "out")
    assert [r["status"] for r in rows] == [STATUS_OK] * 4
    assert waited == {"read": True, "write": True}
    threads = {what: {t for w, _, t in trace.events if w == what} for what in ("read-start", "compute-start", "write-start")}
    main = threading.main_thread().name
    assert threads["compute-start"] == {main}
    assert len(threads["read-start"]) == 1 and len(threads["write-start"]) == 1
    assert len({main} | threads["read-start"] | threads["write-start"]) == 3  # three threads, one per stage
    # bounded: case i+2 is read only after case i was computed, and one case is written at a time
    names = [f"{n}.nii.gz" for n in "abcd"]
    for i in range(len(names) - 2):
        assert trace.index("read-start", names[i + 2]) > trace.index("compute-end", names[i])
    for i in range(len(names) - 1):
        assert trace.index("write-start", names[i + 1][:1]) > trace.index("write-end", names[i][:1])
    assert not _our_threads()


def test_a_read_error_of_a_prefetched_case_is_recorded_in_its_row(det, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    for i, name in enumerate("abc"):
        _phantom(inp / f"{name}.nii.gz", i)
    trace = Trace(det, monkeypatch)

    def unreadable():
        raise OSError(5, "Input/output error")

    trace.hooks[("read", "b.nii.gz")] = unreadable
    log = []
    rows = run_batch(det, inp, tmp_path / "out", log=log.append)
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_FAILED, STATUS_OK]
    assert rows[1]["message"] == "OSError: [Errno 5] Input/output error"
    assert all(rows[1][k] == "" for k in ("volume_score", "heatmap", "labelmap", "scores"))
    assert log == ["b.nii.gz: OSError: [Errno 5] Input/output error"]
    assert trace.names("compute-start") == ["a.nii.gz", "c.nii.gz"]
    assert not list((tmp_path / "out").glob("b_*"))
    assert trace.events[trace.index("read-start", "b.nii.gz")][2] != threading.main_thread().name  # read ahead


def test_a_write_error_is_recorded_in_its_row(det, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    for i, name in enumerate("abc"):
        _phantom(inp / f"{name}.nii.gz", i)
    out = tmp_path / "out"
    run_batch(det, inp, out)
    trace = Trace(det, monkeypatch)

    def disk_full():
        (out / "b_heatmap.nii.gz").write_bytes(b"half")  # the new heatmap is written...
        raise OSError(28, "No space left on device")  # ...and nothing else

    trace.hooks[("write", "b")] = disk_full
    log = []
    rows = run_batch(det, inp, out, overwrite=True, log=log.append)
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_FAILED, STATUS_OK]
    assert rows[1]["message"] == "OSError: [Errno 28] No space left on device"
    assert log == ["b.nii.gz: OSError: [Errno 28] No space left on device"]
    assert is_complete(out, "a") and is_complete(out, "c") and not is_complete(out, "b")
    assert not (out / "b_scores.json").exists()  # the earlier result no longer vouches for the new heatmap
    assert _summary_without_seconds(out / "summary.csv")[1:] == [[str(v) for k, v in r.items() if k != "seconds"] for r in rows]


@pytest.mark.parametrize("stop", ["cancel", "interrupt"])
def test_a_stop_mid_batch_joins_the_threads_and_leaves_nothing_half_done(det, tmp_path, monkeypatch, stop):
    inp = tmp_path / "in"
    for i, name in enumerate("abcd"):
        _phantom(inp / f"{name}.nii.gz", i)
    out = tmp_path / "out"
    trace = Trace(det, monkeypatch)
    cancel = threading.Event()
    monkeypatch.setattr(det, "reporter", Reporter(None, cancel))
    stopped = threading.Event()
    c_read = threading.Event()
    # a is being written when b's computation is stopped, and c is being read ahead
    trace.hooks[("read", "c.nii.gz")] = c_read.set
    trace.hooks[("write", "a")] = lambda: stopped.wait(WAIT)

    def stop_b():
        assert c_read.wait(WAIT)
        if stop == "cancel":
            cancel.set()  # the detector's next progress report raises Cancelled
        stopped.set()
        if stop == "interrupt":
            raise KeyboardInterrupt

    trace.hooks[("compute", "b.nii.gz")] = stop_b
    with pytest.raises(Cancelled if stop == "cancel" else KeyboardInterrupt):
        run_batch(det, inp, out)
    assert not _our_threads()
    assert trace.names("compute-start") == ["a.nii.gz", "b.nii.gz"]
    assert "c.nii.gz" in trace.names("read-end")  # read ahead, then dropped
    assert trace.names("write-end") == ["a"]  # the write under way was finished, then the batch stopped
    assert is_complete(out, "a")
    assert not any(is_complete(out, n) for n in "bcd")
    assert not list(out.glob("[bcd]_*")) and not list(out.glob(".*.tmp*"))
    summary = _summary_without_seconds(out / "summary.csv")
    assert [r[0] for r in summary[1:]] == ["a.nii.gz"] and summary[1][2] == STATUS_OK


def test_an_interrupt_while_a_write_fails_does_not_report_it_ok(det, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    for i, name in enumerate("abc"):
        _phantom(inp / f"{name}.nii.gz", i)
    out = tmp_path / "out"
    trace = Trace(det, monkeypatch)
    interrupted = threading.Event()

    def failing_write():
        (out / "a_heatmap.nii.gz").write_bytes(b"half")
        assert interrupted.wait(WAIT)
        raise OSError(28, "No space left on device")

    def interrupt():
        interrupted.set()
        raise KeyboardInterrupt

    trace.hooks[("write", "a")] = failing_write
    trace.hooks[("compute", "b.nii.gz")] = interrupt
    with pytest.raises(KeyboardInterrupt):
        run_batch(det, inp, out, log=lambda m: None)
    assert not _our_threads()
    assert not is_complete(out, "a")
    summary = _summary_without_seconds(out / "summary.csv")
    assert [(r[0], r[2]) for r in summary[1:]] == [("a.nii.gz", STATUS_FAILED)]
    assert "No space left on device" in summary[1][-1]
