"""Tests of the MRML adapter's outputs as Slicer exports and edits them (``slicer-core``).

- the segmentation of a volume with an oblique grid *and* a parent transform gives, in DICOM SEG
  export (merged labelmap on the reference geometry) and in "export to labelmap", exactly the
  detector's labelmap on the input grid, on the first run and on a second one;
- a result is only attached to the volume node it was computed on (geometry check, node identity
  after a scene close);
- the segment carries the tags DICOM SEG export reads (algorithm type and name, terminology);
- moving the threshold never silently erases edits of the segment;
- which volumes the module offers as input.

Scene, volumes and hand-made results come from ``test_mrml``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from test_mrml import (  # noqa: E402
    LESION,
    SHAPE,
    add_volume,
    ijk,
    make_result,
    oblique_ijk_to_ras,
    rotation,
    segment_voxels_ras,
    slicer_scene,
    sorted_rows,
    synthetic_array,
)
from vtk.util import numpy_support  # noqa: E402

from HiMatchADLib import mrml  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError  # noqa: E402

#: A git repository of Slicer's source (optional): SLICER_SOURCE_GIT, else a local mirror if there is one.
SLICER_SOURCE_GIT = pathlib.Path(os.environ.get("SLICER_SOURCE_GIT", "/work/.mirror/Slicer+Slicer/repo"))
DICOM_MASTER_LIST = "Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json"


@pytest.fixture
def scene():
    with slicer_scene() as s:
        yield s


def add_transform(scene, degrees=35.0, shift=(20.0, -12.5, 7.0)):
    """A linear transform node (rotation about an oblique axis + translation)."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((0.2, 1.0, -0.4), degrees)
    matrix[:3, 3] = shift
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    return node, matrix


def transformed_volume(scene, flip=False, name="case"):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras(flip), name=name)
    transform, matrix = add_transform(scene)
    node.SetAndObserveTransformNodeID(transform.GetID())
    return node, transform, matrix


def oriented_to_array(image) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Voxels ``(k, j, i)``, image-to-world matrix and extent of a vtkOrientedImageData."""
    dims = image.GetDimensions()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return values.copy(), slicer.util.arrayFromVTKMatrix(m), tuple(image.GetExtent())


def merged_reference_labelmap(segmentation_node):
    """What Slicer's DICOM SEG export writes: all segments merged on the reference geometry."""
    merged = slicer.vtkOrientedImageData()
    assert segmentation_node.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    return oriented_to_array(merged)


def exported_labelmap_node(segmentation_node, segment_id, reference_node):
    """Slicer's "Export segment to labelmap node" with the input volume as reference."""
    scene = segmentation_node.GetScene()
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, out, reference_node)
    return out


def to_world(node, points_local: np.ndarray) -> np.ndarray:
    """Local (parent transform not applied) RAS points of ``node`` in world RAS."""
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(node.GetParentTransformNode(), None, transform)
    return np.array([transform.TransformPoint(p) for p in np.asarray(points_local, dtype=float)])


