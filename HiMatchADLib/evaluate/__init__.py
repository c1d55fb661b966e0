"""``himatchad evaluate``: detection quality, speed and memory of the detector's modes, side by side.

The implementation is in :mod:`HiMatchADLib.evaluate.runner`; this package exports its public API.
"""

from .runner import (  # noqa: F401
    BASELINES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_OUT,
    DETECTOR_METHODS,
    CaseOutput,
    IntensityBaselines,
    add_subparser,
    evaluate,
    make_figure,
    name_positions,
    normals_folder,
    print_table,
    render_markdown,
    run_evaluate_cli,
    table_rows,
)
from .runner import _environment, _md_table, _MemoryProbe  # noqa: F401  (used by benchmarks/evaluate_bench.py)
