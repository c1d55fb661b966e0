"""MRML adapter: Slicer volume nodes in, heatmap / labelmap / segmentation / score nodes out.

This is the only module of the library that imports ``slicer`` (and ``vtk``); nothing else in
``HiMatchADLib`` imports it, so the library stays usable without Slicer. It needs Slicer's MRML
and logic libraries only, not Qt: it runs inside the 3D Slicer application and, for tests, on the
``slicer-core`` wheel.

Geometry conventions
--------------------
MRML volume nodes place voxels in RAS with a 4x4 ``IJKToRAS`` matrix; ``slicer.util.arrayFromVolume``
returns a *view* of the voxels in ``(k, j, i)`` numpy order. The library works in ITK's LPS space
(:class:`~HiMatchADLib.imageio.Geometry`: ``physical = origin + direction @ (spacing * ijk)``) on
arrays of the same ``(k, j, i)`` order. The conversion is a sign flip of the first two world axes::

    IJKToLPS = diag(-1, -1, 1, 1) @ IJKToRAS

Output volumes copy the input node's orientation (``CopyOrientation``) and parent transform, so
heatmap, labelmap and segmentation overlay the input exactly, oblique volumes included; the
segmentation's reference geometry is the input volume, which Slicer's DICOM SEG export relies on.

Output nodes are tagged with the attribute ``HiMatchAD.Role`` and a node reference to their input
volume, so a second run on the same input updates them instead of adding new ones;
:func:`is_input_candidate` keeps them (and labelmaps) out of the input choices.

Safety rules
------------
- A result is attached only to the volume it was computed on: :func:`check_result_matches`
  compares the node's grid with ``result.geometry``, and :func:`node_in_scene` tells whether a
  node object still belongs to its scene (node IDs are reused after a scene close).
- The "Anomaly" segment is tagged for DICOM SEG export (algorithm AUTOMATIC "HiMatch-AD", a coded
  terminology of Slicer's DICOM master list).
- Each import records what it put into the segment; replacing a segment edited since then (new
  threshold, second run) raises :class:`SegmentEditedError` unless the caller says to keep a copy
  of the edits or to overwrite them (``if_edited``).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from .errors import HiMatchADError
from .imageio import Geometry, Image
from .result import DetectionResult

#: Flips RAS <-> LPS (it is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

ROLE_ATTRIBUTE = "HiMatchAD.Role"
INPUT_REFERENCE_ROLE = "HiMatchADInputVolume"
ROLE_HEATMAP = "heatmap"
ROLE_LABELMAP = "labelmap"
ROLE_SEGMENTATION = "segmentation"
ROLE_TABLE = "scores"
ROLE_PLOT_SERIES = "scoreSeries"
ROLE_CHART = "scoreChart"

SEGMENT_NAME = "Anomaly"
SEGMENT_COLOR = (1.0, 0.35, 0.1)
#: Colour of the copies that keep a user's edits of the "Anomaly" segment (``if_edited="keep"``).
EDITED_SEGMENT_COLOR = (0.95, 0.85, 0.2)

#: Segment tags read by Slicer's DICOM SEG export (``DICOMSegmentationPlugin``): without them the
#: SEG says the segment was drawn by hand (MANUAL).
SEGMENT_ALGORITHM_TYPE_TAG = "DICOM.SegmentAlgorithmType"
SEGMENT_ALGORITHM_NAME_TAG = "DICOM.SegmentAlgorithmName"
ALGORITHM_NAME = "HiMatch-AD"
#: Digest of the labelmap the last import put into the segment; a segment whose content no longer
#: has this digest was edited (see :func:`segment_was_edited`).
LABELMAP_DIGEST_TAG = "HiMatchAD.LabelmapDigest"
IF_EDITED_CHOICES = ("raise", "keep", "overwrite")

#: Terminology of the "Anomaly" segment, from Slicer's DICOM master list
#: (Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json):
#: category SCT 49755003 "Morphologically Altered Structure" (CID 7150), type SCT 4147007 "Mass"
#: (CID 7159, context group LesionSegmentationTypes). Codes are (scheme, value, meaning).
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
SEGMENT_CATEGORY = ("SCT", "49755003", "Morphologically Altered Structure")
SEGMENT_TYPE = ("SCT", "4147007", "Mass")


def serialize_terminology(category, type_, modifier=None, context: str = TERMINOLOGY_CONTEXT,
                          region_context: str = REGION_CONTEXT, region=None, region_modifier=None) -> str:
    """A segment terminology entry in the serialized form of Slicer 5.x.

    The same string as ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``: seven
    ``~``-separated fields (context, category, type, type modifier, region context, region, region
    modifier), each code written ``scheme^value^meaning`` (``^^`` when absent).
    """

    def code(c) -> str:
        return "^".join(c) if c else "^^"

    return "~".join([context, code(category), code(type_), code(modifier), region_context, code(region), code(region_modifier)])


SEGMENT_TERMINOLOGY = serialize_terminology(SEGMENT_CATEGORY, SEGMENT_TYPE)
#: Terminologies that earlier versions of this module gave the segment; replaced on the next import.
FORMER_SEGMENT_TERMINOLOGIES = (
    serialize_terminology(("SCT", "49755003", "Morphologically Altered Structure"), ("SCT", "52988006", "Lesion")),
)

#: Perceptual colour maps for the heatmap, best first: Slicer's Inferno, ColdToHotRainbow, then
#: built-in tables that exist in every scene with default colours.
HEATMAP_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeRainbow",
)

TABLE_COLUMNS = ("Slice", "Score", "Foreground", "Top reference", "Top similarity")


# --------------------------------------------------------------------------- geometry
def ijk_to_ras_matrix(node) -> np.ndarray:
    """The node's ``IJKToRAS`` matrix as a 4x4 numpy array (local coordinates, parent transform excluded)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def geometry_from_ijk_to_ras(ijk_to_ras, size: Sequence[int], is_2d: bool = False) -> Geometry:
    """LPS :class:`Geometry` of a grid of ``size = (nx, ny, nz)`` voxels placed by ``ijk_to_ras``."""
    m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    linear = RAS_TO_LPS @ m[:3, :3]  # IJK -> LPS
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(linear)):
        raise HiMatchADError("the volume's IJK-to-RAS matrix is degenerate (zero spacing); fix its geometry first")
    direction = linear / spacing
    origin = RAS_TO_LPS @ m[:3, 3]
    return Geometry(tuple(int(s) for s in size), tuple(spacing), tuple(origin), direction, is_2d)


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """4x4 ``IJKToRAS`` matrix of an LPS :class:`Geometry`."""
    m = np.eye(4)
    m[:3, :3] = RAS_TO_LPS @ np.asarray(geometry.direction, dtype=float) @ np.diag(geometry.spacing)
    m[:3, 3] = RAS_TO_LPS @ np.asarray(geometry.origin, dtype=float)
    return m


