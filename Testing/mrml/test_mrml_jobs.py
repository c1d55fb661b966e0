"""The Slicer module's runs (``HiMatchADLib.mrml_jobs``) against real MRML (``slicer-core``) and a
real worker process: results come back on the node's exact grid, a result whose volume left the
scene or changed its grid is dropped, and cancel leaves the scene untouched."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from conftest import RESOLUTION  # noqa: E402
from HiMatchADLib import mrml  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError  # noqa: E402
from HiMatchADLib.mrml.jobs import DetectionRunner  # noqa: E402

TIMEOUT = 300


def oblique(spacing=(0.9, 1.1, 2.0), degrees=25.0) -> np.ndarray:
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag(spacing)
    m[:3, 3] = (12.5, -30.0, 7.25)
    return m


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture(scope="module")
def settings(tiny_model, cache_dir, fitted):
    fitted("himatch")  # the bank is in the shared cache before the worker asks for it
    return {"model": tiny_model, "method": "himatch", "k": 4, "resolution": RESOLUTION, "cache_dir": str(cache_dir)}


@pytest.fixture(scope="module")
def runner():
    r = DetectionRunner()
    yield r
    r.shutdown()


def add_volume(scene, array, ijk_to_ras, name="case"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


def finish(runner, timeout=TIMEOUT):
    """Poll as the module's timer does, until the job ends; returns the last (kind, job, payload)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for kind, job, payload in runner.poll():
            if kind != "progress":
                return kind, job, payload
        time.sleep(0.02)
    raise AssertionError("the job did not end")


def test_a_detection_comes_back_on_the_nodes_grid_under_its_parent_transform(runner, scene, settings, normals_dir, lesion_case, fitted):
    img, lesion = lesion_case
    node = add_volume(scene, img.array.astype(np.int16), oblique())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = np.eye(4)
    m[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    m[:3, 3] = (20.0, -5.0, 3.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(m))
    node.SetAndObserveTransformNodeID(transform.GetID())

    job = runner.start_detection(node, str(normals_dir), settings)
    assert runner.busy and job.volume_node is node and job.workdir.exists()
    kind, _, result = finish(runner)
    assert kind == "done", result
    assert not runner.busy and job.workdir is None  # temporary files removed

    expected = fitted("himatch").predict(mrml.image_from_volume_node(node))
    np.testing.assert_allclose(result.heatmap, expected.heatmap, rtol=1e-4, atol=1e-5)
    assert np.array_equal(result.labelmap, expected.labelmap)
    assert result.geometry.same_as(mrml.image_from_volume_node(node).geometry, tol=1e-12)

    nodes = mrml.result_to_nodes(result, node, scene=scene, show=False)
    assert np.allclose(mrml.ijk_to_ras_matrix(nodes.heatmap), mrml.ijk_to_ras_matrix(node))
    assert nodes.heatmap.GetTransformNodeID() == transform.GetID()
    assert np.array_equal(slicer.util.arrayFromVolume(nodes.labelmap), result.labelmap)


def test_a_result_for_a_closed_scene_is_dropped_even_if_a_same_size_volume_has_the_same_id(runner, scene, settings, normals_dir, lesion_case):
    img, _ = lesion_case
    node = add_volume(scene, img.array, oblique())
    old_id = node.GetID()
    runner.start_detection(node, str(normals_dir), settings)
    scene.Clear(0)  # the user closes the scene and loads another patient of the same size
    other = add_volume(scene, img.array[::-1].copy(), oblique())
    assert other.GetID() == old_id
    kind, job, payload = finish(runner)
    assert kind == "dropped" and "discarded" in payload
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


def test_a_result_is_dropped_when_the_node_changed_its_grid_meanwhile(runner, scene, settings, normals_dir, lesion_case):
    img, _ = lesion_case
    node = add_volume(scene, img.array, oblique())
    runner.start_detection(node, str(normals_dir), settings)
    node.SetSpacing(2.0, 2.0, 2.0)
    kind, _, payload = finish(runner)
    assert kind == "dropped" and "spacing" in payload.lower()


def test_a_single_oblique_slice_comes_back_in_place(runner, scene, settings, normals_dir, lesion_case):
    img, _ = lesion_case
    slice_ = img.array[img.array.shape[0] // 2][None]
    m = np.eye(4)  # a sagittal slice: i -> anterior, j -> superior, k -> left
    m[:3, :3] = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) @ np.diag([0.8, 0.8, 3.0])
    m[:3, 3] = (-14.0, 3.0, 40.0)
    node = add_volume(scene, slice_, m)
    runner.start_detection(node, str(normals_dir), settings)
    kind, _, result = finish(runner)
    assert kind == "done", result
    assert result.geometry.is_2d and result.heatmap.shape == slice_.shape
    nodes = mrml.result_to_nodes(result, node, scene=scene, show=False)
    assert np.allclose(mrml.ijk_to_ras_matrix(nodes.heatmap), m)


def test_cancel_stops_at_once_and_the_scene_is_unchanged(scene, settings, normals_dir, lesion_case, tmp_path):
    img, _ = lesion_case
    node = add_volume(scene, img.array, oblique())
    runner = DetectionRunner()
    try:
        before = scene.GetNumberOfNodes()
        job = runner.start_detection(node, str(normals_dir), dict(settings, cache_dir=str(tmp_path / "cache")))
        pid = runner.client.pid
        time.sleep(0.5)
        t = time.monotonic()
        assert runner.cancel()
        assert time.monotonic() - t < 5
        assert job.state == "cancelled" and not runner.busy and job.workdir is None
        assert runner.poll() == []
        assert scene.GetNumberOfNodes() == before
        with pytest.raises(HiMatchADError, match="already running"):
            runner.start_detection(node, str(normals_dir), settings) and runner.start_detection(node, str(normals_dir), settings)
        kind, _, result = finish(runner)  # the first of those two runs, in a new worker
        assert kind == "done" and runner.client.pid != pid
    finally:
        runner.shutdown()


def test_a_missing_normals_folder_fails_before_anything_is_sent(runner, scene, lesion_case, settings, tmp_path):
    img, _ = lesion_case
    node = add_volume(scene, img.array, oblique())
    with pytest.raises(HiMatchADError, match="does not exist"):
        runner.start_detection(node, str(tmp_path / "nowhere"), settings)
    assert not runner.busy
