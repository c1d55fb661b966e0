"""Tests of the MRML adapter (``HiMatchADLib.mrml``) against Slicer's real MRML (``slicer-core``).

Skipped when ``slicer-core`` is not installed. Detection results are built by hand, so the detector
is not needed here; what is tested is the geometry of every output node (oblique volumes included),
the segmentation, the threshold update and the reuse of nodes on a second run.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from HiMatchADLib import mrml  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError  # noqa: E402
from HiMatchADLib.io.readers import read_image  # noqa: E402
from HiMatchADLib.core.result import DetectionResult, Support  # noqa: E402

SHAPE = (9, 12, 14)  # (nz, ny, nx)
LESION = (slice(3, 6), slice(4, 8), slice(6, 10))


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis /= np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def oblique_ijk_to_ras(flip: bool = False) -> np.ndarray:
    """Non-axis-aligned, anisotropic, off-origin IJK-to-RAS (optionally left-handed)."""
    m = np.eye(4)
    directions = rotation((0.3, -0.5, 0.8), 27.0)
    if flip:
        directions = directions @ np.diag([1.0, -1.0, 1.0])
    m[:3, :3] = directions @ np.diag([0.7, 0.9, 2.3])
    m[:3, 3] = (-41.25, 17.5, 63.0)
    return m


@contextlib.contextmanager
def slicer_scene():
    """A scene as the application starts with: default colour tables, three slice views."""
    s = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()  # default colour tables, as in the application
    colors.SetMRMLScene(s)
    for name in ("Red", "Yellow", "Green"):
        slice_node = slicer.vtkMRMLSliceNode()
        slice_node.SetName(name)
        slice_node.SetLayoutName(name)
        slice_node.SetSingletonTag(name)
        slice_node.SetDefaultOrientation({"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}[name])
        s.AddNode(slice_node)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        composite.SetSingletonTag(name)
        s.AddNode(composite)
    try:
        yield s
    finally:
        colors.SetMRMLScene(None)
        s.Clear(1)


@pytest.fixture
def scene():
    with slicer_scene() as s:
        yield s


def add_volume(scene, array, ijk_to_ras, name="case", class_name="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, array)
    node.CreateDefaultDisplayNodes()
    return node


def synthetic_array(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = (100 + 10 * rng.standard_normal(SHAPE)).astype(np.int16)
    arr[LESION] += 80
    return arr


def make_result(image, slice_axis=0, scale=1.0) -> DetectionResult:
    """A hand-made result on ``image``'s grid: graded scores peaking in the lesion."""
    nz, ny, nx = image.array.shape
    heat = np.zeros((nz, ny, nx), np.float32)
    heat[LESION] = 3.0 * scale
    heat[4, 5:7, 7:9] = 5.0 * scale  # the lesion's core
    heat[1, 1, 1] = 0.4 * scale  # a faint spot, below threshold
    fg = np.ones_like(heat, dtype=bool)
    fg[:, :, 0] = False
    n = heat.shape[slice_axis]
    scores = np.array([float(np.take(heat, i, axis=slice_axis).max()) for i in range(n)], dtype=np.float32)
    scores[0] = np.nan  # a slice without foreground
    supports = [[Support(f"normal_{j}.nii.gz", i + j, 0.9 - 0.1 * j) for j in range(3)] for i in range(n)]
    supports[0] = []
    return DetectionResult(
        heatmap=heat,
        foreground=fg,
        threshold=1.0 * scale,
        geometry=image.geometry,
        slice_axis=slice_axis,
        slice_scores=scores,
        volume_score=float(np.nanmax(scores)),
        supports=supports,
        min_component_size=1,
        name=image.name,
    )


def ijk(node) -> np.ndarray:
    return mrml.ijk_to_ras_matrix(node)


def node_count(scene, class_name) -> int:
    return scene.GetNumberOfNodesByClass(class_name)


def segment_voxels_ras(segmentation_node, segment_id) -> np.ndarray:
    """RAS positions of the voxels of a segment, from its own oriented image data."""
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    dims = image.GetDimensions()
    extent = image.GetExtent()
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    ks, js, is_ = np.nonzero(values)
    index = np.stack([is_ + extent[0], js + extent[2], ks + extent[4], np.ones_like(ks)]).astype(float)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return (slicer.util.arrayFromVTKMatrix(m) @ index)[:3].T