def lps_to_ras(point) -> np.ndarray:
    return RAS_TO_LPS @ np.asarray(point, dtype=float)


def volume_size(node) -> tuple[int, int, int]:
    """``(nx, ny, nz)`` of a volume node's voxel grid."""
    image = node.GetImageData() if node is not None else None
    if image is None:
        raise HiMatchADError("the volume has no voxels (no image data); load or select another volume")
    return tuple(int(d) for d in image.GetDimensions())


def image_from_volume_node(node, name: Optional[str] = None) -> Image:
    """Copy a scalar (or RGB) volume node into a library :class:`Image` (LPS geometry, float32 copy).

    The voxels are copied, never a view of the node's memory, so the node may change or be deleted
    while the library works on the image in another thread. RGB(A) volumes are converted to
    luminance. A single-slice volume becomes a 2D image, as a PNG or JPEG read by the library would.
    """
    if node is None:
        raise HiMatchADError("no input volume selected")
    if not node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLVectorVolumeNode"):
        raise HiMatchADError(f"'{node.GetName()}' is a {node.GetClassName()}; select a scalar volume")
    size = volume_size(node)
    view = slicer.util.arrayFromVolume(node)
    pixel_type = str(view.dtype)
    if view.ndim == 4:  # vector volume (k, j, i, components)
        ncomp = view.shape[3]
        if ncomp >= 3:
            data = np.asarray(view[..., :3], dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        else:
            data = np.array(view[..., 0], dtype=np.float32, copy=True)
    elif view.ndim == 3:
        data = np.array(view, dtype=np.float32, copy=True)
    else:
        raise HiMatchADError(f"'{node.GetName()}' has an unsupported voxel layout {view.shape}")
    if data.size == 0:
        raise HiMatchADError(f"'{node.GetName()}' has no voxels")
    geometry = geometry_from_ijk_to_ras(ijk_to_ras_matrix(node), size, is_2d=(size[2] == 1))
    image = Image(data, geometry, name=name or node.GetName() or "volume", path=None, pixel_type=pixel_type)
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int((~finite).sum())
        if n_bad == finite.size:
            raise HiMatchADError(f"'{node.GetName()}': every voxel is NaN or infinite; nothing to analyse")
        image.array = np.where(finite, data, np.nan).astype(np.float32)
        image.warnings.append(f"{node.GetName()}: {n_bad} non-finite voxels (NaN/Inf) treated as background")
    return image


#: Largest difference accepted between a result's geometry and its volume node's: mm for spacing
#: and origin, unitless for the direction cosines (plus float32 rounding, as NIfTI stores them).
GEOMETRY_TOLERANCE = 1e-4


def geometry_differences(expected: Geometry, actual: Geometry, tol: float = GEOMETRY_TOLERANCE) -> list[str]:
    """What differs between two grids: size, spacing, origin, directions (empty when they match)."""

    def close(a, b) -> bool:
        return bool(np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-6, atol=tol))

    def fmt(v) -> str:
        return "(" + ", ".join(f"{x:.6g}" for x in np.asarray(v, dtype=float).reshape(-1)) + ")"

    differences = []
    if tuple(expected.size) != tuple(actual.size):
        differences.append(f"size {tuple(expected.size)} != {tuple(actual.size)}")
    if not close(expected.spacing, actual.spacing):
        differences.append(f"spacing {fmt(expected.spacing)} != {fmt(actual.spacing)} mm")
    if not close(expected.origin, actual.origin):
        shift = float(np.linalg.norm(np.subtract(expected.origin, actual.origin)))
        differences.append(f"origin {fmt(expected.origin)} != {fmt(actual.origin)} (LPS, {shift:.4g} mm apart)")
    if not close(expected.direction, actual.direction):
        angle = float(np.abs(np.asarray(expected.direction) - np.asarray(actual.direction)).max())
        differences.append(f"axis directions differ (largest cosine difference {angle:.4g})")
    return differences


def volume_geometry(node) -> Geometry:
    """LPS :class:`Geometry` of a volume node's voxel grid (its parent transform excluded)."""
    size = volume_size(node)
    return geometry_from_ijk_to_ras(ijk_to_ras_matrix(node), size, is_2d=(size[2] == 1))


