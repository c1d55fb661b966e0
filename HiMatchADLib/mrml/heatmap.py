"""The heatmap and labelmap volume nodes and how the heatmap is displayed."""

from __future__ import annotations

from typing import Optional

import numpy as np
import slicer

from ..core.result import DetectionResult
from .nodes import (
    ROLE_HEATMAP,
    ROLE_LABELMAP,
    base_name,
    nodes_by_class,
    write_volume_node,
)

#: Perceptual colour maps for the heatmap, best first: Slicer's Inferno, ColdToHotRainbow, then
#: built-in tables that exist in every scene with default colours.
HEATMAP_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeRainbow",
)


# --------------------------------------------------------------------------- heatmap
def heatmap_color_node_id(scene) -> Optional[str]:
    """ID of the first available colour node of :data:`HEATMAP_COLOR_NODE_IDS` in ``scene``."""
    for node_id in HEATMAP_COLOR_NODE_IDS:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    for name in ("Inferno", "ColdToHotRainbow"):
        for node in nodes_by_class(scene, "vtkMRMLColorNode"):
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
    node = write_volume_node(result, reference_node, node, scene, "vtkMRMLScalarVolumeNode", ROLE_HEATMAP,
                              name or f"{base_name(result, reference_node)} anomaly heatmap", result.heatmap.astype(np.float32, copy=False))
    configure_heatmap_display(node, result)
    return node


# --------------------------------------------------------------------------- labelmap and segmentation
def labelmap_to_volume_node(result: DetectionResult, reference_node, node=None, scene=None, name: Optional[str] = None):
    """Write ``result.labelmap`` (uint8, 1 = anomalous) into a labelmap volume node on the reference grid."""
    node = write_volume_node(result, reference_node, node, scene, "vtkMRMLLabelMapVolumeNode", ROLE_LABELMAP,
                              name or f"{base_name(result, reference_node)} anomaly labelmap", result.labelmap.astype(np.uint8, copy=False))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def set_heatmap_opacity(scene, heatmap_node, opacity: float) -> int:
    """Foreground opacity of the slice views that show ``heatmap_node`` as foreground."""
    n = 0
    for composite in nodes_by_class(scene, "vtkMRMLSliceCompositeNode"):
        if heatmap_node is not None and composite.GetForegroundVolumeID() == heatmap_node.GetID():
            composite.SetForegroundOpacity(float(opacity))
            n += 1
    return n
