"""The Anomaly segment as the user changes it, on Slicer's real MRML (``slicer-core``):

- its DICOM SegmentAlgorithmType (what Slicer's DICOM SEG export writes) is AUTOMATIC while it holds
  the detection's output at the detection's threshold, SEMIAUTOMATIC once a person edited it or chose
  another threshold;
- the labelmap volume node follows the segment, edits included;
- a threshold step (which thresholds a box and writes the segment directly) gives exactly the
  result's labelmap, on an oblique grid under a parent transform;
- which volumes are inputs (one predicate for the selector and the automatic choice).

Scene, volumes and hand-made results come from ``test_mrml`` and ``test_mrml_export``.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from test_mrml import SHAPE, add_volume, make_result, oblique_ijk_to_ras, slicer_scene, synthetic_array  # noqa: E402
from test_mrml_export import merged_reference_labelmap, saved_and_loaded, slicer_modules, tag, transformed_volume  # noqa: E402,F401  (slicer_modules: fixture)
from vtk.util import numpy_support  # noqa: E402

from HiMatchADLib import mrml  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError  # noqa: E402
from HiMatchADLib.core.result import DetectionResult  # noqa: E402

ALGORITHM_TYPE = "DICOM.SegmentAlgorithmType"


@pytest.fixture
def scene():
    with slicer_scene() as s:
        yield s


def algorithm_type(nodes, name="Anomaly"):
    segmentation = nodes.segmentation.GetSegmentation()
    return tag(segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name)), ALGORITHM_TYPE)


def paint(nodes, where=(7, slice(1, 3), slice(2, 4)), segment_id=None):
    """Add voxels to a segment with slicer.util, as a script or an effect would."""
    segment_id = segment_id or nodes.segment_id
    name = nodes.segmentation.GetSegmentation().GetSegment(segment_id).GetName()
    array = mrml.segment_to_array(nodes.segmentation, nodes.input_volume, name)
    array[where] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(array, nodes.segmentation, segment_id, nodes.input_volume)
    return array


def erase_one_voxel(nodes):
    """Change the segment's binary labelmap in place, as Segment Editor effects do."""
    segment = nodes.segmentation.GetSegmentation().GetSegment(nodes.segment_id)
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    voxels[np.flatnonzero(voxels)[0]] = 0
    image.Modified()


def labelmap_of(nodes):
    return slicer.util.arrayFromVolume(nodes.labelmap)


# --------------------------------------------------------------------------- DICOM algorithm type
def test_edits_make_the_segment_semiautomatic(scene, slicer_modules):  # noqa: F811 (the imported fixture)
    node, _, _ = transformed_volume(scene)
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(node)), node)
    assert algorithm_type(nodes) == "AUTOMATIC" == mrml.segment_algorithm_type(nodes.segmentation)

    # Another segment painted beside it: the Anomaly segment is untouched and stays AUTOMATIC.
    note_id = nodes.segmentation.GetSegmentation().AddEmptySegment("", "Note", [0.0, 1.0, 0.0])
    paint(nodes, (0, slice(0, 2), slice(0, 3)), segment_id=note_id)
    assert algorithm_type(nodes) == "AUTOMATIC"

    # Painted by a person: SEMIAUTOMATIC at once, no call to the module needed before an export.
    edited = paint(nodes)
    assert algorithm_type(nodes) == "SEMIAUTOMATIC" == mrml.segment_algorithm_type(nodes.segmentation)
    assert tag(nodes.segmentation.GetSegmentation().GetSegment(nodes.segment_id), "DICOM.SegmentAlgorithmName") == "HiMatch-AD"
    assert np.array_equal(labelmap_of(nodes), edited)

    # Written again by the module (edits overwritten): AUTOMATIC; an in-place change of the labelmap: SEMIAUTOMATIC.
    nodes.set_threshold(1.0, if_edited="overwrite")
    assert algorithm_type(nodes) == "AUTOMATIC"
    erase_one_voxel(nodes)
    assert algorithm_type(nodes) == "SEMIAUTOMATIC"
    assert labelmap_of(nodes).sum() == nodes.result.labelmap.sum() - 1
    assert mrml.segment_to_array(nodes.segmentation, node, "Note").sum() == 6  # the other segment keeps its voxels