def check_result_matches(result: DetectionResult, reference_node) -> None:
    """Raise :class:`HiMatchADError` unless ``result`` was computed on ``reference_node``'s voxel grid.

    The node's local geometry (size, spacing, origin and directions of its ``IJKToRAS``; its parent
    transform excluded) must be the result's :attr:`~DetectionResult.geometry` within
    :data:`GEOMETRY_TOLERANCE`. A result of another volume (another patient loaded after the scene
    was closed, a resampled or cropped copy) is refused, never attached.
    """
    if reference_node is None:
        raise HiMatchADError("no input volume node to compare the result with; select the volume that was analysed")
    name = reference_node.GetName()
    geometry = volume_geometry(reference_node)
    differences = geometry_differences(result.geometry, geometry)
    if not differences and tuple(np.shape(result.heatmap)) != geometry.shape:
        differences.append(f"heatmap array {tuple(np.shape(result.heatmap))} != voxel grid {geometry.shape}")
    if differences:
        raise HiMatchADError(
            f"the result '{result.name}' was not computed on the volume '{name}' (result vs volume: "
            + "; ".join(differences)
            + "); run the detection on this volume again"
        )


def node_in_scene(node, scene=None) -> bool:
    """True while ``node`` (this very object) belongs to ``scene`` (default: the node's own scene).

    False after the node was removed or the scene was closed, even when the scene now holds another
    node with the same ID (IDs are reused after a scene close): keep node objects, not node IDs, to
    find a job's input volume again.
    """
    if node is None:
        return False
    own = node.GetScene()
    if own is None or (scene is not None and own is not scene):
        return False
    node_id = node.GetID()
    return bool(node_id) and own.GetNodeByID(node_id) is node


def _require_in_scene(node, what: str) -> None:
    if not node_in_scene(node):
        name = node.GetName() if node is not None else "?"
        raise HiMatchADError(
            f"the {what} '{name}' is no longer in the scene (it was removed or the scene was closed); "
            "select a volume and run the detection again"
        )


