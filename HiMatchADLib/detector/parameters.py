"""Declared parameter values: one check of every user-given setting, for the command line, the
worker and the Python API.

Each ``*_value`` function takes the user's text or value and returns it converted, or raises
:class:`ValueError` with a message that names no option ("must be at least 1, not 0"), so that
each front end adds its own words: argparse its ``argument --k:`` prefix (:func:`argtype`), the
detector the keyword (:data:`DETECTOR_PARAMETERS`, "k must be at least 1, not 0"), which the
worker's errors repeat.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..core.errors import HiMatchADError
from ..features.presets import MODALITIES
from ..features.slicing import SLICE_AXES
from ..io.subjects import compile_subject_pattern
from ..methods.base import get_method
from ..methods.fusion import FUSIONS, check_fusion
from ..methods.knn_index import check_knn_index

#: Largest ``--resolution``. DINOv3 features stay usable up to about 4k pixels, and no medical slice
#: needs more (CT/MRI matrices are at most 1024, OCT B-scans about 2048: beyond the image's own size
#: the model sees an upsampled image). At 4096 one slice is already 65 536 patch tokens; larger values
#: only exhaust memory inside the model.
MAX_RESOLUTION = 4096


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, not '{value}'") from None


def whole_value(value) -> int:
    """A whole number: an integer, a number with no fraction (``4.0``) or its text (``"4"``); not
    ``1.5`` (``int()`` would make it 1 without a word) nor ``True``."""
    if isinstance(value, bool):
        raise ValueError(f"must be a whole number, not {value}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"must be a whole number, not {value:g}")
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a whole number, not '{value}'") from None


def positive_int(value) -> int:
    """A whole number of at least 1."""
    v = whole_value(value)
    if v < 1:
        raise ValueError(f"must be at least 1, not {v}")
    return v


#: Smallest ``resolution``: one 16-pixel patch.
MIN_RESOLUTION = 16


def resolution_value(value) -> int:
    """A whole number of pixels from :data:`MIN_RESOLUTION` to :data:`MAX_RESOLUTION`."""
    v = whole_value(value)
    if v < MIN_RESOLUTION:
        raise ValueError(f"must be at least {MIN_RESOLUTION} pixels (one model patch), not {v}")
    if v > MAX_RESOLUTION:
        raise ValueError(f"must be at most {MAX_RESOLUTION} pixels, not {v}")
    return v


def number_value(value) -> float:
    """A number."""
    return _number(value)


def positive_value(value) -> float:
    """A number above 0."""
    v = _number(value)
    if not v > 0:
        raise ValueError(f"must be positive, not {value}")
    return v


def non_negative_value(value) -> float:
    """A finite number of at least 0."""
    v = _number(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"must be a number of at least 0, not {value}")
    return v


def fraction_value(value) -> float:
    """A number strictly between 0 and 1."""
    v = _number(value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"must be between 0 and 1, not {v}")
    return v


def threshold_value(value):
    """``"auto"`` or a finite number (a number given as a number is kept as given)."""
    if value == "auto":
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be 'auto' or a number, not '{value}'") from None
    if not math.isfinite(v):
        raise ValueError(f"must be 'auto' or a finite number, not '{value}'")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else v


def pixel_spacing_value(value):
    """``"auto"``, ``None`` (also ``"off"``/``"none"``: stretch each slice) or a positive number of mm."""
    if isinstance(value, str) and value.lower() in ("none", "off"):
        return None
    if value in (None, "auto"):
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be 'auto', 'off' or a number of mm, not '{value}'") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"must be a positive number of mm, not {value}")
    return v


def distance_mm_value(value):
    """``None`` or a positive, finite distance in mm."""
    if value is None:
        return None
    v = _number(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"must be a positive distance in mm (or None), not {value}")
    return v


def optional(check):
    """``check``, with None allowed."""

    def checked(value):
        return None if value is None else check(value)

    checked.__name__ = check.__name__
    return checked


def argtype(check):
    """``check`` as an argparse ``type=`` (its ValueError becomes argparse's usage error)."""

    def parse(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__
    return parse


def add_method_tuning(g) -> None:
    """The command-line options that tune how the modes score (detect, batch, demo and evaluate), in
    the argparse group ``g``."""
    g.add_argument(
        "--fusion", default=FUSIONS[0], choices=FUSIONS,
        help="himatch only: how the calibrated stage maps are fused: reliability (default: one weight per stage, from "
        "its support disagreement on held-out normals), mean, max, or variance (the former per-pixel weights)",
    )
    g.add_argument(
        "--position-window", type=argtype(fraction_value), default=None, metavar="D",
        help="himatch, volumes: retrieve only normal slices whose relative position lies within D of the query's "
        "(opt-in slice-position prior; default off)",
    )
    g.add_argument(
        "--sigma", type=argtype(non_negative_value), default=None, metavar="PX",
        help="Gaussian smoothing of the maps in image pixels (default: the mode's reference: 4 for himatch and knn, "
        "0 for dpmm)",
    )


# ------------------------------------------------------------------------------- the detector's keywords
def keyword(check, name: str = ""):
    """``check`` for the detector's keyword ``name``: a :class:`HiMatchADError` that names it
    (``name`` overrides how the keyword is called in the message)."""

    def checked(key, value):
        try:
            return check(value)
        except ValueError as exc:
            raise HiMatchADError(f"{name or key} {exc}") from None

    return checked


def _choice(choices, message: str, lower: bool = False):
    def check(name, value):
        v = str(value).lower() if lower else value
        if v not in choices:
            raise HiMatchADError(message.format(value=value, choices=", ".join(choices)))
        return v

    return check


def _stages(value):
    if not value:
        return None
    try:
        return [int(s) for s in value]
    except (TypeError, ValueError):
        raise ValueError(f"must be a list of layer numbers, not {value!r}") from None


def _subject_pattern(name, value):
    compile_subject_pattern(value)  # a bad pattern is a user error now, not after the bank
    return value or None


def _unchanged(name, value):
    return value


#: How each keyword of :class:`~HiMatchADLib.detector.HiMatchDetector` is checked and converted
#: (as scikit-learn's ``_parameter_constraints``): ``check(name, value) -> value``, raising
#: :class:`HiMatchADError` with a message that says what is wrong. ``precision`` is resolved by the
#: detector itself (it needs the device), ``cache_dir`` becomes a path.
DETECTOR_PARAMETERS = {
    "model": lambda name, value: str(value),
    "method": lambda name, value: get_method(value).name,
    "k": keyword(positive_int),
    "knn_index": lambda name, value: check_knn_index(value),
    "modality": _choice(MODALITIES, "unknown modality '{value}'; choose one of {choices}", lower=True),
    "slice_axis": _choice(SLICE_AXES, "unknown slice axis '{value}'; choose one of {choices}"),
    "resolution": keyword(resolution_value),
    "pixel_spacing": keyword(pixel_spacing_value, "pixel spacing"),
    "stages": keyword(_stages),
    "threshold": keyword(threshold_value),
    "target_fpr": keyword(fraction_value, "target false-positive rate"),
    "min_component_size": _unchanged,
    "sigma": keyword(optional(non_negative_value), "smoothing sigma"),
    "position_window": keyword(optional(fraction_value), "position window"),
    "fusion": keyword(check_fusion),
    "candidates": keyword(whole_value),
    "alpha": keyword(number_value),
    "clusters_per_slice": keyword(positive_int),
    "codebook_factor": keyword(positive_value),
    "shared_codebook": lambda name, value: bool(value),
    "slice_step": keyword(positive_int),
    "dpmm_components": keyword(positive_int),
    "dpmm_max_tokens": keyword(positive_int),
    "dpmm_covariance": _unchanged,
    "dpmm_concentration": keyword(optional(positive_value)),
    "calibration_slices": keyword(positive_int),
    "consistency_mm": keyword(distance_mm_value),
    "subject_pattern": _subject_pattern,
    "device": _unchanged,
    "batch_size": keyword(positive_int),
    "stage_norm": lambda name, value: bool(value),
    "precision": _unchanged,
    "cache_dir": lambda name, value: Path(value).expanduser() if value else None,
    "seed": keyword(whole_value),
}


def check_detector_parameters(values: dict) -> dict:
    """``values`` (every keyword of :data:`DETECTOR_PARAMETERS`) checked and converted, in the
    table's order; the first mistake raises :class:`HiMatchADError`. Settings that only make sense
    together are checked too (``knn_index`` other than exact needs a method that searches normal
    tokens)."""
    out = {name: check(name, values[name]) for name, check in DETECTOR_PARAMETERS.items()}
    spec = get_method(out["method"])
    if out["knn_index"] != "exact" and not spec.uses_knn_index:
        raise HiMatchADError(f"knn_index {out['knn_index']} applies to method knn only (method is {out['method']}); leave it at exact")
    if out["fusion"] != FUSIONS[0] and not spec.uses_fusion:
        raise HiMatchADError(f"fusion {out['fusion']} applies to method himatch only (method is {out['method']}), which fuses stage maps; leave it at {FUSIONS[0]}")
    if out["sigma"] is None:  # the method's own smoothing (its reference's)
        out["sigma"] = float(spec.smoothing_sigma)
    return out
