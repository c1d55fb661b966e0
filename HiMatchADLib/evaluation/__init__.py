"""Layer 9, ``evaluation``: ``himatchad evaluate`` (detection quality, speed and memory of the modes, side by side), data sets, metrics, synthetic lesions and phantoms.

For one data set (BMAD folders or the ``volumes`` layout, see :mod:`.datasets`), every
requested mode (``himatch``, ``knn`` = AnomalyDINO, ``dpmm`` = AnomalyDINO-DPMM) is fitted on the same
normal reference set with the same model and settings: the detectors share one cache folder and
the bank does not depend on the mode, so the features of the normal set are computed once and the
modes differ only in how they score. Two intensity-only baselines, ``intensity`` and
``intensity-dev``, are computed by the same code (defined in :mod:`.baselines`); every number of a
feature-based mode should be read against them.

Metrics (see :mod:`.metrics`): image AUROC (one score per 2D image or per volume),
slice AUROC for volumes (a slice is anomalous when its mask has a voxel), pixel AUROC, AUPRO to
FPR 0.3, pixel AP, best Dice and Dice at the detector's calibrated threshold (its labelmap), all
pooled over the test cases; time per case and per scored slice, with the detector's own breakdown
(features, retrieval, stage maps, fusion, ...); fitting time (model loading, bank build or cache
load, calibration, DPMM); peak resident memory of the process during each mode (Linux: the
high-water mark is reset before each mode; elsewhere the lifetime peak) and peak GPU memory.

Outputs in ``OUT``: ``results.md`` (tables), ``results.json`` (everything, including per-case
scores), ``results.png`` (ROC and PRO curves, and example slices with each map and the ground-truth
outline). Files are written atomically.

Modules:

- :mod:`.runner`: :func:`evaluate`, the run itself (fitting, predicting, writing the outputs);
- :mod:`.inputs`: slice positions from file names, image sizes, masks, the folder of normals;
- :mod:`.records`: one case's output (:class:`CaseOutput`) and a method's accumulated metrics;
- :mod:`.baselines`: the intensity-only baselines;
- :mod:`.memory`: peak memory of each method; :mod:`.environment`: the machine and library versions;
- :mod:`.report`: ``results.md`` and the console table; :mod:`.figure`: ``results.png``;
- :mod:`.command`: the ``himatchad evaluate`` sub-command;
- :mod:`.datasets`: test sets (BMAD, volumes); :mod:`.metrics`: AUROC, AUPRO, Dice;
- :mod:`.synth`: synthetic lesions in normal scans (``himatchad synth``); :mod:`.phantom`: phantoms and the demo data.
"""

from .baselines import BASELINES, IntensityBaselines
from .command import add_subparser, run_evaluate_cli
from .environment import environment
from .figure import make_figure
from .inputs import name_positions, normals_folder
from .memory import MemoryProbe
from .records import DETECTOR_METHODS, CaseOutput
from .report import markdown_table, print_table, render_markdown, table_rows
from .runner import DEFAULT_MAX_PIXELS, DEFAULT_OUT, evaluate

__all__ = [
    "BASELINES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_OUT",
    "DETECTOR_METHODS",
    "CaseOutput",
    "IntensityBaselines",
    "MemoryProbe",
    "add_subparser",
    "environment",
    "evaluate",
    "make_figure",
    "markdown_table",
    "name_positions",
    "normals_folder",
    "print_table",
    "render_markdown",
    "run_evaluate_cli",
    "table_rows",
]