def is_input_candidate(node) -> bool:
    """True for volumes this module can analyse: scalar volumes (and RGB vector volumes), not
    labelmaps, not tensor or diffusion volumes, and not outputs of this module (``HiMatchAD.Role``)."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        return False
    if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(ROLE_ATTRIBUTE):
        return False
    if node.IsA("vtkMRMLTensorVolumeNode"):  # vector (RGB) volumes derive from it, as diffusion tensors do
        return node.IsA("vtkMRMLVectorVolumeNode")
    return not node.IsA("vtkMRMLDiffusionWeightedVolumeNode") and not node.IsA("vtkMRMLMultiVolumeNode")


def input_candidates(scene) -> list:
    """The volume nodes of ``scene`` that :func:`is_input_candidate` accepts, in scene order."""
    return [node for node in _nodes_by_class(scene, "vtkMRMLVolumeNode") if is_input_candidate(node)]


def _place_like(node, reference_node, result: Optional[DetectionResult]) -> None:
    """Give ``node`` the reference's grid placement and parent transform (or the result's geometry)."""
    if reference_node is not None:
        node.CopyOrientation(reference_node)
        node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    elif result is not None:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_from_geometry(result.geometry)))
    else:
        raise ValueError("either a reference volume node or a result is needed to place an output node")


# --------------------------------------------------------------------------- node bookkeeping
def _scene_of(*candidates):
    for c in candidates:
        if c is None:
            continue
        if isinstance(c, slicer.vtkMRMLScene):
            return c
        scene = c.GetScene()
        if scene is not None:
            return scene
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise ValueError("no MRML scene: pass scene= or nodes that belong to a scene")
    return scene


def _nodes_by_class(scene, class_name: str) -> list:
    nodes = []
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        nodes.append(scene.GetNthNodeByClass(i, class_name))
    return nodes


def find_output_node(scene, class_name: str, role: str, reference_node):
    """The node of ``class_name`` made for ``reference_node`` with ``role`` by an earlier run, if any."""
    if scene is None or reference_node is None:
        return None
    for node in _nodes_by_class(scene, class_name):
        if node.GetAttribute(ROLE_ATTRIBUTE) != role:
            continue
        ref = node.GetNodeReference(INPUT_REFERENCE_ROLE)
        if ref is not None and ref.GetID() == reference_node.GetID():
            return node
    return None


def _output_node(scene, class_name: str, role: str, reference_node, node, name: str):
    if node is None:
        node = find_output_node(scene, class_name, role, reference_node)
    if node is None:
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    if reference_node is not None:
        node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, reference_node.GetID())
    return node


def _base_name(result: Optional[DetectionResult], reference_node) -> str:
    if reference_node is not None and reference_node.GetName():
        return reference_node.GetName()
    return (result.name if result is not None else None) or "volume"


def place_in_same_study(node, reference_node) -> None:
    """Put ``node`` under the subject hierarchy parent (e.g. the DICOM study) of ``reference_node``.

    DICOM export (segmentation as DICOM SEG, heatmap as a derived series) takes patient and study
    from there. Nothing happens when the reference has no subject hierarchy item.
    """
    scene = node.GetScene() if node is not None else None
    if scene is None or reference_node is None:
        return
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    invalid = sh.GetInvalidItemID()
    reference_item = sh.GetItemByDataNode(reference_node)
    if reference_item == invalid:
        return
    parent = sh.GetItemParent(reference_item)
    item = sh.GetItemByDataNode(node)
    if item == invalid:
        sh.CreateItem(parent, node)
    elif sh.GetItemParent(item) != parent:
        sh.SetItemParent(item, parent)


# --------------------------------------------------------------------------- heatmap
def heatmap_color_node_id(scene) -> Optional[str]:
    """ID of the first available colour node of :data:`HEATMAP_COLOR_NODE_IDS` in ``scene``."""
    for node_id in HEATMAP_COLOR_NODE_IDS:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    for name in ("Inferno", "ColdToHotRainbow"):
        for node in _nodes_by_class(scene, "vtkMRMLColorNode"):
            if node.GetName() == name:
                return node.GetID()
    return None


def configure_heatmap_display(node, result: DetectionResult) -> None:
    """Colour map, window and transparent background (values near 0) for a heatmap volume node."""
    scene = node.GetScene()
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if display is None:
        return
    low, high = result.display_range()
    with slicer.util.NodeModify(display):
        color_id = heatmap_color_node_id(scene) if scene is not None else None
        if color_id:
            display.SetAndObserveColorNodeID(color_id)
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(low, high)
        # Voxels below the lower threshold are transparent in slice views: the background (0) and
        # scores at or below those of typical normal tissue disappear, the anatomy stays visible.
        display.SetAutoThreshold(False)
        display.SetLowerThreshold(low + 1e-3 * (high - low))
        display.SetUpperThreshold(max(float(np.nanmax(result.heatmap)) if result.heatmap.size else high, high) + 1.0)
        display.SetApplyThreshold(True)
        display.SetInterpolate(True)


def heatmap_to_volume_node(result: DetectionResult, reference_node, node=None, scene=None, name: Optional[str] = None):
    """Write ``result.heatmap`` into a scalar volume node on the reference volume's grid.

    ``node``: an existing node to update; otherwise the heatmap node of an earlier run on the same
    reference is reused, or a new one is added to ``scene`` (default: the reference's scene).
    """
    node = _write_volume_node(result, reference_node, node, scene, "vtkMRMLScalarVolumeNode", ROLE_HEATMAP,
                              name or f"{_base_name(result, reference_node)} anomaly heatmap", result.heatmap.astype(np.float32, copy=False))
    configure_heatmap_display(node, result)
    return node


def _write_volume_node(result: DetectionResult, reference_node, node, scene, class_name: str, role: str, label: str, array: np.ndarray):
    """The output node of ``role`` (reused or added), placed on the reference grid, holding ``array``."""
    if reference_node is not None:
        _require_in_scene(reference_node, "input volume")
        check_result_matches(result, reference_node)
    scene = _scene_of(scene, node, reference_node)
    node = _output_node(scene, class_name, role, reference_node, node, label)
    _place_like(node, reference_node, result)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


# --------------------------------------------------------------------------- labelmap and segmentation
def labelmap_to_volume_node(result: DetectionResult, reference_node, node=None, scene=None, name: Optional[str] = None):
    """Write ``result.labelmap`` (uint8, 1 = anomalous) into a labelmap volume node on the reference grid."""
    node = _write_volume_node(result, reference_node, node, scene, "vtkMRMLLabelMapVolumeNode", ROLE_LABELMAP,
                              name or f"{_base_name(result, reference_node)} anomaly labelmap", result.labelmap.astype(np.uint8, copy=False))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def ensure_segmentation_converters() -> None:
    """Register the binary labelmap <-> closed surface conversion rules when nobody has.

    The Slicer application registers them when its Segmentations module starts; outside it (for
    example with ``slicer-core``) segments cannot even be created without them.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) > 0:
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


class SegmentEditedError(HiMatchADError):
    """The segment holds edits made since the detector last wrote it; replacing it would lose them."""


def _segment_tag(segment, name: str) -> Optional[str]:
    value = vtk.mutable("")
    return str(value) if segment.GetTag(name, value) else None


def _default_terminology() -> Optional[str]:
    """The terminology this Slicer version gives a new segment."""
    return _segment_tag(slicer.vtkSegment(), slicer.vtkSegment.GetTerminologyEntryTagName())


def _tag_segment(segment, algorithm_type: str = "AUTOMATIC") -> None:
    """DICOM SEG algorithm tags, and :data:`SEGMENT_TERMINOLOGY` unless a user chose another one.

    A terminology counts as chosen when it is neither missing, nor Slicer's default for new
    segments, nor one that an earlier version of this module wrote.
    """
    segment.SetTag(SEGMENT_ALGORITHM_TYPE_TAG, algorithm_type)
    segment.SetTag(SEGMENT_ALGORITHM_NAME_TAG, ALGORITHM_NAME)
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    current = _segment_tag(segment, tag)
    if not current or current in FORMER_SEGMENT_TERMINOLOGIES or current == _default_terminology():
        segment.SetTag(tag, SEGMENT_TERMINOLOGY)


def ensure_segment(segmentation_node, name: str = SEGMENT_NAME, color=SEGMENT_COLOR) -> str:
    """ID of the segment called ``name`` (added, with colour, terminology and algorithm tags, if missing)."""
    ensure_segmentation_converters()
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    if segment_id:
        return segment_id
    segment_id = segmentation.AddEmptySegment("", name, list(color))
    if not segment_id:
        raise RuntimeError(f"could not add segment '{name}' to '{segmentation_node.GetName()}'")
    segment = segmentation.GetSegment(segment_id)
    _tag_segment(segment)
    if hasattr(segment, "SetNameAutoGenerated"):
        segment.SetNameAutoGenerated(False)
    return segment_id