def test_a_threshold_chosen_by_a_person_is_semiautomatic(scene, tmp_path):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras(flip=True))
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    assert algorithm_type(nodes) == "AUTOMATIC"
    nodes.set_threshold(2.0)
    assert algorithm_type(nodes) == "SEMIAUTOMATIC" == nodes.algorithm_type
    nodes.set_threshold(1.0)  # back at the detection's threshold: its output, untouched
    assert algorithm_type(nodes) == "AUTOMATIC"
    nodes.set_threshold(4.0)

    # The tag is saved with the segmentation, for an export after the scene is loaded again.
    loaded = saved_and_loaded(scene, nodes.segmentation, str(tmp_path / "anomaly.seg.nrrd"))
    segment = loaded.GetSegmentation().GetSegment(loaded.GetSegmentation().GetSegmentIdBySegmentName("Anomaly"))
    assert tag(segment, ALGORITHM_TYPE) == "SEMIAUTOMATIC"
    assert mrml.segment_algorithm_type(loaded) == "SEMIAUTOMATIC"


def test_the_detections_threshold_is_the_calibrated_one(scene):
    """A result thresholded again before it is shown: its calibrated threshold is the detection's."""
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    result = make_result(mrml.image_from_volume_node(node))
    result.threshold_info = {"mode": "auto", "calibrated_threshold": 1.0}
    result.set_threshold(2.0)
    nodes = mrml.result_to_nodes(result, node)
    assert algorithm_type(nodes) == "SEMIAUTOMATIC"
    nodes.set_threshold(1.0)
    assert algorithm_type(nodes) == "AUTOMATIC"

    # The same result shown again after slider steps keeps the detection's threshold as its reference.
    plain = make_result(mrml.image_from_volume_node(node))
    again = mrml.result_to_nodes(plain, node, previous=nodes)
    again.set_threshold(3.0)
    again = mrml.result_to_nodes(plain, node, previous=again)
    assert algorithm_type(again) == "SEMIAUTOMATIC"
    again.set_threshold(1.0)
    assert algorithm_type(again) == "AUTOMATIC"


# --------------------------------------------------------------------------- the labelmap node
def test_labelmap_node_follows_the_segment(scene, slicer_modules):  # noqa: F811 (the imported fixture)
    node, transform, _ = transformed_volume(scene)
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(node)), node)
    assert np.array_equal(labelmap_of(nodes), nodes.result.labelmap)
    edited = paint(nodes)
    assert np.array_equal(labelmap_of(nodes), edited)
    assert np.allclose(mrml.ijk_to_ras_matrix(nodes.labelmap), mrml.ijk_to_ras_matrix(node))
    assert nodes.labelmap.GetTransformNodeID() == transform.GetID()

    # The segment removed: nothing is anomalous any more.
    nodes.segmentation.GetSegmentation().RemoveSegment(nodes.segment_id)
    assert not labelmap_of(nodes).any()


