"""Node roles: which nodes of a scene are inputs, and the output nodes of an input found and placed beside it."""

from __future__ import annotations

from typing import Optional

import numpy as np
import slicer

from ..core.errors import HiMatchADError
from ..core.result import DetectionResult
from .geometry import check_result_matches, ijk_to_ras_from_geometry

ROLE_ATTRIBUTE = "HiMatchAD.Role"


INPUT_REFERENCE_ROLE = "HiMatchADInputVolume"


ROLE_HEATMAP = "heatmap"


ROLE_LABELMAP = "labelmap"


ROLE_SEGMENTATION = "segmentation"


ROLE_TABLE = "scores"


ROLE_PLOT_SERIES = "scoreSeries"


ROLE_CHART = "scoreChart"


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


def require_in_scene(node, what: str) -> None:
    if not node_in_scene(node):
        name = node.GetName() if node is not None else "?"
        raise HiMatchADError(
            f"the {what} '{name}' is no longer in the scene (it was removed or the scene was closed); "
            "select a volume and run the detection again"
        )


#: Components per voxel of the vector volumes accepted as input: RGB and RGBA colour images,
#: analysed as their luminance (0.299 R + 0.587 G + 0.114 B), as the library's reader does with
#: colour image files (:func:`HiMatchADLib.io.readers.image_from_sitk`).
COLOR_COMPONENTS = (3, 4)


def input_problem(node) -> Optional[str]:
    """Why ``node`` cannot be this module's input, or None when it can.

    The rule: a scalar volume, or an RGB/RGBA vector volume (analysed as its luminance, see
    :data:`COLOR_COMPONENTS`), that is not an output of this module
    (``HiMatchAD.Role``). Labelmaps, tensor, diffusion-weighted and multi-volumes, vector volumes
    of other kinds (2 components, displacement fields of more), and non-volume nodes are refused.
    """
    if node is None:
        return "no volume selected"
    name = node.GetName()
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        return f"'{name}' is a {node.GetClassName()}, not a volume; select a scalar or RGB volume"
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"'{name}' is a labelmap (segment labels, not an image); select the image it was drawn on"
    if node.GetAttribute(ROLE_ATTRIBUTE):
        return f"'{name}' is an output of HiMatch-AD ({node.GetAttribute(ROLE_ATTRIBUTE)}); select the volume it was computed on"
    if node.IsA("vtkMRMLDiffusionWeightedVolumeNode") or node.IsA("vtkMRMLMultiVolumeNode"):
        return f"'{name}' is a {node.GetClassName()} (several volumes); extract one scalar volume first"
    if node.IsA("vtkMRMLTensorVolumeNode") and not node.IsA("vtkMRMLVectorVolumeNode"):
        return f"'{name}' is a {node.GetClassName()} (tensors); select a scalar volume"
    image = node.GetImageData()
    if image is None:  # still loading, or empty: judged by its class until it has voxels
        return None
    components = image.GetNumberOfScalarComponents()
    if node.IsA("vtkMRMLVectorVolumeNode"):
        if components not in COLOR_COMPONENTS:
            return (f"'{name}' is a vector volume of {components} components per voxel; only RGB and RGBA colour "
                    "volumes (analysed as their luminance) and scalar volumes can be examined")
    elif components != 1:
        return f"'{name}' has {components} components per voxel; select a scalar volume"
    return None


def is_supported_input(node) -> bool:
    """True for volumes this module can analyse (:func:`input_problem` has nothing against it). The
    one rule for the panel's input selector (which volumes it lists) and its automatic choice."""
    return input_problem(node) is None


#: Former name of :func:`is_supported_input`.
is_input_candidate = is_supported_input


#: Node classes whose nodes :func:`is_supported_input` may accept (a node selector's ``nodeTypes``,
#: with ``showChildNodeTypes`` off; the others of these classes are hidden by the predicate).
INPUT_NODE_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")


def input_candidates(scene) -> list:
    """The volume nodes of ``scene`` that :func:`is_supported_input` accepts, in scene order."""
    return [node for node in nodes_by_class(scene, "vtkMRMLVolumeNode") if is_supported_input(node)]


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
def scene_of(*candidates):
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


def nodes_by_class(scene, class_name: str) -> list:
    nodes = []
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        nodes.append(scene.GetNthNodeByClass(i, class_name))
    return nodes


def find_output_node(scene, class_name: str, role: str, reference_node):
    """The node of ``class_name`` made for ``reference_node`` with ``role`` by an earlier run, if any."""
    if scene is None or reference_node is None:
        return None
    for node in nodes_by_class(scene, class_name):
        if node.GetAttribute(ROLE_ATTRIBUTE) != role:
            continue
        ref = node.GetNodeReference(INPUT_REFERENCE_ROLE)
        if ref is not None and ref.GetID() == reference_node.GetID():
            return node
    return None


def output_node(scene, class_name: str, role: str, reference_node, node, name: str):
    if node is None:
        node = find_output_node(scene, class_name, role, reference_node)
    if node is None:
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    if reference_node is not None:
        node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, reference_node.GetID())
    return node


def base_name(result: Optional[DetectionResult], reference_node) -> str:
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


def write_volume_node(result: DetectionResult, reference_node, node, scene, class_name: str, role: str, label: str, array: np.ndarray):
    """The output node of ``role`` (reused or added), placed on the reference grid, holding ``array``."""
    if reference_node is not None:
        require_in_scene(reference_node, "input volume")
        check_result_matches(result, reference_node)
    scene = scene_of(scene, node, reference_node)
    node = output_node(scene, class_name, role, reference_node, node, label)
    _place_like(node, reference_node, result)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node
