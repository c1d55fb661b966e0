"""The batch runner: mirrored layout, resume by settings, failures recorded, inputs never taken from
our own outputs, the output folder or the normal scans, and one summary for every caller."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib import Cancelled, HiMatchADError
from HiMatchADLib.batch import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_OK,
    SUMMARY_COLUMNS,
    find_cases,
    result_settings,
    run_batch,
    settings_changes,
    summary_counts,
)
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.outputs.files import load_result
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.evaluation.phantom import make_phantom

SHAPE = (8, 48, 48)  # small cases: the runner is under test, not the detector


def _phantom(path: Path, seed: int, lesion: bool = False) -> Path:
    img, _ = make_phantom(SHAPE, seed=seed, lesion=lesion, lesion_radius=0.35)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(img.array, img.geometry, path)
    return path


def _dicom_series(folder: Path, seed: int) -> Path:
    """A DICOM series (one file per slice) that GDCM reads back as one volume."""
    import SimpleITK as sitk

    img, _ = make_phantom(SHAPE, seed=seed)
    vol = sitk.GetImageFromArray(np.clip(img.array, 0, 3000).astype(np.int16))
    vol.SetSpacing((1.0, 1.0, 2.0))
    folder.mkdir(parents=True)
    uid = f"1.2.826.0.1.3680043.2.1125.{seed}.1"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(SHAPE[0]):
        s = vol[:, :, z]
        position = "\\".join(str(v) for v in vol.TransformIndexToPhysicalPoint((0, 0, z)))
        for tag, value in {
            "0008|0060": "MR", "0020|000d": uid + ".0", "0020|000e": uid, "0008|0018": f"{uid}.{z + 1}",
            "0020|0013": str(z + 1), "0020|0032": position, "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2",
        }.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(s)
    assert read_image(folder).array.shape == SHAPE
    return folder


def _read_csv(path: Path) -> tuple[list, list]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _as_text(rows: list) -> list:
    return [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows]


def _without_seconds(rows: list) -> list:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name not in ("summary.csv", "report.html")}


@pytest.fixture()
def det(fitted):
    return fitted("knn")


def test_subfolders_are_mirrored_and_the_summary_has_the_columns(det, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    _phantom(inp / "site2" / "deep" / "b.nrrd", 2)
    _dicom_series(inp / "site2" / "series.7", 3)
    out = tmp_path / "out"
    progress = []
    rows = run_batch(det, inp, out, progress=lambda m, d, t: progress.append((m, d, t)))

    assert [r["case"] for r in rows] == ["a.nii.gz", "site2/deep/b.nrrd", "site2/series.7"]
    assert [r["status"] for r in rows] == [STATUS_OK] * 3
    for stem in ("a", "site2/deep/b", "site2/series.7"):
        for kind in ("heatmap", "labelmap"):
            assert (out / f"{stem}_{kind}.nii.gz").is_file()
        assert json.loads((out / f"{stem}_scores.json").read_text())["complete"]
    assert not (out / "b_heatmap.nii.gz").exists() and not (out / "series_heatmap.nii.gz").exists()

    columns, csv_rows = _read_csv(out / "summary.csv")
    assert tuple(columns) == SUMMARY_COLUMNS
    assert csv_rows == _as_text(rows)  # the returned rows are the CSV's
    b = rows[1]
    assert (b["heatmap"], b["labelmap"], b["scores"]) == ("site2/deep/b_heatmap.nii.gz", "site2/deep/b_labelmap.nii.gz", "site2/deep/b_scores.json")
    assert b["input"] == str(inp / "site2" / "deep" / "b.nrrd")
    data = json.loads((out / b["scores"]).read_text())
    for key in ("volume_score", "threshold", "anomalous_voxels", "anomalous_volume_mm3", "most_anomalous_slice"):
        assert b[key] == data[key]
    # progress: before each case with the number finished, and once at the end
    assert [(d, t) for _, d, t in progress] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert "site2/deep/b.nrrd" in progress[1][0]
    assert summary_counts(rows) == {STATUS_OK: 3, STATUS_DONE: 0, STATUS_FAILED: 0}


def test_second_run_is_done_earlier_and_touches_nothing(det, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    _phantom(inp / "sub" / "b.nii.gz", 2)
    out = tmp_path / "out"
    first = run_batch(det, inp, out)
    before = _mtimes(out)
    assert len(before) == 6

    second = run_batch(det, inp, out)
    assert [r["status"] for r in second] == [STATUS_DONE, STATUS_DONE]
    assert _mtimes(out) == before  # nothing rewritten
    for a, b in zip(first, second):  # the rows of cases done earlier come from their scores JSON
        assert {k: v for k, v in a.items() if k not in ("status", "seconds")} == {k: v for k, v in b.items() if k not in ("status", "seconds")}
    assert summary_counts(second) == {STATUS_OK: 0, STATUS_DONE: 2, STATUS_FAILED: 0}

    third = run_batch(det, inp, out, overwrite=True)
    assert [r["status"] for r in third] == [STATUS_OK, STATUS_OK]
    after = _mtimes(out)
    assert set(after) == set(before) and all(after[p] != before[p] for p in before)
    assert _without_seconds(third) == _without_seconds(first)  # same settings, same results


def test_volatile_settings_do_not_count_but_result_settings_do(det, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    _phantom(inp / "b.nii.gz", 2)
    out = tmp_path / "out"
    run_batch(det, inp, out)

    def edit(name, **settings):
        p = out / f"{name}_scores.json"
        data = json.loads(p.read_text())
        data["settings"].update(settings)
        p.write_text(json.dumps(data))

    edit("a", version="0.0.1", device="cuda:3")  # where and with which release it ran: same result
    edit("b", k=5, sigma=2.5, method_revision=1)  # and maps computed another way
    stamp = (out / "a_heatmap.nii.gz").stat().st_mtime_ns
    log = []
    rows = run_batch(det, inp, out, log=log.append)
    assert [r["status"] for r in rows] == [STATUS_DONE, STATUS_OK]
    assert (out / "a_heatmap.nii.gz").stat().st_mtime_ns == stamp
    assert rows[1]["message"].startswith("recomputed: settings changed: method_revision 1 -> 2, k 5 -> 4, sigma 2.5 -> 4.0")
    assert any("b.nii.gz: recomputed: settings changed" in m for m in log)
    assert json.loads((out / "b_scores.json").read_text())["settings"]["k"] == 4  # rewritten with the current settings


def test_changed_settings_are_recomputed_with_the_reason(fitted, tiny_model, normals_dir, cache_dir, tmp_path):
    from HiMatchADLib import HiMatchDetector

    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1, lesion=True)
    out = tmp_path / "out"
    knn = run_batch(fitted("knn"), inp, out)
    log = []
    rows = run_batch(fitted("himatch"), inp, out, log=log.append)
    # himatch records its fusion rule, which knn has not
    assert log == ["a.nii.gz: recomputed: settings changed: method knn -> himatch, fusion (not recorded) -> reliability"]
    assert rows[0]["status"] == STATUS_OK
    assert "recomputed: settings changed: method knn -> himatch" in rows[0]["message"]
    assert json.loads((out / "a_scores.json").read_text())["method"] == "himatch"
    assert rows[0]["volume_score"] != knn[0]["volume_score"]

    other = HiMatchDetector(model=tiny_model, method="himatch", k=4, resolution=RESOLUTION, cache_dir=cache_dir, threshold=0.5).fit(normals_dir)
    rows = run_batch(other, inp, out, log=log.append)
    assert rows[0]["status"] == STATUS_OK and "threshold auto -> 0.5" in rows[0]["message"]
    assert rows[0]["threshold"] == 0.5
    assert run_batch(other, inp, out)[0]["status"] == STATUS_DONE


def test_settings_changes_compares_normals_as_folders_and_flags_unrecorded_settings(det, normals_dir):
    current = result_settings(det)
    assert "device" not in current and "version" not in current
    assert current["normals"] == str(normals_dir) and current["method"] == "knn"
    stored = {"settings": dict(current, normals=str(normals_dir / "sub" / ".."), device="cpu", modality_used="mri")}
    assert settings_changes(current, stored) == []
    stored["settings"]["normals"] = str(normals_dir.parent)
    del stored["settings"]["seed"]
    assert settings_changes(current, stored) == ["seed (not recorded) -> 0", f"normals {normals_dir.parent} -> {normals_dir}"]
    assert settings_changes(current, {"volume_score": 1.0}) == ["settings of the earlier result not recorded"]
    # a fixed minimum component size is compared with the size the earlier labelmap was cleaned with
    fixed = dict(current, min_component_size=50)
    assert settings_changes(fixed, {"settings": dict(current), "min_component_size": 16}) == ["min_component_size 16 -> 50"]
    assert settings_changes(fixed, {"settings": dict(current), "min_component_size": 50}) == []


def test_a_failing_case_is_recorded_and_the_batch_goes_on(det, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    (inp / "b.nii.gz").write_bytes(b"\x00 not an image")
    _phantom(inp / "c.nii.gz", 3)
    out = tmp_path / "out"
    log = []
    rows = run_batch(det, inp, out, log=log.append)
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_FAILED, STATUS_OK]
    failed = rows[1]
    assert "not a readable image" in failed["message"] and "\n" not in failed["message"]
    assert all(failed[k] == "" for k in ("volume_score", "heatmap", "labelmap", "scores"))
    assert any(m.startswith("b.nii.gz: ") and "not a readable image" in m for m in log)
    assert (out / "c_scores.json").exists() and not list(out.glob("b_*"))
    assert [r["status"] for r in _read_csv(out / "summary.csv")[1]] == [STATUS_OK, STATUS_FAILED, STATUS_OK]
    # resumed: the failed case is tried again, the others are done
    rows = run_batch(det, inp, out, log=log.append)
    assert [r["status"] for r in rows] == [STATUS_DONE, STATUS_FAILED, STATUS_DONE]
    assert summary_counts(rows) == {STATUS_OK: 0, STATUS_DONE: 2, STATUS_FAILED: 1}


def test_runtime_errors_fail_the_case_but_cancellation_stops_the_batch(det, tmp_path, monkeypatch):
    inp = tmp_path / "in"
    for i, name in enumerate("abc"):
        _phantom(inp / f"{name}.nii.gz", i)
    out = tmp_path / "out"
    real = det.predict

    def predict(path):
        if Path(path).name == "b.nii.gz":
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return real(path)

    monkeypatch.setattr(det, "predict", predict)
    rows = run_batch(det, inp, out, log=lambda m: None)
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_FAILED, STATUS_OK]
    assert rows[1]["message"] == "RuntimeError: CUDA out of memory."

    def cancel_at_second(message, done, total):
        if done == 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        run_batch(det, inp, tmp_path / "out2", progress=cancel_at_second)
    _, written = _read_csv(tmp_path / "out2" / "summary.csv")
    assert [r["case"] for r in written] == ["a.nii.gz"]

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(det, "predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(det, inp, tmp_path / "out3")


def test_a_recompute_that_fails_leaves_no_complete_stale_result(det, tmp_path, monkeypatch):
    from HiMatchADLib.outputs.files import is_complete

    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    out = tmp_path / "out"
    run_batch(det, inp, out)

    def failing_save(result, out_dir):
        (Path(out_dir) / f"{result.name}_heatmap.nii.gz").write_bytes(b"half")  # the new heatmap is written...
        raise OSError(28, "No space left on device")  # ...and the labelmap is not

    monkeypatch.setattr(det, "save", failing_save)
    rows = run_batch(det, inp, out, overwrite=True, log=lambda m: None)
    assert rows[0]["status"] == STATUS_FAILED and "No space left on device" in rows[0]["message"]
    assert not is_complete(out, "a")  # the old scores JSON no longer vouches for the new heatmap
    monkeypatch.undo()
    rows = run_batch(det, inp, out, log=lambda m: None)
    assert rows[0]["status"] == STATUS_OK and rows[0]["message"].startswith("recomputed: earlier outputs were incomplete")


@pytest.mark.parametrize("pair", [("case.nii", "case.nii.gz"), ("case", "case.nrrd"), ("Case.nii.gz", "case.mha")], ids=["suffixes", "dicom-folder", "letter-case"])
def test_inputs_with_colliding_outputs_are_refused_before_anything_is_written(det, tmp_path, pair):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    first, second = pair
    if "." in first:
        _phantom(inp / "sub" / first, 2)
    else:
        _dicom_series(inp / "sub" / first, 2)
    _phantom(inp / "sub" / second, 3)
    out = tmp_path / "out"
    with pytest.raises(HiMatchADError) as err:
        run_batch(det, inp, out)
    assert str(inp / "sub" / first) in str(err.value) and str(inp / "sub" / second) in str(err.value)
    assert not out.exists()


def test_output_and_normal_folders_inside_the_input_are_not_cases(det, normals_dir, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    _phantom(inp / "controls" / "n1.nii.gz", 5)  # passed as an excluded folder
    (inp / "bank").symlink_to(normals_dir, target_is_directory=True)  # the detector's own normals: always excluded
    out = inp / "results"
    for _ in range(2):  # the second time the output folder is full of images
        rows = run_batch(det, inp, out, exclude=[inp / "controls"])
        assert [r["case"] for r in rows] == ["a.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["a_heatmap.nii.gz", "a_labelmap.nii.gz", "a_scores.json", "report.html", "summary.csv"]
    # left by an interrupted write: images in the output folder that no scores JSON vouches for
    (out / "a_scores.json").unlink()
    rows = run_batch(det, inp, out, exclude=[inp / "controls"], log=lambda m: None)
    assert [(r["case"], r["status"]) for r in rows] == [("a.nii.gz", STATUS_OK)]
    with pytest.raises(HiMatchADError, match="inside the output folder|is the output folder"):
        run_batch(det, inp, tmp_path)
    with pytest.raises(HiMatchADError, match="read as normal scans"):
        run_batch(det, inp, inp / "controls" / "out", exclude=[inp / "controls"])
    with pytest.raises(HiMatchADError, match="excluded folder"):
        run_batch(det, inp / "bank", tmp_path / "o")  # the detector's normal scans are never cases
    assert not (tmp_path / "o").exists()


def test_our_outputs_in_the_input_tree_are_not_cases(det, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    run_batch(det, inp, tmp_path / "elsewhere")
    old = inp / "old_results"
    old.mkdir()
    for p in (tmp_path / "elsewhere").glob("a_*"):
        (old / p.name).write_bytes(p.read_bytes())
    _phantom(inp / "b_heatmap.nii.gz", 2)  # named like an output, but no scores JSON of ours beside it
    _phantom(old / "c_labelmap.nii.gz", 3)  # beside our JSON, but not one of the outputs it names
    notes = []
    cases = find_cases(inp, tmp_path / "out", log=notes.append)
    assert [c.case for c in cases] == ["a.nii.gz", "b_heatmap.nii.gz", "old_results/c_labelmap.nii.gz"]
    assert any("outputs of this tool" in n for n in notes)


def test_symlink_loops_and_duplicate_links_give_each_case_once(det, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    _phantom(inp / "sub" / "b.nii.gz", 2)
    (inp / "sub" / "up").symlink_to("..", target_is_directory=True)  # in/sub/up/sub/up/...
    (inp / "sub" / "again").symlink_to(inp / "sub", target_is_directory=True)
    (inp / "sub" / "same.nii.gz").symlink_to(inp / "a.nii.gz")
    (inp / "knot.nii.gz").symlink_to("knot.nii.gz")  # a link to itself
    outside = tmp_path / "shared_cases"
    _phantom(outside / "c.nii.gz", 3)
    (inp / "linked").symlink_to(outside, target_is_directory=True)  # a linked folder outside: followed
    notes = []
    cases = find_cases(inp, tmp_path / "out", log=notes.append)
    assert [c.case for c in cases] == ["a.nii.gz", "linked/c.nii.gz", "sub/b.nii.gz"]
    assert [c.out_dir for c in cases] == [tmp_path / "out", tmp_path / "out" / "linked", tmp_path / "out" / "sub"]
    assert any("same input" in n for n in notes) and any("loop" in n for n in notes)


def test_missing_or_empty_input_folder(det, tmp_path):
    with pytest.raises(HiMatchADError, match="not found"):
        run_batch(det, tmp_path / "nothere", tmp_path / "out")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(HiMatchADError, match="no images found"):
        run_batch(det, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_input_replaced_after_its_result_is_recomputed(det, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    _phantom(inp / "b.nii.gz", 2)
    out = tmp_path / "out"
    first = run_batch(det, inp, out)
    _phantom(inp / "b.nii.gz", 3, lesion=True)  # a new scan under the old name
    scores = (out / "b_scores.json").stat()
    os.utime(inp / "b.nii.gz", ns=(scores.st_atime_ns, scores.st_mtime_ns + 1_000_000))
    rows = run_batch(det, inp, out, log=lambda m: None)
    assert [r["status"] for r in rows] == [STATUS_DONE, STATUS_OK]
    assert rows[1]["message"].startswith("recomputed: the input's content changed after its result was written")
    assert rows[1]["volume_score"] != first[1]["volume_score"]


def test_resume_knows_a_replaced_input_by_its_content_not_its_modification_time(det, tmp_path):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    _phantom(inp / "b.nii.gz", 2)
    out = tmp_path / "out"
    first = run_batch(det, inp, out)
    old = (inp / "b.nii.gz").stat()
    _phantom(tmp_path / "other.nii.gz", 3, lesion=True)
    shutil.copyfile(tmp_path / "other.nii.gz", inp / "b.nii.gz")
    os.utime(inp / "b.nii.gz", ns=(old.st_atime_ns, old.st_mtime_ns))  # as cp -p / rsync -a leave it
    rows = run_batch(det, inp, out, log=lambda m: None)
    assert [r["status"] for r in rows] == [STATUS_DONE, STATUS_OK]
    assert "input's content changed" in rows[1]["message"]
    assert rows[1]["volume_score"] != first[1]["volume_score"]
    # Touched but unchanged: the same content is done earlier.
    os.utime(inp / "a.nii.gz")
    rows = run_batch(det, inp, out, log=lambda m: None)
    assert [r["status"] for r in rows] == [STATUS_DONE, STATUS_DONE]


@pytest.mark.parametrize("damage", ["cut", "empty", "same_size"])
def test_resume_recomputes_a_case_whose_outputs_were_damaged(det, tmp_path, damage):
    inp = tmp_path / "in"
    _phantom(inp / "a.nii.gz", 1)
    out = tmp_path / "out"
    first = run_batch(det, inp, out)
    target = out / ("a_heatmap.nii.gz" if damage != "empty" else "a_labelmap.nii.gz")
    data = target.read_bytes()
    if damage == "cut":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        target.write_bytes(b"")
    else:  # one byte changed, size kept
        target.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    with pytest.raises(HiMatchADError, match="changed or damaged"):
        load_result(out / "a_scores.json")
    rows = run_batch(det, inp, out, log=lambda m: None)
    assert [r["status"] for r in rows] == [STATUS_OK]
    assert "changed or damaged after it was written" in rows[0]["message"]
    assert rows[0]["volume_score"] == first[0]["volume_score"]
    assert load_result(out / "a_scores.json").anomalous_voxels == first[0]["anomalous_voxels"]


def test_a_dicom_series_given_as_the_input_folder_is_one_case(det, tmp_path):
    series = _dicom_series(tmp_path / "series1", 4)
    rows = run_batch(det, series, tmp_path / "out")
    assert [(r["case"], r["status"], r["heatmap"]) for r in rows] == [(".", STATUS_OK, "series1_heatmap.nii.gz")]
    assert (tmp_path / "out" / "series1_scores.json").exists()


def test_an_unfitted_detector_is_refused(tiny_model, tmp_path):
    from HiMatchADLib import HiMatchDetector

    _phantom(tmp_path / "in" / "a.nii.gz", 1)
    with pytest.raises(HiMatchADError, match="call fit"):
        run_batch(HiMatchDetector(model=tiny_model, resolution=RESOLUTION), tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()
