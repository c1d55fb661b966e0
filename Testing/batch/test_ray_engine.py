"""The Ray engine: the same outputs and summary as the local engine, resumable, a failing case
recorded, a dying worker replaced and its case retried once, Ctrl-C leaving nothing that looks
complete, and a clear message when Ray is not installed. A local Ray cluster with two workers is
started (and stopped) by these tests; the faults are injected in the workers through a Ray worker
setup hook written here."""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib import HiMatchADError
from HiMatchADLib.batch import STATUS_DONE, STATUS_FAILED, STATUS_OK, run_batch
from HiMatchADLib.batch.summary import SUMMARY_COLUMNS
from HiMatchADLib.cli.main import main
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.outputs.files import is_complete
from HiMatchADLib.evaluation.phantom import make_phantom

SHAPE = (8, 48, 48)
CASES = ("a.nii.gz", "b.nii.gz", "site/c.nii.gz", "site/d.nii.gz")

# Runs in every Ray worker process: a hidden marker file beside an input makes the worker die (or
# stall) when it starts that input, as a process killed by the system would.
FAULT_HOOK = '''
import os, time
from pathlib import Path


def install():
    from HiMatchADLib.bank.store import NormalBank
    from HiMatchADLib.detector.detector import HiMatchDetector

    load = NormalBank.load.__func__

    def unreadable(cls, root, *args, **kwargs):  # a bank the workers cannot see, as on a machine without the shared folder
        if (Path(root) / ".hidden-from-workers").exists():
            raise OSError(f"[Errno 2] No such file or directory: '{root}/manifest.json'")
        return load(cls, root, *args, **kwargs)

    NormalBank.load = classmethod(unreadable)

    predict = HiMatchDetector.predict

    def faulty(self, image):
        p = Path(image)
        once = p.parent / f".die-once-{p.name}"
        if once.exists():
            once.unlink()
            os._exit(17)
        if (p.parent / f".die-always-{p.name}").exists():
            os._exit(17)
        if (p.parent / f".stall-{p.name}").exists():
            time.sleep(60)
        return predict(self, image)

    HiMatchDetector.predict = faulty
'''


def _write_cases(folder: Path) -> Path:
    for i, rel in enumerate(CASES):
        img, _ = make_phantom(SHAPE, seed=300 + i, lesion=i % 2 == 0, lesion_radius=0.35)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        write_image(img.array, img.geometry, folder / rel)
    return folder


def _summary(folder: Path) -> list:
    with (folder / "summary.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
        return list(reader)


NUMBERS = ("volume_score", "threshold", "anomalous_volume_mm3")


def _assert_same_rows(a: list, b: list, skip=("seconds",)) -> None:
    """Same rows but for ``seconds``; scores equal within float tolerance."""
    assert [r["case"] for r in a] == [r["case"] for r in b]
    for x, y in zip(a, b):
        for k in SUMMARY_COLUMNS:
            if k in skip:
                continue
            if k in NUMBERS and x[k] != "":
                assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-5, abs=1e-6), (x["case"], k)
            else:
                assert str(x[k]) == str(y[k]), (x["case"], k)


