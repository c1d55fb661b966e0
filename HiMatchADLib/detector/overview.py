"""The overview picture of a result, from the result and its input image (re-read when not given).

The image is windowed by the intensity preset the detection used (``settings["modality_used"]``):
CT through its Hounsfield window, MRI and OCT from their background level to three times the
foreground median's normalised value (so tissue is mid-grey and bright lesions stay visible),
8-bit images as they are. Drawing: :mod:`HiMatchADLib.outputs.overview`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..core.atomic import write_text_atomic
from ..core.digest import files_digest
from ..core.errors import HiMatchADError
from ..core.geometry import Image
from ..core.result import DetectionResult
from ..features.presets import PRESETS, normalise, padding_values
from ..io.dicom import DicomSeries
from ..io.readers import read_image
from ..outputs.files import load_result
from ..outputs.overview import write_overview
from ..outputs.registry import get_writer


def display_volume(result: DetectionResult, image: Optional[Image] = None) -> np.ndarray:
    """The input image on the result's grid, windowed to [0, 1] for display (float32): ``image``,
    else the input kept by :meth:`~HiMatchADLib.detector.HiMatchDetector.predict`
    (``result.image_array``), else the input file read again."""
    array = getattr(result, "image_array", None) if image is None else None
    if array is None:
        if image is None:
            if not result.source_path or not Path(result.source_path).exists():
                raise HiMatchADError(f"the input image of '{result.name}' is needed for its overview picture and was not found: {result.source_path}")
            image = read_image(result.source_path)
        array = image.array
    array = np.asarray(array)
    if array.shape != result.heatmap.shape:
        raise HiMatchADError(
            f"{result.source_path}: the image ({array.shape}) is not on the result's grid ({result.heatmap.shape}); "
            "was the input changed after the detection?")
    modality = (result.settings or {}).get("modality_used") or "mri"
    preset = PRESETS.get(modality, PRESETS["mri"])
    norm = normalise(array, preset, pad=padding_values(array))
    top = min(1.0, 3.0 * float(preset["high_value"])) if preset["scaling"] == "percentile" else 1.0
    return np.clip(norm / top, 0.0, 1.0).astype(np.float32)


def write_case_overview(result: DetectionResult, path, image: Optional[Image] = None, n: int = 6, stand_in: Optional[bool] = None) -> Path:
    """Write the overview PNG of ``result`` to ``path`` (atomically); see :func:`display_volume`.
    ``stand_in`` (a random-weights model) defaults to what the result's provenance records."""
    if stand_in is None:
        model = (result.provenance or {}).get("model")
        stand_in = bool(isinstance(model, dict) and model.get("random_weights"))
    return write_overview(result, display_volume(result, image), path, n=n, model_label=result.model, stand_in=stand_in)


def add_overview(scores_path: Union[str, os.PathLike], image: Union[None, str, os.PathLike, Image, DicomSeries] = None) -> Path:
    """Make the overview picture of a finished result from its saved outputs, without computing
    its maps again, and list it in its scores JSON; returns the picture's path.

    ``image``: the input (a path, a DICOM series or an :class:`Image`; default: the input the
    JSON records). The result is read with :func:`~HiMatchADLib.outputs.files.load_result` (which
    refuses damaged outputs), the picture written atomically, then the JSON rewritten atomically
    with the picture among its ``"outputs"`` and ``"output_digests"``. A 2D result is refused:
    its picture is its overlay PNG.
    """
    scores_path = Path(scores_path)
    result = load_result(scores_path)
    if result.geometry.is_2d:
        raise HiMatchADError(f"{scores_path.name}: a 2D result has no overview picture; its overlay PNG shows it")
    if image is not None and not isinstance(image, Image):
        image = read_image(image)
    data = json.loads(scores_path.read_text(encoding="utf-8"))
    path = scores_path.parent / f"{result.name}{get_writer('overview').suffix}"
    write_case_overview(result, path, image=image)
    data["outputs"] = {**data.get("outputs", {}), "overview": path.name}
    data["output_digests"] = {**(data.get("output_digests") or {}), "overview": files_digest([path])}
    write_text_atomic(scores_path, json.dumps(data, indent=1))
    return path
