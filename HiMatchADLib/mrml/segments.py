"""The Anomaly segment: terminology, DICOM tags, edits kept, threshold updates."""

from __future__ import annotations

import functools
import hashlib
import logging
import weakref
from contextlib import contextmanager
from typing import Optional

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from ..core.errors import HiMatchADError
from ..core.result import DetectionResult, remove_small_components
from ..outputs import dicom_seg
from .geometry import check_result_matches
from .heatmap import labelmap_to_volume_node
from .nodes import (
    INPUT_REFERENCE_ROLE,
    ROLE_ATTRIBUTE,
    ROLE_LABELMAP,
    ROLE_SEGMENTATION,
    base_name,
    find_output_node,
    node_in_scene,
    nodes_by_class,
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


#: Terminology of the "Anomaly" segment (codes as ``(scheme, value, meaning)``): category SCT
#: 49755003 "Morphologically Altered Structure" of Slicer's DICOM master list
#: (Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json,
#: CID 7150), and the same code as type: the least assertive code there is. The map marks voxels
#: unlike the normal scans, whatever they are (oedema, artefact, tumour); every type Slicer lists
#: under this category (Mass, Nodule, Cyst, Edema, Hemorrhage, Necrosis, Neoplasm, ...) names a
#: particular finding. Shared with the DICOM SEG file writer (:mod:`HiMatchADLib.outputs.dicom_seg`).
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"


REGION_CONTEXT = "Anatomic codes - DICOM master list"


SEGMENT_CATEGORY = dicom_seg.SEGMENT_CATEGORY


SEGMENT_TYPE = dicom_seg.SEGMENT_TYPE


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
    serialize_terminology(("SCT", "49755003", "Morphologically Altered Structure"), ("SCT", "4147007", "Mass")),
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


def _tag_segment(segment, algorithm_type: str = dicom_seg.AUTOMATIC) -> None:
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


# --------------------------------------------------------------------------- what a segment holds
def _bounding_box(mask: np.ndarray) -> Optional[tuple]:
    """``((k0, k1), (j0, j1), (i0, i1))``, half-open, of the non-zero voxels of a ``(k, j, i)`` mask; None if none."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return None
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _box_slices(box) -> tuple:
    return tuple(slice(a, b) for a, b in box)


class _Content:
    """A segment's voxels read from its own binary labelmap: image-to-world matrix, the absolute
    ``(k, j, i)`` index of the first voxel of ``mask``, and ``mask`` (bool, cropped to its voxels;
    ``None`` when the segment is empty)."""

    def __init__(self, matrix: np.ndarray, corner: tuple, mask: Optional[np.ndarray]):
        self.matrix, self.corner, self.mask = matrix, corner, mask

    @property
    def has_voxels(self) -> bool:
        return self.mask is not None

    def digest(self) -> str:
        """Independent of how the labelmap is padded or indexed (extent, origin), so that a
        segment shrunk to its voxels, saved and loaded again has the same digest; a change of a
        voxel, of the geometry or of the position is a change of the digest."""
        if self.mask is None:
            return DIGEST_VERSION + "empty"
        corner_world = self.matrix @ np.array([self.corner[2], self.corner[1], self.corner[0], 1.0])
        h = hashlib.blake2b(digest_size=20)
        h.update(repr((np.round(self.matrix[:3, :3], 6).tolist(), np.round(corner_world[:3], 4).tolist(), self.mask.shape)).encode())
        h.update(np.packbits(self.mask, axis=None).tobytes())
        return DIGEST_VERSION + h.hexdigest()


#: Prefix of digests of :class:`_Content` (digests without it are of earlier versions, :func:`_legacy_digest`).
DIGEST_VERSION = "v2:"


def _segment_content(segmentation_node, segment_id: str) -> Optional[_Content]:
    """What the segment holds, from its binary labelmap (shared layers included: the voxels with its
    label value). None when it has no binary labelmap to read (e.g. a closed-surface source)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        return None
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None:
        return None
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    matrix = slicer.util.arrayFromVTKMatrix(matrix)
    extent = image.GetExtent()
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    scalars = image.GetPointData().GetScalars()
    if scalars is None or min(dims) <= 0:
        return _Content(matrix, (0, 0, 0), None)
    values = vtk_to_numpy(scalars)
    if values.ndim > 1:
        values = values[:, 0]
    mask = values.reshape(dims) == segment.GetLabelValue()
    box = _bounding_box(mask)
    if box is None:
        return _Content(matrix, (0, 0, 0), None)
    corner = (extent[4] + box[0][0], extent[2] + box[1][0], extent[0] + box[2][0])
    return _Content(matrix, corner, mask[_box_slices(box)])


def _legacy_digest(segmentation_node, segment_id: str) -> tuple[str, bool]:
    """The digest earlier versions recorded: the segment merged on the reference geometry."""
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


def _segment_digest(segmentation_node, segment_id: str) -> tuple[str, bool]:
    """Digest of a segment's voxels, and whether it has any (parent transforms play no part: moving
    the volume and its outputs under another transform is not an edit)."""
    content = _segment_content(segmentation_node, segment_id)
    if content is None:
        return _legacy_digest(segmentation_node, segment_id)
    return content.digest(), content.has_voxels


def is_edited(segmentation_node, segment_id: str) -> bool:
    """True if the segment does not hold what the last import put there.

    A non-empty segment that no import of this module wrote (no digest) counts as edited.
    """
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if segment is None:
        return False
    recorded = _segment_tag(segment, LABELMAP_DIGEST_TAG)
    if recorded is not None and not recorded.startswith(DIGEST_VERSION):
        digest, has_voxels = _legacy_digest(segmentation_node, segment_id)
    else:
        digest, has_voxels = _segment_digest(segmentation_node, segment_id)
    return has_voxels if recorded is None else digest != recorded


# --------------------------------------------------------------------------- DICOM algorithm type
#: Threshold of the content the module last wrote into the segment (``repr`` of a float).
THRESHOLD_TAG = "HiMatchAD.Threshold"


#: Threshold the detection chose for the result in the segment (calibrated, or fixed in its settings):
#: the segment is AUTOMATIC only at this threshold (:func:`HiMatchADLib.outputs.dicom_seg.algorithm_type`).
DETECTOR_THRESHOLD_TAG = "HiMatchAD.DetectorThreshold"


def _float_tag(segment, name: str) -> Optional[float]:
    try:
        return float(_segment_tag(segment, name))
    except (TypeError, ValueError):
        return None


def segment_algorithm_type(segmentation_node, segment_name: str = SEGMENT_NAME) -> Optional[str]:
    """AUTOMATIC or SEMIAUTOMATIC, as it should be now for the segment ``segment_name`` (None
    without such a segment): SEMIAUTOMATIC once a person changed it, by editing it (Segment Editor,
    or any change of its labelmap) or by choosing a threshold other than the detection's."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
    if segment is None:
        return None
    threshold, chosen = _float_tag(segment, THRESHOLD_TAG), _float_tag(segment, DETECTOR_THRESHOLD_TAG)
    if threshold is None or chosen is None:  # not written by this module (or by an earlier version)
        threshold = chosen = 0.0
    return dicom_seg.algorithm_type(threshold, chosen, is_edited(segmentation_node, segment_id))


def refresh_algorithm_type(segmentation_node, segment_name: str = SEGMENT_NAME) -> Optional[str]:
    """Set the segment's ``DICOM.SegmentAlgorithmType`` tag to :func:`segment_algorithm_type`
    (what Slicer's DICOM SEG export writes); returns it. Done by the module after each change it
    makes and, through :func:`watch_segmentation`, after each edit."""
    value = segment_algorithm_type(segmentation_node, segment_name)
    if value is not None:
        segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        if _segment_tag(segment, SEGMENT_ALGORITHM_TYPE_TAG) != value:
            segment.SetTag(SEGMENT_ALGORITHM_TYPE_TAG, value)
    return value


# --------------------------------------------------------------------------- the labelmap node follows the segment
#: Node reference from the segmentation to its labelmap volume node, which mirrors the segment.
LABELMAP_REFERENCE_ROLE = "HiMatchADLabelmap"


_OBSERVER_ATTRIBUTE = "_himatchad_edit_observers"


_writing = [0]  # > 0 while the module itself writes a segment: its own changes are not edits


@contextmanager
def _module_writes():
    _writing[0] += 1
    try:
        yield
    finally:
        _writing[0] -= 1


def _reference_geometry(segmentation_node):
    """The segmentation's reference image geometry (no voxels), or None."""
    text = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    image = slicer.vtkOrientedImageData()
    if not text or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False):
        return None
    return image


def _labelmap_node_of(segmentation_node, labelmap_node=None):
    """``labelmap_node``, else the segmentation's labelmap reference, else (scenes of earlier
    versions) the labelmap node made for the same input volume."""
    scene = segmentation_node.GetScene()
    node = labelmap_node if labelmap_node is not None else segmentation_node.GetNodeReference(LABELMAP_REFERENCE_ROLE)
    if node is None and labelmap_node is None:
        node = find_output_node(scene, "vtkMRMLLabelMapVolumeNode", ROLE_LABELMAP, segmentation_node.GetNodeReference(INPUT_REFERENCE_ROLE))
    return node if node_in_scene(node, scene) else None


def _write_labelmap_node(labelmap_node, shape: tuple, box, mask) -> bool:
    """Write ``mask`` at ``box`` (zeros elsewhere) into a labelmap node of ``shape``, in place."""
    if labelmap_node.GetImageData() is None:
        return False
    view = slicer.util.arrayFromVolume(labelmap_node)
    if view.shape != tuple(shape):
        return False
    view.fill(0)
    if box is not None:
        view[_box_slices(box)] = mask
    slicer.util.arrayFromVolumeModified(labelmap_node)
    return True


def sync_labelmap(segmentation_node, segment_name: str = SEGMENT_NAME, labelmap_node=None):
    """Make the labelmap volume node of this segmentation (its ``HiMatchADLabelmap`` reference, or
    ``labelmap_node``) hold segment ``segment_name`` as it is now, edits included (empty without the
    segment). Returns the node, or None when there is none. Done by the module after each change
    and, through :func:`watch_segmentation`, after each edit; call it after loading a saved scene."""
    node = _labelmap_node_of(segmentation_node, labelmap_node)
    if node is None:
        return None
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    content = _segment_content(segmentation_node, segment_id) if segment_id else None
    reference = _reference_geometry(segmentation_node)
    image = node.GetImageData()
    if reference is not None and image is not None and (content is not None or not segment_id):
        shape = tuple(image.GetDimensions()[::-1])
        matrix = vtk.vtkMatrix4x4()
        reference.GetImageToWorldMatrix(matrix)
        node_matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(node_matrix)
        same_grid = (np.allclose(slicer.util.arrayFromVTKMatrix(matrix), slicer.util.arrayFromVTKMatrix(node_matrix), rtol=0, atol=1e-9)
                     and tuple(reference.GetExtent()) == (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1))
        if content is None or not content.has_voxels:
            if same_grid and _write_labelmap_node(node, shape, None, None):
                return node
        elif same_grid and np.allclose(content.matrix, slicer.util.arrayFromVTKMatrix(node_matrix), rtol=0, atol=1e-9):
            box = tuple((c, c + n) for c, n in zip(content.corner, content.mask.shape))
            if all(0 <= a and b <= n for (a, b), n in zip(box, shape)) and _write_labelmap_node(node, shape, box, content.mask):
                return node
    # Another grid (or no reference geometry): Slicer's export, resampled onto the node's grid.
    if segment_id:
        array = _segment_array(segmentation_node, segment_id, node)
    else:
        array = np.zeros(slicer.util.arrayFromVolume(node).shape, np.uint8)
    slicer.util.updateVolumeFromArray(node, array)
    return node


def _on_segment_edited(segment_name: str, segmentation_node, event=None) -> None:
    if _writing[0] or not node_in_scene(segmentation_node):
        return
    try:
        refresh_algorithm_type(segmentation_node, segment_name)
        sync_labelmap(segmentation_node, segment_name)
    except Exception:  # an observer must never break the Segment Editor
        logging.getLogger(__name__).exception("HiMatch-AD: updating the '%s' segment's tags and labelmap failed", segment_name)


def watch_segmentation(segmentation_node, segment_name: str = SEGMENT_NAME) -> None:
    """After each edit of segment ``segment_name`` (Segment Editor, scripts), update its DICOM
    algorithm type (:func:`refresh_algorithm_type`) and its labelmap node (:func:`sync_labelmap`).

    The module watches the segmentations it makes; observers are not saved with a scene, so call this
    for the segmentations of a scene loaded again (:func:`watch_result_segmentations`). Idempotent.
    """
    watched = getattr(segmentation_node, _OBSERVER_ATTRIBUTE, None)
    if watched is None:
        watched = {}
        setattr(segmentation_node, _OBSERVER_ATTRIBUTE, watched)  # kept by VTK with the node's Python object
    if segment_name in watched:
        return
    callback = functools.partial(_on_segment_edited, segment_name)
    watched[segment_name] = [
        segmentation_node.AddObserver(event, callback)
        for event in (slicer.vtkSegmentation.SourceRepresentationModified, slicer.vtkSegmentation.SegmentRemoved,
                      slicer.vtkSegmentation.SegmentAdded)
    ]


def watch_result_segmentations(scene) -> int:
    """:func:`watch_segmentation` for every segmentation this module made in ``scene`` (after a scene
    was loaded); their labelmap nodes are brought up to date and their algorithm types refreshed.
    Returns how many."""
    n = 0
    for node in nodes_by_class(scene, "vtkMRMLSegmentationNode"):
        if node.GetAttribute(ROLE_ATTRIBUTE) == ROLE_SEGMENTATION:
            watch_segmentation(node)
            refresh_algorithm_type(node)
            sync_labelmap(node)
            n += 1
    return n


# --------------------------------------------------------------------------- edits kept
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
    for tag in (LABELMAP_DIGEST_TAG, THRESHOLD_TAG, DETECTOR_THRESHOLD_TAG):
        copy.RemoveTag(tag)
    copy.SetTag(SEGMENT_ALGORITHM_TYPE_TAG, dicom_seg.SEMIAUTOMATIC)
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
    with _module_writes():
        return _keep_edited_copy(segmentation_node, segment_id)


# --------------------------------------------------------------------------- thresholds, fast
class _ThresholdIndex:
    """What a threshold step needs of one result, computed once: per index along each axis, the
    largest heatmap value in the foreground there. ``heatmap > t`` inside the foreground lies
    exactly in the box of the indices whose value is above ``t`` (same dtype, same comparison), so
    a step thresholds, and looks for small components, in that box only."""

    def __init__(self, result: DetectionResult):
        self.heatmap, self.foreground = result.heatmap, result.foreground
        #: the threshold the detection chose (:func:`HiMatchADLib.outputs.dicom_seg.detector_threshold`)
        self.detector_threshold = dicom_seg.detector_threshold(result)
        heat, fg = np.asarray(result.heatmap), np.asarray(result.foreground, dtype=bool)
        fill = np.array(-np.inf, dtype=np.result_type(heat.dtype, np.float32))
        profiles = [np.full(n, fill, fill.dtype) for n in heat.shape]
        for a in range(0, heat.shape[0], 16):
            h = np.where(fg[a : a + 16], heat[a : a + 16], fill)  # NaN stays NaN; fmax skips it
            profiles[0][a : a + h.shape[0]] = np.fmax.reduce(h.reshape(h.shape[0], -1), axis=1)
            over_k = np.fmax.reduce(h, axis=0)
            profiles[1] = np.fmax(profiles[1], np.fmax.reduce(over_k, axis=1))
            profiles[2] = np.fmax(profiles[2], np.fmax.reduce(over_k, axis=0))
        self.profiles = profiles

    def matches(self, result: DetectionResult) -> bool:
        return self.heatmap is result.heatmap and self.foreground is result.foreground

    def box(self, threshold: float) -> Optional[tuple]:
        box = []
        for profile in self.profiles:
            hit = np.flatnonzero(profile > threshold)
            if hit.size == 0:
                return None
            box.append((int(hit[0]), int(hit[-1]) + 1))
        return tuple(box)

    def labelmap(self, threshold: float, min_component_size: int) -> tuple:
        """``(box, mask)``: the labelmap of ``threshold`` (as :meth:`DetectionResult.labelmap_at`) is
        ``mask`` at ``box`` and 0 elsewhere (``box`` None: empty)."""
        box = self.box(threshold)
        if box is None:
            return None, None
        s = _box_slices(box)
        mask = (self.heatmap[s] > threshold) & self.foreground[s]
        # Components lie inside the box (no voxel of the mask is outside it): the same components.
        mask = remove_small_components(mask, min_component_size)
        return box, mask


_threshold_indexes: dict = {}


def _threshold_index(result: DetectionResult) -> _ThresholdIndex:
    """The :class:`_ThresholdIndex` of ``result`` (made on first use, dropped with the result)."""
    index = _threshold_indexes.get(id(result))
    if index is None or not index.matches(result):
        index = _ThresholdIndex(result)
        if id(result) not in _threshold_indexes:
            weakref.finalize(result, _threshold_indexes.pop, id(result), None)
        _threshold_indexes[id(result)] = index
    return index


def _write_segment(segmentation_node, segment_id: str, shape: tuple, box, mask) -> bool:
    """Replace the segment's content with ``mask`` at ``box`` (empty: None), on the segmentation's
    reference geometry, which must be the grid of ``shape``; False (nothing done) when it is not."""
    reference = _reference_geometry(segmentation_node)
    nz, ny, nx = shape
    if reference is None or tuple(reference.GetExtent()) != (0, nx - 1, 0, ny - 1, 0, nz - 1):
        return False
    modifier = slicer.vtkOrientedImageData()
    modifier.SetOrigin(reference.GetOrigin())
    modifier.SetSpacing(reference.GetSpacing())
    directions = vtk.vtkMatrix4x4()
    reference.GetDirectionMatrix(directions)
    modifier.SetDirectionMatrix(directions)
    (k0, k1), (j0, j1), (i0, i1) = box if box is not None else ((0, 1), (0, 1), (0, 1))
    modifier.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
    modifier.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = vtk_to_numpy(modifier.GetPointData().GetScalars()).reshape(k1 - k0, j1 - j0, i1 - i0)
    voxels[...] = mask if box is not None else 0
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"writing the segment '{segment_id}' of '{segmentation_node.GetName()}' failed")
    return True