def sorted_rows(points: np.ndarray) -> np.ndarray:
    points = np.round(np.asarray(points, dtype=float), 6)
    return points[np.lexsort(points.T[::-1])]


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("flip", [False, True])
def test_geometry_round_trip(flip):
    m = oblique_ijk_to_ras(flip)
    geometry = mrml.geometry_from_ijk_to_ras(m, (SHAPE[2], SHAPE[1], SHAPE[0]))
    assert np.allclose(geometry.spacing, (0.7, 0.9, 2.3))
    assert np.allclose(geometry.direction.T @ geometry.direction, np.eye(3))
    assert np.allclose(mrml.ijk_to_ras_from_geometry(geometry), m, atol=1e-12)
    # A voxel's LPS position is its RAS position with the first two axes negated.
    index = np.array([3, 5, 7])
    ras = (m @ np.append(index, 1.0))[:3]
    assert np.allclose(geometry.index_to_physical(index), ras * (-1, -1, 1))


def test_degenerate_matrix_is_refused():
    m = oblique_ijk_to_ras()
    m[:3, 1] = 0
    with pytest.raises(HiMatchADError):
        mrml.geometry_from_ijk_to_ras(m, (2, 2, 2))


@pytest.mark.parametrize("flip", [False, True])
def test_image_geometry_matches_what_simpleitk_reads_from_slicers_nrrd(scene, tmp_path, flip):
    """Slicer writes the node to NRRD with its own storage node; SimpleITK (LPS) must read back
    exactly the geometry and voxels that the adapter produced from the node."""
    sitk = pytest.importorskip("SimpleITK")
    arr = synthetic_array()
    node = add_volume(scene, arr, oblique_ijk_to_ras(flip))
    image = mrml.image_from_volume_node(node)

    path = tmp_path / "case.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    assert storage.WriteData(node)

    ref = sitk.ReadImage(str(path))
    assert ref.GetSize() == image.geometry.size
    assert np.allclose(ref.GetSpacing(), image.geometry.spacing, atol=1e-6)
    assert np.allclose(ref.GetOrigin(), image.geometry.origin, atol=1e-6)
    assert np.allclose(np.reshape(ref.GetDirection(), (3, 3)), image.geometry.direction, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(ref).astype(np.float32), image.array)
    # ... and the library's own reader agrees.
    assert read_image(path).geometry.same_as(image.geometry, tol=1e-6)


def test_image_is_a_copy_with_pixel_type(scene):
    arr = synthetic_array()
    node = add_volume(scene, arr, oblique_ijk_to_ras())
    image = mrml.image_from_volume_node(node)
    assert image.array.dtype == np.float32
    assert image.pixel_type == "int16"
    assert image.name == "case"
    assert not image.is_2d
    view = slicer.util.arrayFromVolume(node)
    view[:] = 0
    slicer.util.arrayFromVolumeModified(node)
    assert np.array_equal(image.array, arr.astype(np.float32))


