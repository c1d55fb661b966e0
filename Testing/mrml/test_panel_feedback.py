"""The panel's "Mark as normal" and its undo (``HiMatchAD.py`` on ``slicer-core``, Qt stand-ins):

- with a real worker, on an oblique, flipped volume under a parent transform: the Anomaly segment
  marked as normal becomes an entry whose slices are those the segment covers; the next detection
  lists it and scores the marked region lower; after undo the heatmap is the first run's, bit for bit;
- the slice a slice view shows (its offset) is the right input slice, flipped and oblique directions
  and parent transforms included; a tilted view or one outside the volume is refused;
- the region is sent as a labelmap on exactly the grid the volume is sent on;
- "Use reader feedback" unchecked sends ``"use_feedback": false``;
- errors give one message and send nothing; the feedback files are handled without torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from conftest import oblique_direction  # noqa: E402
from HiMatchADLib import mrml  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError  # noqa: E402
from HiMatchADLib.core.result import DetectionResult  # noqa: E402
from HiMatchADLib.io.readers import read_image  # noqa: E402
from HiMatchADLib.mrml.jobs import DetectionRunner  # noqa: E402
from test_panel_bank_provenance import RecordingClient, panel  # noqa: E402
from test_mrml_export import slicer_modules  # noqa: E402,F401  (fixture: slicer.modules for slicer.util)
from test_slicer_logic import ROOT, HiMatchAD, logic, scene, settings  # noqa: E402,F401  (fixtures)

TIMEOUT = 300


def ijk_to_ras(spacing=(0.9, 1.1, 2.5), flip_k=True, origin=(12.0, -30.0, 45.0)) -> np.ndarray:
    """An oblique IJK-to-RAS whose k axis is flipped (the slices run against the scanner axis)."""
    direction = oblique_direction() @ np.diag([1.0, 1.0, -1.0 if flip_k else 1.0])
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def parent_transform(mrml_scene):
    """A rigid parent transform: 25 degrees about an oblique axis and a translation."""
    a = np.deg2rad(25)
    axis = np.array([0.6, 0.0, 0.8])
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    m = np.eye(4)
    m[:3, :3] = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
    m[:3, 3] = (7.0, -3.0, 11.0)
    node = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(m))
    return node, m


def add_volume(mrml_scene, array, m, transform=None, name="case"):
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))
    slicer.util.updateVolumeFromArray(node, np.asarray(array).astype(np.int16))
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
    return node


@pytest.fixture
def recording(HiMatchAD, monkeypatch):  # noqa: F811
    client = RecordingClient()
    monkeypatch.setattr(HiMatchAD.HiMatchADLogic, "_sharedRunner", DetectionRunner(client))
    monkeypatch.setattr(HiMatchAD.HiMatchADLogic, "markUndoStack", [])
    monkeypatch.setattr(HiMatchAD.HiMatchADLogic, "lastFeedbackFolder", None)
    return client


def made_result(node, slice_axis=0, block=True) -> DetectionResult:
    """A result on ``node``'s grid (no worker): a block above the threshold, or nothing."""
    geometry = mrml.volume_geometry(node)
    heatmap = np.zeros(geometry.shape, np.float32)
    if block:
        heatmap[3:6, 10:20, 12:22] = 5.0
    n = geometry.shape[slice_axis]
    return DetectionResult(heatmap=heatmap, foreground=np.ones(geometry.shape, bool), threshold=1.0, geometry=geometry,
                           slice_axis=slice_axis, slice_scores=np.ones(n), volume_score=1.0, name=node.GetName())


