"""The models the detector is known to work with, what a failed Hub download means, and the
Hugging Face token.

- :data:`KNOWN_MODELS`: the catalogue (Hub id, short name, licence, whether the Hub gates it);
  :func:`model_info`, :func:`ungated_alternative`;
- :func:`classify_load_error`: the exception chain of ``AutoConfig`` / ``AutoModel.from_pretrained``
  or of the model download (``HfApi.model_info``, ``snapshot_download``) as one :class:`~HiMatchADLib.core.errors.ModelAccessError` (gated, unauthorised, not found,
  offline, other) that says what to do;
- :func:`save_hub_token`, :func:`hub_token_status`, :func:`remove_hub_token`: the token, stored as
  ``huggingface_hub`` stores it, so a worker process started later finds it.

Stdlib only: nothing here imports torch, transformers or huggingface_hub.

Ungated copies of the DINOv3 weights: timm publishes the DINOv3 ViTs under the same DINOv3
License without gating (e.g. ``timm/vit_small_patch16_dinov3.lvd1689m``), but in timm's format:
their ``config.json`` has ``architecture`` and ``pretrained_cfg`` and no ``model_type``, so
transformers (``PretrainedConfig._get_config_dict``, ``is_timm_config_dict``) reads them as
``timm_wrapper`` and ``AutoModel`` builds a ``TimmWrapperModel`` around a timm network (it needs
the ``timm`` package; its only conversion is the ``timm_model.`` weight prefix), never a
``DINOv3ViTModel``. The feature extractor reads ``DINOv3ViTModel`` / ``Dinov2Model`` hidden states
and final norm, so no such copy is listed; :func:`~HiMatchADLib.features.backbone.load_backbone`
refuses a timm checkpoint with that reason.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..core.errors import HiMatchADError, ModelAccessError

log = logging.getLogger("HiMatchAD.models")

HUB_URL = "https://huggingface.co"


@dataclass(frozen=True)
class ModelInfo:
    """One model of the catalogue."""

    id: str  #: Hugging Face Hub id
    label: str  #: short human name
    licence: str
    gated: bool  #: the Hub asks for approval (accepting the licence) before downloading
    patch_size: int
    size: str  #: "S" or "B": the ViT size, for :func:`ungated_alternative`
    note: str = ""
    url: str = ""  #: the model page, ``https://huggingface.co/<id>`` (filled in from ``id``)

    def __post_init__(self):
        if not self.url:
            object.__setattr__(self, "url", f"{HUB_URL}/{self.id}")

    def to_dict(self) -> dict:
        return asdict(self)


KNOWN_MODELS = (
    ModelInfo(
        "facebook/dinov3-vits16-pretrain-lvd1689m", "DINOv3 ViT-S/16", "DINOv3 License", True, 16, "S",
        "the default; gated: accept the licence on its Hub page (approval), then use a Hugging Face token",
    ),
    ModelInfo(
        "facebook/dinov3-vitb16-pretrain-lvd1689m", "DINOv3 ViT-B/16", "DINOv3 License", True, 16, "B",
        "larger and slower than ViT-S/16; gated as ViT-S/16",
    ),
    ModelInfo(
        "facebook/dinov2-small", "DINOv2 ViT-S/14", "Apache-2.0", False, 14, "S",
        "no login; the ungated alternative to DINOv3 ViT-S/16",
    ),
    ModelInfo(
        "facebook/dinov2-base", "DINOv2 ViT-B/14", "Apache-2.0", False, 14, "B",
        "no login; the ungated alternative to DINOv3 ViT-B/16",
    ),
)

#: The model used when none is given: DINOv3 ViT-S/16.
DEFAULT_MODEL = KNOWN_MODELS[0].id


def model_info(model_id: str) -> Optional[ModelInfo]:
    """The catalogue entry of ``model_id`` (case-insensitive), or None."""
    key = str(model_id or "").strip().lower()
    return next((m for m in KNOWN_MODELS if m.id.lower() == key), None)


def _size_of(model_id: str) -> Optional[str]:
    info = model_info(model_id)
    if info is not None:
        return info.size
    name = str(model_id).rsplit("/", 1)[-1].lower()
    if re.search(r"vit[-_]?s(?![a-z])|vits\d|small", name):
        return "S"
    if re.search(r"vit[-_]?b(?![a-z])|vitb\d|base", name):
        return "B"
    return None


def ungated_alternative(model_id: str) -> Optional[ModelInfo]:
    """The ungated catalogue model of the nearest size to ``model_id`` (ViT-S: DINOv2 ViT-S/14,
    ViT-B and others: DINOv2 ViT-B/14), or None for an ungated model or an id of unknown size."""
    info = model_info(model_id)
    if info is not None and not info.gated:
        return None
    size = _size_of(model_id)
    if size is None:
        return None
    return next((m for m in KNOWN_MODELS if not m.gated and m.size == size), None)


def is_gated(model_id: str) -> Optional[bool]:
    """Whether the Hub gates ``model_id``: the catalogue's answer, True for any other
    ``facebook/dinov3-*`` (Meta gates every DINOv3 release), None when unknown."""
    info = model_info(model_id)
    if info is not None:
        return info.gated
    if str(model_id).lower().startswith("facebook/dinov3"):
        return True
    return None


# ------------------------------------------------------------------------------ load errors
def _chain(exc: BaseException) -> list:
    """``exc`` and every exception it was raised from or during (``__cause__``, ``__context__``)."""
    out, todo, seen = [], [exc], set()
    while todo and len(out) < 32:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _names(e: BaseException) -> set:
    return {c.__name__ for c in type(e).__mro__}


def _status(e: BaseException) -> Optional[int]:
    code = getattr(getattr(e, "response", None), "status_code", None)
    return code if isinstance(code, int) else None


_CONNECTION_ERRORS = {
    "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "TimeoutException",
    "NetworkError", "ProxyError", "ConnectionError", "TimeoutError", "gaierror", "MaxRetryError",
}


def _detail(exc: BaseException, lines: int = 4, limit: int = 700) -> str:
    """The first lines of ``exc``'s message (transformers' first lines name the model page), on one line."""
    text = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:lines]
    out = " ".join(ln if len(ln) <= 300 else ln[:297] + "..." for ln in text)
    if len(out) > limit:
        out = out[: limit - 3] + "..."
    if type(exc) is not OSError:  # transformers wraps Hub errors in a plain OSError
        out = f"{type(exc).__name__}: {out}" if out else type(exc).__name__
    return out


def _http_error(chain: list) -> Optional[BaseException]:
    """The innermost huggingface_hub HTTP error of the chain (the Hub's own answer), if any."""
    found = None
    for e in chain:
        if "HfHubHTTPError" in _names(e) and _status(e) is not None:
            found = e
    return found


def classify(exc: BaseException) -> str:
    """The :class:`ModelAccessError` kind of a failed ``from_pretrained`` (see :func:`classify_load_error`)."""
    chain = _chain(exc)
    names = [_names(e) for e in chain]
    if any("GatedRepoError" in n for n in names):
        return "gated"
    # 401/403 that is not "repository not found": a refused, invalid or under-privileged token.
    # (huggingface_hub wraps a 403 in LocalEntryNotFoundError, and transformers words that as a
    # connection problem: the status decides.)
    for e, n in zip(chain, names):
        if "HfHubHTTPError" in n and "RepositoryNotFoundError" not in n and _status(e) in (401, 403):
            return "unauthorised"
    if any("RepositoryNotFoundError" in n or "RevisionNotFoundError" in n for n in names):
        return "not_found"
    # The Hub answered (a server error, a rate limit): not a connection problem.
    if _http_error(chain) is not None:
        return "other"
    if any(n & _CONNECTION_ERRORS for n in names) or "couldn't connect to" in str(exc).lower():
        return "offline"
    return "other"


def _offline_mode() -> bool:
    return str(os.environ.get("HF_HUB_OFFLINE", "")).strip().lower() in ("1", "on", "yes", "true")


def classify_load_error(model: str, exc: BaseException) -> ModelAccessError:
    """The :class:`ModelAccessError` for ``exc``, raised by ``AutoConfig`` or
    ``AutoModel.from_pretrained(model)`` for a Hub id.

    Walks the exception chain (``__cause__``, ``__context__``): huggingface_hub's
    ``GatedRepoError`` is ``gated``; an HTTP 401/403 that is not ``RepositoryNotFoundError`` (an
    invalid token, a token without permission) is ``unauthorised``; ``RepositoryNotFoundError`` /
    ``RevisionNotFoundError`` is ``not_found``; any other answer of the Hub (HTTP 5xx, 429) is
    ``other``; ``LocalEntryNotFoundError``, ``OfflineModeIsEnabled`` and connection errors
    (transformers' "We couldn't connect to ...") are ``offline``; anything else is ``other``.
    The detail keeps the first lines of transformers' message, and the Hub's answer when
    transformers' words hide it.
    """
    kind = classify(exc)
    chain = _chain(exc)
    http = _http_error(chain)
    detail = _detail(exc)
    if http is not None and kind in ("unauthorised", "other"):
        answer = " ".join(ln.strip() for ln in str(http).splitlines() if ln.strip())[:300]
        if "couldn't connect to" in detail.lower():  # transformers' words for any Hub answer but 401
            detail = f"the Hub answered: {answer}"
        elif answer[:60] not in detail:
            detail += f"; the Hub answered: {answer}"
    alt = ungated_alternative(model) if kind in ("gated", "unauthorised") else None
    return ModelAccessError(
        kind, model, detail=detail, url=f"{HUB_URL}/{model}",
        alternative=alt.id if alt else None,
        alternative_label=alt.label if alt else None,
        alternative_licence=alt.licence if alt else None,
        http_status=_status(http) if http is not None else None,
        gated_model=is_gated(model),
        token_present=hub_token_status()["available"],
        offline_mode=_offline_mode(),
    )


# ------------------------------------------------------------------------------ token
def hub_token_path() -> Path:
    """Where huggingface_hub keeps the token: ``$HF_TOKEN_PATH``, else ``$HF_HOME/token``, else
    ``$XDG_CACHE_HOME/huggingface/token``, else ``~/.cache/huggingface/token`` (as
    ``huggingface_hub.constants.HF_TOKEN_PATH`` is computed)."""
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"))
    home = os.path.expandvars(os.path.expanduser(home))
    return Path(os.path.expandvars(os.path.expanduser(os.getenv("HF_TOKEN_PATH", os.path.join(home, "token")))))


def _clean(token) -> Optional[str]:
    if token is None:
        return None
    return str(token).replace("\r", "").replace("\n", "").strip() or None


def hub_token_status() -> dict:
    """Whether a Hugging Face token is available, never the token: ``{"available": bool,
    "source": "environment" | "file" | None, "path": token file}``. ``HF_TOKEN`` (or
    ``HUGGING_FACE_HUB_TOKEN``) comes first, as huggingface_hub reads them."""
    path = hub_token_path()
    if _clean(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        return {"available": True, "source": "environment", "path": str(path)}
    try:
        present = _clean(path.read_text(encoding="utf-8")) is not None
    except (OSError, UnicodeDecodeError):
        present = False
    return {"available": present, "source": "file" if present else None, "path": str(path)}


def save_hub_token(token: str) -> dict:
    """Store ``token`` where huggingface_hub reads it (:func:`hub_token_path`), without going to
    the network: written atomically, readable by the user only (mode 0600), so every process
    started later (the worker) uses it. Returns :func:`hub_token_status` (the token is never
    returned nor logged). ``huggingface_hub.login(token)`` is not used: it checks the token online.
    """
    token = _clean(token)
    if token is None:
        raise HiMatchADError("the Hugging Face token is empty; paste a token from https://huggingface.co/settings/tokens")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise HiMatchADError("that is not a Hugging Face token (it contains spaces or control characters); "
                             "copy the token again from https://huggingface.co/settings/tokens")
    path = hub_token_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".token.", dir=str(path.parent))  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(token)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.chmod(tmp, 0o600)
            except (OSError, NotImplementedError):  # Windows: no POSIX modes
                pass
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise HiMatchADError(f"cannot store the Hugging Face token in {path}: {exc.strerror or exc}; "
                             "check that folder's permissions (or set HF_HOME to a folder you can write to)") from None
    status = hub_token_status()
    log.info("Hugging Face token stored in %s", path)
    if status["source"] == "environment":
        log.warning("HF_TOKEN is set in the environment: huggingface_hub uses it instead of the stored token")
    return status


def remove_hub_token() -> bool:
    """Delete the stored token file (not ``HF_TOKEN``); True when there was one."""
    path = hub_token_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise HiMatchADError(f"cannot remove the Hugging Face token file {path}: {exc.strerror or exc}") from None
    log.info("Hugging Face token file %s removed", path)
    return True
