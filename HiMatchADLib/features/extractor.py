"""Feature extraction: patch tokens of selected stages (through the final norm, L2-normalised) and the CLS token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..core.errors import HiMatchADError
from .backbone import (
    DEFAULT_MODEL,
    load_backbone,
    resolve_device,
    resolve_precision,
    torch_dtype,
)
from .canvas import model_grid, to_model_input


def final_norm(net):
    """The model's final layer norm module (``norm`` in DINOv3, ``layernorm`` in DINOv2)."""
    for name in ("norm", "layernorm"):
        mod = getattr(net, name, None)
        if mod is not None and callable(mod):
            return mod
    raise HiMatchADError(f"{type(net).__name__} has no final layer norm ('norm' or 'layernorm'); pass a DINOv3 or DINOv2 ViT")


def default_stages(num_layers: int, n: int = 4) -> list[int]:
    """``n`` layers evenly spaced through the network, ending with the last one (1-based)."""
    n = max(1, min(n, num_layers))
    return sorted({int(round(num_layers * (i + 1) / n)) for i in range(n)})


@dataclass
class Features:
    """Output of one batch: per stage ``(B, gh*gw, D)`` float32 unit vectors; CLS ``(B, D)``."""

    stages: list  # list of np.ndarray, one per stage
    cls: np.ndarray
    grid: tuple[int, int]


class FeatureExtractor:
    """Batched frozen-feature extraction at selected transformer stages."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        stages: Optional[Sequence[int]] = None,
        resolution: int = 448,
        batch_size: int = 8,
        stage_norm: bool = True,
        precision: str = "fp32",
        reporter=None,
    ):
        """``stage_norm``: pass the intermediate stages through the model's final layer norm (as
        DINOv3's ``get_intermediate_layers(norm=True)``); False keeps their raw hidden states.
        ``precision``: ``"fp32"`` (default), ``"bf16"``, ``"int8"`` (CPU) or ``"auto"`` (resolved
        here, see :func:`resolve_precision`) for the backbone; float16 is refused. The returned
        features are float32 whatever the precision. ``reporter`` (a
        :class:`~HiMatchADLib.core.progress.Reporter` or a ``(message, done, total)`` callback)
        gets the model download's progress and can cancel it (see :func:`load_backbone`)."""
        self.model_id = str(model)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.net, self.info = load_backbone(self.model_id, self.device, self.precision, reporter=reporter)
        L = self.info["num_layers"]
        self.stages = list(stages) if stages else default_stages(L)
        bad = [s for s in self.stages if not 1 <= int(s) <= L]
        if bad:
            raise HiMatchADError(f"stage(s) {bad} out of range: this model has layers 1..{L}")
        self.stages = sorted(int(s) for s in self.stages)
        if int(resolution) < self.patch_size:
            raise HiMatchADError(f"resolution {resolution} is smaller than the patch size {self.patch_size}")
        self.resolution = int(resolution)
        self.batch_size = max(1, int(batch_size))
        self.stage_norm = bool(stage_norm)
        self._norm = final_norm(self.net)

    @property
    def patch_size(self) -> int:
        return self.info["patch_size"]

    @property
    def dim(self) -> int:
        return self.info["hidden_size"]

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def cache_key(self) -> dict:
        """Everything about this extractor that changes the features (part of a bank's cache key)."""
        import torch

        return {
            "model": self.fingerprint,
            "stage_norm": self.stage_norm,
            "precision": self.precision,
            "device_type": torch.device(self.device).type,
        }

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return model_grid(height, width, self.resolution, self.patch_size)

    def forward(self, pixel_values) -> Features:
        """Run the backbone on a ``(B, 3, h, w)`` tensor (already normalised)."""
        import torch
        import torch.nn.functional as F

        p = self.patch_size
        gh, gw = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        n_pre = self.info["num_prefix_tokens"]
        dtype = torch_dtype(self.precision)
        with torch.inference_mode():
            out = self.net(pixel_values=pixel_values.to(self.device, dtype=dtype), output_hidden_states=True)
            hs = out.hidden_states  # embeddings + one per layer
            stage_tokens = []
            for s in self.stages:
                if s == self.info["num_layers"]:
                    h = out.last_hidden_state  # = norm(hs[L])
                else:
                    h = self._norm(hs[s]) if self.stage_norm else hs[s]
                tok = h[:, n_pre:, :].float()
                if tok.shape[1] != gh * gw:
                    raise HiMatchADError(f"unexpected token count {tok.shape[1]} for a {gh}x{gw} patch grid")
                stage_tokens.append(F.normalize(tok, dim=-1).cpu().numpy())
            cls = F.normalize(out.last_hidden_state[:, 0, :].float(), dim=-1).cpu().numpy()
        return Features(stage_tokens, cls, (gh, gw))

    def extract(self, slices: np.ndarray, as_is: bool = False) -> Features:
        """(B, H, W) slices in [0, 1] -> :class:`Features` on this extractor's model grid, or, with
        ``as_is`` (slices already on a model canvas, sides multiples of the patch size), on theirs."""
        if as_is:
            p = self.patch_size
            if slices.shape[1] % p or slices.shape[2] % p:
                raise ValueError(f"a model canvas of {slices.shape[1]}x{slices.shape[2]} pixels is not a multiple of the {p}-pixel patch")
            size = (int(slices.shape[1]), int(slices.shape[2]))
        else:
            size = self.grid_for(slices.shape[1], slices.shape[2])
        return self.forward(to_model_input(slices, size))
