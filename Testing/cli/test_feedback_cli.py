"""``himatchad feedback add|list|remove`` on a result, ``--feedback`` / ``--no-feedback`` on detect and
batch: a marked region counts from the next run, a batch recomputes what feedback changes, removing
every entry gives the earlier maps exactly, mistakes are one error line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import RESOLUTION, one_error_line
from HiMatchADLib.cli.main import main
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detector"))
from test_feedback import _case  # noqa: E402  (the constructed case with an artefact and a lesion)


@pytest.fixture()
def run(tiny_model, normals_dir, cache_dir, capsys, tmp_path):
    fb = tmp_path / "feedback"

    def _run(*argv):
        args = list(argv)
        if args[0] in ("detect", "batch"):
            args += ["--normals", str(normals_dir), "--model", tiny_model, "--resolution", str(RESOLUTION), "--cache-dir", str(cache_dir),
                     "--method", "knn", "--feedback", str(fb), "--no-overview"]
        code = main(["--quiet"] + args)
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return code, out.out, out.err

    return _run, fb


def test_mark_a_result_normal_then_list_and_remove(run, tmp_path, cache_dir):
    run, fb = run
    case, art, les = _case(tmp_path / "in" / "case.nii.gz", 1000)
    code, _, err = run("detect", str(case), "--out-dir", str(tmp_path / "o1"))
    assert code == 0, err
    heat0 = read_image(tmp_path / "o1" / "case_heatmap.nii.gz").array
    scores = tmp_path / "o1" / "case_scores.json"
    region = tmp_path / "artefact.nii.gz"
    write_image(art.astype(np.uint8), read_image(case).geometry, region)
    code, out, err = run("feedback", "add", str(scores), "--region", str(region), "--note", "scanner stripes", "--cache-dir", str(cache_dir))
    assert code == 0, err
    assert out.startswith("added ") and "scanner stripes" in out and str(fb) in out
    entry_id = out.split()[1]
    code, out, _ = run("feedback", "list", str(scores))  # the result's JSON names the folder its run used
    assert code == 0 and f"({1} entries)" in out and entry_id in out and "labelmap slices 3-5" in out
    code, out, _ = run("feedback", "list", "--feedback", str(fb), "--json")
    assert [e["id"] for e in json.loads(out)["entries"]] == [entry_id]

    code, _, err = run("detect", str(case), "--out-dir", str(tmp_path / "o2"))
    assert code == 0, err
    data = json.loads((tmp_path / "o2" / "case_scores.json").read_text())
    heat1 = read_image(tmp_path / "o2" / "case_heatmap.nii.gz").array
    assert data["settings"]["feedback"] == [entry_id] and data["provenance"]["feedback"][0]["id"] == entry_id
    assert np.percentile(heat1[art], 99) < data["threshold"] < np.percentile(heat0[art], 99)
    assert np.percentile(heat1[les], 99) > data["threshold"]
    code, _, err = run("detect", str(case), "--out-dir", str(tmp_path / "o3"), "--no-feedback")
    assert code == 0, err
    np.testing.assert_array_equal(read_image(tmp_path / "o3" / "case_heatmap.nii.gz").array, heat0)

    code, out, _ = run("feedback", "remove", "--all", "--feedback", str(fb))
    assert code == 0 and out.strip() == f"removed {entry_id}"
    code, _, _ = run("detect", str(case), "--out-dir", str(tmp_path / "o4"))
    np.testing.assert_array_equal(read_image(tmp_path / "o4" / "case_heatmap.nii.gz").array, heat0)
    assert "feedback" not in json.loads((tmp_path / "o4" / "case_scores.json").read_text())["settings"]


def test_a_batch_recomputes_the_cases_after_feedback_and_after_its_removal(run, tmp_path, cache_dir):
    run, fb = run
    case, art, _ = _case(tmp_path / "in" / "case.nii.gz", 1001)
    out = tmp_path / "out"
    assert run("batch", str(tmp_path / "in"), "--out-dir", str(out))[0] == 0
    assert "0 processed, 1 already done" in run("batch", str(tmp_path / "in"), "--out-dir", str(out))[1]
    region = tmp_path / "artefact.nii.gz"
    write_image(art.astype(np.uint8), read_image(case).geometry, region)
    code, _, err = run("feedback", "add", str(out / "case_scores.json"), "--region", str(region), "--cache-dir", str(cache_dir))
    assert code == 0, err
    code, text, err = run("batch", str(tmp_path / "in"), "--out-dir", str(out))
    assert code == 0 and "1 processed, 0 already done" in text and "settings changed: feedback [] -> [" in err
    run("feedback", "remove", "--all", "--feedback", str(fb))
    code, text, err = run("batch", str(tmp_path / "in"), "--out-dir", str(out))
    assert "1 processed" in text and "-> []" in err


def test_feedback_mistakes_are_one_error_line(run, tmp_path, cache_dir, capsys):
    run, fb = run
    case, art, _ = _case(tmp_path / "in" / "case.nii.gz", 1002)
    assert run("detect", str(case), "--out-dir", str(tmp_path / "o"))[0] == 0
    scores = str(tmp_path / "o" / "case_scores.json")
    code, _, err = run("feedback", "add", scores)
    assert code == 2 and "say what is normal" in one_error_line(err)
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        run("feedback", "add", scores, "--slices", "x-y")
    assert exc.value.code == 2 and "slices are N, A-B" in capsys.readouterr().err
    code, _, err = run("feedback", "remove", "abc", "--feedback", str(fb))
    assert code == 2 and "no feedback entry 'abc'" in one_error_line(err)
    other = tmp_path / "other.nii.gz"
    small, _ = make_phantom((4, 32, 32), seed=1)
    write_image((small.array > 0).astype(np.uint8), small.geometry, other)
    code, _, err = run("feedback", "add", scores, "--region", str(other), "--cache-dir", str(cache_dir))
    assert code == 2 and "does not lie on the grid" in one_error_line(err)
    # the input changed since the result: refused, not marked on other content
    write_image(read_image(case).array * 1.5, read_image(case).geometry, case)
    code, _, err = run("feedback", "add", scores, "--slices", "3-5", "--cache-dir", str(cache_dir))
    assert code == 2 and "changed since the result was made" in one_error_line(err)


def test_reproduce_compares_the_feedback_a_result_used_and_reruns_with_it(run, tmp_path, cache_dir, capsys):
    run, fb = run
    case, art, _ = _case(tmp_path / "in" / "case.nii.gz", 1003)
    assert run("detect", str(case), "--out-dir", str(tmp_path / "o0"))[0] == 0
    region = tmp_path / "artefact.nii.gz"
    write_image(art.astype(np.uint8), read_image(case).geometry, region)
    assert run("feedback", "add", str(tmp_path / "o0" / "case_scores.json"), "--region", str(region), "--cache-dir", str(cache_dir))[0] == 0
    assert run("detect", str(case), "--out-dir", str(tmp_path / "o1"))[0] == 0
    scores = str(tmp_path / "o1" / "case_scores.json")
    code, out, _ = run("reproduce", scores, "--rerun", "--cache-dir", str(cache_dir))
    assert code == 0, out
    assert "feedback: same" in out and "heatmap: same" in out
    run("feedback", "remove", "--all", "--feedback", str(fb))
    code, out, _ = run("reproduce", scores, "--cache-dir", str(cache_dir))
    assert code == 1 and "feedback: differs" in out and "removed since" in out
