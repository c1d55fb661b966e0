"""Layer 1, ``core``: errors, progress, geometry and :class:`Image`, result dataclasses, atomic files.

Imports only the standard library and numpy; every other layer builds on it.
"""

from .atomic import atomic_path, write_text_atomic
from .errors import Cancelled, HiMatchADError
from .geometry import Geometry, Image
from .progress import ProgressCallback, Reporter
from .result import DetectionResult, Support
from .version import __version__

__all__ = [
    "Cancelled",
    "DetectionResult",
    "Geometry",
    "HiMatchADError",
    "Image",
    "ProgressCallback",
    "Reporter",
    "Support",
    "__version__",
    "atomic_path",
    "write_text_atomic",
]