# --------------------------------------------------------------------------- geometry under a parent transform
@pytest.mark.parametrize("flip", [False, True])
def test_segmentation_of_a_transformed_oblique_volume_exports_the_labelmap(scene, flip):
    node, transform, matrix = transformed_volume(scene, flip)
    m = oblique_ijk_to_ras(flip)
    result = make_result(mrml.image_from_volume_node(node))
    expected = result.labelmap
    assert expected.sum() == expected[LESION].size

    def check(nodes):
        # Every output lies under the input's parent transform.
        for out in (nodes.heatmap, nodes.labelmap, nodes.segmentation):
            assert out.GetTransformNodeID() == transform.GetID()
        assert np.array_equal(ijk(nodes.heatmap), m) and np.array_equal(ijk(nodes.labelmap), m)
        # (a) DICOM SEG export: merged labelmap on the reference geometry = the input grid, voxel for voxel.
        values, image_to_segmentation, extent = merged_reference_labelmap(nodes.segmentation)
        assert np.allclose(image_to_segmentation, m, atol=1e-6)
        assert extent == (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)
        assert np.array_equal(values != 0, expected != 0)
        # (b) Export to a labelmap node with the input as reference.
        exported = exported_labelmap_node(nodes.segmentation, nodes.segment_id, node)
        assert np.allclose(ijk(exported), m, atol=1e-6)
        assert np.array_equal(slicer.util.arrayFromVolume(exported) != 0, expected != 0)
        assert exported.GetTransformNodeID() == transform.GetID()  # so it overlays the input in world space too
        # The segment's voxels sit, in world coordinates, where the lesion voxels of the input do.
        ks, js, is_ = np.nonzero(expected)
        lesion_local = (m @ np.stack([is_, js, ks, np.ones_like(ks)]).astype(float))[:3].T
        lesion_world = (matrix @ np.c_[lesion_local, np.ones(len(lesion_local))].T)[:3].T
        segment_world = to_world(nodes.segmentation, segment_voxels_ras(nodes.segmentation, nodes.segment_id))
        assert np.allclose(sorted_rows(segment_world), sorted_rows(lesion_world), atol=1e-5)
        return values

    first = mrml.result_to_nodes(result, node)
    merged_first = check(first)
    geometry_parameter = first.segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())

    second = mrml.result_to_nodes(result, node, previous=first)  # the same nodes, updated
    assert second.segmentation is first.segmentation and second.labelmap is first.labelmap
    merged_second = check(second)
    assert np.array_equal(merged_first, merged_second)
    assert second.segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()) == geometry_parameter


def test_segmentation_follows_the_volume_to_another_transform(scene):
    """A second run after the input was moved under another transform: the segmentation moves too,
    and its reference geometry is still the input grid (not the grid folded through a transform)."""
    node, _, _ = transformed_volume(scene)
    result = make_result(mrml.image_from_volume_node(node))
    first = mrml.result_to_nodes(result, node)
    other, _ = add_transform(scene, degrees=-50.0, shift=(-3.0, 40.0, 9.0))
    node.SetAndObserveTransformNodeID(other.GetID())
    again = mrml.result_to_nodes(result, node, previous=first)
    for out in (again.heatmap, again.labelmap, again.segmentation):
        assert out.GetTransformNodeID() == other.GetID()
    values, image_to_segmentation, _ = merged_reference_labelmap(again.segmentation)
    assert np.allclose(image_to_segmentation, ijk(node), atol=1e-6)
    assert np.array_equal(values != 0, result.labelmap != 0)


# --------------------------------------------------------------------------- stale results
def test_result_geometry_must_match_the_node(scene):
    node, _, _ = transformed_volume(scene)  # the parent transform is not part of the comparison
    result = make_result(mrml.image_from_volume_node(node))
    mrml.check_result_matches(result, node)

    def variant(change):
        m = oblique_ijk_to_ras()
        change(m)
        return add_volume(scene, synthetic_array(), m, name="variant")

    def shift_origin(d):
        return lambda m: m.__setitem__((slice(0, 3), 3), m[:3, 3] + d)

    mrml.check_result_matches(result, variant(shift_origin((2e-5, 0, 0))))  # float32 rounding passes
    cases = {
        "origin": variant(shift_origin((0.0, 0.5, 0.0))),
        "spacing": variant(lambda m: m.__setitem__((slice(0, 3), 2), m[:3, 2] * 1.01)),
        "direction": variant(lambda m: m.__setitem__((slice(0, 3), slice(0, 3)), rotation((0, 0, 1), 2.0) @ m[:3, :3])),
        "size": add_volume(scene, np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 1), np.int16), oblique_ijk_to_ras()),
    }
    barely = variant(shift_origin((0.0, 0.0, 1e-3)))  # a thousandth of a millimetre is too much
    for what, other in list(cases.items()) + [("origin", barely)]:
        with pytest.raises(HiMatchADError, match=what) as error:
            mrml.check_result_matches(result, other)
        assert "run the detection on this volume again" in str(error.value)
        count = scene.GetNumberOfNodes()
        with pytest.raises(HiMatchADError):
            mrml.result_to_nodes(result, other)
        assert scene.GetNumberOfNodes() == count  # refused before any node was added


