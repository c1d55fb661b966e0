"""The Anomaly segment: terminology, DICOM tags, edits kept, threshold updates."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Optional

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from ..core.errors import HiMatchADError
from ..core.result import DetectionResult
from .geometry import check_result_matches
from .heatmap import labelmap_to_volume_node
from .nodes import (
    INPUT_REFERENCE_ROLE,
    ROLE_SEGMENTATION,
    base_name,
    find_output_node,
    output_node,
    require_in_scene,
    scene_of,
)

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
    with _temporary_labelmap(scene_of(segmentation_node, reference_node)) as temp:
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


def is_edited(segmentation_node, segment_id: str) -> bool:
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
    if not is_edited(segmentation_node, segment_id):
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
    scene = scene_of(scene, segmentation_node, reference_node)
    if reference_node is not None:
        require_in_scene(reference_node, "input volume")
        check_result_matches(result, reference_node)
    if segmentation_node is None:
        segmentation_node = find_output_node(scene, "vtkMRMLSegmentationNode", ROLE_SEGMENTATION, reference_node)
    ensure_segmentation_converters()
    _resolve_edits(segmentation_node, segment_name, if_edited)
    labelmap_node = labelmap_to_volume_node(result, reference_node, node=labelmap_node, scene=scene)
    label = name or f"{base_name(result, reference_node)} anomaly"
    segmentation_node = output_node(scene, "vtkMRMLSegmentationNode", ROLE_SEGMENTATION, reference_node, segmentation_node, label)
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
    require_in_scene(segmentation_node, "segmentation")
    if reference_node is None:
        reference_node = segmentation_node.GetNodeReference(INPUT_REFERENCE_ROLE)
    if reference_node is not None:
        require_in_scene(reference_node, "input volume")
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