@contextmanager
def _temporary_labelmap(scene):
    """A labelmap volume node that is removed (with its display and storage nodes) afterwards."""
    temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__HiMatchAD_temporary__")
    try:
        yield temp
    finally:
        for helper in (temp.GetDisplayNode(), temp.GetStorageNode()):
            if helper is not None:
                scene.RemoveNode(helper)
        scene.RemoveNode(temp)


def _segment_array(segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """Copy of a segment as a ``(k, j, i)`` uint8 array on ``reference_node``'s grid."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    with _temporary_labelmap(_scene_of(segmentation_node, reference_node)) as temp:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, temp, reference_node):
            raise RuntimeError(f"exporting segment '{segment_id}' of '{segmentation_node.GetName()}' failed")
        return np.array(slicer.util.arrayFromVolume(temp), dtype=np.uint8, copy=True)


def _segment_digest(segmentation_node, segment_id: str) -> tuple[str, bool]:
    """Digest of a segment's voxels on the segmentation's reference geometry, and whether it has any.

    The segment is read as Slicer's DICOM SEG export reads it (merged labelmap on the reference
    geometry), in the segmentation's own coordinates: parent transforms play no part, so moving the
    volume and its outputs under another transform is not an edit.
    """
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    image = slicer.vtkOrientedImageData()
    if not segmentation_node.GenerateMergedLabelmapForAllSegments(image, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, None, ids):
        # Slicer cannot merge an empty segment of a segmentation without reference geometry.
        return "unreadable", False
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    scalars = image.GetPointData().GetScalars()
    mask = np.zeros(0, dtype=bool) if scalars is None else vtk_to_numpy(scalars) != 0
    digest = hashlib.sha256(repr((tuple(image.GetExtent()), np.round(slicer.util.arrayFromVTKMatrix(matrix), 6).tolist())).encode())
    digest.update(np.packbits(mask, axis=None).tobytes())
    return digest.hexdigest(), bool(mask.any())


def _import_labelmap_into_segment(labelmap_node, segmentation_node, segment_id: str) -> None:
    """Replace the segment's content with the labelmap node's, tag it and record what it holds."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation_node, ids):
        raise RuntimeError(f"importing the labelmap into '{segmentation_node.GetName()}' failed")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    _tag_segment(segment)
    # The digest of the content as read back (what segment_was_edited compares with), not of the
    # labelmap that went in, so that any resampling of the import cannot look like an edit.
    segment.SetTag(LABELMAP_DIGEST_TAG, _segment_digest(segmentation_node, segment_id)[0])


def _is_edited(segmentation_node, segment_id: str) -> bool:
    """True if the segment does not hold what the last import put there.

    A non-empty segment that no import of this module wrote (no digest) counts as edited.
    """
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if segment is None:
        return False
    digest, has_voxels = _segment_digest(segmentation_node, segment_id)
    recorded = _segment_tag(segment, LABELMAP_DIGEST_TAG)
    return has_voxels if recorded is None else digest != recorded


def _unique_segment_name(segmentation, base: str) -> str:
    name, n = base, 1
    while segmentation.GetSegmentIdBySegmentName(name):
        n += 1
        name = f"{base} {n}"
    return name


def _keep_edited_copy(segmentation_node, segment_id: str) -> str:
    """Copy an edited segment into a new one, "<name> (edited)", marked SEMIAUTOMATIC. Returns its ID."""
    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSegment(segment_id)
    copy = slicer.vtkSegment()
    copy.DeepCopy(source)  # content, terminology and tags; as vtkSegmentation::CopySegmentFromSegmentation does
    name = _unique_segment_name(segmentation, f"{source.GetName()} (edited)")
    copy.SetName(name)
    copy.SetColor(*EDITED_SEGMENT_COLOR)
    if hasattr(copy, "SetNameAutoGenerated"):
        copy.SetNameAutoGenerated(False)
    copy.RemoveTag(LABELMAP_DIGEST_TAG)
    copy.SetTag(SEGMENT_ALGORITHM_TYPE_TAG, "SEMIAUTOMATIC")
    copy.SetTag(SEGMENT_ALGORITHM_NAME_TAG, ALGORITHM_NAME)
    copy_id = segmentation.GenerateUniqueSegmentID(name)
    if not segmentation.AddSegment(copy, copy_id):
        raise RuntimeError(f"could not copy segment '{source.GetName()}' in '{segmentation_node.GetName()}'")
    return copy_id


def _resolve_edits(segmentation_node, segment_name: str, if_edited: str) -> Optional[str]:
    """Before an import replaces segment ``segment_name``: what to do with edits made to it.

    ``"raise"``: :class:`SegmentEditedError`; ``"keep"``: copy the edited segment (returns the copy's
    ID); ``"overwrite"``: nothing.
    """
    if if_edited not in IF_EDITED_CHOICES:
        raise ValueError(f"if_edited must be one of {IF_EDITED_CHOICES}, not {if_edited!r}")
    if segmentation_node is None or if_edited == "overwrite":
        return None
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    if not _is_edited(segmentation_node, segment_id):
        return None
    if if_edited == "raise":
        raise SegmentEditedError(
            f"the segment '{segment_name}' of '{segmentation_node.GetName()}' was edited since the detector "
            "wrote it; updating it would replace the edits: keep a copy of them (if_edited='keep') or "
            "discard them (if_edited='overwrite')"
        )
    return _keep_edited_copy(segmentation_node, segment_id)