def test_a_closed_scene_does_not_take_old_results(scene):
    old = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    old_id = old.GetID()
    result = make_result(mrml.image_from_volume_node(old))
    nodes = mrml.result_to_nodes(result, old)
    assert mrml.node_in_scene(old) and mrml.node_in_scene(old, scene) and mrml.node_in_scene(nodes.segmentation)
    assert not mrml.node_in_scene(old, slicer.vtkMRMLScene()) and not mrml.node_in_scene(None)

    scene.Clear(0)  # File > Close scene; then another patient of the same size is loaded
    m = oblique_ijk_to_ras()
    m[:3, 3] += (0.0, 0.0, 30.0)
    new = add_volume(scene, synthetic_array(1), m, name="other patient")
    assert new.GetID() == old_id and scene.GetNodeByID(old_id) is new  # the ID is reused
    assert not mrml.node_in_scene(old) and not mrml.node_in_scene(old, scene) and mrml.node_in_scene(new)
    assert not mrml.node_in_scene(nodes.heatmap) and not mrml.node_in_scene(nodes.segmentation)

    count = scene.GetNumberOfNodes()
    with pytest.raises(HiMatchADError, match="origin"):
        mrml.result_to_nodes(result, new, previous=nodes)
    with pytest.raises(HiMatchADError, match="no longer in the scene"):
        nodes.set_threshold(4.0)
    with pytest.raises(HiMatchADError, match="no longer in the scene"):
        mrml.result_to_nodes(result, old)
    assert scene.GetNumberOfNodes() == count
    assert result.threshold == 1.0

    # The same patient loaded again (same grid): a new result attaches to new nodes only.
    same = add_volume(scene, synthetic_array(), oblique_ijk_to_ras(), name="reloaded")
    fresh = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(same)), same, previous=nodes)
    for attr in ("heatmap", "labelmap", "segmentation", "table", "chart"):
        assert getattr(fresh, attr) is not getattr(nodes, attr) and mrml.node_in_scene(getattr(fresh, attr), scene)

    scene.RemoveNode(same)
    assert not mrml.node_in_scene(same)


# --------------------------------------------------------------------------- DICOM SEG tags
def tag(segment, name):
    value = vtk.mutable("")
    return str(value) if segment.GetTag(name, value) else None


def deserialize(text):
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, entry)
    return entry


def codes(obj):
    return (obj.GetCodingSchemeDesignator(), obj.GetCodeValue(), obj.GetCodeMeaning())


def test_segment_terminology_is_in_slicers_serialized_format():
    text = mrml.SEGMENT_TERMINOLOGY
    # Seven '~'-separated fields, each code a 'scheme^value^meaning' triple.
    fields = text.split("~")
    assert len(fields) == 7 and all(len(f.split("^")) == 3 for f in fields[1:4] + fields[5:7])
    # Slicer's own parser reads the codes back ...
    entry = deserialize(text)
    assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
    assert codes(entry.GetCategoryObject()) == ("SCT", "49755003", "Morphologically Altered Structure")
    assert codes(entry.GetTypeObject()) == ("SCT", "49755003", "Morphologically Altered Structure")
    assert entry.GetRegionContextName() == "Anatomic codes - DICOM master list"
    assert not entry.GetTypeModifierObject().GetCodeValue() and not entry.GetRegionObject().GetCodeValue()
    # ... and its serializer writes the same string.
    category, type_ = mrml.SEGMENT_CATEGORY, mrml.SEGMENT_TYPE
    serialized = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        mrml.TERMINOLOGY_CONTEXT, category[1], category[0], category[2], type_[1], type_[0], type_[2],
        "", "", "", mrml.REGION_CONTEXT, "", "", "", "", "", "")
    assert serialized == text


