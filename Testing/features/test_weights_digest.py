"""The weights digest names the weights by content: same weights, same digest, wherever they lie."""

from __future__ import annotations

import os
import shutil

from HiMatchADLib.features.backbone import build_random_model, load_backbone, weights_digest


def test_the_digest_follows_the_weights_not_the_folder_or_timestamps(tmp_path):
    a = build_random_model(tmp_path / "a", "selftest", seed=0)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.utime(b / "model.safetensors", (1, 1))  # another mtime: same weights
    assert weights_digest(a) == weights_digest(b) and weights_digest(a).startswith("sha256:")
    other = build_random_model(tmp_path / "c", "selftest", seed=1)
    assert weights_digest(other) != weights_digest(a)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (b / "model.safetensors").write_bytes(bytes(data))
    assert weights_digest(b) != weights_digest(a)
    assert weights_digest(tmp_path / "empty") is None and weights_digest(None) is None


def test_a_loaded_model_reports_its_weights_digest(tmp_path):
    folder = build_random_model(tmp_path / "m", "selftest", seed=3)
    _, info = load_backbone(str(folder), "cpu", "fp32")
    assert info["weights_digest"] == weights_digest(folder)


def test_a_random_model_made_here_says_so_and_a_trained_one_does_not(tmp_path):
    import json

    folder = build_random_model(tmp_path / "r", "selftest", seed=4)
    assert json.loads((folder / "config.json").read_text())["himatchad_random_weights"] is True
    assert load_backbone(str(folder), "cpu", "fp32")[1]["random_weights"] is True
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["himatchad_random_weights"]  # as a published model's config
    other = tmp_path / "t"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    assert load_backbone(str(other), "cpu", "fp32")[1]["random_weights"] is False
