"""The worker's JSON-lines protocol: its version, the settings it reserves or shares, the outputs a request asks for.

The requests and events are described in :mod:`HiMatchADLib.worker.server` and docs/api-contract.md.
"""

from __future__ import annotations

from ..core.errors import HiMatchADError
from ..outputs.registry import check_outputs, list_writers

PROTOCOL = 1


#: Detector keywords a request may not set (the worker owns progress and cancellation).
RESERVED_SETTINGS = ("progress", "cancel_event")


#: Settings that decide the feature extractor; detectors that agree on them share one loaded model.
EXTRACTOR_SETTINGS = ("model", "device", "stages", "resolution", "batch_size", "precision", "stage_norm")


PROGRESS_INTERVAL_S = 0.2


def requested_outputs(req: dict) -> tuple:
    """The optional outputs a ``detect`` / ``batch`` request asks for: ``outputs`` (a list of names
    of :func:`~HiMatchADLib.outputs.registry.list_writers`) and, as protocol 1 has them, one boolean
    field per output (``"dicom_seg": true``, ``"dicom_heatmap": true``)."""
    names = req.get("outputs") or []
    if not isinstance(names, list):
        raise HiMatchADError("'outputs' must be a list of output names")
    names = list(names) + [name for name in list_writers() if req.get(name)]
    return check_outputs(names)
