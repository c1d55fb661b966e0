"""HiMatch-AD: training-free anomaly detection in medical images on frozen DINOv3 features.

Slicer-independent: nothing here imports ``slicer``, ``qt``, ``ctk`` or ``vtk`` except the MRML
adapter ``HiMatchADLib.mrml``, which is imported only inside 3D Slicer (or with ``slicer-core``).

The package is layered; each sub-package imports only from the layers below it (checked by
``Testing/test_layers.py``)::

    core < io < features, outputs < bank < methods < detector < batch < worker < mrml, evaluation < cli

The public API is re-exported here. ``import HiMatchADLib`` stays light: torch, transformers and
faiss load when a detector is made.
"""

from .core.errors import Cancelled, HiMatchADError, ModelAccessError
from .core.geometry import Geometry, Image
from .core.result import DetectionResult, Support
from .core.version import __version__
from .io.dicom import DicomSeries, select_series
from .io.readers import read_image
from .io.series_filters import parse_series_filters
from .io.writers import write_image
from .outputs.files import load_result, save_result

_LAZY = {
    "HiMatchDetector": ("detector", "HiMatchDetector"),
    "PreparedQuery": ("detector", "PreparedQuery"),
    "run_batch": ("batch", "run_batch"),
    "list_methods": ("methods", "list_methods"),
    "get_method": ("methods", "get_method"),
    "list_engines": ("batch", "list_engines"),
    "list_writers": ("outputs", "list_writers"),
    "KNOWN_MODELS": ("features.models", "KNOWN_MODELS"),
    "model_info": ("features.models", "model_info"),
    "ungated_alternative": ("features.models", "ungated_alternative"),
    "save_hub_token": ("features.models", "save_hub_token"),
    "hub_token_status": ("features.models", "hub_token_status"),
    "available_devices": ("features.backbone", "available_devices"),
}


def __getattr__(name):  # keep `import HiMatchADLib` light
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KNOWN_MODELS",
    "Cancelled",
    "DetectionResult",
    "DicomSeries",
    "Geometry",
    "HiMatchADError",
    "HiMatchDetector",
    "Image",
    "ModelAccessError",
    "PreparedQuery",
    "Support",
    "__version__",
    "available_devices",
    "get_method",
    "hub_token_status",
    "list_engines",
    "list_methods",
    "list_writers",
    "load_result",
    "model_info",
    "parse_series_filters",
    "read_image",
    "run_batch",
    "save_hub_token",
    "save_result",
    "select_series",
    "ungated_alternative",
    "write_image",
]
