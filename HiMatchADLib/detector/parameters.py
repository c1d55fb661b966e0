"""Declared parameter values: the checks of user-given settings shared by the command line, the
worker and the Python API (one message per mistake, wherever it is made).

Each ``*_value`` function takes the user's text or value and returns it converted, or raises
:class:`ValueError` with a message that names no option, so that each front end can add its own
words (the command line its flag, argparse its ``argument --x:`` prefix).
"""

from __future__ import annotations

import argparse
import math

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
