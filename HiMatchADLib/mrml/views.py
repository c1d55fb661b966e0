"""Slice views: what they show and where they are."""

from __future__ import annotations

from typing import Optional

import numpy as np
import slicer
import vtk

from .nodes import nodes_by_class


# --------------------------------------------------------------------------- slice views and navigation
def show_in_slice_views(scene, background_node=None, foreground_node=None, foreground_opacity: Optional[float] = None) -> int:
    """Put volumes into the background/foreground layers of every slice view of ``scene``.

    The same as ``slicer.util.setSliceViewerLayers`` but on an explicit scene and without Qt.
    Returns the number of slice views updated.
    """
    composites = nodes_by_class(scene, "vtkMRMLSliceCompositeNode")
    for composite in composites:
        with slicer.util.NodeModify(composite):
            if background_node is not None:
                composite.SetBackgroundVolumeID(background_node.GetID())
            if foreground_node is not None:
                composite.SetForegroundVolumeID(foreground_node.GetID())
            if foreground_opacity is not None:
                composite.SetForegroundOpacity(float(foreground_opacity))
    return len(composites)


def jump_slices_to(scene, ras, reference_node=None) -> None:
    """Centre every slice view on RAS point ``ras`` (local coordinates of ``reference_node``)."""
    point = np.asarray(ras, dtype=float)[:3]
    transform_node = reference_node.GetParentTransformNode() if reference_node is not None else None
    if transform_node is not None:
        local_to_world = vtk.vtkGeneralTransform()
        transform_node.GetTransformToWorld(local_to_world)
        point = np.asarray(local_to_world.TransformPoint(point))
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(point[0]), float(point[1]), float(point[2]), slicer.vtkMRMLSliceNode.CenteredJumpSlice)