def _assert_same_outputs(out_a: Path, out_b: Path, cases=CASES, ignore=()) -> None:
    for rel in cases:
        stem = rel[: -len(".nii.gz")]
        ha, hb = read_image(out_a / f"{stem}_heatmap.nii.gz"), read_image(out_b / f"{stem}_heatmap.nii.gz")
        np.testing.assert_allclose(ha.array, hb.array, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ha.geometry.direction, hb.geometry.direction)
        la, lb = read_image(out_a / f"{stem}_labelmap.nii.gz").array, read_image(out_b / f"{stem}_labelmap.nii.gz").array
        assert np.count_nonzero(la != lb) <= max(2, la.size // 10000), rel
        ja = json.loads((out_a / f"{stem}_scores.json").read_text())
        jb = json.loads((out_b / f"{stem}_scores.json").read_text())
        kept = [{k: v for k, v in j["outputs"].items() if k not in ignore} for j in (ja, jb)]
        assert ja["settings"] == jb["settings"] and kept[0] == kept[1] and ja["complete"] is jb["complete"] is True
        assert ja["volume_score"] == pytest.approx(jb["volume_score"], rel=1e-5)
        np.testing.assert_allclose(
            np.array(ja["slice_scores"], dtype=float), np.array(jb["slice_scores"], dtype=float), rtol=1e-5, atol=1e-6, equal_nan=True
        )


@pytest.fixture(scope="module")
def det(fitted):
    return fitted("himatch")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return _write_cases(tmp_path_factory.mktemp("ray_inputs"))


@pytest.fixture(scope="module")
def local_out(det, inputs, tmp_path_factory) -> Path:
    """The local engine's outputs for ``inputs``: what every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("local_out")
    rows = run_batch(det, inputs, out, log=lambda m: None)
    assert [r["status"] for r in rows] == [STATUS_OK] * len(CASES)
    return out


# --------------------------------------------------------------------- without Ray
def test_without_ray_the_engine_says_how_to_install_it(det, inputs, tmp_path, monkeypatch, capsys, tiny_model, normals_dir, cache_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" raises ImportError
    with pytest.raises(HiMatchADError, match=r'pip install "himatchad\[ray\]"'):
        run_batch(det, inputs, tmp_path / "lib", engine="ray")
    assert not (tmp_path / "lib").exists()
    code = main([
        "--quiet", "batch", str(inputs), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "cli"), "--model", tiny_model,
        "--resolution", str(RESOLUTION), "--cache-dir", str(cache_dir), "--engine", "ray",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == ['error: the Ray engine needs Ray: pip install "himatchad[ray]" (or pip install "ray>=2.9")']
    assert not (tmp_path / "cli").exists()


def test_engine_options_need_the_ray_engine(inputs, tmp_path, capsys, tiny_model, normals_dir, cache_dir, det):
    code = main(["--quiet", "batch", str(inputs), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "o"), "--model", tiny_model, "--workers", "3"])
    assert code == 2 and capsys.readouterr().err.strip() == "error: --address, --workers, --gpus-per-worker and --cpus-per-worker need --engine ray"
    with pytest.raises(HiMatchADError, match="unknown engine"):
        run_batch(det, inputs, tmp_path / "o", engine="spark")


def test_a_worker_refuses_a_bank_or_library_it_cannot_reproduce(det, tmp_path):
    from HiMatchADLib.batch.ray import CaseWorker, detector_spec

    spec = detector_spec(det)
    with pytest.raises(HiMatchADError, match="cannot read the normal bank at .*shared by all of them"):
        CaseWorker().setup({**spec, "bank": str(tmp_path / "elsewhere")})
    with pytest.raises(HiMatchADError, match="imports HiMatchADLib"):
        CaseWorker().setup({**spec, "library": "0.0.0+other"})
    with pytest.raises(HiMatchADError, match="changed after the batch started"):
        CaseWorker().setup({**spec, "content": "0" * 64})
    worker = CaseWorker()
    info = worker.setup(spec)  # the driver's own spec is reproduced
    assert info["pid"] == os.getpid() and worker.detector.bank.root == det.bank.root


def test_a_worker_uses_the_drivers_reader_feedback(det, tmp_path, monkeypatch):
    from HiMatchADLib.batch.ray import CaseWorker, detector_spec

    monkeypatch.setattr(det, "feedback_dir", tmp_path / "feedback")
    monkeypatch.setattr(det, "_feedback", None)
    img, _ = make_phantom((16, 64, 64), seed=5)
    entry = det.mark_normal(img, slices=[7, 8])
    spec = detector_spec(det)
    assert spec["settings"]["feedback"] == [entry["id"]] and spec["feedback_dir"] == str(tmp_path / "feedback")
    worker = CaseWorker()
    worker.setup(spec)
    assert worker.detector.feedback_folder == tmp_path / "feedback"
    res_driver, res_worker = det.predict(img), worker.detector.predict(img)
    assert res_worker.settings["feedback"] == [entry["id"]]
    np.testing.assert_array_equal(res_worker.heatmap, res_driver.heatmap)
    # A worker that would not see the same entries refuses, naming the setting.
    with pytest.raises(HiMatchADError, match="feedback"):
        CaseWorker().setup({**spec, "feedback_dir": str(tmp_path / "empty")})


# --------------------------------------------------------------------- with Ray
def _ray():
    return pytest.importorskip("ray")


def test_cli_ray_engine_equals_local_and_stops_its_own_cluster(inputs, local_out, tmp_path, capsys, tiny_model, normals_dir, cache_dir):
    """``--engine ray`` starts a local cluster with two workers, writes what the local engine writes,
    and shuts the cluster down."""
    ray = _ray()
    assert not ray.is_initialized()
    out = tmp_path / "ray"
    code = main([
        "--quiet", "batch", str(inputs), "--normals", str(normals_dir), "--out-dir", str(out), "--model", tiny_model,
        "--resolution", str(RESOLUTION), "--cache-dir", str(cache_dir), "--k", "4", "--engine", "ray", "--workers", "2",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == f"4 processed, 0 already done, 0 failed; summary: {out / 'summary.csv'}; report: {out / 'report.html'}"
    assert not ray.is_initialized()
    rows = _summary(out)
    _assert_same_rows(rows, _summary(local_out), skip=("seconds", "overview"))
    # The command line writes the overview pictures by default (the library's local run asked for none).
    for r in rows:
        assert r["overview"] == r["case"].replace(".nii.gz", "_overview.png") and (out / r["overview"]).stat().st_size > 0
        assert json.loads((out / r["scores"]).read_text())["outputs"]["overview"] == Path(r["overview"]).name
    _assert_same_outputs(out, local_out, ignore=("overview",))


def test_no_cluster_at_the_address_is_one_error_line(inputs, tmp_path, capsys, tiny_model, normals_dir, cache_dir, monkeypatch):
    ray = _ray()
    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main([
        "--quiet", "batch", str(inputs), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "out"), "--model", tiny_model,
        "--resolution", str(RESOLUTION), "--cache-dir", str(cache_dir), "--engine", "ray", "--address", "auto",
    ])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot connect to the Ray cluster at auto: ")
    assert not ray.is_initialized() and not (tmp_path / "out" / "summary.csv").exists()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster of two CPUs whose workers run FAULT_HOOK (and import this worktree)."""
    ray = _ray()
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "himatchad_faults.py").write_text(textwrap.dedent(FAULT_HOOK))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(hooks), old) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False, logging_level="ERROR",
        runtime_env={"worker_process_setup_hook": "himatchad_faults.install"},
    )
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _copy_inputs(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def _run_ray(det, inp, out, **kw):
    logs: list = []
    rows = run_batch(det, inp, out, log=logs.append, engine="ray", engine_options={"workers": 2, **kw.pop("options", {})}, **kw)
    return rows, logs


def _cpus_free(ray, want: float = 2.0, wait: float = 20.0) -> bool:
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if ray.available_resources().get("CPU", 0.0) >= want:
            return True
        time.sleep(0.2)
    return False


def test_resume_skips_complete_cases_and_redoes_partial_ones(cluster, det, inputs, local_out, tmp_path):
    out = tmp_path / "out"
    rows, _ = _run_ray(det, inputs, out)
    assert [r["status"] for r in rows] == [STATUS_OK] * 4
    _assert_same_rows(_summary(out), rows)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in ("summary.csv", "report.html")}
    rows, _ = _run_ray(det, inputs, out)
    assert [r["status"] for r in rows] == [STATUS_DONE] * 4
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in ("summary.csv", "report.html")}
    (out / "site" / "c_scores.json").unlink()  # as an interrupted write leaves it
    rows, logs = _run_ray(det, inputs, out)
    assert [(r["case"], r["status"]) for r in rows] == [
        ("a.nii.gz", STATUS_DONE), ("b.nii.gz", STATUS_DONE), ("site/c.nii.gz", STATUS_OK), ("site/d.nii.gz", STATUS_DONE),
    ]
    assert rows[2]["message"].startswith("recomputed: earlier outputs were incomplete")
    assert any("site/c.nii.gz: recomputed: earlier outputs were incomplete" in m for m in logs)
    _assert_same_outputs(out, local_out)
    # the local engine resumes what the Ray engine wrote, and the other way round
    assert [r["status"] for r in run_batch(det, inputs, out, log=lambda m: None)] == [STATUS_DONE] * 4


