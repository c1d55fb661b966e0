"""Layer 6, ``detector``: the :class:`HiMatchDetector` facade and what it is made of.

- :mod:`.detector`: :class:`HiMatchDetector` (configure, ``fit``, ``prepare``, ``predict``, ``save``);
- :mod:`.parameters`: the detector's keywords declared and checked (:data:`DETECTOR_PARAMETERS`), and the
  value checks the command line and the evaluation share;
- :mod:`.checks`: whether a query belongs with the normal bank;
- :mod:`.calibration`: held-out normal slices and the calibrated threshold;
- :mod:`.subjects`: the subject of every bank slice (what calibration holds out together).
"""

from .detector import HiMatchDetector, PreparedQuery

__all__ = ["HiMatchDetector", "PreparedQuery"]
