"""HiMatch-AD: training-free anomaly detection in medical images on frozen DINOv3 features.

Slicer-independent: nothing here imports ``slicer``, ``qt``, ``ctk`` or ``vtk`` except the MRML
adapter ``HiMatchADLib.mrml``, which is imported only inside 3D Slicer (or with ``slicer-core``).
"""

__version__ = "0.1.0"

from .errors import Cancelled, HiMatchADError  # noqa: E402
from .imageio import Geometry, Image, read_image, write_image  # noqa: E402
from .result import DetectionResult, Support  # noqa: E402


def __getattr__(name):  # keep `import HiMatchADLib` light: torch/transformers load on first use
    if name in ("HiMatchDetector", "METHODS"):
        from . import detector

        return getattr(detector, name)
    raise AttributeError(name)


__all__ = [
    "Cancelled",
    "DetectionResult",
    "Geometry",
    "HiMatchADError",
    "HiMatchDetector",
    "Image",
    "Support",
    "read_image",
    "write_image",
]