def _import_labelmap_into_segment(labelmap_node, segmentation_node, segment_id: str) -> None:
    """Replace the segment's content with the labelmap node's (Slicer resamples it when the grids differ)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap_node, segmentation_node, ids):
        raise RuntimeError(f"importing the labelmap into '{segmentation_node.GetName()}' failed")


def _record(segmentation_node, segment_id: str, threshold: float, detector_threshold: float) -> None:
    """Tag what the module just wrote: digest (as read back, so that no resampling looks like an
    edit), thresholds, DICOM tags."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    _tag_segment(segment)
    segment.SetTag(LABELMAP_DIGEST_TAG, _segment_digest(segmentation_node, segment_id)[0])
    segment.SetTag(THRESHOLD_TAG, repr(float(threshold)))
    segment.SetTag(DETECTOR_THRESHOLD_TAG, repr(float(detector_threshold)))
    segment.SetTag(SEGMENT_ALGORITHM_TYPE_TAG, dicom_seg.algorithm_type(threshold, detector_threshold, False))


def _place_segmentation(segmentation_node, reference_node, labelmap_node) -> None:
    if reference_node is not None:
        # First under the volume's parent transform, then the reference geometry: the other way
        # round Slicer folds the transform into the geometry, and the transform applies twice.
        segmentation_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    else:  # the result's own grid, where the labelmap node lies
        segmentation_node.SetAndObserveTransformNodeID(labelmap_node.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap_node)


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

    The labelmap volume node (``labelmap_node``, reused or created, see
    :func:`labelmap_to_volume_node`) gets ``result.labelmap`` and from then on mirrors the segment
    (:func:`sync_labelmap`, :func:`watch_segmentation`). The segmentation lies under the input
    volume's parent transform and its reference image geometry is the input volume (needed for
    DICOM SEG export and for editing on the input's grid). The segment is tagged for DICOM SEG
    (algorithm "HiMatch-AD", :func:`segment_algorithm_type`, :data:`SEGMENT_TERMINOLOGY`).

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
    index = _threshold_index(result)
    with _module_writes():
        labelmap_node = labelmap_to_volume_node(result, reference_node, node=labelmap_node, scene=scene)
        label = name or f"{base_name(result, reference_node)} anomaly"
        segmentation_node = output_node(scene, "vtkMRMLSegmentationNode", ROLE_SEGMENTATION, reference_node, segmentation_node, label)
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()
        _place_segmentation(segmentation_node, reference_node, labelmap_node)
        segmentation_node.SetNodeReferenceID(LABELMAP_REFERENCE_ROLE, labelmap_node.GetID())
        is_new = not segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
        segment_id = ensure_segment(segmentation_node, segment_name)
        labelmap = np.asarray(result.labelmap) != 0
        box = _bounding_box(labelmap)
        if not _write_segment(segmentation_node, segment_id, labelmap.shape, box, None if box is None else labelmap[_box_slices(box)]):
            _import_labelmap_into_segment(labelmap_node, segmentation_node, segment_id)
        _record(segmentation_node, segment_id, result.threshold, index.detector_threshold)
    watch_segmentation(segmentation_node, segment_name)
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

    ``result.threshold`` and ``result.labelmap`` are updated (as :meth:`DetectionResult.set_threshold`
    does), and so is the labelmap node (given, or the segmentation's). Returns the number of anomalous
    voxels. The segment becomes SEMIAUTOMATIC at a threshold other than the detection's, AUTOMATIC
    again back at it.

    Only the box of the heatmap above ``threshold`` is thresholded and written, and the segment is
    set directly on its reference geometry (the input's grid), without a merged export.

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
    threshold = float(threshold)
    index = _threshold_index(result)
    box, mask = index.labelmap(threshold, result.min_component_size)
    labelmap = np.zeros(np.shape(result.heatmap), np.uint8)
    if box is not None:
        labelmap[_box_slices(box)] = mask
    result.threshold, result.labelmap = threshold, labelmap
    labelmap_node = _labelmap_node_of(segmentation_node, labelmap_node)
    with _module_writes():
        segment_id = ensure_segment(segmentation_node, segment_name)
        if reference_node is not None or labelmap_node is not None:  # the volume may have moved to another transform
            _place_segmentation(segmentation_node, reference_node, labelmap_node)
        if not _write_segment(segmentation_node, segment_id, labelmap.shape, box, mask):
            labelmap_node = labelmap_to_volume_node(result, reference_node, node=labelmap_node, scene=scene_of(segmentation_node))
            segmentation_node.SetNodeReferenceID(LABELMAP_REFERENCE_ROLE, labelmap_node.GetID())
            _import_labelmap_into_segment(labelmap_node, segmentation_node, segment_id)
        elif labelmap_node is not None and not _write_labelmap_node(labelmap_node, labelmap.shape, box, mask):
            labelmap_to_volume_node(result, reference_node, node=labelmap_node, scene=scene_of(segmentation_node))
        _record(segmentation_node, segment_id, threshold, index.detector_threshold)
    watch_segmentation(segmentation_node, segment_name)
    return 0 if mask is None else int(np.count_nonzero(mask))


def segment_to_array(segmentation_node, reference_node, segment_name: str = SEGMENT_NAME) -> np.ndarray:
    """Copy of segment ``segment_name`` as a ``(k, j, i)`` uint8 array on ``reference_node``'s grid."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        raise KeyError(f"no segment named '{segment_name}' in '{segmentation_node.GetName()}'")
    return _segment_array(segmentation_node, segment_id, reference_node)