def test_segment_codes_are_the_least_assertive_of_slicers_dicom_master_list():
    """The category is one of Slicer's DICOM master list and the type is that category's own code:
    every type the list has under it names a particular finding (Mass, Edema, ...), which an anomaly
    map cannot tell. Read from Slicer's source when a git repository of it is at hand (the adapter
    keeps the codes as constants); the file writer uses the same codes."""
    from HiMatchADLib.outputs import dicom_seg

    assert (mrml.SEGMENT_CATEGORY, mrml.SEGMENT_TYPE) == (dicom_seg.SEGMENT_CATEGORY, dicom_seg.SEGMENT_TYPE)
    assert mrml.SEGMENT_TYPE == mrml.SEGMENT_CATEGORY == ("SCT", "49755003", "Morphologically Altered Structure")
    mass = deserialize(mrml.FORMER_SEGMENT_TERMINOLOGIES[-1])
    assert codes(mass.GetTypeObject()) == ("SCT", "4147007", "Mass")  # what earlier versions wrote is replaced
    try:
        text = subprocess.run(["git", "-C", str(SLICER_SOURCE_GIT), "show", f"HEAD:{DICOM_MASTER_LIST}"],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"no Slicer source repository at {SLICER_SOURCE_GIT} (set SLICER_SOURCE_GIT) to read the DICOM master list from")
    master = json.loads(text)
    assert master["SegmentationCategoryTypeContextName"] == mrml.TERMINOLOGY_CONTEXT
    categories = {(c["CodingSchemeDesignator"], c["CodeValue"], c["CodeMeaning"]): c for c in master["SegmentationCodes"]["Category"]}
    assert mrml.SEGMENT_CATEGORY in categories
    listed = {t["CodeMeaning"] for t in categories[mrml.SEGMENT_CATEGORY]["Type"]}
    assert {"Mass", "Edema", "Hemorrhage", "Necrosis", "Neoplasm"} <= listed  # specific findings only
    assert not listed & {"Lesion", "Morphologically Altered Structure", "Morphologically Abnormal Structure"}


def test_segment_tags_for_dicom_seg(scene):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    segmentation = nodes.segmentation.GetSegmentation()
    segment = segmentation.GetSegment(nodes.segment_id)
    assert tag(segment, "DICOM.SegmentAlgorithmType") == "AUTOMATIC"
    assert tag(segment, "DICOM.SegmentAlgorithmName") == "HiMatch-AD"
    assert tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == mrml.SEGMENT_TERMINOLOGY

    # A segment of an earlier version (old terminology, no algorithm tags) is re-tagged on reuse ...
    for name in ("DICOM.SegmentAlgorithmType", "DICOM.SegmentAlgorithmName"):
        segment.RemoveTag(name)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), mrml.FORMER_SEGMENT_TERMINOLOGIES[0])
    nodes.set_threshold(1.0)
    assert tag(segment, "DICOM.SegmentAlgorithmType") == "AUTOMATIC"
    assert tag(segment, "DICOM.SegmentAlgorithmName") == "HiMatch-AD"
    assert tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == mrml.SEGMENT_TERMINOLOGY
    # ... while a terminology a user chose for it stays.
    chosen = mrml.serialize_terminology(("SCT", "49755003", "Morphologically Altered Structure"), ("SCT", "108369006", "Tumor"))
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), chosen)
    mrml.result_to_nodes(result, node, previous=nodes)
    assert tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == chosen
    assert segmentation.GetNumberOfSegments() == 1


# --------------------------------------------------------------------------- edits of the segment
@pytest.fixture
def slicer_modules(scene, monkeypatch):
    """``slicer.modules`` and ``slicer.mrmlScene`` as the application has them, for slicer.util."""
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: volumes),
        segmentations=types.SimpleNamespace(logic=lambda: slicer.vtkSlicerSegmentationsModuleLogic()),
    )
    monkeypatch.setattr(slicer, "modules", modules, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    yield modules
    volumes.SetMRMLScene(None)


def edited(nodes):
    """Paint a voxel far from the lesion into the segment with slicer.util, as a script would."""
    array = mrml.segment_to_array(nodes.segmentation, nodes.input_volume)
    array[7, 1:3, 2:4] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(array, nodes.segmentation, nodes.segment_id, nodes.input_volume)
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, nodes.input_volume), array)
    return array


