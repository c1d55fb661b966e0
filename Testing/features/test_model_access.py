"""Model access: the catalogue, what a failed Hub download means (gated, refused token, unknown id,
offline, other) as transformers and huggingface_hub really raise it, the wording per context, and
the Hugging Face token store. Nothing here goes to the network: the Hub's answers come from an
``httpx2.MockTransport`` or from huggingface_hub's own ``hf_raise_for_status`` on made-up responses.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from HiMatchADLib import HiMatchADError, ModelAccessError
from HiMatchADLib.features import backbone
from HiMatchADLib.features import models
from HiMatchADLib.features.models import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    classify_load_error,
    hub_token_status,
    model_info,
    remove_hub_token,
    save_hub_token,
    ungated_alternative,
)

REPO = Path(__file__).resolve().parents[2]
VITS = "facebook/dinov3-vits16-pretrain-lvd1689m"
VITB = "facebook/dinov3-vitb16-pretrain-lvd1689m"
FAKE_TOKEN = "hf_TESTtokenNOTREAL0123456789abcdef"


# ------------------------------------------------------------------------------ catalogue
def test_catalogue_entries_and_the_one_default():
    ids = [m.id for m in KNOWN_MODELS]
    assert ids == [VITS, VITB, "facebook/dinov2-small", "facebook/dinov2-base"]
    assert backbone.DEFAULT_MODEL is models.DEFAULT_MODEL == VITS  # one definition
    for m in KNOWN_MODELS:
        assert m.url == f"https://huggingface.co/{m.id}" and m.label and m.note
        assert m.gated == m.id.startswith("facebook/dinov3")
        assert m.licence == ("DINOv3 License" if m.gated else "Apache-2.0")
        assert m.patch_size == (16 if m.gated else 14)
    assert model_info(VITS).label == "DINOv3 ViT-S/16"
    assert model_info("FACEBOOK/DINOv2-Small").id == "facebook/dinov2-small"
    assert model_info("timm/vit_small_patch16_dinov3.lvd1689m") is None  # loads as TimmWrapperModel: not listed
    with pytest.raises(Exception):
        KNOWN_MODELS[0].gated = False  # frozen


def test_which_models_are_gated():
    assert models.is_gated(VITS) is True and models.is_gated("facebook/dinov3-vitl16-pretrain-lvd1689m") is True
    assert models.is_gated("facebook/dinov2-small") is False and models.is_gated("someone/model") is None
    offline = classify_load_error("facebook/dinov2-small", OSError("We couldn't connect to 'https://huggingface.co' to load the files"))
    assert offline.kind == "offline" and offline.gated_model is False and "licence" not in str(offline)


def test_ungated_alternative_is_the_nearest_size():
    assert ungated_alternative(VITS).id == "facebook/dinov2-small"
    assert ungated_alternative(VITB).id == "facebook/dinov2-base"
    assert ungated_alternative("facebook/dinov3-vits16plus-pretrain-lvd1689m").id == "facebook/dinov2-small"
    assert ungated_alternative("facebook/dinov2-small") is None  # already ungated
    assert ungated_alternative("someone/some-model") is None  # size unknown


# ------------------------------------------------------------------------------ real chains
_SCENARIOS = r'''
import json, os, sys, tempfile
os.environ["HF_HOME"] = tempfile.mkdtemp()
for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH"):
    os.environ.pop(k, None)
import httpx2
import huggingface_hub.utils._http as hub_http
hub_http.time.sleep = lambda s: None  # no waiting between connection retries

MODE = {"mode": None}
GATED_MSG = "Access to model {m} is restricted. You must have access to it and be authenticated to access it. Please log in."

def handler(request):
    mode, auth = MODE["mode"], request.headers.get("authorization", "")
    path = str(request.url.path)
    model = path.split("/resolve/")[0].strip("/")
    if mode == "gated" and path.startswith("/api/models/"):  # a gated model's metadata is public
        files = [{"rfilename": "config.json", "size": 500}, {"rfilename": "model.safetensors", "size": 88_000_000}]
        if "/tree/" in path:
            return httpx2.Response(200, json=[{"type": "file", "path": f["rfilename"], "size": f["size"], "oid": "0" * 40} for f in files], request=request)
        return httpx2.Response(200, json={"id": model, "sha": "a" * 40, "gated": "manual", "siblings": files}, request=request)
    if mode == "gated":  # the Hub: 401 without a token, 403 with a token not approved
        return httpx2.Response(403 if auth else 401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": GATED_MSG.format(m=model)}, request=request)
    if mode == "not_found":
        return httpx2.Response(401, headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, request=request)
    if mode == "bad_token":
        return httpx2.Response(401, headers={"X-Error-Message": "Invalid credentials in Authorization header"}, request=request)
    if mode == "forbidden":
        return httpx2.Response(403, headers={"X-Error-Message": "Fine-grained token lacks permission"}, request=request)
    if mode == "server":
        return httpx2.Response(500, request=request)
    raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)

hub_http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
from HiMatchADLib.core.errors import ModelAccessError
from HiMatchADLib.features.backbone import load_backbone

out = {}
for name, mode, model, env in json.loads(sys.argv[1]):
    MODE["mode"] = mode
    os.environ.update(env)
    try:
        load_backbone(model, "cpu")
        out[name] = None
    except ModelAccessError as exc:
        out[name] = dict(exc.to_dict(), cause=type(exc.__cause__).__name__, cli=exc.message("cli"))
    for k in env:
        os.environ.pop(k, None)
print(json.dumps(out))
'''

CASES = [
    ("gated", "gated", VITS, {}),
    ("gated_with_token", "gated", VITB, {"HF_TOKEN": FAKE_TOKEN}),
    ("not_found", "not_found", "facebook/dinov3-vits16-pretrain-lvd1689", {}),
    ("bad_token", "bad_token", VITS, {"HF_TOKEN": FAKE_TOKEN}),
    ("forbidden", "forbidden", VITB, {"HF_TOKEN": FAKE_TOKEN}),
    ("server", "server", VITS, {}),
    ("no_connection", "connect", VITS, {}),
    ("offline_mode", "connect", VITS, {"HF_HUB_OFFLINE": "1"}),
]


@pytest.fixture(scope="module")
def real_errors():
    """The ModelAccessError of each case, raised by load_backbone through transformers'
    AutoConfig and huggingface_hub, the Hub answering from a mock transport (one process)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCENARIOS, json.dumps(CASES)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gated_model_keeps_the_hubs_lines_and_offers_the_ungated_alternative(real_errors):
    e = real_errors["gated"]  # raised by the download (huggingface_hub), before transformers
    assert e["kind"] == "gated" and e["cause"] == "GatedRepoError" and e["model"] == VITS
    assert e["url"] == f"https://huggingface.co/{VITS}"
    # huggingface_hub's first lines, the model's address and the Hub's own words included
    assert "Cannot access gated repo for url" in e["detail"] and f"https://huggingface.co/{VITS}/resolve/" in e["detail"]
    assert f"Access to model {VITS} is restricted" in e["detail"]
    assert e["alternative"] == "facebook/dinov2-small" and e["alternative_licence"] == "Apache-2.0"
    assert e["token_present"] is False and "no Hugging Face token is set" in e["message"]
    assert f"request access on https://huggingface.co/{VITS}" in e["message"]
    assert "facebook/dinov2-small" in e["message"] and "--" not in e["message"]  # no option names in the library's words
    assert "Hugging Face token field" in e["panel_message"] and "Model selector" in e["panel_message"]
    assert "--model facebook/dinov2-small" in e["cli"] and "hf auth login" in e["cli"]


