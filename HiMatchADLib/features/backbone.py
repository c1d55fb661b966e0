"""Frozen DINOv3/DINOv2 features through Hugging Face ``transformers``.

One batched forward pass per batch of slices returns, for each selected stage (transformer layer),
the L2-normalised patch tokens (CLS and register tokens skipped) and the L2-normalised CLS token of
the last stage as the global descriptor. Every stage, intermediate ones included, is passed through
the model's own final layer norm before the L2 normalisation, as DINOv3's
``get_intermediate_layers(norm=True)`` and transformers' ``DINOv3ViTBackbone`` /
``Dinov2Backbone`` (``apply_layernorm``) do; the last stage is therefore the model's
``last_hidden_state``.

Backbone precision (:func:`resolve_precision`): ``fp32``; ``bf16`` (the weights cast to bfloat16:
``torch.autocast`` fails inside transformers' DINOv3 embeddings, which concatenate tokens of mixed
dtypes); ``int8`` on CPU (the ``nn.Linear`` layers dynamically quantised to int8 weights, activations
float32); ``auto``, which resolves to ``bf16`` where the hardware computes bfloat16 natively and
``fp32`` elsewhere. Never float16. Whatever the precision, the features returned are float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Optional

from ..core.errors import HiMatchADError

DEFAULT_MODEL = "facebook/dinov3-vits16-pretrain-lvd1689m"


#: Backbone precisions a user may ask for; ``auto`` resolves to one of the others (see
#: :func:`resolve_precision`). float16 is not offered: DINOv3's maintainers do not support it
#: (activations overflow); bfloat16 has float32's range.
PRECISIONS = ("auto", "fp32", "bf16", "int8")


#: CPU features (names as in ``torch.cpu.get_capabilities()`` and Linux ``/proc/cpuinfo``) that
#: compute bfloat16 matrix products natively: AVX512-BF16 and AMX-BF16.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


_MODEL_CACHE: dict = {}


_MODEL_LOCK = threading.Lock()


def resolve_device(device: str = "auto") -> str:
    import torch

    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise HiMatchADError(f"unknown device '{device}'; choose auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HiMatchADError("device 'cuda' was asked for but no CUDA GPU is available to torch; use --device cpu or auto")
    return device


def _looks_like_path(model: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is a folder."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _load_error(model: str, exc: Exception) -> HiMatchADError:
    return HiMatchADError(
        f"could not load the model '{model}' ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}).\n"
        "  - Offline or no access to the Hugging Face Hub: download the model once where you have access "
        "and pass its local folder (config.json + model.safetensors) with --model /path/to/folder.\n"
        "  - DINOv3 weights are gated: accept the licence on the model's Hub page, then log in with "
        "`hf auth login` (or set HF_TOKEN).\n"
        "  - Check the model id for typos (e.g. facebook/dinov3-vits16-pretrain-lvd1689m)."
    )


def check_precision(precision: str) -> str:
    """One of :data:`PRECISIONS` (also ``float32``/``bfloat16``/``qint8``; None is ``auto``);
    float16 is refused with the reason."""
    p = str(precision or "auto").lower()
    p = {"float32": "fp32", "bfloat16": "bf16", "qint8": "int8", "float16": "fp16", "half": "fp16"}.get(p, p)
    if p == "fp16":
        raise HiMatchADError(
            "precision fp16 is not supported: DINOv3 activations overflow in float16 (its maintainers do not "
            "support it); use --precision auto (default), fp32, bf16 or int8 (CPU)"
        )
    if p not in PRECISIONS:
        raise HiMatchADError(f"unknown precision '{precision}'; choose auto (default), fp32, bf16 or int8 (CPU)")
    return p


def cpu_flags() -> frozenset:
    """The instruction-set features of this CPU: ``torch.cpu.get_capabilities()`` (recent torch),
    else the bf16/AMX probes of older torch, else the ``flags`` of Linux ``/proc/cpuinfo``; empty
    when none of them answers."""
    import torch

    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get is not None:
        try:
            return frozenset(k for k, v in get().items() if v is True)
        except Exception:  # a probe that fails is "unknown", never a crash
            pass
    # Older torch: private probes (every CPU with AMX tiles has AMX-BF16).
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    cpu = getattr(torch._C, "_cpu", None)
    if cpu is not None and all(hasattr(cpu, f) for f in probes.values()):
        try:
            return frozenset(name for name, f in probes.items() if getattr(cpu, f)())
        except Exception:
            pass
    return _cpuinfo_flags()


def _cpuinfo_flags(path="/proc/cpuinfo") -> frozenset:
    """The first ``flags`` (x86) or ``Features`` (ARM) line of Linux ``/proc/cpuinfo``; empty elsewhere."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")) and ":" in line:
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cuda_native_bf16(device: str = "cuda") -> bool:
    """True when the CUDA (or ROCm) GPU ``device`` computes bfloat16 natively (compute capability
    8.0 or later: Ampere, Hopper, ...), as ``torch.cuda.is_bf16_supported(including_emulation=False)``
    does for the current GPU."""
    import torch

    if getattr(torch.version, "hip", None):
        return True
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def auto_precision(device_type: str, cuda_bf16: bool, flags) -> str:
    """What ``precision="auto"`` is on ``device_type`` (``"cuda"`` or ``"cpu"``): ``bf16`` on a
    GPU that computes it natively (``cuda_bf16``) and on a CPU whose ``flags`` include
    :data:`NATIVE_BF16_CPU_FLAGS`, ``fp32`` elsewhere (emulated bfloat16 is slower than float32).
    Never float16 (DINOv3 does not support it) nor int8 (an approximation the user asks for)."""
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp32"
    if device_type == "cpu":
        return "bf16" if any(f in flags for f in NATIVE_BF16_CPU_FLAGS) else "fp32"
    return "fp32"


