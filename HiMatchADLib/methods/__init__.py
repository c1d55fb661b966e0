"""Layer 5, ``methods``: the scorer protocol, the method registry and one module per method.

- :mod:`.base`: :class:`QuerySlice`, :class:`SliceScores`, the :class:`Scorer` protocol and the
  registry (:func:`register_method`, :func:`get_method`, :func:`list_methods`);
- :mod:`.knn` (AnomalyDINO), :mod:`.dpmm` (AnomalyDINO-DPMM), :mod:`.himatch` (HiMatch-AD);
- :mod:`.maps`: patch scores to pixel maps, top-percent scores, fusion across slices;
- :mod:`.knn_index`: exact and approximate nearest-neighbour searches for ``knn``.

A new method is one module defining a scorer and calling :func:`register_method`, plus its name
in :data:`_BUILTIN`; the detector, calibration, the command line, the worker, the evaluation and
the Slicer module read the registry.
"""

from .base import (
    MethodSpec,
    QuerySlice,
    SliceScores,
    get_method,
    list_methods,
    register_method,
)

__all__ = ["MethodSpec", "QuerySlice", "SliceScores", "get_method", "list_methods", "register_method"]