def test_single_slice_volume_is_2d_and_rgb_becomes_luminance(scene):
    grey = np.arange(12 * 16, dtype=np.uint8).reshape(1, 12, 16)
    node = add_volume(scene, grey, np.diag([-1.0, -1.0, 1.0, 1.0]), name="slice")
    image = mrml.image_from_volume_node(node)
    assert image.is_2d and image.pixel_type == "uint8"
    assert image.array.shape == (1, 12, 16)
    assert np.allclose(image.geometry.direction, np.eye(3)) and np.allclose(image.geometry.origin, 0)

    rgb = np.zeros((1, 4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    vector = add_volume(scene, rgb, np.eye(4), name="photo", class_name="vtkMRMLVectorVolumeNode")
    lum = mrml.image_from_volume_node(vector)
    assert lum.array.shape == (1, 4, 5)
    assert np.allclose(lum.array, 200 * 0.299, atol=1e-3)


def test_non_finite_voxels_and_bad_inputs(scene):
    arr = synthetic_array().astype(np.float32)
    arr[0, 0, :3] = np.nan
    node = add_volume(scene, arr, np.eye(4))
    image = mrml.image_from_volume_node(node)
    assert np.isnan(image.array[0, 0, :3]).all() and image.warnings
    with pytest.raises(HiMatchADError):
        mrml.image_from_volume_node(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(HiMatchADError):
        mrml.image_from_volume_node(empty)
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "model")
    with pytest.raises(HiMatchADError):
        mrml.image_from_volume_node(model)


# --------------------------------------------------------------------------- output nodes
@pytest.mark.parametrize("flip", [False, True])
def test_heatmap_and_labelmap_have_the_input_geometry(scene, flip):
    m = oblique_ijk_to_ras(flip)
    node = add_volume(scene, synthetic_array(), m)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    result = make_result(mrml.image_from_volume_node(node))

    heatmap = mrml.heatmap_to_volume_node(result, node)
    labelmap = mrml.labelmap_to_volume_node(result, node)
    for out in (heatmap, labelmap):
        assert np.array_equal(ijk(out), ijk(node))  # exactly, not approximately
        assert out.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
        assert out.GetTransformNodeID() == transform.GetID()
    assert np.array_equal(slicer.util.arrayFromVolume(heatmap), result.heatmap)
    assert np.array_equal(slicer.util.arrayFromVolume(labelmap), result.labelmap)
    assert labelmap.IsA("vtkMRMLLabelMapVolumeNode")
    segmentation, _, _ = mrml.labelmap_to_segmentation(result, node, labelmap_node=labelmap)
    assert segmentation.GetTransformNodeID() == transform.GetID()
    assert np.array_equal(mrml.segment_to_array(segmentation, node), result.labelmap)
    # Without a reference node the geometry comes from the result (LPS -> RAS).
    free = mrml.heatmap_to_volume_node(result, None, scene=scene)
    assert np.allclose(ijk(free), m, atol=1e-9)


def test_result_on_another_grid_is_refused(scene):
    node = add_volume(scene, synthetic_array(), np.eye(4))
    other = add_volume(scene, np.zeros((4, 4, 4), np.int16), np.eye(4), name="other")
    result = make_result(mrml.image_from_volume_node(node))
    with pytest.raises(HiMatchADError):
        mrml.heatmap_to_volume_node(result, other)


def test_heatmap_display(scene):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    result = make_result(mrml.image_from_volume_node(node))
    heatmap = mrml.heatmap_to_volume_node(result, node)
    display = heatmap.GetDisplayNode()
    assert display.GetColorNodeID() in mrml.HEATMAP_COLOR_NODE_IDS
    assert display.GetApplyThreshold() and not display.GetAutoWindowLevel()
    low = display.GetLowerThreshold()
    assert 0.0 < low < 0.4 * 1.0  # background (0) transparent, weak scores still visible
    assert display.GetWindowLevelMax() >= result.threshold

    # Slicer's Inferno colour table is preferred when the application has loaded it.
    inferno = slicer.vtkMRMLColorTableNode()
    inferno.SetName("Inferno")
    inferno.SetSingletonTag("FileInferno.txt")
    inferno.SetTypeToGrey()
    scene.AddNode(inferno)
    assert inferno.GetID() == "vtkMRMLColorTableNodeFileInferno.txt"
    mrml.heatmap_to_volume_node(result, node)
    assert heatmap.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"


def test_heatmap_display_starts_at_the_normal_tissue_level(scene):
    # A calibrated result knows the median score of normal tissue: at or below it is transparent.
    node = add_volume(scene, synthetic_array(), np.eye(4))
    result = make_result(mrml.image_from_volume_node(node))
    result.threshold_info = {"normal_pixel_median": 0.5}
    display = mrml.heatmap_to_volume_node(result, node).GetDisplayNode()
    assert display.GetWindowLevelMin() == pytest.approx(0.5)
    assert 0.5 < display.GetLowerThreshold() < 0.6 and display.GetWindowLevelMax() >= result.threshold
    # a floor that is not below the threshold (or missing) falls back to 0
    result.threshold_info = {"normal_pixel_median": 2.0}
    assert result.display_range()[0] == 0.0
    result.threshold_info = {"normal_pixel_median": None}
    assert result.display_range()[0] == 0.0


@pytest.mark.parametrize("flip", [False, True])
def test_anomaly_segment_lies_over_the_lesion(scene, flip):
    m = oblique_ijk_to_ras(flip)
    node = add_volume(scene, synthetic_array(), m)
    result = make_result(mrml.image_from_volume_node(node))
    segmentation, segment_id, labelmap = mrml.labelmap_to_segmentation(result, node)

    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "Anomaly"
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    assert segment.GetTerminology() == mrml.SEGMENT_TERMINOLOGY
    # Reference geometry = the input volume (what DICOM SEG export and Segment Editor use).
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReference(role).GetID() == node.GetID()

    # Every lesion voxel of the input is in the segment at the same RAS position, and nothing else.
    ks, js, is_ = np.nonzero(result.labelmap)
    assert ks.size == result.labelmap[LESION].size
    lesion_ras = (m @ np.stack([is_, js, ks, np.ones_like(ks)]).astype(float))[:3].T
    assert np.allclose(sorted_rows(segment_voxels_ras(segmentation, segment_id)), sorted_rows(lesion_ras), atol=1e-6)
    # Exported back on the input grid (what "Export to labelmap" gives) it is the labelmap itself.
    assert np.array_equal(mrml.segment_to_array(segmentation, node), result.labelmap)
    assert np.array_equal(ijk(labelmap), m)


def test_threshold_update_changes_the_segment(scene):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    heat_before = slicer.util.arrayFromVolume(nodes.heatmap).copy()
    lesion_voxels = nodes.anomalous_voxels
    assert lesion_voxels == result.labelmap[LESION].size

    core = nodes.set_threshold(4.0)
    assert core == 4 and result.threshold == 4.0
    assert np.array_equal(mrml.segment_to_array(nodes.segmentation, node), result.labelmap_at(4.0))
    assert np.array_equal(slicer.util.arrayFromVolume(nodes.labelmap), result.labelmap_at(4.0))

    lower = mrml.update_segmentation_threshold(result, nodes.segmentation, 0.2)
    assert lower == lesion_voxels + 1  # the faint spot joins
    assert mrml.segment_to_array(nodes.segmentation, node).sum() == lower

    assert nodes.set_threshold(10.0) == 0
    assert mrml.segment_to_array(nodes.segmentation, node).sum() == 0
    segmentation = nodes.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetSegment(nodes.segment_id) is not None
    # The maps were not touched.
    assert np.array_equal(slicer.util.arrayFromVolume(nodes.heatmap), heat_before)


def test_second_run_reuses_the_nodes(scene):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    image = mrml.image_from_volume_node(node)
    first = mrml.result_to_nodes(make_result(image), node)
    classes = ["vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode",
               "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode"]
    counts = {c: node_count(scene, c) for c in classes}
    ids = [first.heatmap.GetID(), first.labelmap.GetID(), first.segmentation.GetID(), first.table.GetID(), first.chart.GetID()]

    second_result = make_result(image, scale=2.0)
    again = mrml.result_to_nodes(second_result, node, previous=first)
    found = mrml.result_to_nodes(second_result, node)  # found through their role and input reference
    for nodes in (again, found):
        assert [nodes.heatmap.GetID(), nodes.labelmap.GetID(), nodes.segmentation.GetID(), nodes.table.GetID(),
                nodes.chart.GetID()] == ids
        assert nodes.segment_id == first.segment_id
    assert {c: node_count(scene, c) for c in classes} == counts
    assert np.array_equal(slicer.util.arrayFromVolume(again.heatmap), second_result.heatmap)
    assert again.chart.GetNumberOfPlotSeriesNodes() == 1

    # Another input volume gets its own outputs.
    other = add_volume(scene, synthetic_array(1), np.eye(4), name="other")
    third = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(other)), other, previous=first)
    assert third.heatmap.GetID() not in ids and third.segmentation.GetID() not in ids
    assert node_count(scene, "vtkMRMLSegmentationNode") == counts["vtkMRMLSegmentationNode"] + 1

    mrml.remove_result_nodes(third)
    assert node_count(scene, "vtkMRMLSegmentationNode") == counts["vtkMRMLSegmentationNode"]
    assert other.GetScene() is scene


