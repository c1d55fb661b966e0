"""Devices: ``auto`` is CUDA, then Apple's GPU (mps), then the CPU; a device torch does not find is
refused with what to use instead; precision on mps; the list of devices torch finds; the command
line's ``--device``. torch's probes are mocked: the decisions are made before any kernel runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from HiMatchADLib import HiMatchADError
from HiMatchADLib.features import backbone
from HiMatchADLib.features.backbone import available_devices, resolve_device, resolve_precision


@pytest.fixture
def gpus(monkeypatch):
    """Set what torch finds: ``gpus(cuda=..., mps=..., bf16_mps=...)``."""

    def set_(cuda: int = 0, mps: bool = False, bf16_mps: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(
            torch.cuda, "get_device_properties",
            lambda i: SimpleNamespace(name=f"NVIDIA Test GPU {i}", total_memory=80 * 2**30),
        )
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: bf16_mps)
        monkeypatch.setattr(backbone, "cuda_native_bf16", lambda device: True)
        monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset({"avx2"}))

    return set_


@pytest.mark.parametrize(
    "cuda, mps, expected",
    [(1, True, "cuda"), (2, False, "cuda"), (0, True, "mps"), (0, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(gpus, cuda, mps, expected):
    gpus(cuda=cuda, mps=mps)
    assert resolve_device("auto") == expected
    assert resolve_device(None) == expected


def test_explicit_devices_are_checked(gpus):
    gpus(cuda=0, mps=True)
    assert resolve_device("MPS") == "mps" and resolve_device("cpu") == "cpu"
    with pytest.raises(HiMatchADError, match=r"no CUDA GPU is available to torch; use --device mps, cpu or auto"):
        resolve_device("cuda")
    gpus(cuda=2, mps=False)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(HiMatchADError, match=r"torch finds 2 CUDA GPU\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_mps_when_unavailable_says_what_to_use(gpus, monkeypatch):
    gpus(cuda=0, mps=False)
    with pytest.raises(HiMatchADError, match=r"device 'mps' \(Apple GPU\) was asked for but torch finds no usable Apple GPU.*use --device cpu or auto"):
        resolve_device("mps")
    gpus(cuda=1, mps=False)
    with pytest.raises(HiMatchADError, match=r"use --device cuda, cpu or auto"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    with pytest.raises(HiMatchADError, match="this torch build has no MPS support"):
        resolve_device("mps")


def test_unknown_device_lists_the_choices(gpus):
    gpus()
    with pytest.raises(HiMatchADError, match=r"unknown device 'tpu'; choose auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")


def test_precision_on_mps(gpus):
    gpus(mps=True, bf16_mps=True)
    assert resolve_precision("auto", "mps") == "fp32"  # bf16 not verified there
    assert resolve_precision("auto", "auto") == "fp32"  # auto picks mps here
    assert resolve_precision("fp32", "mps") == "fp32"
    assert resolve_precision("bf16", "mps") == "bf16"  # torch supports it (macOS 14+)
    with pytest.raises(HiMatchADError, match="int8 runs on CPU only .* not on mps; use --device cpu, or --precision auto or fp32"):
        resolve_precision("int8", "mps")
    gpus(mps=True, bf16_mps=False)
    with pytest.raises(HiMatchADError, match=r"precision bf16 on the Apple GPU \(mps\) needs macOS 14 or later"):
        resolve_precision("bf16", "mps")
    assert resolve_precision("auto", "mps") == "fp32"


def test_precision_on_cuda_and_cpu_unchanged(gpus):
    gpus(cuda=1, mps=True)
    assert resolve_precision("auto", "auto") == "bf16"  # cuda first; its bf16 is native (mocked)
    assert resolve_precision("auto", "cpu") == "fp32"  # an AVX2-only CPU


def test_available_devices_lists_what_torch_finds(gpus):
    gpus(cuda=2, mps=True)
    found = available_devices()
    assert [d["device"] for d in found] == ["cpu", "cuda:0", "cuda:1", "mps"]
    assert found[1]["label"] == "cuda:0 (NVIDIA Test GPU 0, 80 GiB)" and found[1]["memory_gib"] == 80.0
    assert found[1]["kind"] == "cuda" and found[3] == {"device": "mps", "kind": "mps", "label": "mps (Apple GPU)"}
    gpus()
    assert available_devices() == [{"device": "cpu", "kind": "cpu", "label": "cpu"}]


def test_cli_device_choices(gpus, capsys, tmp_path):
    from HiMatchADLib.cli.main import build_parser, main

    parser = build_parser()
    for value in ("auto", "cpu", "cuda", "cuda:1", "mps", "MPS"):
        assert parser.parse_args(["bank", "n", "--device", value]).device == value.lower()
    with pytest.raises(SystemExit):
        parser.parse_args(["bank", "n", "--device", "tpu"])
    assert "invalid device 'tpu'" in capsys.readouterr().err
    gpus(mps=False)
    (tmp_path / "n").mkdir()
    code = main(["--quiet", "bank", str(tmp_path / "n"), "--device", "mps"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: device 'mps' (Apple GPU) was asked for") and len(err.strip().splitlines()) == 1