def test_labelmap_follows_a_segmentation_of_a_loaded_scene(scene, slicer_modules):  # noqa: F811 (the imported fixture)
    """Observers are not saved with a scene: watch_result_segmentations brings a loaded scene's
    labelmap nodes and tags up to date and keeps them so."""
    node, _, _ = transformed_volume(scene)
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(node)), node)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "as loaded")
    loaded.Copy(nodes.segmentation)  # content, attributes and node references, no observers
    scene.RemoveNode(nodes.segmentation)
    view = mrml.ResultNodes(nodes.result, node, labelmap=nodes.labelmap, segmentation=loaded,
                            segment_id=loaded.GetSegmentation().GetSegmentIdBySegmentName("Anomaly"))
    edited = paint(view)
    assert not np.array_equal(labelmap_of(view), edited)  # not watched yet
    assert mrml.watch_result_segmentations(scene) == 1
    assert np.array_equal(labelmap_of(view), edited) and algorithm_type(view) == "SEMIAUTOMATIC"
    more = paint(view, (8, slice(0, 2), slice(0, 2)))
    assert np.array_equal(labelmap_of(view), more)
    assert mrml.watch_result_segmentations(scene) == 1  # idempotent

    # A scene of an earlier version: no reference from the segmentation to its labelmap node; the
    # labelmap node made for the same input is found.
    loaded.RemoveNodeReferenceIDs(mrml.LABELMAP_REFERENCE_ROLE)
    assert loaded.GetNodeReference(mrml.LABELMAP_REFERENCE_ROLE) is None
    again = paint(view, (0, slice(5, 7), slice(5, 7)))
    assert np.array_equal(labelmap_of(view), again)


# --------------------------------------------------------------------------- threshold steps
def graded_result(node, min_component_size: int) -> DetectionResult:
    """Random graded scores with NaN voxels and a partial foreground, on the node's grid."""
    image = mrml.image_from_volume_node(node)
    rng = np.random.default_rng(5)
    heat = rng.random(SHAPE).astype(np.float32) * 4.0
    heat[2, 3, 4] = np.nan
    foreground = np.ones(SHAPE, bool)
    foreground[:, :, :3] = False
    return DetectionResult(heatmap=heat, foreground=foreground, threshold=3.0, geometry=image.geometry, slice_axis=0,
                           slice_scores=np.nanmax(heat, axis=(1, 2)), volume_score=3.9, supports=[[] for _ in range(SHAPE[0])],
                           min_component_size=min_component_size, name="graded")


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("min_size", [1, 4])
def test_threshold_steps_give_exactly_the_labelmap(scene, flip, min_size):
    node, transform, _ = transformed_volume(scene, flip)
    result = graded_result(node, min_size)
    nodes = mrml.result_to_nodes(result, node)
    heat, foreground = result.heatmap.copy(), result.foreground.copy()
    for threshold in (3.5, 2.0, 3.999, 5.0, 0.0, 3.0, float(heat[0, 0, 5])):
        voxels = nodes.set_threshold(threshold)
        expected = result.labelmap_at(threshold)
        if min_size == 1:  # the library's definition: above the threshold, inside the foreground
            assert np.array_equal(expected, ((heat > threshold) & foreground).astype(np.uint8))
        assert result.threshold == threshold and np.array_equal(result.labelmap, expected)
        assert voxels == int(expected.sum())
        assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), expected), threshold
        assert np.array_equal(labelmap_of(nodes), expected)
        values, image_to_segmentation, extent = merged_reference_labelmap(nodes.segmentation)  # what DICOM SEG export reads
        assert np.allclose(image_to_segmentation, oblique_ijk_to_ras(flip), atol=1e-9)
        assert extent == (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)
        assert np.array_equal(values != 0, expected != 0)
        assert nodes.segmentation.GetTransformNodeID() == transform.GetID()
        assert not mrml.segment_was_edited(nodes)
    assert 0 < result.labelmap_at(3.5).sum() < result.labelmap_at(2.0).sum() < heat.size
    assert result.labelmap_at(5.0).sum() == 0


def test_threshold_step_writes_the_segment_without_a_labelmap_import(scene, monkeypatch):
    """A step sets the segment's voxels directly (no import through a labelmap node, no merged export)."""
    from HiMatchADLib.mrml import segments

    node, _, _ = transformed_volume(scene)
    nodes = mrml.result_to_nodes(graded_result(node, 1), node)

    def refuse(*args, **kwargs):
        raise AssertionError("slow path taken")

    monkeypatch.setattr(segments, "_import_labelmap_into_segment", refuse)
    monkeypatch.setattr(segments, "_legacy_digest", refuse)
    monkeypatch.setattr(segments, "_segment_array", refuse)  # Slicer's export of a segment
    monkeypatch.setattr(segments, "labelmap_to_volume_node", refuse)  # a whole new labelmap
    nodes.set_threshold(3.2)
    monkeypatch.undo()
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), nodes.result.labelmap_at(3.2))