def segment_names(nodes):
    segmentation = nodes.segmentation.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def test_edits_are_detected(scene, slicer_modules):
    node, _, _ = transformed_volume(scene)
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(node)), node)
    assert not mrml.segment_was_edited(nodes)
    edited(nodes)
    assert mrml.segment_was_edited(nodes)
    nodes.set_threshold(2.0, if_edited="overwrite")
    assert not mrml.segment_was_edited(nodes)

    # A direct change of the segment's binary labelmap (as Segment Editor effects make).
    segment = nodes.segmentation.GetSegmentation().GetSegment(nodes.segment_id)
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    inside = np.flatnonzero(voxels)
    voxels[inside[0]] = 0  # erase one voxel of the lesion
    image.Modified()
    assert mrml.segment_was_edited(nodes)
    nodes.set_threshold(2.0, if_edited="overwrite")
    assert not mrml.segment_was_edited(nodes)

    # Emptied by the user: an edit too.
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros(SHAPE, np.uint8), nodes.segmentation, nodes.segment_id, node)
    assert mrml.segment_was_edited(nodes)

    # A segment called "Anomaly" that no import wrote counts as edited once it has content.
    segmentation = nodes.segmentation.GetSegmentation()
    segmentation.GetSegment(nodes.segment_id).RemoveTag(mrml.LABELMAP_DIGEST_TAG)
    assert not mrml.segment_was_edited(nodes)  # (still empty)
    edited(nodes)
    assert mrml.segment_was_edited(nodes)

    # Without the segment or the segmentation nothing can be lost.
    segmentation.RemoveSegment(nodes.segment_id)
    assert not mrml.segment_was_edited(nodes)
    scene.RemoveNode(nodes.segmentation)
    assert not mrml.segment_was_edited(nodes)


def saved_and_loaded(scene, segmentation, path: str):
    """``segmentation`` written to ``path`` (.seg.nrrd) and read back into a new node, as a scene
    saved and loaded again would have it."""
    writer = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    writer.SetFileName(path)
    assert writer.WriteData(segmentation)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(path)
    assert reader.ReadData(loaded)
    return loaded


def test_edit_record_survives_saving_the_segmentation(scene, tmp_path, slicer_modules):
    """Tags, and what the last import wrote, are saved with the segmentation (.seg.nrrd)."""
    node, _, _ = transformed_volume(scene)
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    loaded = saved_and_loaded(scene, nodes.segmentation, str(tmp_path / "anomaly.seg.nrrd"))
    loaded.SetAndObserveTransformNodeID(node.GetTransformNodeID())
    segment_id = loaded.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
    segment = loaded.GetSegmentation().GetSegment(segment_id)
    assert tag(segment, "DICOM.SegmentAlgorithmType") == "AUTOMATIC"
    assert tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == mrml.SEGMENT_TERMINOLOGY
    reloaded = mrml.ResultNodes(result, node, segmentation=loaded, segment_id=segment_id)
    assert np.array_equal(mrml.segment_to_array(loaded, node), result.labelmap)
    assert not mrml.segment_was_edited(reloaded)
    edited(reloaded)
    assert mrml.segment_was_edited(reloaded)


def test_threshold_refuses_to_erase_edits(scene, slicer_modules):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    labelmap_before = result.labelmap.copy()
    mine = edited(nodes)
    assert np.array_equal(slicer.util.arrayFromVolume(nodes.labelmap), mine)  # the labelmap node follows the segment

    with pytest.raises(mrml.SegmentEditedError, match="if_edited='keep'"):
        nodes.set_threshold(4.0)
    assert isinstance(mrml.SegmentEditedError("x"), HiMatchADError)
    assert result.threshold == 1.0 and np.array_equal(result.labelmap, labelmap_before)
    assert np.array_equal(slicer.util.arrayFromVolume(nodes.labelmap), mine)
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), mine)
    assert segment_names(nodes) == ["Anomaly"]
    with pytest.raises(mrml.SegmentEditedError):  # the function form says the same
        mrml.update_segmentation_threshold(result, nodes.segmentation, 4.0)
    with pytest.raises(ValueError):
        nodes.set_threshold(4.0, if_edited="ignore")
    assert result.threshold == 1.0 and np.array_equal(mrml.segment_to_array(nodes.segmentation, node), mine)

    # A second detection run on the same volume refuses as well, before touching any node.
    heat_before = slicer.util.arrayFromVolume(nodes.heatmap).copy()
    with pytest.raises(mrml.SegmentEditedError):
        mrml.result_to_nodes(make_result(mrml.image_from_volume_node(node), scale=2.0), node, previous=nodes)
    assert np.array_equal(slicer.util.arrayFromVolume(nodes.heatmap), heat_before)
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), mine)


