"""The overview picture in a batch: written beside the maps and listed in the scores JSON and the
summary; a rerun that lacks it makes it from the saved outputs without computing the maps again; a
2D input's picture is its overlay."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from HiMatchADLib import HiMatchADError
from HiMatchADLib.batch import STATUS_DONE, STATUS_OK, run_batch
from HiMatchADLib.core.digest import files_digest
from HiMatchADLib.detector.overview import add_overview, display_volume
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.outputs.files import is_complete, load_result

SHAPE = (8, 48, 48)


def _inputs(folder: Path) -> Path:
    for i, name in enumerate(("a.nii.gz", "sub/b.nii.gz")):
        img, _ = make_phantom(SHAPE, seed=40 + i, lesion=i == 0, lesion_radius=0.35)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_image(img.array, img.geometry, folder / name)
    slice2d = (make_phantom(SHAPE, seed=45)[0].array[4] / 10).clip(0, 255).astype(np.uint8)
    PILImage.fromarray(slice2d).save(folder / "flat.png")
    return folder


def _rows(out: Path) -> dict:
    import csv

    with (out / "summary.csv").open(newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def test_batch_writes_the_overview_and_a_rerun_makes_a_missing_one_from_the_saved_outputs(fitted, tmp_path, monkeypatch):
    det = fitted("knn")
    inp = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    rows = run_batch(det, inp, out, log=lambda m: None, outputs=("overview",))
    assert [r["status"] for r in rows] == [STATUS_OK] * 3
    table = _rows(out)
    assert table["a.nii.gz"]["overview"] == "a_overview.png"
    assert table["sub/b.nii.gz"]["overview"] == "sub/b_overview.png"
    assert table["flat.png"]["overview"] == "flat_overlay.png"  # a 2D input's picture is its overlay
    assert not (out / "flat_overview.png").exists()
    data = json.loads((out / "a_scores.json").read_text())
    assert data["outputs"]["overview"] == "a_overview.png"
    assert data["output_digests"]["overview"] == files_digest([out / "a_overview.png"])
    first = (out / "a_overview.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"

    # The picture deleted, its listing removed: a rerun makes it again from the saved maps.
    heat_before = (out / "a_heatmap.nii.gz").read_bytes()
    (out / "a_overview.png").unlink()
    data["outputs"].pop("overview")
    data["output_digests"].pop("overview")
    (out / "a_scores.json").write_text(json.dumps(data))
    calls = []
    monkeypatch.setattr(type(det), "predict", lambda self, *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("recomputed")))
    rows = run_batch(det, inp, out, log=lambda m: None, outputs=("overview",))
    assert calls == [] and [r["status"] for r in rows] == [STATUS_DONE] * 3
    row = {r["case"]: r for r in rows}["a.nii.gz"]
    assert "overview picture made from the saved outputs" in row["message"] and row["overview"] == "a_overview.png"
    assert (out / "a_heatmap.nii.gz").read_bytes() == heat_before  # the maps were not rewritten
    again = json.loads((out / "a_scores.json").read_text())
    assert again["outputs"]["overview"] == "a_overview.png" and is_complete(out, "a")
    # The same picture as the one drawn from the result in memory (same image, same maps).
    assert np.array_equal(np.asarray(PILImage.open(out / "a_overview.png")), np.asarray(PILImage.open(io.BytesIO(first))))
    assert _rows(out)["a.nii.gz"]["overview"] == "a_overview.png"


def test_add_overview_reads_the_given_input_and_refuses_a_2d_result(fitted, tmp_path):
    det = fitted("knn")
    inp = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    run_batch(det, inp, out, log=lambda m: None)  # no overview asked for
    assert not list(out.rglob("*_overview.png"))
    assert _rows(out)["a.nii.gz"]["overview"] == ""
    assert _rows(out)["flat.png"]["overview"] == "flat_overlay.png"
    scores = out / "a_scores.json"
    data = json.loads(scores.read_text())
    data["input"] = str(tmp_path / "gone.nii.gz")  # the recorded path no longer exists
    scores.write_text(json.dumps(data))
    with pytest.raises(HiMatchADError, match="needed for its overview picture and was not found"):
        add_overview(scores)
    assert "overview" not in json.loads(scores.read_text())["outputs"]  # nothing half-done
    path = add_overview(scores, inp / "a.nii.gz")  # the case's input given: the picture is made
    assert path.name == "a_overview.png" and json.loads(scores.read_text())["outputs"]["overview"] == path.name
    assert is_complete(out, "a")
    with pytest.raises(HiMatchADError, match="2D result has no overview"):
        add_overview(out / "flat_scores.json")


def test_display_volume_from_the_kept_input_equals_the_file_read_again(fitted, tmp_path):
    det = fitted("knn")
    img, _ = make_phantom(SHAPE, seed=7, lesion=True, lesion_radius=0.35)
    write_image(img.array, img.geometry, tmp_path / "c.nii.gz")
    res = det.predict(tmp_path / "c.nii.gz")
    kept = display_volume(res)
    again = display_volume(res, read_image(tmp_path / "c.nii.gz"))
    np.testing.assert_array_equal(kept, again)
    assert kept.dtype == np.float32 and 0.0 <= kept.min() and kept.max() <= 1.0 and kept.max() > 0.5
    paths = det.save(res, tmp_path / "o", outputs=("overview",))
    assert getattr(res, "display_image", None) is None  # the float copy is not kept after writing
    assert paths["overview"].is_file()
    loaded = load_result(paths["scores"])
    assert loaded.provenance["model"]["random_weights"] is True  # the tiny test model is a random stand-in
