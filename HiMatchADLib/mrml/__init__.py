"""Layer 9, ``mrml``: the Slicer adapter. Slicer volume nodes in, heatmap / labelmap / segmentation / score nodes out.

This is the only package of the library that imports ``slicer`` (and ``vtk``); nothing else in
``HiMatchADLib`` imports it, so the library stays usable without Slicer. It needs Slicer's MRML
and logic libraries only, not Qt: it runs inside the 3D Slicer application and, for tests, on the
``slicer-core`` wheel.

Geometry conventions
--------------------
MRML volume nodes place voxels in RAS with a 4x4 ``IJKToRAS`` matrix; ``slicer.util.arrayFromVolume``
returns a *view* of the voxels in ``(k, j, i)`` numpy order. The library works in ITK's LPS space
(:class:`~HiMatchADLib.core.geometry.Geometry`: ``physical = origin + direction @ (spacing * ijk)``) on
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


Modules (each imports ``slicer``; this package itself does not, so that :mod:`.install` runs in a
Slicer whose Python lacks the module's requirements):

- :mod:`.geometry`: RAS/LPS, node geometry, :func:`check_result_matches`;
- :mod:`.nodes`: node roles, input candidates, output nodes beside their input;
- :mod:`.heatmap`: heatmap and labelmap volume nodes and their display;
- :mod:`.segments`: the Anomaly segment, terminology, DICOM tags, edits;
- :mod:`.scores`: score table and plot; :mod:`.views`: slice views;
- :mod:`.results`: every output node of one result (:func:`result_to_nodes`);
- :mod:`.jobs`: detection jobs on the worker process (:class:`DetectionRunner`);
- :mod:`.install`: the module's Python requirements installed into Slicer's Python.

Every public name of those modules is also an attribute of this package (loaded on first use).
"""

import importlib

_MODULES = ("geometry", "nodes", "heatmap", "segments", "scores", "views", "results")


def __getattr__(name):
    for m in _MODULES:
        mod = importlib.import_module(f"{__name__}.{m}")
        if hasattr(mod, name) and not name.startswith("_"):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