def labelmap_to_segmentation(
    result: DetectionResult,
    reference_node,
    segmentation_node=None,
    labelmap_node=None,
    scene=None,
    segment_name: str = SEGMENT_NAME,
    name: Optional[str] = None,
    if_edited: str = "raise",
):
    """Import ``result.labelmap`` into segment ``segment_name`` of a segmentation node.

    The labelmap goes through a labelmap volume node (``labelmap_node``, reused or created, see
    :func:`labelmap_to_volume_node`). The segmentation lies under the input volume's parent
    transform and its reference image geometry is the input volume (needed for DICOM SEG export and
    for editing on the input's grid). The segment is tagged for DICOM SEG (AUTOMATIC, algorithm
    "HiMatch-AD", :data:`SEGMENT_TERMINOLOGY`).

    A segment edited since the last import is handled by ``if_edited`` (see
    :func:`update_segmentation_threshold`) before anything changes. Returns
    ``(segmentation_node, segment_id, labelmap_node)``.
    """
    scene = _scene_of(scene, segmentation_node, reference_node)
    if reference_node is not None:
        _require_in_scene(reference_node, "input volume")
        check_result_matches(result, reference_node)
    if segmentation_node is None:
        segmentation_node = find_output_node(scene, "vtkMRMLSegmentationNode", ROLE_SEGMENTATION, reference_node)
    ensure_segmentation_converters()
    _resolve_edits(segmentation_node, segment_name, if_edited)
    labelmap_node = labelmap_to_volume_node(result, reference_node, node=labelmap_node, scene=scene)
    label = name or f"{_base_name(result, reference_node)} anomaly"
    segmentation_node = _output_node(scene, "vtkMRMLSegmentationNode", ROLE_SEGMENTATION, reference_node, segmentation_node, label)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    if reference_node is not None:
        # First under the volume's parent transform, then the reference geometry: the other way
        # round Slicer folds the transform into the geometry, and the transform applies twice.
        segmentation_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    else:  # the result's own grid, where the labelmap node lies
        segmentation_node.SetAndObserveTransformNodeID(labelmap_node.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap_node)
    is_new = not segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    segment_id = ensure_segment(segmentation_node, segment_name)
    _import_labelmap_into_segment(labelmap_node, segmentation_node, segment_id)
    display = segmentation_node.GetDisplayNode()
    if is_new and display is not None:
        # Outline and a light fill, so the heatmap under the segment stays readable.
        display.SetSegmentOpacity2DFill(segment_id, 0.25)
        display.SetSegmentOpacity2DOutline(segment_id, 1.0)
    return segmentation_node, segment_id, labelmap_node


def update_segmentation_threshold(
    result: DetectionResult,
    segmentation_node,
    threshold: float,
    labelmap_node=None,
    reference_node=None,
    segment_name: str = SEGMENT_NAME,
    if_edited: str = "raise",
) -> int:
    """Re-threshold ``result`` (no recomputation of the maps) and replace the segment's content.

    ``result.threshold`` and ``result.labelmap`` are updated. The labelmap node (given, or the one
    of this result's reference volume) is updated too. Returns the number of anomalous voxels.

    When the segment was edited (Segment Editor, or any change of its labelmap) since it was last
    written, ``if_edited`` decides: ``"raise"`` raises :class:`SegmentEditedError` and changes
    nothing; ``"keep"`` first copies the edited segment into a new segment "<name> (edited)"
    (SEMIAUTOMATIC), ``"overwrite"`` discards the edits.
    """
    _require_in_scene(segmentation_node, "segmentation")
    if reference_node is None:
        reference_node = segmentation_node.GetNodeReference(INPUT_REFERENCE_ROLE)
    if reference_node is not None:
        _require_in_scene(reference_node, "input volume")
        check_result_matches(result, reference_node)
    _resolve_edits(segmentation_node, segment_name, if_edited)
    result.set_threshold(float(threshold))
    labelmap_to_segmentation(result, reference_node, segmentation_node=segmentation_node, labelmap_node=labelmap_node,
                             segment_name=segment_name, if_edited="overwrite")
    return int(result.labelmap.sum())


