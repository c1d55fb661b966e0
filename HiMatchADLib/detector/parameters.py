"""Declared parameter values: the checks of user-given settings, for the command line, the
worker and the Python API (:data:`DETECTOR_PARAMETERS` for the detector's keywords).

Each ``*_value`` function takes the user's text or value and returns it converted, or raises
:class:`ValueError` with a message that names no option, so that each front end can add its own
words (the command line its flag, argparse its ``argument --x:`` prefix).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

from ..core.errors import HiMatchADError
from ..features.presets import MODALITIES
from ..features.slicing import SLICE_AXES
from ..io.subjects import compile_subject_pattern
from ..methods.base import get_method
from ..methods.knn_index import check_knn_index

#: Largest ``--resolution``. DINOv3 features stay usable up to about 4k pixels, and no medical slice
#: needs more (CT/MRI matrices are at most 1024, OCT B-scans about 2048: beyond the image's own size
#: the model sees an upsampled image). At 4096 one slice is already 65 536 patch tokens; larger values
#: only exhaust memory inside the model.
MAX_RESOLUTION = 4096


def threshold_value(value):
    """``"auto"`` or a finite number."""
    if value == "auto":
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be 'auto' or a number, not '{value}'") from None
    if not math.isfinite(v):
        raise ValueError(f"must be 'auto' or a finite number, not '{value}'")
    return v


def positive_int(value) -> int:
    """A whole number of at least 1."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a whole number, not '{value}'") from None
    if v < 1:
        raise ValueError(f"must be at least 1, not {v}")
    return v


def resolution_value(value) -> int:
    """A whole number of pixels from 1 to :data:`MAX_RESOLUTION`."""
    v = positive_int(value)
    if v > MAX_RESOLUTION:
        raise ValueError(f"must be at most {MAX_RESOLUTION} pixels, not {v}")
    return v


