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
import re
import threading
from pathlib import Path
from typing import Optional

from ..core.errors import HiMatchADError
from ..core.progress import Reporter
from .models import DEFAULT_MODEL, KNOWN_MODELS, classify_load_error


#: Backbone precisions a user may ask for; ``auto`` resolves to one of the others (see
#: :func:`resolve_precision`). float16 is not offered: DINOv3's maintainers do not support it
#: (activations overflow); bfloat16 has float32's range.
PRECISIONS = ("auto", "fp32", "bf16", "int8")


#: CPU features (names as in ``torch.cpu.get_capabilities()`` and Linux ``/proc/cpuinfo``) that
#: compute bfloat16 matrix products natively: AVX512-BF16 and AMX-BF16.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


_MODEL_CACHE: dict = {}


_MODEL_LOCK = threading.Lock()


def mps_available() -> bool:
    """True when torch can use an Apple GPU (Metal Performance Shaders)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:  # a probe that fails is "not available"
        return False


def resolve_device(device: str = "auto") -> str:
    """The torch device to run on: ``auto`` is ``cuda`` when torch finds a CUDA (or ROCm) GPU, else
    ``mps`` when it finds an Apple GPU, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are
    checked against what torch finds."""
    import torch

    device = str(device or "auto").strip().lower()
    if device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", device):
        raise HiMatchADError(f"unknown device '{device}'; choose auto, cpu, cuda, cuda:N or mps")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            other = "mps, cpu or auto" if mps_available() else "cpu or auto"
            raise HiMatchADError(f"device '{device}' was asked for but no CUDA GPU is available to torch; use --device {other}")
        count = torch.cuda.device_count()
        if ":" in device and count and int(device.split(":")[1]) >= count:
            raise HiMatchADError(f"device '{device}' was asked for but torch finds {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    if device == "mps" and not mps_available():
        built = getattr(getattr(torch.backends, "mps", None), "is_built", lambda: False)()
        why = "this torch build has no MPS support" if not built else "torch finds no usable Apple GPU (MPS needs macOS 12.3 or later on Apple silicon or an AMD GPU)"
        other = "cuda, cpu or auto" if torch.cuda.is_available() else "cpu or auto"
        raise HiMatchADError(f"device 'mps' (Apple GPU) was asked for but {why}; use --device {other}")
    return device


def available_devices() -> list:
    """What torch finds, as ``[{"device": "cpu", "kind": "cpu", "label": "cpu"}, {"device": "cuda:0",
    "kind": "cuda", "label": "cuda:0 (NVIDIA ...)", "name": ..., "memory_gib": ...}, {"device": "mps",
    "kind": "mps", "label": "mps (Apple GPU)"}]``: the CPU always, then every CUDA GPU, then MPS."""
    import torch

    out = [{"device": "cpu", "kind": "cpu", "label": "cpu"}]
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        n = 0
    for i in range(n):
        entry = {"device": f"cuda:{i}", "kind": "cuda", "label": f"cuda:{i}"}
        try:
            props = torch.cuda.get_device_properties(i)
            entry.update(name=str(props.name), memory_gib=round(props.total_memory / 2**30, 1))
            entry["label"] = f"cuda:{i} ({props.name}, {entry['memory_gib']:g} GiB)"
        except Exception:  # a GPU torch lists but cannot describe is still listed
            pass
        out.append(entry)
    if mps_available():
        out.append({"device": "mps", "kind": "mps", "label": "mps (Apple GPU)"})
    return out


def _looks_like_path(model: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is a folder."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def is_local_model(model: str) -> bool:
    """True when ``model`` names a local folder (an existing path, or one written as a path), False
    for a Hub id (as :func:`load_backbone` tells them apart)."""
    return Path(str(model)).expanduser().exists() or _looks_like_path(str(model))


def _first_lines(exc: BaseException, n: int = 3) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:n]
    return " ".join(ln[:300] for ln in lines) or type(exc).__name__


def _catalogue_ids() -> str:
    return ", ".join(m.id for m in KNOWN_MODELS)


def _timm_error(model: str) -> HiMatchADError:
    return HiMatchADError(
        f"{model} is a timm checkpoint: transformers loads it only as a TimmWrapperModel (with the timm package), "
        "not as the DINOv3ViTModel or Dinov2Model this feature extractor reads; use a transformers-format "
        f"DINOv3 or DINOv2 model ({_catalogue_ids()})"
    )


def _load_error(model: str, folder: Optional[Path], exc: BaseException) -> HiMatchADError:
    """What a failed ``AutoConfig.from_pretrained`` means: a timm checkpoint, an unreadable local
    folder, or (a Hub id) a :class:`~HiMatchADLib.core.errors.ModelAccessError`."""
    if any("TimmWrapper" in str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None):
        return _timm_error(model)
    if folder is not None:
        return HiMatchADError(f"{folder}: the model configuration could not be read ({_first_lines(exc)})")
    return classify_load_error(model, exc)


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


def mps_bf16_supported() -> bool:
    """True when torch runs bfloat16 on the Apple GPU: torch supports it on MPS from macOS 14
    (``torch.backends.mps.is_macos_or_newer(14, 0)``); a torch without that probe is asked to make
    a bfloat16 tensor there."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    probe = getattr(mps, "is_macos_or_newer", None)
    try:
        if probe is not None:
            return bool(probe(14, 0))
        torch.ones(1, dtype=torch.bfloat16, device="mps")
        return True
    except Exception:
        return False