def test_scores_table_and_plot(scene):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    result = make_result(mrml.image_from_volume_node(node))
    nodes = mrml.result_to_nodes(result, node)
    table = nodes.table.GetTable()
    assert table.GetNumberOfRows() == SHAPE[0]
    assert [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())] == list(mrml.TABLE_COLUMNS)
    scores = slicer.util.arrayFromTableColumn(nodes.table, "Score")
    expected = np.nan_to_num(np.asarray(result.slice_scores, dtype=float), nan=0.0)
    assert np.allclose(scores, expected)
    assert list(slicer.util.arrayFromTableColumn(nodes.table, "Foreground")[:2]) == [0, 1]
    assert table.GetValueByName(4, "Top reference").ToString() == "normal_0.nii.gz [4]"
    series = nodes.chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNodeID() == nodes.table.GetID()
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("Slice", "Score")
    assert nodes.most_anomalous_slice == 4
    assert mrml.supports_for_slice(result, 4)[0] == ("normal_0.nii.gz", 4, pytest.approx(0.9))
    assert mrml.supports_for_slice(result, 0) == [] and mrml.supports_for_slice(result, 99) == []


def test_slice_views_show_input_and_heatmap(scene):
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(node)), node, heatmap_opacity=0.6)
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == node.GetID()
        assert composite.GetForegroundVolumeID() == nodes.heatmap.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.6)
    assert mrml.set_heatmap_opacity(scene, nodes.heatmap, 0.3) == 3
    assert composites[0].GetForegroundOpacity() == pytest.approx(0.3)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_slice_navigation(scene, slice_axis):
    m = oblique_ijk_to_ras()
    node = add_volume(scene, synthetic_array(), m)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -3.0, 12.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    result = make_result(mrml.image_from_volume_node(node), slice_axis=slice_axis)

    index = 4
    center = np.array([(SHAPE[2] - 1) / 2, (SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2, 1.0])
    center[2 - slice_axis] = index
    expected_local = (m @ center)[:3]
    assert np.allclose(mrml.slice_center_ras(result, index), expected_local, atol=1e-9)

    world = (shift @ np.append(expected_local, 1.0))[:3]
    assert mrml.slice_index_at_ras(result, node, world) == index
    assert mrml.slice_index_at_ras(result, node, world + 1e4) == -1

    mrml.jump_slices_to(scene, expected_local, reference_node=node)
    red = scene.GetNodeByID("vtkMRMLSliceNodeRed")
    slice_to_ras = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())
    assert np.allclose(slice_to_ras[:3, 3], world, atol=1e-6)