# --------------------------------------------------------------------------- the real worker
def test_a_marked_segment_lowers_the_next_run_and_undo_gives_the_first_run_back(
        HiMatchAD, logic, scene, settings, normals_dir, lesion_case, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(HiMatchAD.HiMatchADLogic, "markUndoStack", [])
    Logic = HiMatchAD.HiMatchADLogic
    img, _ = lesion_case
    transform, _ = parent_transform(scene)
    node = add_volume(scene, img.array, ijk_to_ras(), transform)
    folder = tmp_path / "feedback"  # not the shared cache's bank: other tests keep their results
    first = logic.process(node, normals_dir, feedbackFolder=folder, **settings)
    heat1 = np.array(first.result.heatmap, copy=True)
    assert first.result.settings.get("feedback", []) == []
    assert first.result.provenance["feedback_folder"] == str(folder)
    assert Logic.feedbackText(first).startswith("Reader feedback of this normal bank: 0 entries")

    mask = mrml.segment_to_array(first.segmentation, node).astype(bool)
    assert mask.any() and np.array_equal(mask, first.result.labelmap.astype(bool))  # exported on the input's grid
    axis = first.result.slice_axis
    covered = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))).tolist()

    message = logic.markNormal(first, note="reader: a vessel", timeout=TIMEOUT)
    (entryFile,) = sorted(folder.glob("entry-*.json"))
    entry = json.loads(entryFile.read_text())
    assert entry["note"] == "reader: a vessel" and entry["region"]["kind"] == "labelmap"
    assert entry["region"]["slices"] == covered and entry["region"]["slice_axis"] == axis
    assert entry["region"]["voxels"] == int(mask.sum())
    a, b = covered[0], covered[-1]
    assert message == f"Marked as normal: {entry['region']['patches']} patches on slices {a}–{b}; takes effect on the next run"
    assert [m["id"] for m in Logic.markUndoStack] == [entry["id"]]
    assert Logic.feedbackText(first).startswith("Reader feedback of this normal bank: 1 entry")

    second = logic.process(node, normals_dir, feedbackFolder=folder, **settings)
    assert second.result.settings["feedback"] == [entry["id"]]
    assert [e["id"] for e in second.result.provenance["feedback"]] == [entry["id"]]
    heat2 = second.result.heatmap
    assert float(heat2[mask].mean()) < float(heat1[mask].mean())
    assert Logic.feedbackText(second) == "Reader feedback of this normal bank: 1 entry; this result used 1"

    # Unchecked "Use reader feedback": the entry is kept but not used.
    unused = logic.process(node, normals_dir, feedbackFolder=folder, useFeedback=False, **settings)
    assert unused.result.settings.get("feedback", []) == [] and np.array_equal(unused.result.heatmap, heat1)

    assert logic.undoMarkNormal().startswith(f"Removed the last mark ({entry['region']['patches']} patches on slices {a}–{b})")
    assert list(folder.glob("entry-*")) == [] and Logic.markUndoStack == []
    third = logic.process(node, normals_dir, feedbackFolder=folder, **settings)
    assert third.result.settings.get("feedback", []) == []
    assert third.result.heatmap.dtype == heat1.dtype and np.array_equal(third.result.heatmap, heat1)  # bit for bit
    with pytest.raises(HiMatchADError, match="^there is no mark as normal of this session to undo$"):
        logic.undoMarkNormal()