def test_threshold_keeps_a_copy_of_the_edits(scene, slicer_modules):
    node, _, _ = transformed_volume(scene)
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    mine = edited(nodes)

    assert nodes.set_threshold(4.0, if_edited="keep") == 4
    assert segment_names(nodes) == ["Anomaly", "Anomaly (edited)"]
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), result.labelmap_at(4.0))
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node, "Anomaly (edited)"), mine)
    assert not mrml.segment_was_edited(nodes)
    segmentation = nodes.segmentation.GetSegmentation()
    anomaly = segmentation.GetSegment(nodes.segment_id)
    copy = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Anomaly (edited)"))
    assert tag(copy, "DICOM.SegmentAlgorithmType") == "SEMIAUTOMATIC"
    assert tag(copy, "DICOM.SegmentAlgorithmName") == "HiMatch-AD"
    assert tag(copy, slicer.vtkSegment.GetTerminologyEntryTagName()) == mrml.SEGMENT_TERMINOLOGY
    assert tag(copy, mrml.LABELMAP_DIGEST_TAG) is None
    assert tag(anomaly, "DICOM.SegmentAlgorithmType") == "SEMIAUTOMATIC"  # a threshold chosen by a person

    # Edited again: a second copy with a name of its own; the first copy is left alone.
    mine_again = edited(nodes)
    mrml.update_segmentation_threshold(result, nodes.segmentation, 2.0, if_edited="keep")
    assert segment_names(nodes) == ["Anomaly", "Anomaly (edited)", "Anomaly (edited) 2"]
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node, "Anomaly (edited) 2"), mine_again)
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node, "Anomaly (edited)"), mine)
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), result.labelmap_at(2.0))
    # DICOM SEG export merges all segments on the input grid.
    values, _, _ = merged_reference_labelmap(nodes.segmentation)
    assert np.array_equal(values != 0, (mine != 0) | (mine_again != 0) | (result.labelmap != 0))

    # A rerun keeps the edits the same way.
    edited(nodes)
    mrml.result_to_nodes(result, node, previous=nodes, if_edited="keep")
    assert segment_names(nodes)[-1] == "Anomaly (edited) 3" and not mrml.segment_was_edited(nodes)


def test_keep_with_a_segment_sharing_the_labelmap_layer(scene):
    """Segment Editor often puts segments into one shared labelmap layer: the copy of the edits and
    the other segment keep their own voxels."""
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    segmentation = nodes.segmentation.GetSegmentation()
    note_id = segmentation.AddEmptySegment("", "Note", [0.0, 1.0, 0.0])
    labels = result.labelmap.astype(np.uint8)
    labels[7, 1:3, 2:4] = 1  # added to Anomaly
    labels[0, 0:2, 0:3] = 2  # the Note segment
    source = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "painted")
    source.CopyOrientation(node)
    slicer.util.updateVolumeFromArray(source, labels)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(nodes.segment_id)
    ids.InsertNextValue(note_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, nodes.segmentation, ids)
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    assert segmentation.GetSegment(nodes.segment_id).GetRepresentation(labelmap_name) is \
        segmentation.GetSegment(note_id).GetRepresentation(labelmap_name)  # one shared layer

    assert mrml.segment_was_edited(nodes)
    nodes.set_threshold(4.0, if_edited="keep")
    assert segment_names(nodes) == ["Anomaly", "Note", "Anomaly (edited)"]
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), result.labelmap_at(4.0))
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node, "Anomaly (edited)"), (labels == 1).astype(np.uint8))
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node, "Note"), (labels == 2).astype(np.uint8))
    assert not mrml.segment_was_edited(nodes)