def resolve_precision(precision: str, device: str = "auto") -> str:
    """The concrete precision (``fp32``, ``bf16`` or ``int8``) the backbone runs in on ``device``.

    ``auto`` is :func:`auto_precision` of the device's hardware; on an Apple GPU (``mps``) it is
    ``fp32`` (bfloat16 is not verified there), and an explicit ``bf16`` is allowed there only where
    torch supports it (:func:`mps_bf16_supported`). ``int8`` (dynamic quantisation of the linear
    layers) runs on CPU only: on a GPU it is refused.
    """
    import torch

    p = check_precision(precision)
    device = resolve_device(device)
    kind = torch.device(device).type
    if p == "int8" and kind != "cpu":
        raise HiMatchADError(
            f"precision int8 runs on CPU only (dynamic int8 quantisation of the linear layers), not on {kind}; "
            + ("use --device cpu, or --precision auto or bf16 on the GPU" if kind == "cuda" else "use --device cpu, or --precision auto or fp32 on the GPU")
        )
    if kind == "mps":
        if p == "bf16" and not mps_bf16_supported():
            raise HiMatchADError(
                "precision bf16 on the Apple GPU (mps) needs macOS 14 or later, which torch does not report here; "
                "use --precision auto or fp32 on mps, or bf16 with --device cpu"
            )
        return "fp32" if p == "auto" else p
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


# ------------------------------------------------------------------------------ Hub download
#: One megabyte of the download progress (decimal, as the Hub shows file sizes).
MB = 1_000_000


def download_message(model: str) -> str:
    """The progress message of a model download: ``Downloading model <id>`` (done and total in MB)."""
    return f"Downloading model {model}"