def test_segmentation_export_to_nifti_keeps_the_input_geometry(scene, tmp_path):
    """Slicer's own "export segmentation to file" gives the labelmap on the input's LPS grid."""
    sitk = pytest.importorskip("SimpleITK")
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras(flip=True))
    image = mrml.image_from_volume_node(node)
    nodes = mrml.result_to_nodes(make_result(image), node)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsBinaryLabelmapRepresentationToFiles(
        str(tmp_path), nodes.segmentation, None, "nii.gz", True, node
    )
    assert ok
    files = list(tmp_path.glob("*.nii.gz"))
    assert len(files) == 1
    exported = sitk.ReadImage(str(files[0]))
    assert np.array_equal(sitk.GetArrayFromImage(exported) > 0, nodes.result.labelmap > 0)
    assert np.allclose(exported.GetOrigin(), image.geometry.origin, atol=1e-4)
    assert np.allclose(exported.GetSpacing(), image.geometry.spacing, atol=1e-5)
    assert np.allclose(np.reshape(exported.GetDirection(), (3, 3)), image.geometry.direction, atol=1e-5)


def test_outputs_join_the_input_study(scene):
    """Outputs go to the input's study in the subject hierarchy (where DICOM export looks)."""
    node = add_volume(scene, synthetic_array(), oblique_ijk_to_ras())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    study = sh.CreateStudyItem(patient, "study")
    sh.CreateItem(study, node)
    nodes = mrml.result_to_nodes(make_result(mrml.image_from_volume_node(node)), node)
    for out in (nodes.heatmap, nodes.labelmap, nodes.segmentation, nodes.table, nodes.chart):
        assert sh.GetItemParent(sh.GetItemByDataNode(out)) == study
