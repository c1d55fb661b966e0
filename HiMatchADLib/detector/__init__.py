"""Layer 6, ``detector``: the :class:`HiMatchDetector` facade, its declared parameters, calibration and subjects."""

from .detector import HiMatchDetector, PreparedQuery

__all__ = ["HiMatchDetector", "PreparedQuery"]
