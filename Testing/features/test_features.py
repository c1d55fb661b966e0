"""Feature extraction against a reference computed from the model's hidden states.

The reference is written from DINOv3's ``get_intermediate_layers(norm=True)``: every selected layer's
output goes through the final LayerNorm, the CLS and register tokens are dropped, and the patch tokens
are L2-normalised. The LayerNorm is applied here with ``torch.nn.functional.layer_norm`` and the
weights read from the saved checkpoint, so the reference does not share code with the extractor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from HiMatchADLib.features.extractor import FeatureExtractor


def _with_distinct_norm(src: Path, dst: Path, seed: int = 3) -> Path:
    """Copy of a saved model whose final LayerNorm has non-trivial weight and bias."""
    from transformers import AutoModel

    net = AutoModel.from_pretrained(str(src)).eval()
    norm = net.norm if hasattr(net, "norm") else net.layernorm
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(0.5 + 2.0 * torch.rand(norm.weight.shape, generator=g))
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
    net.save_pretrained(str(dst))
    return dst


def _tiny_dinov2(dst: Path, registers: int) -> Path:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(1)
    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, patch_size=16, image_size=64)
    if registers:
        net = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        net = Dinov2Model(Dinov2Config(**common))
    net.eval().save_pretrained(str(dst))
    return dst


def _reference(folder: Path, pixels: torch.Tensor, stages: list):
    """Expected per-stage patch tokens and CLS (numpy), from hidden states + the saved norm weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(str(folder))
    net = AutoModel.from_pretrained(str(folder)).eval()
    weights = load_file(str(folder / "model.safetensors"))
    prefix = "norm" if cfg.model_type == "dinov3_vit" else "layernorm"
    w, b = weights[f"{prefix}.weight"].float(), weights[f"{prefix}.bias"].float()
    n_skip = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    with torch.no_grad():
        hs = net(pixel_values=pixels, output_hidden_states=True).hidden_states  # embeddings, layer 1, ...
        normed = [F.layer_norm(hs[s], (cfg.hidden_size,), w, b, eps=cfg.layer_norm_eps) for s in stages]
        raw = [F.normalize(hs[s][:, n_skip:], dim=-1).numpy() for s in stages]
        tokens = [F.normalize(h[:, n_skip:], dim=-1).numpy() for h in normed]
        cls = F.normalize(normed[-1][:, 0], dim=-1).numpy()
    return tokens, cls, raw


@pytest.fixture(scope="module")
def normed_model(tiny_model, tmp_path_factory) -> Path:
    return _with_distinct_norm(Path(tiny_model), tmp_path_factory.mktemp("normed") / "tiny-normed")


def _pixels(h=64, w=48, b=2, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_every_stage_goes_through_the_final_norm(normed_model):
    ex = FeatureExtractor(str(normed_model), device="cpu", resolution=64)
    assert ex.stages == [1, 2, 3, 4]  # every layer of the tiny model
    x = _pixels()
    feats = ex.forward(x)
    tokens, cls, raw = _reference(normed_model, x, ex.stages)
    assert feats.grid == (4, 3)
    for s, got, want, unnormed in zip(ex.stages, feats.stages, tokens, raw):
        assert got.dtype == np.float32 and got.shape == want.shape == (2, 12, 192), s
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"stage {s}")
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
        # Skipping the norm would give clearly different tokens at this stage.
        assert np.abs(got - unnormed).max() > 0.05, f"stage {s} looks unnormalised"
    np.testing.assert_allclose(feats.cls, cls, atol=2e-5)


def test_raw_intermediate_stages_on_request(normed_model):
    ex = FeatureExtractor(str(normed_model), device="cpu", resolution=64, stage_norm=False)
    x = _pixels(seed=1)
    feats = ex.forward(x)
    tokens, _, raw = _reference(normed_model, x, ex.stages)
    for got, want in zip(feats.stages[:-1], raw[:-1]):
        np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(feats.stages[-1], tokens[-1], atol=2e-5)  # the last stage is always normed
    assert ex.cache_key() != FeatureExtractor(str(normed_model), device="cpu", resolution=64).cache_key()


@pytest.mark.parametrize("registers", [0, 3])
def test_dinov2_stages_go_through_its_layernorm(tmp_path, registers):
    folder = _with_distinct_norm(_tiny_dinov2(tmp_path / "plain", registers), tmp_path / "normed")
    ex = FeatureExtractor(str(folder), device="cpu", resolution=64, stages=[1, 3, 4])
    assert ex.info["num_prefix_tokens"] == 1 + registers
    x = _pixels(seed=2)
    feats = ex.forward(x)
    tokens, cls, raw = _reference(folder, x, ex.stages)
    for got, want, unnormed in zip(feats.stages, tokens, raw):
        assert got.shape == (2, 12, 64)
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert np.abs(got - unnormed).max() > 0.05
    np.testing.assert_allclose(feats.cls, cls, atol=2e-5)


def test_bf16_features_are_float32_and_close_to_fp32(normed_model):
    ex32 = FeatureExtractor(str(normed_model), device="cpu", resolution=64)
    ex16 = FeatureExtractor(str(normed_model), device="cpu", resolution=64, precision="bf16")
    assert next(ex16.net.parameters()).dtype == torch.bfloat16
    assert next(ex32.net.parameters()).dtype == torch.float32  # a separate model instance, not recast
    x = _pixels(seed=4)
    f32, f16 = ex32.forward(x), ex16.forward(x)
    for a, b in zip(f32.stages, f16.stages):
        assert b.dtype == np.float32
        cos = (a * b).sum(-1)
        assert cos.mean() > 0.99 and not np.array_equal(a, b)  # bfloat16 rounding, not the fp32 model
    assert f16.cls.dtype == np.float32
    k32, k16 = ex32.cache_key(), ex16.cache_key()
    assert (k32["precision"], k16["precision"]) == ("fp32", "bf16") and k32["device_type"] == "cpu"


@pytest.mark.parametrize("bad", ["fp16", "float16", "half", "int4"])
def test_float16_and_unknown_precisions_are_refused(normed_model, bad):
    from HiMatchADLib import HiMatchADError, HiMatchDetector

    with pytest.raises(HiMatchADError, match="fp16 is not supported" if bad != "int4" else "unknown precision"):
        FeatureExtractor(str(normed_model), device="cpu", precision=bad)
    with pytest.raises(HiMatchADError, match="fp32"):
        HiMatchDetector(model=str(normed_model), precision=bad)