def test_gated_model_with_a_token_not_approved(real_errors):
    e = real_errors["gated_with_token"]
    assert e["kind"] == "gated" and e["token_present"] is True and e["alternative"] == "facebook/dinov2-base"
    assert "has no access to it" in e["message"]
    assert FAKE_TOKEN not in json.dumps(e)


def test_unknown_id_is_not_found(real_errors):
    e = real_errors["not_found"]
    assert e["kind"] == "not_found" and e["alternative"] is None
    assert "Repository Not Found" in e["detail"] and "check the model id" in e["message"]
    assert "check the id given to --model" in e["cli"]


@pytest.mark.parametrize("case, status", [("bad_token", 401), ("forbidden", 403)])
def test_refused_token_is_unauthorised(real_errors, case, status):
    e = real_errors[case]
    assert e["kind"] == "unauthorised" and e["http_status"] == status
    assert "token is missing, invalid, or has no read permission" in e["message"]
    assert "https://huggingface.co/settings/tokens" in e["message"]
    assert e["alternative"] in ("facebook/dinov2-small", "facebook/dinov2-base")
    assert FAKE_TOKEN not in json.dumps(e)
    if case == "forbidden":  # transformers says "couldn't connect": the Hub's answer is shown instead
        assert "couldn't connect" not in e["detail"] and "Fine-grained token lacks permission" in e["detail"]


