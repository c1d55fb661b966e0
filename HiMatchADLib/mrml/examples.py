"""Example data in the scene: volume files loaded as MRML nodes, with the file kept as their storage.

The Slicer module offers a first run on generated data (phantom normal scans and a case with a
lesion, written by :func:`HiMatchADLib.evaluation.phantom.write_demo_dataset` to a folder the user
can see); this module puts the case and its lesion mask into the scene. Loading goes through MRML's
own volume reader (``vtkMRMLVolumeArchetypeStorageNode``), as Slicer's "Add data" does, so the node
keeps the file as its storage (Save shows where it came from) and its geometry is the file's.
"""

from __future__ import annotations

import os

from ..core.errors import HiMatchADError


def load_volume_file(scene, path, name: str, labelmap: bool = False):
    """A scalar (or, with ``labelmap``, a labelmap) volume node read from ``path`` into ``scene``,
    with default display nodes (grey, automatic window/level for a scalar volume). A file MRML
    cannot read raises :class:`HiMatchADError` and leaves no node behind."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise HiMatchADError(f"volume file not found: {path}")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    storage.SetSingleFile(True)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise HiMatchADError(f"{path}: the volume could not be read")
    node.CreateDefaultDisplayNodes()
    return node
