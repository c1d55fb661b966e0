"""Tests of the MRML adapter's outputs as Slicer exports and edits them (``slicer-core``).

- the segmentation of a volume with an oblique grid *and* a parent transform gives, in DICOM SEG
  export (merged labelmap on the reference geometry) and in "export to labelmap", exactly the
  detector's labelmap on the input grid, on the first run and on a second one.

Scene, volumes and hand-made results come from ``test_mrml``.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from vtk.util import numpy_support  # noqa: E402

from HiMatchADLib import mrml  # noqa: E402
from test_mrml import (  # noqa: E402,F401  (scene is a fixture)
    LESION,
    SHAPE,
    add_volume,
    ijk,
    make_result,
    oblique_ijk_to_ras,
    rotation,
    scene,
    segment_voxels_ras,
    sorted_rows,
    synthetic_array,
)

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
        exported_world = exported.GetParentTransformNode()
        assert exported_world is None or exported_world.GetID() == transform.GetID()
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