def test_threshold_overwrites_edits_when_asked(scene, slicer_modules):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras(flip=True))
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    edited(nodes)
    assert nodes.set_threshold(4.0, if_edited="overwrite") == 4
    assert segment_names(nodes) == ["Anomaly"]
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), result.labelmap_at(4.0))
    assert np.array_equal(slicer.util.arrayFromVolume(nodes.labelmap), result.labelmap_at(4.0))
    assert not mrml.segment_was_edited(nodes)
    # Unedited, the default updates without asking.
    assert nodes.set_threshold(1.0) == result.labelmap[LESION].size


# --------------------------------------------------------------------------- input selection
def test_input_candidates(scene):
    mri = add_volume(scene, synthetic_array(), oblique_ijk_to_ras(), name="mri")
    photo = add_volume(scene, np.zeros((1, 4, 5, 3), np.uint8), np.eye(4), name="photo", class_name="vtkMRMLVectorVolumeNode")
    mask = add_volume(scene, np.zeros(SHAPE, np.uint8), np.eye(4), name="mask", class_name="vtkMRMLLabelMapVolumeNode")
    tensor = scene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "dti")
    dwi = scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "dwi")
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "model")
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(mri)), mri)

    assert mrml.is_input_candidate(mri) and mrml.is_input_candidate(photo)
    for other in (mask, tensor, dwi, model, None, nodes.heatmap, nodes.labelmap, nodes.segmentation):
        assert not mrml.is_input_candidate(other)
    assert nodes.heatmap.IsA("vtkMRMLScalarVolumeNode")  # excluded by its role, not by its class
    assert mrml.input_candidates(scene) == [mri, photo]
    copy = add_volume(scene, synthetic_array(), np.eye(4), name="copy")
    copy.SetAttribute(mrml.ROLE_ATTRIBUTE, mrml.ROLE_HEATMAP)
    assert mrml.input_candidates(scene) == [mri, photo]


def test_single_slice_and_reference_free_segmentations(scene):
    """A 2D image (one slice) and a segmentation made without an input node (on the result's own
    grid) take the same path: exact content, no false "edited" after an update."""
    from HiMatchADLib.core.result import DetectionResult

    node = add_volume(scene, synthetic_array()[:1], oblique_ijk_to_ras(flip=True), name="b-scan")
    image = mrml.image_from_volume_node(node)
    assert image.is_2d
    heat = np.zeros((1, SHAPE[1], SHAPE[2]), np.float32)
    heat[0, 3:6, 4:9] = 3.0
    heat[0, 1, 1] = 0.5
    result = DetectionResult(heatmap=heat, foreground=np.ones(heat.shape, bool), threshold=1.0, geometry=image.geometry,
                             slice_axis=0, slice_scores=np.array([3.0], np.float32), volume_score=3.0, supports=[[]],
                             min_component_size=1, name="b-scan")
    nodes = mrml.result_to_nodes(result, node)
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), result.labelmap)
    assert not mrml.segment_was_edited(nodes)
    assert nodes.set_threshold(0.2) == 16 and not mrml.segment_was_edited(nodes)

    segmentation, segment_id, labelmap = mrml.labelmap_to_segmentation(result, None, scene=scene)
    assert np.allclose(ijk(labelmap), oblique_ijk_to_ras(flip=True), atol=1e-9)
    values, image_to_world, _ = merged_reference_labelmap(segmentation)
    assert np.allclose(image_to_world, ijk(labelmap), atol=1e-6) and np.array_equal(values != 0, result.labelmap != 0)
    assert mrml.update_segmentation_threshold(result, segmentation, 100.0, labelmap_node=labelmap) == 0
    free = mrml.ResultNodes(result, None, labelmap=labelmap, segmentation=segmentation, segment_id=segment_id)
    assert not mrml.segment_was_edited(free)
    assert mrml.update_segmentation_threshold(result, segmentation, 1.0, labelmap_node=labelmap) == 15
    assert np.array_equal(mrml.segment_to_array(segmentation, labelmap), result.labelmap)
