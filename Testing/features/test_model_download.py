"""Model download from the Hub with progress and cancel: a Hub id not (completely) in the local
Hugging Face cache is fetched with ``snapshot_download`` (only what transformers needs), its MB
reported through the detector's reporter, cancellable at every chunk; then transformers loads it
from the cache. The Hub is :class:`fake_hub.FakeHub` (an ``httpx2.MockTransport``): no network.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from HiMatchADLib import ModelAccessError
from HiMatchADLib.core.errors import Cancelled
from HiMatchADLib.core.progress import Reporter
from HiMatchADLib.features import backbone

from fake_hub import FakeHub

REPO_ID = "someone/tiny-dinov3"
MSG = f"Downloading model {REPO_ID}"


class Stop:
    """A cancel event that is set once the download has reported ``at`` MB."""

    def __init__(self, at: int):
        self.at, self.flag = at, threading.Event()

    def is_set(self) -> bool:
        return self.flag.is_set()


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_model):
    """The fake Hub serving the tiny model (and files the loader must not fetch), an empty
    Hugging Face cache, online mode; restored afterwards."""
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as hub_http

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)  # many chunks of the 5 MB weights
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hub_http.time, "sleep", lambda s: None)
    fake = FakeHub()
    fake.add_repo(REPO_ID, tiny_model, extra={
        "preprocessor_config.json": json.dumps({"image_processor_type": "DINOv3ViTImageProcessorFast"}).encode(),
        "pytorch_model.bin": b"\0" * 3_000_000,  # safetensors exist: never fetched
        "README.md": b"# tiny",
        "onnx/model.onnx": b"\0" * 1000,
    })
    old = hub_http._GLOBAL_CLIENT_FACTORY
    fake.install()
    saved = dict(backbone._MODEL_CACHE)
    backbone._MODEL_CACHE.clear()
    yield fake
    backbone._MODEL_CACHE.clear()
    backbone._MODEL_CACHE.update(saved)
    hub_http.set_client_factory(old)


def expected_total(tiny_model) -> int:
    size = sum((Path(tiny_model) / f).stat().st_size for f in ("config.json", "model.safetensors")) + len(
        json.dumps({"image_processor_type": "DINOv3ViTImageProcessorFast"}))
    return -(-size // 1_000_000)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)


def blobs(tmp_path) -> list:
    return sorted(p.name for p in (tmp_path / "hub-cache").rglob("*") if p.is_file() and "blobs" in p.parts)


def test_a_download_reports_its_mb_from_zero_to_the_total_and_fetches_only_what_transformers_needs(hub, tiny_model, tmp_path):
    events = []
    net, info = backbone.load_backbone(REPO_ID, "cpu", reporter=lambda *e: events.append(e))
    total = expected_total(tiny_model)
    assert total >= 4 and all(m == MSG and t == total for m, _, t in events)
    done = [d for _, d, _ in events]
    assert done[0] == 0 and done[-1] == total and done == sorted(done) and len(set(done)) == len(done)
    assert len(done) > 2 and max(done[:-1]) < total  # steps in between; the end only once all is written
    got = sorted(p.split("/resolve/")[1].split("/", 1)[1] for m, p in hub.requests if m == "GET" and "/resolve/" in p)
    assert got == ["config.json", "model.safetensors", "preprocessor_config.json"]
    ours = [r for r in hub.requests if REPO_ID in r[1]]  # (huggingface_hub also asks for its agent list once a day)
    assert len(ours) == 3 + 2 * 3  # model info (sizes), repo info, tree; HEAD + GET per file: no storms
    local, _ = backbone.load_backbone(tiny_model, "cpu")
    assert same_weights(net, local) and info["model"] == REPO_ID and info["num_layers"] == 4
    assert backbone.cached_snapshot(REPO_ID) is not None


def test_a_cached_model_loads_without_a_request_or_a_download_report(hub):
    backbone.load_backbone(REPO_ID, "cpu")
    backbone._MODEL_CACHE.clear()
    hub.requests.clear()
    events = []
    net, _ = backbone.load_backbone(REPO_ID, "cpu", reporter=lambda *e: events.append(e))
    assert events == [] and hub.requests == []  # transformers too reads only the cache
    assert backbone.download_model(REPO_ID) is False


def test_a_cancel_during_the_download_stops_it_and_the_next_call_completes_it(hub, tiny_model, tmp_path):
    stop = Stop(at=1)
    events = []

    def progress(message, done, total):
        events.append(done)
        if done >= stop.at:
            stop.flag.set()

    with pytest.raises(Cancelled):
        backbone.load_backbone(REPO_ID, "cpu", reporter=Reporter(progress, stop))
    total = expected_total(tiny_model)
    assert events[-1] < total  # stopped before the end
    assert backbone.cached_snapshot(REPO_ID) is None  # nothing that looks like a complete model
    for blob in (tmp_path / "hub-cache").rglob("blobs/*"):  # every blob in place is whole (named by its sha256)
        if not blob.name.endswith(".incomplete"):  # (huggingface_hub 2 removes a cut file; earlier ones kept it to resume)
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    snapshot = next((tmp_path / "hub-cache").rglob("snapshots/*"), None)
    assert snapshot is None or not (snapshot / "model.safetensors").exists()
    assert REPO_ID not in {k[0] for k in backbone._MODEL_CACHE}

    events.clear()
    net, _ = backbone.load_backbone(REPO_ID, "cpu", reporter=lambda m, d, t: events.append((d, t)))
    assert events[0][0] == 0 and events[-1][0] == events[-1][1] > 0  # the missing files, downloaded
    local, _ = backbone.load_backbone(tiny_model, "cpu")
    assert same_weights(net, local)


def test_a_gated_repository_during_the_download_is_a_gated_model_access_error(hub, tmp_path):
    hub.modes[REPO_ID] = "gated"  # the metadata answers, the files are refused
    with pytest.raises(ModelAccessError) as info:
        backbone.load_backbone(REPO_ID, "cpu", reporter=lambda *e: None)
    err = info.value
    assert err.kind == "gated" and err.url == f"https://huggingface.co/{REPO_ID}" and type(err.__cause__).__name__ == "GatedRepoError"
    assert blobs(tmp_path) == [] and backbone.cached_snapshot(REPO_ID) is None


@pytest.mark.parametrize("mode, kind", [("not_found", "not_found"), ("connect", "offline")])
def test_other_hub_failures_are_classified_as_for_a_load(hub, mode, kind):
    hub.modes[REPO_ID] = mode
    with pytest.raises(ModelAccessError) as info:
        backbone.load_backbone(REPO_ID, "cpu")
    assert info.value.kind == kind


def test_offline_mode_and_local_folders_download_nothing(hub, tiny_model, monkeypatch):
    events = []
    backbone.load_backbone(tiny_model, "cpu", reporter=lambda *e: events.append(e))
    assert hub.requests == [] and events == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelAccessError) as info:
        backbone.load_backbone(REPO_ID, "cpu", reporter=lambda *e: events.append(e))
    assert info.value.kind == "offline" and info.value.offline_mode is True
    assert hub.requests == [] and events == []


def test_files_to_download_prefers_safetensors_and_keeps_shards():
    names = ["config.json", "model.safetensors", "pytorch_model.bin", "README.md", "onnx/model.onnx"]
    assert backbone.files_to_download(names) == ["config.json", "model.safetensors"]
    sharded = ["config.json", "preprocessor_config.json", "model.safetensors.index.json",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin"]
    assert backbone.files_to_download(sharded) == ["config.json", "preprocessor_config.json", "model.safetensors.index.json",
                                                   "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert backbone.files_to_download(["config.json", "pytorch_model.bin", ".gitattributes"]) == ["config.json", "pytorch_model.bin"]


def test_a_repository_without_transformers_weights_is_refused(hub, tmp_path):
    (tmp_path / "onnx-only").mkdir()
    (tmp_path / "onnx-only" / "config.json").write_text("{}")
    hub.add_repo("someone/onnx-only", tmp_path / "onnx-only", extra={"model.onnx": b"\0"})
    with pytest.raises(Exception, match="no model in transformers format") as info:
        backbone.load_backbone("someone/onnx-only", "cpu")
    assert not isinstance(info.value, ModelAccessError)


def test_the_detector_passes_its_reporter_to_the_download(hub):
    from HiMatchADLib import HiMatchDetector

    events = []
    det = HiMatchDetector(model=REPO_ID, device="cpu", precision="fp32", progress=lambda *e: events.append(e))
    det._ensure_extractor()
    messages = [m for m, _, _ in events]
    assert messages[0] == "Loading model" and messages[-1] == "Loading model" and MSG in messages
    stop = threading.Event()
    stop.set()
    backbone._MODEL_CACHE.clear()
    for p in Path(backbone.cached_snapshot(REPO_ID)).iterdir():
        if p.name == "model.safetensors":
            p.unlink()
    with pytest.raises(Cancelled):
        HiMatchDetector(model=REPO_ID, device="cpu", precision="fp32", cancel_event=stop)._ensure_extractor()


def test_the_worker_forwards_the_download_progress(hub, tmp_path, lesion_case):
    from HiMatchADLib.io.writers import write_image
    from HiMatchADLib.worker.server import Worker

    write_image(lesion_case[0].array, lesion_case[0].geometry, tmp_path / "case.nii.gz")
    (tmp_path / "normals").mkdir()
    events = []
    worker = Worker(events.append)
    worker.handle({"id": "1", "cmd": "detect", "input": str(tmp_path / "case.nii.gz"), "normals": str(tmp_path / "normals"),
                   "out_dir": str(tmp_path / "out"), "settings": {"model": REPO_ID, "device": "cpu", "cache_dir": str(tmp_path / "cache")}})
    down = [e for e in events if e.get("message") == MSG]
    assert down and down[0]["event"] == "progress" and down[0]["done"] == 0 and down[-1]["done"] == down[-1]["total"] > 0
    assert events[-1]["event"] == "error" and "model_access" not in events[-1]  # the empty normals folder, after the download

    hub.modes["someone/gated"] = "gated"
    hub.add_repo("someone/gated", backbone.cached_snapshot(REPO_ID))
    events.clear()
    worker.handle({"id": "2", "cmd": "detect", "input": str(tmp_path / "case.nii.gz"), "normals": str(tmp_path / "normals"),
                   "out_dir": str(tmp_path / "out"), "settings": {"model": "someone/gated", "device": "cpu", "cache_dir": str(tmp_path / "cache")}})
    assert events[-1]["event"] == "error" and events[-1]["model_access"]["kind"] == "gated"
