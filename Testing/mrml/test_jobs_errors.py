"""A detection whose model cannot be loaded, through a real worker and real MRML (``slicer-core``):
the job keeps the worker's whole error event and the structured error, and ``wait`` raises it."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from conftest import RESOLUTION  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError, ModelAccessError  # noqa: E402
from HiMatchADLib.mrml.jobs import DetectionRunner  # noqa: E402
from HiMatchADLib.worker.client import WorkerClient  # noqa: E402
from test_mrml_jobs import finish  # noqa: E402

TIMEOUT = 300
HUB_ID = "facebook/dinov3-vits16-pretrain-lvd1689m"


@pytest.fixture
def offline_runner(tmp_path):
    """A runner whose worker is offline (HF_HUB_OFFLINE=1) with an empty Hugging Face cache: any
    Hub id fails to load as ``offline``, deterministically and without network."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""}
    r = DetectionRunner(client=WorkerClient(env=env))
    yield r
    r.shutdown()


def add_volume(scene, array):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


def test_a_model_that_cannot_be_loaded_gives_the_structured_error_on_the_job(offline_runner, normals_dir, lesion_case, tmp_path):
    scene = slicer.vtkMRMLScene()
    try:
        node = add_volume(scene, lesion_case[0].array)
        settings = {"model": HUB_ID, "resolution": RESOLUTION, "cache_dir": str(tmp_path / "cache")}
        offline_runner.start_detection(node, str(normals_dir), settings)
        kind, job, payload = finish(offline_runner)
        assert kind == "error" and job.state == "failed"
        assert isinstance(payload, str) and payload == job.message  # the message, as before
        assert job.event["event"] == "error" and job.event["model_access"]["kind"] == "offline"  # the whole event
        err = job.error
        assert isinstance(err, ModelAccessError) and err.kind == "offline" and err.model == HUB_ID
        assert err.url == f"https://huggingface.co/{HUB_ID}" and err.offline_mode is True
        assert err.message("panel") == job.event["model_access"]["panel_message"]
        assert "Local folder…" in err.message("panel") and "HF_HUB_OFFLINE=1" in err.message("panel")
        assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0

        offline_runner.start_detection(node, str(normals_dir), settings)  # the same worker, blocking
        with pytest.raises(ModelAccessError) as info:
            offline_runner.wait(timeout=TIMEOUT)
        assert info.value.kind == "offline" and info.value.url == err.url
        assert info.value is offline_runner.job.error
    finally:
        scene.Clear(1)


def test_other_errors_stay_plain_project_errors(offline_runner, normals_dir, lesion_case, tmp_path):
    scene = slicer.vtkMRMLScene()
    try:
        node = add_volume(scene, lesion_case[0].array)
        offline_runner.start_detection(node, str(normals_dir), {"model": str(tmp_path / "not-a-model"), "resolution": RESOLUTION})
        with pytest.raises(HiMatchADError, match="model folder not found") as info:
            offline_runner.wait(timeout=TIMEOUT)
        assert not isinstance(info.value, ModelAccessError)
        job = offline_runner.job
        assert info.value is job.error and job.event["event"] == "error" and "model_access" not in job.event
    finally:
        scene.Clear(1)