# --------------------------------------------------------------------------- the slice in view
def aligned_slice_node(mrml_scene, world_normal, world_up, name="Red"):
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode")
    node.SetLayoutName(name)
    n = world_normal / np.linalg.norm(world_normal)
    x = world_up - n * (world_up @ n)
    x /= np.linalg.norm(x)
    y = np.cross(n, x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2] = x, y, n
    node.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(m))
    node.UpdateMatrices()
    return node


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_the_slice_in_view_is_the_input_slice_its_offset_shows(HiMatchAD, scene, recording, normals_dir, slice_axis):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic
    transform, parent = parent_transform(scene)
    m = ijk_to_ras()
    node = add_volume(scene, np.ones((9, 30, 34)), m, transform)
    nodes = Logic().importResult(made_result(node, slice_axis), node, show=False)
    ijk_axis = 2 - slice_axis
    world = parent @ m  # IJK -> world
    view = aligned_slice_node(scene, world[:3, ijk_axis], world[:3, (ijk_axis + 1) % 3])
    normal = slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS())[:3, 2]
    size = node.GetImageData().GetDimensions()  # (i, j, k)
    spacing = np.linalg.norm(m[:3, ijk_axis])
    for index in (0, 1, size[ijk_axis] // 2, size[ijk_axis] - 1):
        ijk = (np.asarray(size, float) - 1) / 2
        ijk[ijk_axis] = index
        center = (world @ np.append(ijk, 1.0))[:3]
        for shift in (0.0, 0.3 * spacing, -0.3 * spacing):  # within half a slice of its centre
            view.SetSliceOffset(float(normal @ center) + shift)
            assert Logic.sliceIndexInView(nodes, view) == index
    # The flipped k axis: a larger offset is a smaller index along k.
    view.SetSliceOffset(float(normal @ (world @ np.append(np.zeros(3), 1.0))[:3]))
    assert Logic.sliceIndexInView(nodes, view) == 0

    # The request carries that slice, and no region.
    view.SetSliceOffset(float(normal @ (world @ np.append(np.eye(3)[ijk_axis] * 2, 1.0))[:3]))
    Logic().startMarkNormal(nodes, "slice", sliceView="Red", normalsFolder=normals_dir, note="n", device="cpu")
    request = recording.sent[-1]
    assert request["cmd"] == "mark_normal" and request["slices"] == [2] and "region" not in request
    assert request["normals"] == str(normals_dir) and request["settings"] == {"device": "cpu"} and request["note"] == "n"
    assert Logic().cancel()

    # Outside the volume, or a tilted view: one message, nothing sent.
    sent = len(recording.sent)
    view.SetSliceOffset(float(normal @ center) + 3 * size[ijk_axis] * spacing)
    with pytest.raises(HiMatchADError, match="^the Red view is outside 'case'"):
        Logic().startMarkNormal(nodes, "slice", normalsFolder=normals_dir)
    aligned_slice_node(scene, world[:3, ijk_axis] / spacing + 0.05 * world[:3, (ijk_axis + 1) % 3] / np.linalg.norm(world[:3, (ijk_axis + 1) % 3]),
                                world[:3, (ijk_axis + 1) % 3], name="Yellow")
    with pytest.raises(HiMatchADError, match="^the Yellow view does not show a slice of 'case' along the axis the detector sliced it"):
        Logic().startMarkNormal(nodes, "slice", sliceView="Yellow", normalsFolder=normals_dir)
    assert len(recording.sent) == sent


def test_the_region_is_sent_on_the_grid_the_volume_is_sent_on(HiMatchAD, scene, recording, normals_dir, slicer_modules):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic
    transform, _ = parent_transform(scene)
    node = add_volume(scene, np.arange(9 * 30 * 34).reshape(9, 30, 34) % 97, ijk_to_ras(), transform)
    nodes = Logic().importResult(made_result(node), node, show=False)
    # The user edits the segment: the mark is of the segment as it is now.
    edited = mrml.segment_to_array(nodes.segmentation, node)
    edited[4] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, nodes.segmentation, nodes.segment_id, node)
    Logic().startMarkNormal(nodes, "segment", normalsFolder=normals_dir)
    request = recording.sent[-1]
    sent_input, sent_region = read_image(request["input"]), read_image(request["region"])
    assert "slices" not in request
    g, h = sent_input.geometry, sent_region.geometry
    assert g.size == h.size and np.array_equal(g.spacing, h.spacing) and np.array_equal(g.origin, h.origin)
    assert np.array_equal(g.direction, h.direction)
    assert not mrml.geometry_differences(g, mrml.volume_geometry(node), tol=1e-9)
    assert np.array_equal(sent_region.array > 0, edited > 0)
    assert np.array_equal(sent_input.array, slicer.util.arrayFromVolume(node))
    assert Logic().cancel()


# --------------------------------------------------------------------------- "Use reader feedback"
def test_use_reader_feedback_unchecked_sends_use_feedback_false(HiMatchAD, scene, recording, normals_dir, lesion_case, tmp_path):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic
    img, _ = lesion_case
    node = add_volume(scene, img.array, ijk_to_ras())
    for checked in (True, False):
        pn = panel(HiMatchAD, normalsSource=HiMatchAD.NormalsSource.FOLDER, normalsFolder=str(normals_dir), useFeedback=checked)
        lg = Logic()
        lg.startProcessing(node, **Logic.referenceFromParameterNode(pn), **Logic.runOptionsFromParameterNode(pn),
                           **Logic.settingsFromParameterNode(pn))
        request = recording.sent[-1]
        assert request["cmd"] == "detect"
        assert ("use_feedback" in request) is (not checked) and request.get("use_feedback", True) is checked
        assert "use_feedback" not in request["settings"]  # a request key, not a detector setting
        assert lg.cancel()
    Logic().processFolder(tmp_path, normals_dir, tmp_path / "out", background=True, useFeedback=False, device="cpu")
    assert recording.sent[-1]["cmd"] == "batch" and recording.sent[-1]["use_feedback"] is False
    assert Logic().cancel()