def test_a_segment_recorded_by_an_earlier_version_is_compared_as_it_was(scene):
    from HiMatchADLib.mrml import segments

    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(node)), node)
    segment = nodes.segmentation.GetSegmentation().GetSegment(nodes.segment_id)
    segment.SetTag(mrml.LABELMAP_DIGEST_TAG, segments._legacy_digest(nodes.segmentation, nodes.segment_id)[0])
    assert not mrml.segment_was_edited(nodes)
    segment.SetTag(mrml.LABELMAP_DIGEST_TAG, "0" * 64)
    assert mrml.segment_was_edited(nodes)


# --------------------------------------------------------------------------- inputs
def test_one_rule_for_inputs(scene):
    mri = add_volume(scene, synthetic_array(), oblique_ijk_to_ras(), name="mri")
    rgb = add_volume(scene, np.zeros((1, 4, 5, 3), np.uint8), np.eye(4), name="photo", class_name="vtkMRMLVectorVolumeNode")
    rgba = add_volume(scene, np.zeros((1, 4, 5, 4), np.uint8), np.eye(4), name="rgba", class_name="vtkMRMLVectorVolumeNode")
    pair = add_volume(scene, np.zeros((2, 4, 5, 2), np.float32), np.eye(4), name="pair", class_name="vtkMRMLVectorVolumeNode")
    field = add_volume(scene, np.zeros((2, 4, 5, 6), np.float32), np.eye(4), name="field", class_name="vtkMRMLVectorVolumeNode")
    mask = add_volume(scene, np.zeros(SHAPE, np.uint8), np.eye(4), name="mask", class_name="vtkMRMLLabelMapVolumeNode")
    loading = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loading")  # no voxels yet
    tensor = scene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "dti")
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "model")
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(mri)), mri)

    for good in (mri, rgb, rgba, loading):
        assert mrml.is_supported_input(good) and mrml.input_problem(good) is None
    assert "2 components" in mrml.input_problem(pair) and "RGB" in mrml.input_problem(pair)
    assert "6 components" in mrml.input_problem(field)
    assert "labelmap" in mrml.input_problem(mask)
    assert "output of HiMatch-AD" in mrml.input_problem(nodes.heatmap)
    for bad in (pair, field, mask, tensor, model, None, nodes.heatmap, nodes.labelmap, nodes.segmentation):
        assert not mrml.is_supported_input(bad) and mrml.input_problem(bad)
    assert mrml.input_candidates(scene) == [mri, rgb, rgba, loading]
    assert mrml.is_input_candidate is mrml.is_supported_input
    assert set(mrml.INPUT_NODE_CLASSES) == {"vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"}
    # What is accepted is analysed as the library analyses a colour file: luminance.
    image = mrml.image_from_volume_node(rgba)
    assert image.array.shape == (1, 4, 5)
    with pytest.raises(HiMatchADError):
        mrml.image_from_volume_node(model)


def test_a_segmentation_on_another_grid_is_written_through_slicers_import(scene, monkeypatch):
    """When the segment cannot be set on the result's grid directly, the labelmap goes through
    Slicer's import (resampled to the segmentation's geometry): the same voxels."""
    from HiMatchADLib.mrml import segments

    node, _, _ = transformed_volume(scene, flip=True)
    result = graded_result(node, 4)
    nodes = mrml.result_to_nodes(result, node)
    monkeypatch.setattr(segments, "_write_segment", lambda *args: False)
    for threshold in (3.3, 5.0, 2.5):
        nodes.set_threshold(threshold)
        expected = result.labelmap_at(threshold)
        assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), expected)
        assert np.array_equal(labelmap_of(nodes), expected)
        assert not mrml.segment_was_edited(nodes)
