"""Layer 3, ``outputs``: what a result is written as, and the registry of optional output writers.

- :mod:`.files`: the heatmap, labelmap and scores JSON (always), overlay PNG (2D), foreground mask;
  :func:`save_result`, :func:`load_result`, :func:`is_complete`;
- :mod:`.overlay`: the 2D overlay picture;
- :mod:`.registry`: optional writers by name (``dicom_seg``, ``dicom_heatmap``);
- :mod:`.dicom_seg`: the DICOM SEG and parametric map writers (highdicom, loaded on use).
"""

from .files import is_complete, load_result, output_paths, save_result
from .registry import (
    OUTPUT_WRITERS,
    OutputWriter,
    check_outputs,
    get_writer,
    list_writers,
)

__all__ = ["OUTPUT_WRITERS", "OutputWriter", "check_outputs", "get_writer", "is_complete", "list_writers", "load_result", "output_paths", "save_result"]
