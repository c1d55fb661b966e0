"""The worker's ``mark_normal`` request and ``feedback_dir`` / ``use_feedback`` on detect: what the
Slicer panel's "Mark as normal" and its undo rely on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import RESOLUTION
from HiMatchADLib.bank.feedback import read_entries, remove_entry
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.outputs.files import load_result
from HiMatchADLib import HiMatchADError
from HiMatchADLib.worker.client import WorkerClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detector"))
from test_feedback import _case  # noqa: E402

TIMEOUT = 300


@pytest.fixture
def client():
    c = WorkerClient()
    yield c
    c.cancel()


def test_mark_normal_then_detect_uses_it_and_undo_restores_the_map(client, tiny_model, cache_dir, normals_dir, tmp_path):
    settings = {"model": tiny_model, "method": "knn", "k": 4, "resolution": RESOLUTION, "cache_dir": str(cache_dir)}
    case, art, les = _case(tmp_path / "case.nii.gz", 1000)
    fb = tmp_path / "feedback"
    common = {"normals": str(normals_dir), "settings": settings, "feedback_dir": str(fb)}

    def detect(out):
        rid = client.send({"cmd": "detect", "input": str(case), "out_dir": str(tmp_path / out), **common})
        done = client.wait(rid, timeout=TIMEOUT)
        return done, load_result(done["scores"])

    first, r0 = detect("a")
    assert first["feedback"] == []
    region = write_image(art.astype(np.uint8), read_image(case).geometry, tmp_path / "region.nii.gz")
    rid = client.send({"cmd": "mark_normal", "input": str(case), "region": str(region), "note": "stripes", **common})
    done = client.wait(rid, timeout=TIMEOUT)
    entry = done["entry"]
    assert done["feedback_folder"] == str(fb) and entry["region"]["slices"] == [3, 4, 5] and entry["note"] == "stripes"
    assert "labelmap" not in entry["region"]  # the client's temporary file is not recorded
    assert [e.id for e in read_entries(fb)] == [entry["id"]]
    second, r1 = detect("b")
    assert second["feedback"] == [entry["id"]] and r1.provenance["feedback"][0]["id"] == entry["id"]
    assert np.percentile(r1.heatmap[art], 99) < r1.threshold < np.percentile(r0.heatmap[art], 99)
    rid = client.send({"cmd": "detect", "input": str(case), "out_dir": str(tmp_path / "c"), **common, "use_feedback": False})
    np.testing.assert_array_equal(load_result(client.wait(rid, timeout=TIMEOUT)["scores"]).heatmap, r0.heatmap)
    remove_entry(fb, entry["id"])  # the panel's undo: the same worker, no restart
    third, r2 = detect("d")
    assert third["feedback"] == []
    np.testing.assert_array_equal(r2.heatmap, r0.heatmap)
    # mistakes are errors of the request; the worker goes on
    with pytest.raises(HiMatchADError, match="say what is normal"):
        client.request({"cmd": "mark_normal", "input": str(case), **common}, timeout=TIMEOUT)
    with pytest.raises(HiMatchADError, match="'slices' must be a list"):
        client.request({"cmd": "mark_normal", "input": str(case), "slices": "3-5", **common}, timeout=TIMEOUT)
    assert detect("e")[0]["feedback"] == []