def segment_to_array(segmentation_node, reference_node, segment_name: str = SEGMENT_NAME) -> np.ndarray:
    """Copy of segment ``segment_name`` as a ``(k, j, i)`` uint8 array on ``reference_node``'s grid."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        raise KeyError(f"no segment named '{segment_name}' in '{segmentation_node.GetName()}'")
    return _segment_array(segmentation_node, segment_id, reference_node)


# --------------------------------------------------------------------------- scores table and plot
def _slice_rows(result: DetectionResult):
    scores = np.asarray(result.slice_scores, dtype=float)
    for i, s in enumerate(scores):
        sups = result.supports[i] if i < len(result.supports) and result.supports[i] else []
        top = max(sups, key=lambda x: x.similarity) if sups else None
        yield i, (float(s) if np.isfinite(s) else 0.0), int(np.isfinite(s)), top


def scores_to_table(result: DetectionResult, table_node=None, reference_node=None, scene=None, name: Optional[str] = None):
    """Per-slice scores in a table node: slice index, score (0 where the slice had no foreground),
    foreground flag (1 = scored), and the best-matching normal reference with its similarity."""
    scene = _scene_of(scene, table_node, reference_node)
    label = name or f"{_base_name(result, reference_node)} anomaly scores"
    table_node = _output_node(scene, "vtkMRMLTableNode", ROLE_TABLE, reference_node, table_node, label)
    rows = list(_slice_rows(result))
    idx = vtk.vtkIntArray()
    idx.SetName(TABLE_COLUMNS[0])
    score = vtk.vtkDoubleArray()
    score.SetName(TABLE_COLUMNS[1])
    fg = vtk.vtkIntArray()
    fg.SetName(TABLE_COLUMNS[2])
    ref = vtk.vtkStringArray()
    ref.SetName(TABLE_COLUMNS[3])
    sim = vtk.vtkDoubleArray()
    sim.SetName(TABLE_COLUMNS[4])
    for i, s, f, top in rows:
        idx.InsertNextValue(i)
        score.InsertNextValue(s)
        fg.InsertNextValue(f)
        ref.InsertNextValue(f"{top.source} [{top.slice_index}]" if top is not None else "")
        sim.InsertNextValue(float(top.similarity) if top is not None else 0.0)
    table = vtk.vtkTable()
    for column in (idx, score, fg, ref, sim):
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)
    table_node.SetAttribute("HiMatchAD.SliceAxis", str(int(result.slice_axis)))
    table_node.SetAttribute("HiMatchAD.VolumeScore", repr(float(result.volume_score)))
    return table_node


def scores_to_plot(table_node, chart_node=None, series_node=None, reference_node=None, scene=None, name: Optional[str] = None):
    """A plot chart of the table's score per slice (line). Returns ``(chart_node, series_node)``."""
    scene = _scene_of(scene, chart_node, table_node)
    base = name or (f"{reference_node.GetName()} anomaly" if reference_node is not None else table_node.GetName())
    series_node = _output_node(scene, "vtkMRMLPlotSeriesNode", ROLE_PLOT_SERIES, reference_node, series_node, f"{base} score")
    with slicer.util.NodeModify(series_node):
        series_node.SetAndObserveTableNodeID(table_node.GetID())
        series_node.SetXColumnName(TABLE_COLUMNS[0])
        series_node.SetYColumnName(TABLE_COLUMNS[1])
        series_node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series_node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
        series_node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series_node.SetMarkerSize(4)
        series_node.SetColor(*SEGMENT_COLOR)
    chart_node = _output_node(scene, "vtkMRMLPlotChartNode", ROLE_CHART, reference_node, chart_node, f"{base} score per slice")
    with slicer.util.NodeModify(chart_node):
        if not chart_node.HasPlotSeriesNodeID(series_node.GetID()):
            chart_node.AddAndObservePlotSeriesNodeID(series_node.GetID())
        chart_node.SetTitle("Anomaly score per slice")
        chart_node.SetXAxisTitle("Slice index")
        chart_node.SetYAxisTitle("Score")
        chart_node.SetLegendVisibility(False)
    return chart_node, series_node


# --------------------------------------------------------------------------- slice views and navigation
def show_in_slice_views(scene, background_node=None, foreground_node=None, foreground_opacity: Optional[float] = None) -> int:
    """Put volumes into the background/foreground layers of every slice view of ``scene``.

    The same as ``slicer.util.setSliceViewerLayers`` but on an explicit scene and without Qt.
    Returns the number of slice views updated.
    """
    composites = _nodes_by_class(scene, "vtkMRMLSliceCompositeNode")
    for composite in composites:
        with slicer.util.NodeModify(composite):
            if background_node is not None:
                composite.SetBackgroundVolumeID(background_node.GetID())
            if foreground_node is not None:
                composite.SetForegroundVolumeID(foreground_node.GetID())
            if foreground_opacity is not None:
                composite.SetForegroundOpacity(float(foreground_opacity))
    return len(composites)


def set_heatmap_opacity(scene, heatmap_node, opacity: float) -> int:
    """Foreground opacity of the slice views that show ``heatmap_node`` as foreground."""
    n = 0
    for composite in _nodes_by_class(scene, "vtkMRMLSliceCompositeNode"):
        if heatmap_node is not None and composite.GetForegroundVolumeID() == heatmap_node.GetID():
            composite.SetForegroundOpacity(float(opacity))
            n += 1
    return n


def slice_center_ras(result: DetectionResult, index: int) -> np.ndarray:
    """RAS position (mm, local coordinates of the input volume) of the centre of slice ``index``."""
    return lps_to_ras(result.slice_center_physical(int(index)))


def slice_index_at_ras(result: DetectionResult, reference_node, ras) -> int:
    """Index along ``result.slice_axis`` of the slice through RAS point ``ras`` (-1 if outside).

    ``ras`` is in world coordinates; the reference volume's parent transform (linear) is undone.
    """
    point = np.append(np.asarray(ras, dtype=float)[:3], 1.0)
    transform_node = reference_node.GetParentTransformNode() if reference_node is not None else None
    if transform_node is not None:
        world_to_local = vtk.vtkGeneralTransform()
        transform_node.GetTransformFromWorld(world_to_local)
        point[:3] = world_to_local.TransformPoint(point[:3])
    ijk = np.linalg.inv(ijk_to_ras_matrix(reference_node)) @ point
    index = int(np.floor(ijk[2 - int(result.slice_axis)] + 0.5))
    n = result.heatmap.shape[int(result.slice_axis)]
    return index if 0 <= index < n else -1


