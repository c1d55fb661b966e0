"""What the worker tells the Slicer panel about models and devices: an ``error`` event carries the
structured fields of a ModelAccessError (the client raises it again with them), and ``ping``
answers with the devices torch finds and whether a Hugging Face token is available."""

from __future__ import annotations

import json

import pytest

from conftest import RESOLUTION
from HiMatchADLib import HiMatchADError, ModelAccessError
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.worker.client import WorkerClient, WorkerError, error_from_event
from HiMatchADLib.worker.server import Worker

TOKEN = "hf_WORKERtestTOKEN000000000000000"


class _Detector:
    """A detector whose model cannot be loaded from the Hub."""

    def __init__(self, **settings):
        self.settings = settings

    def check_query(self, path):
        return path

    def set_progress(self, progress):
        pass

    def fit(self, normals):
        raise ModelAccessError(
            "gated", "facebook/dinov3-vits16-pretrain-lvd1689m", detail="You are trying to access a gated repo.",
            url="https://huggingface.co/facebook/dinov3-vits16-pretrain-lvd1689m", alternative="facebook/dinov2-small",
            alternative_label="DINOv2 ViT-S/14", alternative_licence="Apache-2.0", token_present=False,
        )


def _request(tmp_path):
    case = tmp_path / "case.nii.gz"
    case.write_bytes(b"")
    (tmp_path / "normals").mkdir()
    return {"id": "7", "cmd": "detect", "input": str(case), "normals": str(tmp_path / "normals"),
            "out_dir": str(tmp_path / "out"), "settings": {"cache_dir": str(tmp_path / "cache")}}


def test_error_event_carries_the_model_access_fields(tmp_path):
    events = []
    worker = Worker(events.append, detector_factory=lambda cache_dir=None: _Detector(cache_dir=cache_dir))
    assert worker.handle(_request(tmp_path)) is True  # the worker keeps serving
    (event,) = [json.loads(json.dumps(e)) for e in events]  # what goes through the pipe
    assert event["event"] == "error" and event["id"] == "7"
    access = event["model_access"]
    assert access["kind"] == "gated" and access["alternative"] == "facebook/dinov2-small"
    assert access["url"] == "https://huggingface.co/facebook/dinov3-vits16-pretrain-lvd1689m"
    assert "Model selector" in access["panel_message"] and event["message"] == access["message"]
    assert worker.detectors == {}  # a detector whose model never loaded is not kept

    err = error_from_event(event)
    assert isinstance(err, ModelAccessError) and err.kind == "gated" and err.alternative == "facebook/dinov2-small"
    assert err.hint("panel") == access["panel_hint"]
    assert type(error_from_event({"event": "error", "message": "bad path"})) is HiMatchADError
    assert isinstance(error_from_event({"event": "error", "message": "gone", "crashed": True}), WorkerError)


def test_ping_lists_the_devices_and_the_token_status_without_the_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    events = []
    Worker(events.append).handle({"id": "p", "cmd": "ping"})
    (done,) = events
    assert done["event"] == "done"
    assert done["devices"][0] == {"device": "cpu", "kind": "cpu", "label": "cpu"}
    assert all({"device", "kind", "label"} <= set(d) for d in done["devices"])
    assert done["hub_token"]["available"] is True and done["hub_token"]["source"] == "environment"
    assert TOKEN not in json.dumps(done)


def test_real_worker_reports_a_model_it_cannot_download(tmp_path, normals_dir, lesion_case):
    """Through the process and the pipe: offline, an uncached Hub id is a ModelAccessError again in the client."""
    img, _ = lesion_case
    case = write_image(img.array, img.geometry, tmp_path / "case.nii.gz")
    client = WorkerClient(env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""})
    try:
        with pytest.raises(ModelAccessError) as info:
            client.request({
                "cmd": "detect", "input": str(case), "normals": str(normals_dir), "out_dir": str(tmp_path / "out"),
                "settings": {"model": "facebook/dinov3-vitb16-pretrain-lvd1689m", "resolution": RESOLUTION,
                             "cache_dir": str(tmp_path / "cache"), "device": "cpu"},
            }, timeout=300)
        err = info.value
        assert err.kind == "offline" and err.offline_mode and err.model == "facebook/dinov3-vitb16-pretrain-lvd1689m"
        assert "Local folder…" in err.message("panel")
        pong = client.request({"cmd": "ping"}, timeout=120)  # still serving
        assert pong["devices"][0]["device"] == "cpu" and pong["hub_token"]["available"] is False
    finally:
        client.cancel()