def test_a_corrupt_case_in_the_middle_is_recorded_and_the_batch_goes_on(cluster, det, inputs, local_out, tmp_path):
    inp = _copy_inputs(inputs, tmp_path / "in")
    (inp / "b2.nii.gz").write_bytes(b"not an image")
    rows, logs = _run_ray(det, inp, tmp_path / "ray")
    local = run_batch(det, inp, tmp_path / "local", log=lambda m: None)
    assert [(r["case"], r["status"]) for r in rows] == [
        ("a.nii.gz", STATUS_OK), ("b.nii.gz", STATUS_OK), ("b2.nii.gz", STATUS_FAILED), ("site/c.nii.gz", STATUS_OK), ("site/d.nii.gz", STATUS_OK),
    ]
    assert rows[2]["message"] and rows[2]["message"] == local[2]["message"]
    assert any(m.startswith("b2.nii.gz: ") for m in logs)
    _assert_same_rows(_summary(tmp_path / "ray"), _summary(tmp_path / "local"))
    _assert_same_outputs(tmp_path / "ray", local_out)


def test_a_worker_that_dies_is_replaced_and_its_case_retried(cluster, det, inputs, local_out, tmp_path):
    inp = _copy_inputs(inputs, tmp_path / "in")
    (inp / ".die-once-b.nii.gz").touch()
    rows, logs = _run_ray(det, inp, tmp_path / "out")
    assert not (inp / ".die-once-b.nii.gz").exists()  # the fault did happen
    assert [r["status"] for r in rows] == [STATUS_OK] * 4
    retries = [m for m in logs if "retrying" in m]
    assert len(retries) == 1 and retries[0].startswith("b.nii.gz: ") and retries[0].endswith("; retrying it on another worker")
    assert "the worker process died (" in retries[0]
    _assert_same_rows(_summary(tmp_path / "out"), _summary(local_out), skip=("seconds", "input"))
    _assert_same_outputs(tmp_path / "out", local_out)
    assert _cpus_free(cluster)  # the workers are gone after the batch


