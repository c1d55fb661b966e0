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
volume, so a second run on the same input updates them instead of adding new ones.

Inputs: :func:`is_supported_input` (with :func:`input_problem`, the reason) is the one rule for
which volumes the module examines: scalar volumes and RGB/RGBA vector volumes (as their luminance,
as the library reads colour image files), not labelmaps, tensors, other vector volumes or outputs
of this module. A node selector lists :data:`INPUT_NODE_CLASSES` and hides what the rule refuses.

Safety rules
------------
- A result is attached only to the volume it was computed on: :func:`check_result_matches`
  compares the node's grid with ``result.geometry``, and :func:`node_in_scene` tells whether a
  node object still belongs to its scene (node IDs are reused after a scene close).
- The "Anomaly" segment is tagged for DICOM SEG export: algorithm name "HiMatch-AD", algorithm
  type AUTOMATIC while it holds the detection's output at the detection's threshold, SEMIAUTOMATIC
  once a person edited it or chose another threshold (:func:`segment_algorithm_type`, kept up to
  date after every edit by :func:`watch_segmentation`), and the terminology category = type SCT
  49755003 "Morphologically Altered Structure", which asserts no particular finding.
- Each import records what it put into the segment (a digest of its voxels); replacing a segment
  edited since then (new threshold, second run) raises :class:`SegmentEditedError` unless the
  caller says to keep a copy of the edits or to overwrite them (``if_edited``).
- The labelmap volume node mirrors the segment, edits included (:func:`sync_labelmap`): the
  segment is the truth, and what is saved from either is the same.
- A threshold step thresholds only the box of the heatmap above the threshold and sets the
  segment's voxels on its reference geometry directly: the same voxels as
  :meth:`DetectionResult.labelmap_at`, in a fraction of the time (``benchmarks/slider.py``).


Modules (each imports ``slicer``; this package itself does not, so that :mod:`.install` runs in a
Slicer whose Python lacks the module's requirements):

- :mod:`.geometry`: RAS/LPS, node geometry, :func:`check_result_matches`;
- :mod:`.nodes`: node roles, input candidates, output nodes beside their input;
- :mod:`.heatmap`: heatmap and labelmap volume nodes and their display;
- :mod:`.segments`: the Anomaly segment, terminology, DICOM tags, edits, the labelmap mirror, threshold steps;
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