# --------------------------------------------------------------------------- errors
def test_marks_that_cannot_be_made_give_one_message_and_send_nothing(HiMatchAD, scene, recording, normals_dir):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic
    lg = Logic()
    with pytest.raises(HiMatchADError) as none:
        lg.startMarkNormal(None, "segment", normalsFolder=normals_dir)
    assert str(none.value) == "there is no detection result to mark: run the detection first"

    node = add_volume(scene, np.ones((9, 30, 34)), ijk_to_ras())
    empty = lg.importResult(made_result(node, block=False), node, show=False)
    with pytest.raises(HiMatchADError) as nothing:
        lg.startMarkNormal(empty, "segment", normalsFolder=normals_dir)
    assert str(nothing.value) == "the segment 'Anomaly' is empty: nothing to mark as normal"
    with pytest.raises(HiMatchADError, match="^there is no segment 'Lesion' in "):
        lg.startMarkNormal(empty, "segment", segmentName="Lesion", normalsFolder=normals_dir)
    with pytest.raises(HiMatchADError, match="^there is no Green slice view$"):
        lg.startMarkNormal(empty, "slice", sliceView="Green", normalsFolder=normals_dir)
    full = lg.importResult(made_result(node), node, show=False)
    with pytest.raises(HiMatchADError, match="^this result was not computed in this session"):
        lg.startMarkNormal(full, "segment")  # no bank given and none known
    with pytest.raises(HiMatchADError, match="^there is no mark as normal of this session to undo$"):
        lg.undoMarkNormal()
    assert recording.sent == [] and not lg.isRunning


def test_counting_and_removing_feedback_entries_imports_no_torch(tmp_path):
    folder = tmp_path / "fb"
    folder.mkdir()
    meta = {"format": 1, "id": "0123456789ab", "created": "2026-01-01T00:00:00+00:00", "arrays": {"file": "entry-0123456789ab.npz"}}
    (folder / "entry-0123456789ab.json").write_text(json.dumps(meta))
    (folder / "entry-0123456789ab.npz").write_bytes(b"x")
    code = (
        "import sys\n"
        "from HiMatchADLib.mrml import jobs\n"
        "from HiMatchADLib.bank.feedback import entry_files, remove_entry\n"
        "assert len(entry_files(sys.argv[1])) == 1\n"
        "remove_entry(sys.argv[1], '0123')\n"
        "assert entry_files(sys.argv[1]) == []\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert list(folder.iterdir()) == []


def test_the_panel_lists_segments_and_views_to_mark(HiMatchAD, scene, recording):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic

    class Combo:
        def __init__(self):
            self.items, self.currentIndex = [], -1

        @property
        def count(self):
            return len(self.items)

        @property
        def currentData(self):
            return self.items[self.currentIndex][1] if 0 <= self.currentIndex < self.count else None

        def itemData(self, i):
            return self.items[i][1]

        def blockSignals(self, blocked):
            return False

        def clear(self):
            self.items, self.currentIndex = [], -1

        def addItem(self, label, data):
            self.items.append((label, data))

        def findData(self, data):
            return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

        def setCurrentIndex(self, i):
            self.currentIndex = i

    node = add_volume(scene, np.ones((9, 30, 34)), ijk_to_ras())
    nodes = Logic().importResult(made_result(node), node, show=False)
    widget = HiMatchAD.HiMatchADWidget()
    widget.ui = types.SimpleNamespace(markTargetComboBox=Combo())
    widget._updateMarkTargets(nodes)
    combo = widget.ui.markTargetComboBox
    assert [d for _, d in combo.items] == ["segment:Anomaly", "slice:Red", "slice:Yellow", "slice:Green"]
    combo.setCurrentIndex(2)
    nodes.segmentation.GetSegmentation().AddEmptySegment("kept", "kept")
    widget._updateMarkTargets(nodes)
    assert [d for _, d in combo.items][:2] == ["segment:Anomaly", "segment:kept"] and combo.currentData == "slice:Yellow"