def hub_offline() -> bool:
    """True when huggingface_hub must not go to the network (``HF_HUB_OFFLINE``, read now and as
    huggingface_hub read it at import)."""
    if str(os.environ.get("HF_HUB_OFFLINE", "")).strip().lower() in ("1", "on", "yes", "true"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def files_to_download(names) -> list:
    """Of a Hub repository's file names, those transformers reads for a ViT: ``config.json``,
    ``preprocessor_config.json`` if present, and the weights: ``model.safetensors``, else the
    safetensors index and its shards, else ``pytorch_model.bin`` (or its index and shards) when
    there are no safetensors. Files in sub-folders are not needed."""
    root = {n for n in names if "/" not in n}
    want = [n for n in ("config.json", "preprocessor_config.json") if n in root]
    if "model.safetensors" in root:
        want.append("model.safetensors")
    elif "model.safetensors.index.json" in root:
        want += ["model.safetensors.index.json"] + sorted(n for n in root if n.endswith(".safetensors"))
    elif "pytorch_model.bin" in root:
        want.append("pytorch_model.bin")
    elif "pytorch_model.bin.index.json" in root:
        want += ["pytorch_model.bin.index.json"] + sorted(n for n in root if n.startswith("pytorch_model") and n.endswith(".bin"))
    return want


def cached_snapshot(model: str, revision: Optional[str] = None) -> Optional[Path]:
    """The folder of ``model`` (a Hub id) in the local Hugging Face cache when it holds all that
    transformers needs to load it (``config.json`` and complete weights: ``model.safetensors`` or
    ``pytorch_model.bin``, or every shard an index names), else None. No network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        config = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # an id huggingface_hub refuses: not cached
        return None
    if not isinstance(config, str):
        return None
    snap = Path(config).parent
    if any((snap / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        return snap
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (snap / index).is_file():
            try:
                shards = set(json.loads((snap / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
            if shards and all((snap / s).is_file() for s in shards):
                return snap
    return None


class _DownloadProgress:
    """The bytes a ``snapshot_download`` writes, as ``(message, done_MB, total_MB)`` through a
    reporter, which is checked (cancel) at every chunk of every file.

    ``bar_class()`` is the ``tqdm_class`` given to huggingface_hub: bars it creates draw nothing,
    and their ``update`` calls come here. Of several byte bars (huggingface_hub 2.x has one for the
    network and one for what is written), the largest count is the progress; other bars (files
    done) only check for cancel. Done stays below the total until :meth:`finish`.
    """

    def __init__(self, reporter: Reporter, message: str, total_bytes: int):
        self.reporter = reporter
        self.message = message
        self.total_bytes = max(0, int(total_bytes))
        self.total = max(1, -(-self.total_bytes // MB))
        self.counts: dict = {}
        self.reported = -1
        self.lock = threading.Lock()

    def start(self) -> None:
        self.reported = 0
        self.reporter(self.message, 0, self.total)

    def finish(self) -> None:
        self.reported = self.total
        self.reporter(self.message, self.total, self.total)

    def update(self, bar, n) -> None:
        self.reporter.check()  # raises Cancelled inside huggingface_hub's download loop
        if getattr(bar, "_himatch_unit", None) != "B" or not n:
            return
        with self.lock:
            self.counts[id(bar)] = self.counts.get(id(bar), 0) + n
            done = min(int(max(self.counts.values()) // MB), self.total - 1)
            if done > self.reported:
                self.reported = done
                self.reporter(self.message, done, self.total)

    def bar_class(self):
        from tqdm.auto import tqdm

        progress = self

        class ReporterBar(tqdm):
            def __init__(self, *args, **kwargs):
                kwargs.pop("name", None)
                self._himatch_unit = kwargs.get("unit", "it")
                kwargs["disable"] = True  # nothing on the terminal: the progress goes through the reporter
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                progress.update(self, n)

        return ReporterBar


def download_model(model: str, reporter=None, revision: Optional[str] = None) -> bool:
    """Bring the files of the Hub model ``model`` that transformers needs
    (:func:`files_to_download`) into the local Hugging Face cache, with progress and cancel.

    Returns False at once (no request) when the cache already holds them
    (:func:`cached_snapshot`), True after a download. Otherwise one model-info request gives the
    file list and sizes, then ``huggingface_hub.snapshot_download`` fetches only those files,
    reporting ``(download_message(model), done_MB, total_MB)`` through ``reporter`` (a
    :class:`~HiMatchADLib.core.progress.Reporter` or a ``(message, done, total)`` callback; total =
    the sizes of the files not yet cached, in MB of 10^6 bytes, at least 1) from 0 to the total.

    ``reporter.check()`` runs at every chunk: a cancel raises :class:`Cancelled` out of the
    download. huggingface_hub writes each file to a temporary ``.incomplete`` file, removed when
    its download fails, and moves it into place only when complete, so a cancelled download
    leaves files that are either whole or absent: the next call downloads what is missing (the
    file that was cut short from its start). A failure is a
    :class:`~HiMatchADLib.core.errors.ModelAccessError` (gated, unauthorised, not_found, offline,
    other), as for a failed load.
    """
    model = str(model)
    if not isinstance(reporter, Reporter):
        reporter = Reporter(reporter)
    if cached_snapshot(model, revision) is not None:
        return False
    try:
        from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache

        info = HfApi().model_info(model, revision=revision, files_metadata=True)
        sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        files = files_to_download(sizes)
        if "config.json" not in files or not set(files) - {"config.json", "preprocessor_config.json"}:
            raise HiMatchADError(
                f"{model}: this Hugging Face Hub repository has no model in transformers format (config.json with "
                f"model.safetensors or pytorch_model.bin); pass a DINOv3 or DINOv2 model ({_catalogue_ids()})"
            )
        missing = [f for f in files if not isinstance(try_to_load_from_cache(model, f, revision=info.sha), str)]
        progress = _DownloadProgress(reporter, download_message(model), sum(sizes[f] for f in missing))
        progress.start()
        snapshot_download(model, revision=revision, allow_patterns=files, tqdm_class=progress.bar_class())
        progress.finish()
    except HiMatchADError:  # Cancelled included
        raise
    except Exception as exc:
        raise classify_load_error(model, exc) from exc
    return True


def load_backbone(model: str = DEFAULT_MODEL, device: str = "cpu", precision: str = "fp32", reporter=None):
    """Load (once per process) a DINOv3/DINOv2 ViT by Hub id or local folder; returns (model, info).

    ``precision`` (see :func:`resolve_precision`; ``auto`` is resolved here): ``fp32`` (default) or
    ``bf16`` cast the weights, on any device; ``int8`` quantises the linear layers (CPU only).

    A Hub id whose files are not all in the local Hugging Face cache is downloaded first
    (:func:`download_model`: progress ``("Downloading model <id>", done_MB, total_MB)`` through
    ``reporter``, a :class:`~HiMatchADLib.core.progress.Reporter` or a callback, and cancellable
    through it); transformers then loads it from the cache only (``local_files_only``), so a
    cached model needs no network. Local folders and offline mode (``HF_HUB_OFFLINE=1``) download
    nothing.
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
        if not local and not hub_offline():
            download_model(model, reporter)  # ModelAccessError or Cancelled; nothing when cached
        kwargs = {"local_files_only": True}
        source = str(path) if local else model
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
        except Exception as exc:  # transformers raises OSError/ValueError/HF errors
            raise _load_error(model, path if local else None, exc) from exc
        model_type = getattr(config, "model_type", "")
        if model_type == "timm_wrapper":
            raise _timm_error(model)
        if model_type not in ("dinov3_vit", "dinov2", "dinov2_with_registers"):
            raise HiMatchADError(
                f"{model}: model type '{model_type or '?'}' is not a DINOv2/DINOv3 ViT; "
                f"pass a DINOv3 or DINOv2 model ({_catalogue_ids()})"
            )
        dtype = torch_dtype(precision)
        try:
            net = AutoModel.from_pretrained(source, dtype=dtype, **kwargs)
        except Exception as exc:
            if local:
                raise HiMatchADError(f"{path}: the model weights could not be loaded ({_first_lines(exc)})") from exc
            raise _load_error(model, None, exc) from exc
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
            "weights_digest": weights_digest(path if local else cached_snapshot(model)),
            # a model made by build_random_model says so in its config (other random models cannot be told)
            "random_weights": bool(getattr(config, RANDOM_WEIGHTS_KEY, False)),
        }
        _MODEL_CACHE[key] = (net, info)
        return net, info


#: Key of config.json marking a model made by :func:`build_random_model` (untrained weights).
RANDOM_WEIGHTS_KEY = "himatchad_random_weights"


def weights_digest(folder) -> Optional[str]:
    """SHA-256 of a model folder's weights: every ``*.safetensors`` (else ``*.bin``) file, by name
    and content, in name order (``sha256:<hex>``). It names the weights themselves, wherever they
    lie and whatever their timestamps, so a result or a bank can say which weights made it and
    another installation can check it has the same ones. None when ``folder`` is None or has no
    weight files. Streams the files (about 0.1 s per 100 MB)."""
    if folder is None:
        return None
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(8 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


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
    setattr(cfg, RANDOM_WEIGHTS_KEY, True)  # saved in config.json: results can say "random stand-in"
    net = DINOv3ViTModel(cfg).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(folder))
    return folder