def test_hub_server_error_is_other_not_offline(real_errors):
    e = real_errors["server"]
    assert e["kind"] == "other" and e["http_status"] == 500
    assert "answered HTTP 500" in e["message"] and "try again later" in e["message"]


@pytest.mark.parametrize("case", ["no_connection", "offline_mode"])
def test_no_connection_is_offline(real_errors, case):
    e = real_errors[case]
    assert e["kind"] == "offline" and e["alternative"] is None
    assert "cannot be reached" in e["message"] and "local folder with the model" in e["message"]
    assert "connect to the internet once" in e["message"]
    assert "Local folder…" in e["panel_message"] and "--model /path/to/folder" in e["cli"]
    assert e["offline_mode"] is (case == "offline_mode")
    assert e["gated_model"] is True and "its licence must first be accepted" in e["message"]  # DINOv3, first run
    if case == "offline_mode":
        assert "HF_HUB_OFFLINE=1" in e["message"]


# ------------------------------------------------------------------------------ in-process chains
def _hub_error(status: int, headers: dict, model: str = VITS):
    """The exception huggingface_hub raises for this answer of the Hub (its own hf_raise_for_status)."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    request = httpx2.Request("HEAD", f"https://huggingface.co/{model}/resolve/main/config.json")
    try:
        hf_raise_for_status(httpx2.Response(status, headers=headers, request=request))
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


def _raise_through_transformers(monkeypatch, error):
    """AutoConfig.from_pretrained fails as transformers does when hf_hub_download raises ``error``."""
    import transformers.utils.hub as thub

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(thub, "hf_hub_download", fail)


def test_load_backbone_raises_model_access_error_from_the_real_wrapping(monkeypatch):
    gated = _hub_error(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted."})
    _raise_through_transformers(monkeypatch, gated)
    with pytest.raises(ModelAccessError) as info:
        backbone.load_backbone(VITS, "cpu")
    err = info.value
    assert isinstance(err, HiMatchADError) and err.kind == "gated"
    assert isinstance(err.__cause__, OSError) and err.__cause__.__cause__ is gated  # OSError(...) from GatedRepoError
    assert err.to_dict()["alternative"] == "facebook/dinov2-small"


def test_classification_walks_cause_and_context():
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    gated = _hub_error(403, {"X-Error-Code": "GatedRepo"})
    try:  # raised *during* handling (context), not *from* (cause)
        try:
            raise gated
        except Exception:
            raise OSError("something else went wrong")
    except OSError as exc:
        assert classify_load_error(VITS, exc).kind == "gated"
    offline = LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has been disabled.")
    offline.__context__ = OfflineModeIsEnabled("Cannot access file since 'local_files_only=True' as been set.")
    wrapped = OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.")
    wrapped.__cause__ = offline
    assert classify_load_error(VITS, wrapped).kind == "offline"
    assert classify_load_error(VITS, ValueError("The checkpoint has model type 'x' that transformers does not know")).kind == "other"


def test_to_dict_and_from_dict_round_trip():
    err = ModelAccessError("gated", VITS, detail="d", url="https://huggingface.co/x", alternative="facebook/dinov2-small",
                           alternative_label="DINOv2 ViT-S/14", alternative_licence="Apache-2.0", token_present=False)
    d = json.loads(json.dumps(err.to_dict()))
    back = ModelAccessError.from_dict(d)
    assert back.to_dict() == d and str(back) == str(err) and back.hint("panel") == d["panel_hint"]
    assert ModelAccessError.from_dict({"kind": "nonsense", "model": "m"}).kind == "other"
    with pytest.raises(ValueError):
        err.hint("web")


def test_cli_prints_one_error_line_with_the_option_wording(monkeypatch, capsys, tmp_path):
    from HiMatchADLib.cli.main import main

    _raise_through_transformers(monkeypatch, _hub_error(401, {"X-Error-Code": "GatedRepo"}, VITB))
    (tmp_path / "n").mkdir()
    code = main(["--quiet", "bank", str(tmp_path / "n"), "--model", VITB, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: cannot load the model '{VITB}': it is gated")
    assert len(err.strip().splitlines()) == 1
    assert "--model facebook/dinov2-base" in err and f"https://huggingface.co/{VITB}" in err


def test_a_timm_checkpoint_is_refused_with_the_reason(tmp_path, monkeypatch):
    folder = tmp_path / "timm-dinov3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch16_dinov3", "num_classes": 0, "num_features": 384,
        "pretrained_cfg": {"tag": "lvd1689m", "license": "dinov3-license", "input_size": [3, 256, 256]},
    }))
    with pytest.raises(HiMatchADError, match="timm checkpoint: transformers loads it only as a TimmWrapperModel"):
        backbone.load_backbone(str(folder), "cpu")  # without timm installed: transformers' ImportError

    import transformers

    class TimmConfig:  # with timm installed: AutoConfig gives a TimmWrapperConfig
        model_type = "timm_wrapper"

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: TimmConfig())
    with pytest.raises(HiMatchADError, match="not as the DINOv3ViTModel or Dinov2Model") as info:
        backbone.load_backbone("timm/vit_small_patch16_dinov3.lvd1689m", "cpu")
    assert "facebook/dinov2-small" in str(info.value)


# ------------------------------------------------------------------------------ token
@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    return home


def _get_token_in_subprocess(home: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env["HF_HOME"] = str(home)
    code = "from huggingface_hub import get_token; print(get_token())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True).stdout.strip()


def test_saved_token_is_found_by_huggingface_hub_in_a_later_process(hf_home, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    assert hub_token_status() == {"available": False, "source": None, "path": str(hf_home / "token")}
    status = save_hub_token(f"  {FAKE_TOKEN}\n")
    assert status == {"available": True, "source": "file", "path": str(hf_home / "token")}
    path = hf_home / "token"
    assert path.read_text() == FAKE_TOKEN
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in hf_home.iterdir()) == ["token"]  # no temporary file left
    assert _get_token_in_subprocess(hf_home) == FAKE_TOKEN
    out = capsys.readouterr()
    assert "Hugging Face token stored" in caplog.text
    assert FAKE_TOKEN not in caplog.text + out.out + out.err + json.dumps(status)

    save_hub_token("hf_second0000000000000000000000")  # replaced atomically
    assert _get_token_in_subprocess(hf_home) == "hf_second0000000000000000000000"
    assert remove_hub_token() is True and remove_hub_token() is False
    assert hub_token_status()["available"] is False


def test_token_status_names_the_source_never_the_token(hf_home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    status = hub_token_status()
    assert status["available"] is True and status["source"] == "environment" and FAKE_TOKEN not in json.dumps(status)
    monkeypatch.setenv("HF_TOKEN", "  ")
    assert hub_token_status()["available"] is False
    custom = hf_home.parent / "elsewhere" / "tok"
    monkeypatch.setenv("HF_TOKEN_PATH", str(custom))
    save_hub_token(FAKE_TOKEN)
    assert custom.read_text() == FAKE_TOKEN and hub_token_status()["source"] == "file"


@pytest.mark.parametrize("bad", ["", "   \n", "hf_abc def", "hf_abc\tdef"])
def test_bad_tokens_are_refused_without_echoing_them(hf_home, bad):
    with pytest.raises(HiMatchADError) as info:
        save_hub_token(bad)
    assert (bad.strip() == "" or bad not in str(info.value)) and not (hf_home / "token").exists()


def test_the_model_access_error_says_whether_a_token_is_set(hf_home, monkeypatch):
    gated = _hub_error(403, {"X-Error-Code": "GatedRepo"})
    assert classify_load_error(VITS, gated).token_present is False
    save_hub_token(FAKE_TOKEN)
    err = classify_load_error(VITS, gated)
    assert err.token_present is True and "has no access to it" in str(err) and FAKE_TOKEN not in str(err)


def test_package_root_re_exports():
    import HiMatchADLib

    for name in ("ModelAccessError", "KNOWN_MODELS", "model_info", "ungated_alternative", "save_hub_token", "hub_token_status", "available_devices"):
        assert name in HiMatchADLib.__all__ and getattr(HiMatchADLib, name) is not None
    assert HiMatchADLib.save_hub_token is save_hub_token and DEFAULT_MODEL == KNOWN_MODELS[0].id


def test_models_module_imports_no_heavy_package():
    code = textwrap.dedent("""
        import sys
        import HiMatchADLib.features.models
        heavy = [m for m in ("torch", "transformers", "huggingface_hub") if m in sys.modules]
        print(heavy)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    assert out.strip() == "[]"