def jump_slices_to(scene, ras, reference_node=None) -> None:
    """Centre every slice view on RAS point ``ras`` (local coordinates of ``reference_node``)."""
    point = np.asarray(ras, dtype=float)[:3]
    transform_node = reference_node.GetParentTransformNode() if reference_node is not None else None
    if transform_node is not None:
        local_to_world = vtk.vtkGeneralTransform()
        transform_node.GetTransformToWorld(local_to_world)
        point = np.asarray(local_to_world.TransformPoint(point))
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(point[0]), float(point[1]), float(point[2]), slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def supports_for_slice(result: DetectionResult, index: int) -> list:
    """The normal references retrieved for slice ``index``: ``[(file name, slice index, similarity)]``,
    most similar first."""
    if index < 0 or index >= len(result.supports) or not result.supports[index]:
        return []
    rows = [(s.source, int(s.slice_index), float(s.similarity)) for s in result.supports[index]]
    return sorted(rows, key=lambda r: -r[2])


# --------------------------------------------------------------------------- everything at once
@dataclass
class ResultNodes:
    """The MRML nodes showing one :class:`DetectionResult`, and the result itself."""

    result: DetectionResult
    input_volume: Any
    heatmap: Any = None
    labelmap: Any = None
    segmentation: Any = None
    segment_id: str = ""
    table: Any = None
    chart: Any = None
    plot_series: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def volume_score(self) -> float:
        return float(self.result.volume_score)

    @property
    def slice_scores(self) -> np.ndarray:
        return np.asarray(self.result.slice_scores, dtype=float)

    @property
    def most_anomalous_slice(self) -> int:
        return self.result.most_anomalous_slice

    @property
    def threshold(self) -> float:
        return float(self.result.threshold)

    @property
    def anomalous_voxels(self) -> int:
        return int(self.result.labelmap.sum())

    def set_threshold(self, threshold: float, if_edited: str = "raise") -> int:
        """Re-threshold the result and update labelmap and segmentation; returns anomalous voxels.

        ``if_edited`` says what happens to edits of the segment: see :func:`update_segmentation_threshold`.
        """
        _require_in_scene(self.input_volume, "input volume")
        _require_in_scene(self.segmentation, "segmentation")
        labelmap = self.labelmap if node_in_scene(self.labelmap, self.segmentation.GetScene()) else None
        return update_segmentation_threshold(
            self.result, self.segmentation, threshold, labelmap_node=labelmap, reference_node=self.input_volume,
            if_edited=if_edited,
        )


def segment_was_edited(nodes: ResultNodes, segment_name: str = SEGMENT_NAME) -> bool:
    """True when segment ``segment_name`` no longer holds what the last import of a result put there
    (Segment Editor, ``slicer.util.updateSegmentBinaryLabelmapFromArray``, or a direct change of its
    binary labelmap). False when there is no such segment, or no segmentation left in the scene:
    then an update loses nothing."""
    if not node_in_scene(nodes.segmentation):
        return False
    return _is_edited(nodes.segmentation, nodes.segmentation.GetSegmentation().GetSegmentIdBySegmentName(segment_name))


def result_to_nodes(
    result: DetectionResult,
    reference_node,
    previous: Optional[ResultNodes] = None,
    scene=None,
    show: bool = True,
    heatmap_opacity: float = 0.5,
    if_edited: str = "raise",
) -> ResultNodes:
    """Create (or update, on a second run) every output node of ``result`` for ``reference_node``.

    With ``show``, the input goes to the background and the heatmap to the foreground of every slice
    view. Nodes of ``previous`` are reused when it belongs to the same input volume node (the same
    object, still in the scene). ``result`` must have been computed on ``reference_node``
    (:func:`check_result_matches`), and an edited segment of an earlier run is handled by
    ``if_edited`` (see :func:`update_segmentation_threshold`), both before any node changes.
    """
    if reference_node is None:
        raise HiMatchADError("no input volume node to attach the results to")
    _require_in_scene(reference_node, "input volume")
    scene = _scene_of(scene, reference_node)
    if reference_node.GetScene() is not scene:
        raise HiMatchADError(f"the input volume '{reference_node.GetName()}' belongs to another scene")
    check_result_matches(result, reference_node)
    same = previous is not None and previous.input_volume is reference_node

    def reuse(attr):
        node = getattr(previous, attr) if same else None
        return node if node_in_scene(node, scene) else None

    segmentation, segment_id, labelmap = labelmap_to_segmentation(
        result, reference_node, segmentation_node=reuse("segmentation"), labelmap_node=reuse("labelmap"), scene=scene,
        if_edited=if_edited,
    )
    heatmap = heatmap_to_volume_node(result, reference_node, node=reuse("heatmap"), scene=scene)
    table = scores_to_table(result, table_node=reuse("table"), reference_node=reference_node, scene=scene)
    chart, series = scores_to_plot(table, chart_node=reuse("chart"), series_node=reuse("plot_series"), reference_node=reference_node, scene=scene)
    for node in (heatmap, labelmap, segmentation, table, chart):
        place_in_same_study(node, reference_node)
    if show:
        show_in_slice_views(scene, background_node=reference_node, foreground_node=heatmap, foreground_opacity=heatmap_opacity)
    return ResultNodes(result, reference_node, heatmap, labelmap, segmentation, segment_id, table, chart, series)


def remove_result_nodes(nodes: ResultNodes) -> None:
    """Remove a result's output nodes (and their display/storage nodes) from their scene."""
    for node in (nodes.chart, nodes.plot_series, nodes.table, nodes.segmentation, nodes.labelmap, nodes.heatmap):
        if node is None or node.GetScene() is None:
            continue
        scene = node.GetScene()
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for i in reversed(range(node.GetNumberOfDisplayNodes())):
                display = node.GetNthDisplayNode(i)
                if display is not None:
                    scene.RemoveNode(display)
        if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
            scene.RemoveNode(node.GetStorageNode())
        scene.RemoveNode(node)
