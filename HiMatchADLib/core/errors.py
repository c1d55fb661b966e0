"""The one exception type for mistakes a user can make, the cancellation signal, and the model-access error."""

from __future__ import annotations


class HiMatchADError(Exception):
    """A problem the user can fix (bad path, unreadable file, empty folder, model not found...).

    The message says what went wrong and what to do about it; the command line prints it without a
    traceback and exits with status 2.
    """


class Cancelled(HiMatchADError):
    """Raised inside a long step when the caller's cancel event is set."""

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)


class ModelAccessError(HiMatchADError):
    """A Hugging Face model could not be loaded from the Hub: gated, refused token, unknown id,
    no connection, or another failure (``kind``).

    Attributes: ``kind`` (one of :data:`KINDS`), ``model`` (the Hub id), ``url`` (its model page),
    ``alternative`` (the Hub id of an ungated model of the nearest size, or None),
    ``alternative_label`` / ``alternative_licence`` (its short name and licence), ``detail`` (what
    transformers said: its first lines, with the model page it names), ``http_status`` (the Hub's
    HTTP status, when it answered), ``gated_model`` (the model is known to be gated, e.g. DINOv3;
    None when unknown), ``token_present`` (whether a Hugging Face token was available;
    None when unknown) and ``offline_mode`` (HF_HUB_OFFLINE was on).

    ``str(error)`` is the library's wording (no command-line option or panel control named);
    :meth:`message` and :meth:`hint` with ``context="cli"`` or ``"panel"`` name the command line's
    options or the Slicer panel's controls. :meth:`to_dict` / :meth:`from_dict` carry it through the
    worker's JSON events.
    """

    KINDS = ("gated", "unauthorised", "not_found", "offline", "other")
    CONTEXTS = ("library", "cli", "panel")

    def __init__(
        self,
        kind: str,
        model: str,
        detail: str = "",
        url: "str | None" = None,
        alternative: "str | None" = None,
        alternative_label: "str | None" = None,
        alternative_licence: "str | None" = None,
        http_status: "int | None" = None,
        gated_model: "bool | None" = None,
        token_present: "bool | None" = None,
        offline_mode: bool = False,
    ):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, not {kind!r}")
        self.kind = kind
        self.model = str(model)
        self.detail = str(detail or "")
        self.url = url
        self.alternative = alternative
        self.alternative_label = alternative_label
        self.alternative_licence = alternative_licence
        self.http_status = http_status
        self.gated_model = gated_model
        self.token_present = token_present
        self.offline_mode = bool(offline_mode)
        super().__init__(self.message())

    # ------------------------------------------------------------------ wording
    def what(self) -> str:
        """What happened, in one sentence, with transformers' own words after it."""
        if self.kind == "gated":
            if self.token_present:
                why = ("it is gated on the Hugging Face Hub and the account of the Hugging Face token in use has no "
                       "access to it (access not requested, or not approved yet)")
            else:
                why = "it is gated on the Hugging Face Hub (its licence must be accepted first) and no Hugging Face token is set"
        elif self.kind == "unauthorised":
            why = ("the Hugging Face Hub refused the request" + (f" (HTTP {self.http_status})" if self.http_status else "")
                   + ": the Hugging Face token is missing, invalid, or has no read permission for this model")
        elif self.kind == "not_found":
            why = "the Hugging Face Hub has no model with this id (or it is private)"
        elif self.kind == "offline":
            why = ("the Hugging Face Hub cannot be reached" + (" (offline mode is on: HF_HUB_OFFLINE=1)" if self.offline_mode else "")
                   + " and the model is not in the local Hugging Face cache")
        elif self.http_status:
            why = f"the Hugging Face Hub answered HTTP {self.http_status}" + (" (a problem on its side)" if self.http_status >= 500 else "")
        else:
            why = "loading it failed"
        return f"cannot load the model '{self.model}': {why}" + (f" ({self.detail})" if self.detail else "")

    def hint(self, context: str = "library") -> str:
        """What to do, worded for ``context``: ``"library"`` (Python), ``"cli"`` (names ``--model``,
        ``hf auth login``) or ``"panel"`` (names the Model selector, the Hugging Face token field,
        Local folder…)."""
        if context not in self.CONTEXTS:
            raise ValueError(f"context must be one of {self.CONTEXTS}, not {context!r}")
        page = self.url or "the model's page on https://huggingface.co"
        give_token = {
            "library": "provide it (HiMatchADLib.save_hub_token, huggingface_hub.login, or the HF_TOKEN environment variable)",
            "cli": "log in with it (`hf auth login`, or set HF_TOKEN)",
            "panel": "paste it into the Hugging Face token field",
        }[context]
        folder = {
            "library": "pass the path of a local folder with the model (config.json + model.safetensors) downloaded on a machine with access",
            "cli": "pass --model /path/to/folder, a local folder with the model (config.json + model.safetensors) downloaded on a "
                   "machine with access (`hf download ID --local-dir FOLDER`)",
            "panel": "use Local folder… to choose a local folder with the model (config.json + model.safetensors) downloaded on a machine with access",
        }[context]
        if self.kind == "gated":
            do = (f"request access on {page} (log in there and accept the licence; approval may take a while), then "
                  f"create a read token of that account at https://huggingface.co/settings/tokens and {give_token}")
        elif self.kind == "unauthorised":
            do = f"create a read token at https://huggingface.co/settings/tokens (for a gated model, of an account with access) and {give_token}"
        elif self.kind == "not_found":
            do = {
                "library": "check the model id for typos (e.g. facebook/dinov3-vits16-pretrain-lvd1689m); a private model needs a token with access",
                "cli": "check the id given to --model for typos (e.g. facebook/dinov3-vits16-pretrain-lvd1689m), or pass a local model folder",
                "panel": "check the model id in the Model selector for typos, or use Local folder… to choose a downloaded model folder",
            }[context]
        elif self.kind == "offline":
            do = f"{folder}; or connect to the internet once so the model is downloaded into the cache"
            if self.offline_mode:
                do += " (with HF_HUB_OFFLINE unset)"
            if self.gated_model:
                do += (f"; this model is gated: to download it, its licence must first be accepted on {page} "
                       "and a Hugging Face token of that account provided")
        elif self.http_status and self.http_status >= 429:
            do = f"try again later, or {folder}"
        else:
            do = f"check the model id and the connection to the Hugging Face Hub, or {folder}"
        text = f"What to do: {do}."
        if self.alternative:
            about = ", ".join(x for x in (self.alternative, self.alternative_licence and f"{self.alternative_licence} licence") if x)
            name = self.alternative_label or self.alternative
            use = {
                "library": f"model='{self.alternative}'",
                "cli": f"--model {self.alternative}",
                "panel": "choose it in the Model selector",
            }[context]
            text += f" Or use the ungated {name} ({about}), which needs neither approval nor a token: {use}."
        return text

    def message(self, context: str = "library") -> str:
        """What happened, then what to do, worded for ``context`` (see :meth:`hint`)."""
        return f"{self.what()}.\n{self.hint(context)}"

    # ------------------------------------------------------------------ transport
    FIELDS = ("kind", "model", "url", "alternative", "alternative_label", "alternative_licence", "detail",
              "http_status", "gated_model", "token_present", "offline_mode")

    def to_dict(self) -> dict:
        """The structured fields (JSON-ready), with the library's (``message``) and the panel's
        (``panel_message``, ``panel_hint``) wording."""
        out = {f: getattr(self, f) for f in self.FIELDS}
        out.update(message=self.message("library"), panel_message=self.message("panel"), panel_hint=self.hint("panel"))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelAccessError":
        """The error :meth:`to_dict` described (unknown keys ignored; an unknown kind is ``other``)."""
        kind = data.get("kind") if data.get("kind") in cls.KINDS else "other"
        status = data.get("http_status")
        return cls(
            kind, data.get("model") or "?", detail=data.get("detail") or "", url=data.get("url"),
            alternative=data.get("alternative"), alternative_label=data.get("alternative_label"),
            alternative_licence=data.get("alternative_licence"),
            http_status=status if isinstance(status, int) else None,
            gated_model=data.get("gated_model"),
            token_present=data.get("token_present"), offline_mode=bool(data.get("offline_mode")),
        )
