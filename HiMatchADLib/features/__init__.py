"""Layer 3, ``features``: backbone loading and precision, the feature extractor, intensity presets, the slice canvas.

- :mod:`.backbone`: a DINOv3/DINOv2 ViT from the Hub or a local folder; device; precision;
- :mod:`.extractor`: :class:`FeatureExtractor` (patch tokens per stage, CLS);
- :mod:`.presets`: intensity presets (:data:`PRESETS`), normalisation, foreground;
- :mod:`.canvas`: in-plane resampling to one pixel spacing, the model grid and input;
- :mod:`.slicing`: :func:`prepare_volume` (orientation, slice axis, normalisation, canvas).

torch and transformers are imported when a backbone is loaded, not with this package.
"""

from .backbone import DEFAULT_MODEL, PRECISIONS, resolve_precision
from .presets import MODALITIES, PRESETS
from .slicing import SLICE_AXES, PreparedVolume, prepare_volume

__all__ = ["DEFAULT_MODEL", "MODALITIES", "PRECISIONS", "PRESETS", "SLICE_AXES", "PreparedVolume", "prepare_volume", "resolve_precision"]