def test_a_case_that_kills_its_worker_twice_is_recorded_failed(cluster, det, inputs, local_out, tmp_path):
    inp = _copy_inputs(inputs, tmp_path / "in")
    (inp / ".die-always-b.nii.gz").touch()
    out = tmp_path / "out"
    rows, logs = _run_ray(det, inp, out)
    assert [(r["case"], r["status"]) for r in rows] == [
        ("a.nii.gz", STATUS_OK), ("b.nii.gz", STATUS_FAILED), ("site/c.nii.gz", STATUS_OK), ("site/d.nii.gz", STATUS_OK),
    ]
    assert rows[1]["message"].startswith("the worker died twice while processing this case; the second time: the worker process died (")
    assert rows[1]["heatmap"] == rows[1]["volume_score"] == ""
    assert [r["status"] for r in _summary(out)] == [r["status"] for r in rows]
    assert not is_complete(out, "b")
    # once the cause is gone, the next run does only that case
    (inp / ".die-always-b.nii.gz").unlink()
    rows, _ = _run_ray(det, inp, out)
    assert [r["status"] for r in rows] == [STATUS_DONE, STATUS_OK, STATUS_DONE, STATUS_DONE]
    _assert_same_outputs(out, local_out)


def test_ctrl_c_stops_the_workers_and_leaves_nothing_that_looks_complete(cluster, det, inputs, local_out, tmp_path):
    inp = _copy_inputs(inputs, tmp_path / "in")
    (inp / ".stall-a.nii.gz").touch()  # case a is still running when Ctrl-C comes
    out = tmp_path / "out"
    seen: list = []

    def progress(message, done, total):
        seen.append(message)
        if message.startswith("Case 3/"):
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_batch(det, inp, out, progress=progress, log=lambda m: None, engine="ray", engine_options={"workers": 2})
    assert time.monotonic() - start < 45  # the stalled worker was killed, not waited for
    assert _cpus_free(cluster)
    assert not is_complete(out, "a")
    finished = [r["case"] for r in _summary(out)] if (out / "summary.csv").exists() else []
    assert "a.nii.gz" not in finished and len(finished) <= 1
    for rel in CASES:  # whatever is complete is a whole, valid result
        stem = rel[: -len(".nii.gz")]
        if is_complete(out, stem):
            _assert_same_outputs(out, local_out, [rel])
    (inp / ".stall-a.nii.gz").unlink()
    rows, _ = _run_ray(det, inp, out)
    assert rows[0]["status"] == STATUS_OK and {r["status"] for r in rows} <= {STATUS_OK, STATUS_DONE}
    _assert_same_outputs(out, local_out)


def test_a_cluster_too_small_for_one_worker_is_a_clear_error(cluster, det, inputs, tmp_path):
    with pytest.raises(HiMatchADError, match="asks for 1 GPUs but the Ray cluster has 0"):
        _run_ray(det, inputs, tmp_path / "out", options={"gpus_per_worker": 1})
    assert _cpus_free(cluster)


def test_a_worker_that_cannot_see_the_bank_stops_the_batch_with_one_clear_message(cluster, det, inputs, tmp_path):
    marker = Path(det.bank.root) / ".hidden-from-workers"
    marker.touch()
    try:
        with pytest.raises(HiMatchADError) as info:
            _run_ray(det, inputs, tmp_path / "out")
    finally:
        marker.unlink()
    message = str(info.value)
    assert "cannot read the normal bank at" in message and "shared by all of them" in message and "\n" not in message
    assert not any(is_complete(tmp_path / "out", rel[: -len(".nii.gz")]) for rel in CASES)
    assert _cpus_free(cluster)


def test_processing_starts_with_the_workers_the_cluster_can_hold(cluster, det, inputs, local_out, tmp_path):
    """Three workers of one CPU on a two-CPU cluster: the third never starts, the batch runs on two
    and the waiting one is cancelled at the end."""
    rows, _ = _run_ray(det, inputs, tmp_path / "out", options={"workers": 3})
    assert [r["status"] for r in rows] == [STATUS_OK] * 4
    _assert_same_outputs(tmp_path / "out", local_out)
    assert _cpus_free(cluster)