def resolve_precision(precision: str, device: str = "auto") -> str:
    """The concrete precision (``fp32``, ``bf16`` or ``int8``) the backbone runs in on ``device``.

    ``auto`` is :func:`auto_precision` of the device's hardware. ``int8`` (dynamic quantisation of
    the linear layers) runs on CPU only: on a GPU it is refused.
    """
    import torch

    p = check_precision(precision)
    device = resolve_device(device)
    kind = torch.device(device).type
    if p == "int8" and kind != "cpu":
        raise HiMatchADError(
            f"precision int8 runs on CPU only (dynamic int8 quantisation of the linear layers), not on {kind}; "
            "use --device cpu, or --precision auto or bf16 on the GPU"
        )
    if p != "auto":
        return p
    if kind == "cuda":
        return auto_precision(kind, cuda_native_bf16(device), ())
    return auto_precision(kind, False, cpu_flags())


def torch_dtype(precision: str):
    """The dtype of the backbone's float weights and activations (int8 keeps float32 activations)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}[precision]


def quantize_int8(net):
    """Replace every ``nn.Linear`` of ``net`` (in place) by a dynamically quantised one: int8
    weights with one scale per output channel (more accurate than one per tensor, and no slower on
    the ViT-S stand-in), activations quantised per batch inside each product, inputs and outputs
    float32. The patch embedding (a convolution), attention products and layer norms stay float32.

    Uses ``torch.ao.quantization.quantize_dynamic``, which torch 2.13 (the version this package
    pins) provides but marks deprecated in favour of the separate ``torchao`` package; its warnings
    are not the user's concern and are not shown. A torch without it gets a clear error.
    """
    import warnings

    import torch

    if torch.backends.quantized.engine in (None, "none"):
        raise HiMatchADError(
            f"precision int8: this torch build has no quantised CPU engine (supported: "
            f"{', '.join(torch.backends.quantized.supported_engines)}); use --precision fp32 or bf16"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*quantize_per_tensor.*deprecated")
        try:
            from torch.ao.quantization import (
                per_channel_dynamic_qconfig,
                quantize_dynamic,
            )
        except ImportError as exc:
            raise HiMatchADError(
                f"precision int8 needs torch's dynamic quantisation (torch.ao.quantization), which this torch "
                f"{torch.__version__} does not have; use --precision fp32 or bf16"
            ) from exc
        return quantize_dynamic(net, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def load_backbone(model: str = DEFAULT_MODEL, device: str = "cpu", precision: str = "fp32"):
    """Load (once per process) a DINOv3/DINOv2 ViT by Hub id or local folder; returns (model, info).

    ``precision`` (see :func:`resolve_precision`; ``auto`` is resolved here): ``fp32`` (default) or
    ``bf16`` cast the weights, on any device; ``int8`` quantises the linear layers (CPU only).
    """
    from transformers import AutoConfig, AutoModel

    model = str(model)
    precision = resolve_precision(precision, device)
    key = (model, device, precision)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        path = Path(model).expanduser()
        local = path.exists() or _looks_like_path(model)
        if local:
            if not path.exists():
                raise HiMatchADError(f"model folder not found: {path}")
            if not path.is_dir() or not (path / "config.json").is_file():
                raise HiMatchADError(
                    f"{path} is not a Hugging Face model folder (expected config.json and model.safetensors); "
                    "pass a folder saved with save_pretrained or a Hub id"
                )
        kwargs = {"local_files_only": True} if local or os.environ.get("HF_HUB_OFFLINE") == "1" else {}
        try:
            config = AutoConfig.from_pretrained(str(path) if local else model, **kwargs)
        except Exception as exc:  # transformers raises OSError/ValueError/HF errors
            raise _load_error(model, exc) from exc
        if getattr(config, "model_type", "") not in ("dinov3_vit", "dinov2", "dinov2_with_registers"):
            raise HiMatchADError(
                f"{model}: model type '{getattr(config, 'model_type', '?')}' is not a DINOv2/DINOv3 ViT; "
                "pass a DINOv3 (e.g. facebook/dinov3-vits16-pretrain-lvd1689m) or DINOv2 model"
            )
        dtype = torch_dtype(precision)
        try:
            net = AutoModel.from_pretrained(str(path) if local else model, dtype=dtype, **kwargs)
        except Exception as exc:
            if local:
                raise HiMatchADError(f"{path}: the model weights could not be loaded ({str(exc).strip().splitlines()[0][:200]})") from exc
            raise _load_error(model, exc) from exc
        net.eval().to(device)
        if precision == "int8":
            net = quantize_int8(net)
        info = {
            "model": model,
            "model_type": config.model_type,
            "precision": precision,
            "patch_size": int(config.patch_size),
            "hidden_size": int(config.hidden_size),
            "num_layers": int(config.num_hidden_layers),
            "num_prefix_tokens": 1 + int(getattr(config, "num_register_tokens", 0) or 0),
            "fingerprint": _model_fingerprint(model, path if local else None, config),
        }
        _MODEL_CACHE[key] = (net, info)
        return net, info


def _model_fingerprint(model: str, path: Optional[Path], config) -> str:
    h = hashlib.sha256()
    h.update(model.encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    if path is not None:
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_random_model(folder: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Save a randomly initialised DINOv3 ViT in Hugging Face format (tests, offline demo).

    ``tiny``: 4 layers, 192-d, patch 16 (tests); ``selftest``: 4 layers, 48-d, patch 8 (the Slicer
    module's self-test, fast on its 40-pixel slices); ``small``: the ViT-S/16 architecture with 4
    register tokens. Random weights give untrained features: good for checking the installation and the
    pipeline, meaningless for detection quality.
    """
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    presets = {
        "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384, patch_size=16, num_register_tokens=2, image_size=64),
        "selftest": dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96, patch_size=8, num_register_tokens=2, image_size=64),
        "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16, num_register_tokens=4, image_size=224),
    }
    if size not in presets:
        raise ValueError(f"size must be one of {list(presets)}")
    torch.manual_seed(seed)
    cfg = DINOv3ViTConfig(**presets[size])
    net = DINOv3ViTModel(cfg).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(folder))
    return folder
