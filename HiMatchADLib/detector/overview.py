"""The overview picture of a result, from the result and its input image (re-read when not given).

The image is windowed by the intensity preset the detection used (``settings["modality_used"]``):
CT through its Hounsfield window, MRI and OCT from their background level to three times the
foreground median's normalised value (so tissue is mid-grey and bright lesions stay visible),
8-bit images as they are. Drawing: :mod:`HiMatchADLib.outputs.overview`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import HiMatchADError
from ..core.geometry import Image
from ..core.result import DetectionResult
from ..features.presets import PRESETS, normalise, padding_values
from ..io.readers import read_image
from ..outputs.overview import write_overview


def display_volume(result: DetectionResult, image: Optional[Image] = None) -> np.ndarray:
    """The input image on the result's grid, windowed to [0, 1] for display (float32)."""
    if image is None:
        if not result.source_path or not Path(result.source_path).exists():
            raise HiMatchADError(f"the input image of '{result.name}' is needed for its overview picture and was not found: {result.source_path}")
        image = read_image(result.source_path)
    array = np.asarray(image.array)
    if array.shape != result.heatmap.shape:
        raise HiMatchADError(
            f"{result.source_path}: the image ({array.shape}) is not on the result's grid ({result.heatmap.shape}); "
            "was the input changed after the detection?")
    modality = (result.settings or {}).get("modality_used") or "mri"
    preset = PRESETS.get(modality, PRESETS["mri"])
    norm = normalise(array, preset, pad=padding_values(array))
    top = min(1.0, 3.0 * float(preset["high_value"])) if preset["scaling"] == "percentile" else 1.0
    return np.clip(norm / top, 0.0, 1.0).astype(np.float32)


def write_case_overview(result: DetectionResult, path, image: Optional[Image] = None, n: int = 6, stand_in: bool = False) -> Path:
    """Write the overview PNG of ``result`` to ``path`` (atomically); see :func:`display_volume`."""
    return write_overview(result, display_volume(result, image), path, n=n, model_label=result.model, stand_in=stand_in)
