"""Layer 3, ``features``: backbone loading and precision, the feature extractor, intensity presets, the slice canvas.

- :mod:`.models`: the model catalogue (:data:`KNOWN_MODELS`), what a failed Hub download means
  (:class:`~HiMatchADLib.core.errors.ModelAccessError`), the Hugging Face token;
- :mod:`.backbone`: a DINOv3/DINOv2 ViT from the Hub or a local folder; device; precision;
- :mod:`.extractor`: :class:`FeatureExtractor` (patch tokens per stage, CLS);
- :mod:`.presets`: intensity presets (:data:`PRESETS`), normalisation, foreground;
- :mod:`.canvas`: in-plane resampling to one pixel spacing, the model grid and input;
- :mod:`.slicing`: :func:`prepare_volume` (orientation, slice axis, normalisation, canvas).

torch and transformers are imported when a backbone is loaded, not with this package.
"""

from .backbone import PRECISIONS, available_devices, resolve_device, resolve_precision
from .models import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    ModelInfo,
    hub_token_status,
    model_info,
    remove_hub_token,
    save_hub_token,
    ungated_alternative,
)
from .presets import MODALITIES, PRESETS
from .slicing import SLICE_AXES, PreparedVolume, prepare_volume

__all__ = [
    "DEFAULT_MODEL", "KNOWN_MODELS", "MODALITIES", "PRECISIONS", "PRESETS", "SLICE_AXES", "ModelInfo", "PreparedVolume",
    "available_devices", "hub_token_status", "model_info", "prepare_volume", "remove_hub_token", "resolve_device",
    "resolve_precision", "save_hub_token", "ungated_alternative",
]
