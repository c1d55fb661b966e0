"""What every method scores, and the method registry.

A query slice (:class:`QuerySlice`: its foreground patch tokens per stage, CLS token, patch grid,
relative position) goes in; :class:`SliceScores` (patch scores, supports) come out. A method is a
:class:`Scorer` and a :class:`MethodSpec` registered with :func:`register_method`; everything that
lists or dispatches on methods reads :func:`list_methods` / :func:`get_method`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..core.errors import HiMatchADError
from ..core.registry import Registry


@dataclass
class QuerySlice:
    index: int  # slice index in the prepared volume
    tokens: list  # per stage (n_fg, D) float32 unit vectors
    cls: np.ndarray  # (D,)
    fg: np.ndarray  # (gh*gw,) bool
    grid: tuple
    pos: float = float("nan")
    group: Optional[int] = None  # bank group to exclude (calibration)


@dataclass
class SliceScores:
    patch: np.ndarray  # (n_fg,) final patch scores
    stage: Optional[np.ndarray] = None  # (S, n_fg) raw stage scores (himatch)
    var: Optional[np.ndarray] = None  # (S, n_fg) variance across supports (himatch)
    supports: list = field(default_factory=list)


class Scorer:
    """What the detector asks of a method's scorer (the protocol; subclasses override what they need).

    ``score(queries)`` gives one :class:`SliceScores` per :class:`QuerySlice` (patch scores of the
    query's foreground patches, higher = more anomalous, and the supports it was matched against);
    ``timings`` accumulates seconds per named step. Calibration scores held-out normal slices with
    :meth:`calibration_scores`, then :meth:`calibrate` may add statistics of its own to the
    calibration record (and finish the held-out scores with them); :meth:`set_calibration` gives a
    stored record back. :meth:`describe` and :meth:`fit_warnings` report on the fitted scorer.
    """

    name = ""
    timings: dict

    def score(self, queries: list) -> list:  # pragma: no cover - the protocol
        raise NotImplementedError

    def calibration_scores(self, queries: list) -> list:
        """Scores of held-out normal queries for calibration (by default :meth:`score`)."""
        return self.score(queries)

    def calibrate(self, centre: list, collected: list) -> dict:
        """Statistics of the method's own taken from the held-out scores ``centre`` (the slices
        calibrated on; ``collected`` adds their neighbours), stored in the calibration record."""
        return {}

    def set_calibration(self, record: dict) -> None:
        """Use a stored calibration record (as :meth:`calibrate` filled it)."""

    def calibration_warnings(self) -> list:
        """What the calibration record should warn about this scorer (e.g. a fit that saw the held-out subjects)."""
        return []

    def describe(self) -> dict:
        """What ``fit_info`` records about the fitted scorer (e.g. the kNN index)."""
        return {}

    def fit_warnings(self) -> list:
        return []

    def apply_feedback(self, queries: list, scores: list, evidence) -> None:
        """Lower the scores of ``queries`` where they match reader feedback (``evidence``, a
        :class:`~HiMatchADLib.methods.feedback.FeedbackEvidence`), in place. By default the patch
        score is the distance to the nearest normal vector, so a marked vector at the last stage
        is one more: ``patch = min(patch, 1 - max cos to the evidence)``."""
        for q, s in zip(queries, scores):
            d = evidence.distance(len(q.tokens) - 1, q.tokens[-1])
            if d is not None:
                s.patch = np.minimum(s.patch, d).astype(np.float32)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    ``make_scorer(detector, held_out_groups)`` builds (or loads) the fitted scorer from the
    detector's bank and settings. ``key_settings(detector)`` names the detector settings that change
    its scores (they enter the calibration cache key besides the common ones). ``held_out_of_fit``:
    the scorer is fitted without the calibration subjects (so at most half of them are held out);
    otherwise each held-out slice only excludes its own subject. ``pixel_transform`` maps a pixel
    map in place (e.g. a softplus). ``uses_knn_index``: the method searches normal tokens and takes
    ``knn_index``. ``smoothing_sigma``: the Gaussian smoothing of its pixel maps by default, in
    pixels of the image (the detector's ``sigma`` overrides it). ``uses_fusion``: the method fuses
    stage maps and takes ``fusion``. ``feedback``: what reader feedback adds to its normal evidence
    (:data:`~HiMatchADLib.methods.feedback.FEEDBACK_KINDS`: the marked ``tokens``, per-slice
    ``clusters`` at every stage, or mixture ``components``; applied by :meth:`Scorer.apply_feedback`).
    """

    name: str
    title: str
    reference: str
    make_scorer: Callable
    key_settings: Callable = lambda detector: []
    held_out_of_fit: bool = False
    pixel_transform: Optional[Callable] = None
    uses_knn_index: bool = False
    smoothing_sigma: float = 4.0
    uses_fusion: bool = False
    feedback: str = "tokens"


_METHODS = Registry("method")
#: Built-in methods, in the order the choices are listed: each module registers itself on import.
_BUILTIN = ("himatch", "knn", "dpmm")


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (its name must be new); returns it."""
    return _METHODS.register(spec)


def _load_builtin() -> None:
    if len(_METHODS.names()) < len(_BUILTIN):
        for name in _BUILTIN:
            importlib.import_module(f"{__package__}.{name}")


def list_methods() -> tuple:
    """Names of the registered methods (the built-in ones first, in their order)."""
    _load_builtin()
    return tuple(sorted(_METHODS.names(), key=lambda n: (_BUILTIN.index(n) if n in _BUILTIN else len(_BUILTIN), n)))


def get_method(name: str) -> MethodSpec:
    """The registered method ``name`` (case-insensitive), or :class:`HiMatchADError` naming the choices."""
    _load_builtin()
    if str(name).lower() not in _METHODS:
        raise HiMatchADError(f"unknown method '{name}'; choose one of {', '.join(list_methods())}")
    return _METHODS.get(str(name).lower())