def fraction_value(value) -> float:
    """A number strictly between 0 and 1."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, not '{value}'") from None
    if not 0.0 < v < 1.0:
        raise ValueError(f"must be between 0 and 1, not {v}")
    return v


def argtype(check):
    """``check`` as an argparse ``type=`` (its ValueError becomes argparse's usage error)."""

    def parse(text: str):
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__
    return parse


# ------------------------------------------------------------------------------- the detector's keywords
def _as(kind, name: str, value, what: str):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise HiMatchADError(f"{name} must be {what}, not '{value}'") from None


def _whole(minimum: Optional[int] = None, maximum: Optional[int] = None, below: str = "{name} must be at least {minimum}, not {value}"):
    def check(name, value):
        v = _as(int, name, value, "a whole number")
        if minimum is not None and v < minimum:
            raise HiMatchADError(below.format(name=name, minimum=minimum, value=value))
        if maximum is not None and v > maximum:
            raise HiMatchADError(f"{name} must be at most {maximum}, not {value}")
        return v

    return check


def _number(name, value):
    return _as(float, name, value, "a number")


def _positive(message: str, optional: bool = False, finite: bool = False):
    """A number > 0 (finite when ``finite``; None allowed when ``optional``)."""

    def check(name, value):
        if optional and value is None:
            return None
        v = _as(float, name, value, "a number")
        if not (v > 0 and (math.isfinite(v) or not finite)):
            raise HiMatchADError(message.format(value=value))
        return v

    return check


def _choice(choices, message: str, lower: bool = False):
    def check(name, value):
        v = str(value).lower() if lower else value
        if v not in choices:
            raise HiMatchADError(message.format(value=value, choices=", ".join(choices)))
        return v

    return check


def _threshold(name, value):
    if value == "auto":
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise HiMatchADError(f"threshold must be 'auto' or a number, not '{value}'") from None
    if not math.isfinite(_as(float, name, value, "'auto' or a number")):
        raise HiMatchADError(f"threshold must be 'auto' or a finite number, not {value}")
    return value  # a number given as a number is kept as given (its settings record it so)


def _fraction(name, value):
    v = _as(float, name, value, "a number")
    if not (0.0 < v < 1.0):
        raise HiMatchADError(f"target false-positive rate must be between 0 and 1, not {value}")
    return v


def _pixel_spacing(name, value):
    if isinstance(value, str) and value.lower() in ("none", "off"):
        return None
    if value in (None, "auto"):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise HiMatchADError(f"pixel spacing must be 'auto', 'off' or a number of mm, not '{value}'") from None
    v = _as(float, name, value, "'auto', 'off' or a number of mm")
    if not (math.isfinite(v) and v > 0):
        raise HiMatchADError(f"pixel spacing must be a positive number of mm, not {value}")
    return v


def _method(name, value):
    return get_method(value).name


def _subject_pattern(name, value):
    compile_subject_pattern(value)  # a bad pattern is a user error now, not after the bank
    return value or None


def _stages(name, value):
    return [_as(int, name, s, "a list of layer numbers") for s in value] if value else None


def _UNCHANGED(name, value):
    return value


#: How each keyword of :class:`~HiMatchADLib.detector.HiMatchDetector` is checked and converted
#: (as scikit-learn's ``_parameter_constraints``): ``check(name, value) -> value``, raising
#: :class:`HiMatchADError` with a message that says what is wrong. ``precision`` is resolved by the
#: detector itself (it needs the device), ``cache_dir`` becomes a path.
DETECTOR_PARAMETERS = {
    "model": lambda name, value: str(value),
    "method": _method,
    "k": _whole(1),
    "knn_index": lambda name, value: check_knn_index(value),
    "modality": _choice(MODALITIES, "unknown modality '{value}'; choose one of {choices}", lower=True),
    "slice_axis": _choice(SLICE_AXES, "unknown slice axis '{value}'; choose one of {choices}"),
    "resolution": _whole(16, MAX_RESOLUTION, below="resolution {value} is too small"),
    "pixel_spacing": _pixel_spacing,
    "stages": _stages,
    "threshold": _threshold,
    "target_fpr": _fraction,
    "min_component_size": _UNCHANGED,
    "sigma": _number,
    "position_window": _UNCHANGED,
    "candidates": _whole(),
    "alpha": _number,
    "clusters_per_slice": _whole(1, below="clusters_per_slice and codebook_factor must be positive"),
    "codebook_factor": _positive("clusters_per_slice and codebook_factor must be positive"),
    "shared_codebook": lambda name, value: bool(value),
    "slice_step": _whole(1),
    "dpmm_components": _whole(1),
    "dpmm_max_tokens": _whole(1),
    "dpmm_covariance": _UNCHANGED,
    "dpmm_concentration": _positive("dpmm_concentration must be positive, not {value}", optional=True),
    "calibration_slices": _whole(1),
    "consistency_mm": _positive("consistency_mm must be a positive distance in mm (or None), not {value}", optional=True, finite=True),
    "subject_pattern": _subject_pattern,
    "device": _UNCHANGED,
    "batch_size": _whole(1),
    "stage_norm": lambda name, value: bool(value),
    "precision": _UNCHANGED,
    "cache_dir": lambda name, value: Path(value).expanduser() if value else None,
    "seed": _whole(),
}


def check_detector_parameters(values: dict) -> dict:
    """``values`` (every keyword of :data:`DETECTOR_PARAMETERS`) checked and converted, in the
    table's order; the first mistake raises :class:`HiMatchADError`. Settings that only make sense
    together are checked too (``knn_index`` other than exact needs a method that searches normal
    tokens)."""
    out = {name: check(name, values[name]) for name, check in DETECTOR_PARAMETERS.items()}
    if out["knn_index"] != "exact" and not get_method(out["method"]).uses_knn_index:
        raise HiMatchADError(f"knn_index {out['knn_index']} applies to method knn only (method is {out['method']}); leave it at exact")
    return out
