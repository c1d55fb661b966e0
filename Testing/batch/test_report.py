"""report.html, the cohort page of a batch: one row per case in the embedded data, reasons of failed
and skipped cases, escaping, relative links to files that exist, the histogram's threshold, the
random-weights banner, disagreements between cases, ``himatchad report`` and run_batch writing it."""

from __future__ import annotations

import csv
import importlib
import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from conftest import one_error_line
from HiMatchADLib.batch import STATUS_DONE, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, run_batch
from HiMatchADLib.batch.report import REPORT_NAME, embed_json, histogram_svg, read_summary, write_report
from HiMatchADLib.cli.main import main
from HiMatchADLib.core.errors import HiMatchADError
from HiMatchADLib.io.writers import write_image

CSV_COLUMNS = (
    "case", "input", "status", "volume_score", "threshold", "anomalous_voxels", "anomalous_volume_mm3",
    "most_anomalous_slice", "heatmap", "labelmap", "scores", "seconds", "message",
)

EVIL = 'a<b>&"c'
SCRIPT_MESSAGE = "bad header </script><script>window.pwned = 1</script>"


def _png(path: Path, colour=(200, 40, 40), size=(24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")


def scores_json(name: str, score: float, *, calibrated: float = 0.25, model: str = "facebook/dinov3-vits16-pretrain-lvd1689m",
                digest: str = "sha256:abc", random_weights: bool = False, is_2d: bool = False, sigma: float = 4.0,
                picture: str = "overview") -> dict:
    """A scores JSON with the keys the report reads (the layout of DetectionResult.to_dict + save_result)."""
    settings = {"version": "0.1.0", "method": "himatch", "model": model, "k": 4, "sigma": sigma, "resolution": 224}
    outputs = {"heatmap": f"{name}_heatmap.nii.gz", "labelmap": f"{name}_labelmap.nii.gz", "scores": f"{name}_scores.json",
               picture: f"{name}_{picture}.png"}
    return {
        "name": name, "method": "himatch", "model": model, "volume_score": score, "threshold": 0.3,
        "threshold_info": {"mode": "auto", "target_fpr": 0.01, "calibrated_threshold": calibrated},
        "anomalous_voxels": 10, "anomalous_volume_mm3": 20.0, "most_anomalous_slice": 3, "slice_scores": [0.1, 0.2],
        "geometry": {"is_2d": is_2d}, "settings": settings, "outputs": outputs, "complete": True,
        "provenance": {
            "format": 1, "tool": "himatchad", "version": "0.1.0", "method": "himatch", "method_revision": 2,
            "libraries": {"python": "3.11", "torch": "2.5"}, "platform": "Linux", "device": "cpu", "device_name": None,
            "precision": "fp32",
            "model": {"id": model, "weights_digest": digest, "licence": "DINOv3 License", "fingerprint": "f",
                      "random_weights": random_weights},
            "bank": {"digest": "d", "folder": "/normals", "files": 5, "slices": 80}, "settings": settings,
        },
    }


def make_cohort(out: Path, n_ok: int = 3, *, overview_column: bool = True, random_weights: bool = False,
                other_model: bool = False, extra: tuple = ()) -> list:
    """An output folder as a batch leaves it: ``n_ok`` finished cases (maps, scores JSON, picture), one
    failed and one skipped row, a case named ``a<b>&"c`` in a sub-folder with a space; summary.csv."""
    rows = []
    names = [(f"sub dir/case#{i}" if i == 1 else f"case{i:03d}") for i in range(n_ok)] + [f"sub dir/{EVIL}", *extra]
    for i, rel in enumerate(names):
        folder, name = (rel.rsplit("/", 1) if "/" in rel else ("", rel))
        base = out / folder
        base.mkdir(parents=True, exist_ok=True)
        is_2d = i == 0
        picture = "overlay" if is_2d else "overview"
        model = "facebook/dinov2-small" if other_model and i == 1 else "facebook/dinov3-vits16-pretrain-lvd1689m"
        data = scores_json(name, round(0.5 + 0.7 * ((i * 7) % 5), 3), random_weights=random_weights, is_2d=is_2d,
                           picture=picture, model=model, digest="sha256:other" if model.endswith("small") else "sha256:abc")
        (base / f"{name}_scores.json").write_text(json.dumps(data), encoding="utf-8")
        for key in ("heatmap", "labelmap"):
            (base / f"{name}_{key}.nii.gz").write_bytes(b"\x1f\x8b")
        _png(base / f"{name}_{picture}.png", colour=(40 * i % 255, 120, 200))
        prefix = f"{folder}/" if folder else ""
        row = {c: "" for c in CSV_COLUMNS}
        row.update(
            case=f"{rel}.nii.gz", input=f"/data/{rel}.nii.gz", status=STATUS_DONE if i == 2 else STATUS_OK,
            volume_score=data["volume_score"], threshold=0.3, anomalous_voxels=10, anomalous_volume_mm3=20.0,
            most_anomalous_slice=3, heatmap=f"{prefix}{name}_heatmap.nii.gz", labelmap=f"{prefix}{name}_labelmap.nii.gz",
            scores=f"{prefix}{name}_scores.json", seconds=1.5 + i,
        )
        if overview_column:
            row["overview"] = f"{prefix}{name}_{picture}.png"
        rows.append(row)
    failed = {c: "" for c in CSV_COLUMNS}
    failed.update(case="broken.nii.gz", input="/data/broken.nii.gz", status=STATUS_FAILED, seconds=0.01, message=SCRIPT_MESSAGE)
    skipped = {c: "" for c in CSV_COLUMNS}
    skipped.update(case="dicom/localizer", input="/data/dicom/localizer", status=STATUS_SKIPPED,
                   message="a localizer series (3 slices in 3 orientations): not a volume")
    rows += [failed, skipped]
    columns = list(CSV_COLUMNS) + (["overview"] if overview_column else [])
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


def page_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def test_one_row_per_case_with_reasons_and_counts(tmp_path):
    rows = make_cohort(tmp_path, n_ok=3)
    path = write_report(tmp_path)
    assert path == tmp_path / REPORT_NAME
    page = path.read_text(encoding="utf-8")
    data = page_data(page)
    assert [r["case"] for r in data["rows"]] == [r["case"] for r in rows]
    by_case = {r["case"]: r for r in data["rows"]}
    assert by_case["broken.nii.gz"]["status"] == STATUS_FAILED and by_case["broken.nii.gz"]["message"] == SCRIPT_MESSAGE
    assert by_case["dicom/localizer"]["message"].startswith("a localizer series")
    assert by_case["case000.nii.gz"]["volume_score"] == float(rows[0]["volume_score"])
    assert by_case["case000.nii.gz"]["size"] == "0.20 cm²"  # a 2D input: an area
    assert by_case["case002.nii.gz"]["size"] == "0.02 mL"
    assert data["statuses"] == [STATUS_OK, STATUS_DONE, STATUS_FAILED, STATUS_SKIPPED]
    counts = json.loads(re.search(r'data-counts="([^"]*)"', page).group(1).replace("&quot;", '"'))
    assert counts == {STATUS_OK: 3, STATUS_DONE: 1, STATUS_FAILED: 1, STATUS_SKIPPED: 1}
    assert str(tmp_path) in page  # the output folder in the header


def test_data_strings_are_escaped_in_the_page_and_the_embedded_json(tmp_path):
    make_cohort(tmp_path)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert EVIL not in page
    assert "window.pwned" in page and page.count("</script>") == 2  # only the page's own two script elements end
    assert "<script>window.pwned" not in page
    names = [r["case"] for r in page_data(page)["rows"]]
    assert f"sub dir/{EVIL}.nii.gz" in names  # and read back exactly
    assert embed_json({"x": "</script><!--&\u2028"}) == '{"x":"\\u003c/script\\u003e\\u003c!--\\u0026\\u2028"}'


@pytest.mark.parametrize("overview_column", [True, False])
def test_relative_links_name_existing_files(tmp_path, overview_column):
    make_cohort(tmp_path, overview_column=overview_column)
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    finished = [r for r in data["rows"] if r["status"] in (STATUS_OK, STATUS_DONE)]
    assert len(finished) == 4
    for r in finished:
        assert r["picture"] and set(r["links"]) == {"heatmap", "labelmap", "scores"}
        for href in [r["picture"], *r["links"].values()]:
            assert "#" not in href and '"' not in href and "<" not in href and " " not in href  # quoted for a URL
            assert (tmp_path / unquote(href)).is_file(), href
    evil = next(r for r in finished if EVIL in r["case"])
    assert unquote(evil["picture"]) == f"sub dir/{EVIL}_overview.png"
    assert next(r for r in finished if r["case"] == "case000.nii.gz")["picture"] == "case000_overlay.png"
    failed = [r for r in data["rows"] if r["status"] == STATUS_FAILED]
    assert failed[0]["picture"] == "" and failed[0]["links"] == {}


def test_a_missing_output_is_not_linked_and_an_unreadable_json_is_noted(tmp_path):
    make_cohort(tmp_path, overview_column=False)
    (tmp_path / "case002_heatmap.nii.gz").unlink()
    (tmp_path / "case002_overview.png").unlink()
    (tmp_path / "sub dir" / "case#1_scores.json").write_text("{ cut", encoding="utf-8")
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    by_case = {r["case"]: r for r in data["rows"]}
    assert "heatmap" not in by_case["case002.nii.gz"]["links"] and by_case["case002.nii.gz"]["picture"] == ""
    assert "scores JSON cannot be read" in by_case["sub dir/case#1.nii.gz"]["note"]


def test_histogram_marks_the_calibrated_threshold(tmp_path):
    make_cohort(tmp_path)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    data = page_data(page)
    assert data["threshold"] == 0.25  # threshold_info.calibrated_threshold, not the rows' threshold (0.3)
    assert float(re.search(r'id="threshold-line" data-threshold="([^"]+)"', page).group(1)) == 0.25
    scores = [r["volume_score"] for r in data["rows"] if r["volume_score"] is not None]
    svg = histogram_svg(scores, 0.25)
    bars = re.findall(r"<title>[^<]*: (\d+) cases?</title></rect>", svg)
    assert sum(map(int, bars)) == len(scores) == 4
    assert f"{len(scores)} cases above it" in svg
    assert "threshold-line" not in histogram_svg(scores, None)
    assert "No volume scores" in histogram_svg([], 0.25)


def test_random_weights_banner_present_only_for_a_random_model(tmp_path):
    make_cohort(tmp_path / "real")
    make_cohort(tmp_path / "random", random_weights=True)
    assert 'id="random-weights-banner"' not in write_report(tmp_path / "real").read_text(encoding="utf-8")
    page = write_report(tmp_path / "random").read_text(encoding="utf-8")
    assert 'id="random-weights-banner"' in page and "4 of 4 finished cases were computed with a random" in page


def test_cases_that_disagree_on_the_model_are_listed(tmp_path):
    make_cohort(tmp_path / "same")
    make_cohort(tmp_path / "mixed", other_model=True)
    same = write_report(tmp_path / "same").read_text(encoding="utf-8")
    assert 'id="agreement"' in same and 'id="disagreement"' not in same
    mixed = write_report(tmp_path / "mixed").read_text(encoding="utf-8")
    section = mixed[mixed.index('id="disagreement"'):mixed.index("</div>", mixed.index('id="disagreement"'))]
    assert "facebook/dinov2-small" in section and "sha256:other" in section and "sha256:abc" in section
    assert "<code>model</code>" in section  # the settings that differ, too


def test_rows_given_directly_and_no_summary(tmp_path):
    rows = make_cohort(tmp_path)
    (tmp_path / "summary.csv").unlink()
    with pytest.raises(HiMatchADError, match="no summary.csv"):
        read_summary(tmp_path)
    data = page_data(write_report(tmp_path, rows[:2]).read_text(encoding="utf-8"))
    assert [r["case"] for r in data["rows"]] == [r["case"] for r in rows[:2]]


def test_report_command_remakes_the_page_and_prints_its_path(tmp_path, capsys):
    make_cohort(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / REPORT_NAME) and out.err == ""
    assert len(page_data((tmp_path / REPORT_NAME).read_text(encoding="utf-8"))["rows"]) == 6


def test_report_command_on_a_folder_without_summary_is_one_error_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert "summary.csv" in one_error_line(out.err) and "Traceback" not in out.err
    assert not (tmp_path / REPORT_NAME).exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in one_error_line(capsys.readouterr().err)


@pytest.fixture()
def batch_inputs(lesion_case, tmp_path):
    img, _ = lesion_case
    inp = tmp_path / "in"
    inp.mkdir()
    write_image(img.array, img.geometry, inp / "case.nii.gz")
    (inp / "junk.nii.gz").write_text("not an image")
    return inp


def test_run_batch_writes_the_report(fitted, batch_inputs, tmp_path):
    out = tmp_path / "out"
    logged = []
    rows = run_batch(fitted("knn"), batch_inputs, out, log=logged.append, outputs=("overview",))
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    data = page_data(page)
    assert [r["case"] for r in data["rows"]] == [r["case"] for r in rows] == ["case.nii.gz", "junk.nii.gz"]
    ok, bad = data["rows"]
    assert ok["status"] == STATUS_OK and ok["volume_score"] == pytest.approx(rows[0]["volume_score"])
    assert bad["status"] == STATUS_FAILED and "cannot read" in bad["message"]
    scores = json.loads((out / rows[0]["scores"]).read_text())
    assert data["threshold"] == pytest.approx(scores["threshold_info"]["calibrated_threshold"])
    assert 'id="random-weights-banner"' in page  # the tiny test model is a random stand-in
    assert ok["picture"] == "case_overview.png" and (out / ok["picture"]).is_file()
    assert set(ok["links"]) == {"heatmap", "labelmap", "scores"} and all((out / v).is_file() for v in ok["links"].values())
    assert not any("report.html" in m for m in logged)
    run_batch(fitted("knn"), batch_inputs, tmp_path / "no-report", report=False, log=logged.append)
    assert not (tmp_path / "no-report" / REPORT_NAME).exists()


def test_a_report_that_cannot_be_written_is_a_warning_not_a_crash(fitted, batch_inputs, tmp_path, monkeypatch):
    runner = importlib.import_module("HiMatchADLib.batch.runner")

    def fail(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / REPORT_NAME))

    monkeypatch.setattr(runner, "write_report", fail)
    logged = []
    rows = run_batch(fitted("knn"), batch_inputs, tmp_path / "out", log=logged.append)
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_FAILED]
    notes = [m for m in logged if m.startswith("report.html not written: ")]
    assert len(notes) == 1 and "Permission denied" in notes[0] and "\n" not in notes[0]
