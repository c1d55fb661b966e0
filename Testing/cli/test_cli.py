"""The command line: outputs, batch resume, and every user mistake -> one message, exit 2, no
traceback, no partial output."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PHANTOM_SHAPE, RESOLUTION, REPO
from HiMatchADLib.io import readers
from HiMatchADLib.batch.summary import SUMMARY_COLUMNS
from HiMatchADLib.cli.main import main
from HiMatchADLib.core.geometry import Image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.evaluation.phantom import make_phantom


@pytest.fixture()
def run(tiny_model, normals_dir, cache_dir, capsys):
    def _run(*argv, normals=True):
        args = list(argv)
        if normals:
            args += ["--normals", str(normals_dir)]
        args += ["--model", tiny_model, "--resolution", str(RESOLUTION), "--cache-dir", str(cache_dir), "--method", "knn"] if args[0] in ("detect", "batch") else []
        code = main(["--quiet"] + args)
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return code, out.out, out.err

    return _run


@pytest.fixture(scope="module")
def case_file(tmp_path_factory, lesion_case):
    d = tmp_path_factory.mktemp("case")
    img, _ = lesion_case
    write_image(img.array, img.geometry, d / "case.nii.gz")
    return d / "case.nii.gz"


def test_detect_writes_the_three_outputs_and_the_overview(run, case_file, tmp_path):
    code, out, _ = run("detect", str(case_file), "--out-dir", str(tmp_path / "o"))
    assert code == 0 and "case:" in out
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["case_heatmap.nii.gz", "case_labelmap.nii.gz", "case_overview.png", "case_scores.json"]
    data = json.loads((tmp_path / "o" / "case_scores.json").read_text())
    assert data["outputs"]["overview"] == "case_overview.png" and data["output_digests"]["overview"]["bytes"] > 0
    code, _, _ = run("detect", str(case_file), "--out-dir", str(tmp_path / "o"), "--no-overview")
    assert code == 0
    assert not (tmp_path / "o" / "case_overview.png").exists()  # not left beside maps it does not show
    assert "overview" not in json.loads((tmp_path / "o" / "case_scores.json").read_text())["outputs"]
    assert data["complete"] and data["method"] == "knn"
    assert len(data["slice_scores"]) == PHANTOM_SHAPE[0]
    assert {"read", "features", "matching", "total", "write"} <= set(data["timings_s"])
    assert data["threshold_info"]["mode"] == "auto"


def _no_outputs(d: Path) -> bool:
    return not d.exists() or not any(d.iterdir())


@pytest.mark.parametrize(
    "make_input, expected",
    [
        (lambda d: d / "missing.nii.gz", "not found"),
        (lambda d: (d / "junk.nii.gz").write_bytes(b"\x00garbage") and d / "junk.nii.gz", "not a readable image"),
        (lambda d: _write(d / "const.nii.gz", np.full((6, 32, 32), 5.0, np.float32)), "constant"),
        (lambda d: _write(d / "nan.mha", np.full((6, 32, 32), np.nan, np.float32)), "NaN"),
    ],
    ids=["missing", "corrupt", "constant", "all-nan"],
)
def test_bad_input_is_a_clear_error(run, tmp_path, make_input, expected):
    path = make_input(tmp_path)
    code, _, err = run("detect", str(path), "--out-dir", str(tmp_path / "o"))
    assert code == 2
    assert err.startswith("error:") and expected in err
    assert _no_outputs(tmp_path / "o")


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(arr, Image.from_array(arr).geometry, path)
    return path


def test_nan_voxels_and_one_slice_volumes_are_handled(run, tmp_path, lesion_case):
    img, _ = lesion_case
    arr = img.array.copy()
    arr[:, :5, :5] = np.nan
    arr[0, 0, 6] = np.inf
    _write(tmp_path / "withnan.mha", arr)
    code, _, err = run("detect", str(tmp_path / "withnan.mha"), "--out-dir", str(tmp_path / "o"))
    assert code == 0 and "non-finite" in err
    heat = readers.read_image(tmp_path / "o" / "withnan_heatmap.nii.gz").array
    assert np.isfinite(heat).all() and (heat[:, :5, :5] == 0).all()
    one = img.array[8:9]
    write_image(one, Image.from_array(one, is_2d=False).geometry, tmp_path / "one.nii.gz")
    code, _, _ = run("detect", str(tmp_path / "one.nii.gz"), "--out-dir", str(tmp_path / "o1"))
    assert code == 0
    assert readers.read_image(tmp_path / "o1" / "one_heatmap.nii.gz").array.shape == (1, 64, 64)


def test_enormous_volume_is_refused(run, case_file, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_VOXELS", 1000)
    code, _, err = run("detect", str(case_file), "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "voxels" in err and _no_outputs(tmp_path / "o")


def test_model_folder_that_is_not_a_model(run, case_file, tmp_path, normals_dir, cache_dir, capsys):
    (tmp_path / "notamodel").mkdir()
    code = main(["--quiet", "detect", str(case_file), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "o"), "--model", str(tmp_path / "notamodel"), "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "not a Hugging Face model folder" in err
    code = main(["--quiet", "detect", str(case_file), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "o"), "--model", str(tmp_path / "nothere"), "--cache-dir", str(cache_dir)])
    assert code == 2 and "model folder not found" in capsys.readouterr().err


def test_hub_model_offline_says_how_to_fix(case_file, tmp_path, normals_dir, cache_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["--quiet", "detect", str(case_file), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "o"), "--model", "facebook/dinov3-doesnotexist", "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "local folder" in err and "licence" in err and "Traceback" not in err


def test_empty_normal_folder(run, case_file, tmp_path, tiny_model, cache_dir, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["--quiet", "detect", str(case_file), "--normals", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o"), "--model", tiny_model, "--cache-dir", str(cache_dir)])
    assert code == 2 and "no images found" in capsys.readouterr().err


def test_unknown_option_value_exits_2_without_traceback(case_file, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "HiMatchADLib", "detect", str(case_file), "--normals", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--method", "svm"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert p.returncode == 2 and "invalid choice" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "HiMatchADLib", "detect", str(case_file), "--normals", str(tmp_path), "--out-dir", "o", "--k", "zero"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "whole number" in p.stderr


def test_batch_is_resumable_and_survives_a_bad_input(run, tmp_path, lesion_case):
    inp = tmp_path / "in"
    inp.mkdir()
    img, _ = lesion_case
    _write(inp / "a.nii.gz", img.array)
    ph, _ = make_phantom(PHANTOM_SHAPE, seed=77)
    _write(inp / "site" / "b.nii.gz", ph.array)
    (inp / "c.nii.gz").write_bytes(b"broken")
    out = tmp_path / "out"
    code, stdout, err = run("batch", str(inp), "--out-dir", str(out))
    assert code == 1
    assert stdout.strip() == f"2 processed, 0 already done, 1 failed; summary: {out / 'summary.csv'}; report: {out / 'report.html'}"
    assert "warning: c.nii.gz: cannot read" in err
    with (out / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
    assert [(r["case"], r["status"]) for r in rows] == [("a.nii.gz", "ok"), ("c.nii.gz", "failed"), ("site/b.nii.gz", "ok")]
    assert "not a readable image" in rows[1]["message"] and float(rows[0]["volume_score"]) > 0
    assert (out / "site" / "b_heatmap.nii.gz").exists()
    stamp = (out / "a_heatmap.nii.gz").stat().st_mtime_ns
    # second run: finished inputs are not recomputed
    code, stdout, _ = run("batch", str(inp), "--out-dir", str(out))
    assert code == 1 and "0 processed, 2 already done, 1 failed" in stdout
    assert (out / "a_heatmap.nii.gz").stat().st_mtime_ns == stamp
    # an incomplete result (scores missing) is redone
    (out / "site" / "b_scores.json").unlink()
    (inp / "c.nii.gz").unlink()
    code, stdout, _ = run("batch", str(inp), "--out-dir", str(out))
    assert code == 0 and "1 processed, 1 already done, 0 failed" in stdout
    # --overwrite recomputes everything
    code, stdout, _ = run("batch", str(inp), "--out-dir", str(out), "--overwrite")
    assert code == 0 and "2 processed, 0 already done, 0 failed" in stdout
    assert (out / "a_heatmap.nii.gz").stat().st_mtime_ns != stamp


def test_batch_command_and_run_batch_write_the_same_summary(run, tmp_path, fitted, lesion_case, normals_dir):
    from HiMatchADLib.batch import run_batch

    inp = tmp_path / "in"
    _write(inp / "a.nii.gz", lesion_case[0].array)
    _write(inp / "sub" / "b.mha", make_phantom(PHANTOM_SHAPE, seed=78)[0].array)
    (inp / "sub" / "broken.nrrd").write_bytes(b"broken")
    code, _, _ = run("batch", str(inp), "--out-dir", str(tmp_path / "cli"), "--k", "4")
    assert code == 1
    run_batch(fitted("knn"), inp, tmp_path / "lib", log=lambda m: None, outputs=("overview",))

    def table(folder):
        text = (folder / "summary.csv").read_text()
        assert text.splitlines()[0] == ",".join(SUMMARY_COLUMNS)
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(text.splitlines())]

    cli, lib = table(tmp_path / "cli"), table(tmp_path / "lib")
    assert [(r["case"], r["status"]) for r in cli] == [("a.nii.gz", "ok"), ("sub/b.mha", "ok"), ("sub/broken.nrrd", "failed")]
    assert cli == lib
    # the two callers record the same settings: each resumes the other's results
    code, stdout, _ = run("batch", str(inp), "--out-dir", str(tmp_path / "lib"), "--k", "4")
    assert "0 processed, 2 already done, 1 failed" in stdout


def test_batch_refuses_colliding_inputs_before_building_anything(run, tmp_path, lesion_case, cache_dir):
    inp = tmp_path / "in"
    _write(inp / "case.nii", lesion_case[0].array)
    _write(inp / "case.nii.gz", lesion_case[0].array)
    code, stdout, err = run("batch", str(inp), "--out-dir", str(tmp_path / "out"))
    assert code == 2 and stdout == ""
    assert err.startswith("error: two inputs would write the same outputs") and len(err.strip().splitlines()) == 1
    assert str(inp / "case.nii") in err and str(inp / "case.nii.gz") in err
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_partial_file(tmp_path, fitted, lesion_case, monkeypatch):
    import SimpleITK as sitk

    det = fitted("knn")
    res = det.predict(lesion_case[0])
    calls = {"n": 0}
    real = sitk.WriteImage

    def flaky(img, path, *a):
        calls["n"] += 1
        if calls["n"] == 2:  # the labelmap write fails
            raise RuntimeError("disk full")
        return real(img, path, *a)

    monkeypatch.setattr(sitk, "WriteImage", flaky)
    with pytest.raises(Exception):
        det.save(res, tmp_path / "o")
    names = [p.name for p in (tmp_path / "o").iterdir()]
    assert names == ["case_heatmap.nii.gz"]  # no temp file, no labelmap, no scores JSON
    from HiMatchADLib.outputs.files import is_complete

    assert not is_complete(tmp_path / "o", "case")


def test_bank_builds_the_bank_that_detect_uses(tiny_model, normals_dir, lesion_case, tmp_path):
    """`himatchad bank` prepares exactly the cache entry a later `detect` with the same options loads."""
    from HiMatchADLib.cli.main import main
    from HiMatchADLib.io.writers import write_image

    img, _ = lesion_case
    case = write_image(img.array, img.geometry, tmp_path / "case.nii.gz")
    common = ["--model", tiny_model, "--resolution", "128", "--cache-dir", str(tmp_path / "cache")]
    assert main(["--quiet", "bank", str(normals_dir), *common]) == 0
    banks = sorted((tmp_path / "cache" / "banks").iterdir())
    stamp = (banks[0] / "manifest.json").stat().st_mtime_ns
    assert main(["--quiet", "detect", str(case), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "o"), "--method", "knn", *common]) == 0
    assert sorted((tmp_path / "cache" / "banks").iterdir()) == banks  # no second bank
    assert (banks[0] / "manifest.json").stat().st_mtime_ns == stamp  # and not rebuilt
