"""The worker serves detect requests with a bank file ("bank") instead of "normals"; exactly one."""

from __future__ import annotations

import numpy as np

from HiMatchADLib.worker.server import Worker


def test_detect_with_a_bank_file_and_reuse(fitted, lesion_case, tmp_path):
    from HiMatchADLib.io.writers import write_image

    img, _ = lesion_case
    case = write_image(img.array, img.geometry, tmp_path / "case.nii.gz")
    ref = fitted("himatch")
    bank = ref.export_bank(tmp_path / "b.himatchad-bank")
    events = []
    w = Worker(events.append)
    settings = {"model": ref.model, "cache_dir": str(tmp_path / "cache")}
    for n in (1, 2):
        w.handle({"id": n, "cmd": "detect", "input": str(case), "bank": str(bank), "out_dir": str(tmp_path / f"o{n}"), "settings": settings})
    done = [e for e in events if e.get("event") == "done"]
    assert [e["id"] for e in done] == [1, 2], events
    assert done[1]["reused"] and not done[0]["reused"]
    assert np.isclose(done[0]["threshold"], ref.calibration["threshold"])
    w.handle({"id": 3, "cmd": "detect", "input": str(case), "bank": str(bank), "normals": "n", "out_dir": str(tmp_path / "o3"), "settings": settings})
    w.handle({"id": 4, "cmd": "detect", "input": str(case), "bank": str(tmp_path / "none.himatchad-bank"), "out_dir": str(tmp_path / "o4"), "settings": settings})
    # a request's settings are what it asks: one the bank fixes otherwise is refused, naming it
    w.handle({"id": 5, "cmd": "detect", "input": str(case), "bank": str(bank), "out_dir": str(tmp_path / "o5"), "settings": {**settings, "resolution": 448}})
    errors = {e["id"]: e for e in events if e.get("event") == "error"}
    assert "resolution 128 (asked: 448)" in errors[5]["message"]
    assert "exactly one of 'normals'" in errors[3]["message"]
    assert "bank file not found" in errors[4]["message"] and not errors[4].get("internal")


def test_batch_with_a_bank_file(fitted, lesion_case, tmp_path):
    from HiMatchADLib.io.writers import write_image

    img, _ = lesion_case
    write_image(img.array, img.geometry, tmp_path / "in" / "case.nii.gz")
    ref = fitted("knn")
    bank = ref.export_bank(tmp_path / "knn.himatchad-bank")
    events = []
    Worker(events.append).handle(
        {"id": 1, "cmd": "batch", "input_dir": str(tmp_path / "in"), "bank": str(bank), "out_dir": str(tmp_path / "out"), "settings": {"model": ref.model}}
    )
    done = [e for e in events if e.get("event") in ("done", "error")]
    assert done[-1]["event"] == "done" and done[-1]["counts"]["ok"] == 1, done
    got = ref.predict(img)
    from HiMatchADLib.io.readers import read_image

    assert np.array_equal(read_image(tmp_path / "out" / "case_heatmap.nii.gz").array, got.heatmap)
