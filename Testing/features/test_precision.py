"""Backbone precision: ``auto`` resolved once from the hardware, ``int8`` dynamic quantisation on
CPU, float16 refused, and the resolved precision recorded wherever a result or a bank is keyed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import RESOLUTION
from HiMatchADLib import HiMatchADError, HiMatchDetector
from HiMatchADLib.features import backbone as features
from HiMatchADLib.features.backbone import NATIVE_BF16_CPU_FLAGS, auto_precision, check_precision, cpu_flags, resolve_precision
from HiMatchADLib.features.extractor import FeatureExtractor


@pytest.fixture()
def cpu_without_bf16(monkeypatch):
    """This process sees an AVX2-only CPU (as the development machine's AMD EPYC)."""
    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma3"}))


@pytest.fixture()
def fake_cuda(monkeypatch):
    """torch believes a CUDA GPU is there (for the decisions made before any kernel runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def _pixels(b=2, h=64, w=48, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _two_normals(normals_dir, dst):
    dst.mkdir()
    for p in sorted(normals_dir.iterdir())[:2]:
        shutil.copy2(p, dst / p.name)
    return dst


# ------------------------------------------------------------------------------------ auto
@pytest.mark.parametrize(
    "device_type, cuda_bf16, flags, expected",
    [
        ("cuda", True, (), "bf16"),  # Ampere, Hopper, ...
        ("cuda", False, ("avx512_bf16",), "fp32"),  # an older GPU: the GPU decides, not the CPU
        ("cpu", False, ("avx2", "avx512_f", "avx512_bf16"), "bf16"),  # Cooper Lake, Zen 4
        ("cpu", False, ("avx512_f", "amx_tile", "amx_bf16"), "bf16"),  # Sapphire Rapids
        ("cpu", True, ("avx", "avx2", "fma3"), "fp32"),  # AVX2 only (a GPU elsewhere does not count)
        ("cpu", False, ("avx512_f", "avx512_bw", "avx512_vnni"), "fp32"),  # AVX-512 without BF16
        ("cpu", False, (), "fp32"),  # nothing known
    ],
)
def test_auto_decision_table(device_type, cuda_bf16, flags, expected):
    assert auto_precision(device_type, cuda_bf16, frozenset(flags)) == expected


def test_auto_resolves_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert resolve_precision(None, "cpu") == "bf16"  # None is auto
    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept


def test_auto_resolves_from_the_gpu(monkeypatch, fake_cuda):
    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    seen = []
    monkeypatch.setattr(features, "cuda_native_bf16", lambda device: seen.append(device) or True)
    assert resolve_precision("auto", "auto") == "bf16" and seen == ["cuda"]
    assert resolve_precision("auto", "cuda:1") == "bf16" and seen[-1] == "cuda:1"  # that GPU is asked
    monkeypatch.setattr(features, "cuda_native_bf16", lambda device: False)  # e.g. a V100 or T4
    assert resolve_precision("auto", "cuda") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32"


def test_cpu_flags_agree_with_proc_cpuinfo():
    """torch's probe and the Linux fallback tell the same about native bfloat16 on this machine."""
    proc = features._cpuinfo_flags()
    if not proc:
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert {f for f in NATIVE_BF16_CPU_FLAGS if f in cpu_flags()} == {f for f in NATIVE_BF16_CPU_FLAGS if f in proc}
    if not any(f in proc for f in NATIVE_BF16_CPU_FLAGS):
        assert resolve_precision("auto", "cpu") == "fp32"  # e.g. the AVX2-only AMD EPYC this was developed on


def test_cpu_flags_fall_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n")
    assert features._cpuinfo_flags(info) >= {"avx2", "avx512_bf16", "amx_bf16"}
    assert features._cpuinfo_flags(tmp_path / "missing") == frozenset()
    # a torch with neither get_capabilities nor the older probes: the /proc/cpuinfo flags are used
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(torch._C, "_cpu", None)
    monkeypatch.setattr(features, "_cpuinfo_flags", lambda path="/proc/cpuinfo": frozenset({"avx2", "avx512_bf16"}))
    assert cpu_flags() == {"avx2", "avx512_bf16"}
    assert resolve_precision("auto", "cpu") == "bf16"


# ------------------------------------------------------------------------------------ refused
@pytest.mark.parametrize("bad", ["fp16", "float16", "half", "FP16"])
def test_fp16_is_refused_with_the_reason(tiny_model, bad):
    with pytest.raises(HiMatchADError, match="fp16 is not supported: DINOv3 activations overflow"):
        check_precision(bad)
    with pytest.raises(HiMatchADError, match="fp16 is not supported"):
        HiMatchDetector(model=tiny_model, device="cpu", precision=bad)


def test_unknown_precision_names_the_choices():
    with pytest.raises(HiMatchADError, match=r"unknown precision 'int4'; choose auto \(default\), fp32, bf16 or int8"):
        check_precision("int4")
    assert [check_precision(p) for p in ("AUTO", "float32", "bfloat16", "qint8")] == ["auto", "fp32", "bf16", "int8"]


def test_int8_on_cuda_is_refused(tiny_model, fake_cuda, capsys, tmp_path):
    with pytest.raises(HiMatchADError, match="int8 runs on CPU only .* not on cuda; use --device cpu"):
        resolve_precision("int8", "cuda")
    with pytest.raises(HiMatchADError, match="int8 runs on CPU only"):
        resolve_precision("int8", "auto")  # auto picks the GPU
    with pytest.raises(HiMatchADError, match="int8 runs on CPU only"):
        HiMatchDetector(model=tiny_model, device="cuda", precision="int8")
    with pytest.raises(HiMatchADError, match="int8 runs on CPU only"):
        FeatureExtractor(tiny_model, device="cuda:0", precision="int8")
    assert resolve_precision("int8", "cpu") == "int8"

    from HiMatchADLib.cli.main import main

    (tmp_path / "n").mkdir()
    code = main(["--quiet", "bank", str(tmp_path / "n"), "--model", tiny_model, "--device", "cuda", "--precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: precision int8 runs on CPU only") and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ int8
def test_int8_quantises_every_linear_layer(tiny_model):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    ex32 = FeatureExtractor(tiny_model, device="cpu", resolution=64)
    ex8 = FeatureExtractor(tiny_model, device="cpu", resolution=64, precision="int8")
    assert ex8.precision == "int8" and ex8.net is not ex32.net
    n_linear = sum(type(m) is torch.nn.Linear for m in ex32.net.modules())
    assert n_linear == 4 * 6  # q, k, v, o, up, down per layer of the tiny model
    assert not any(type(m) is torch.nn.Linear for m in ex8.net.modules())  # the fp32 model is untouched
    quantised = [m for m in ex8.net.modules() if isinstance(m, DynamicLinear)]
    assert len(quantised) == n_linear
    for m in quantised:
        w = m.weight()
        assert w.dtype == torch.qint8 and w.int_repr().dtype == torch.int8
        assert w.qscheme() == torch.per_channel_affine  # one scale per output channel
    # the rest (patch embedding, norms) keeps float32 weights: activations stay float32
    assert {p.dtype for p in ex8.net.parameters()} == {torch.float32}
    assert ex8.cache_key() == {**ex32.cache_key(), "precision": "int8"}


def test_int8_tokens_are_unit_float32_and_close_to_fp32(tiny_model):
    ex32 = FeatureExtractor(tiny_model, device="cpu", resolution=64)
    ex8 = FeatureExtractor(tiny_model, device="cpu", resolution=64, precision="int8")
    for seed in range(3):
        x = _pixels(seed=seed)
        f32, f8 = ex32.forward(x), ex8.forward(x)
        assert f8.grid == f32.grid
        for a, b in zip(f32.stages, f8.stages):
            assert b.dtype == np.float32 and b.shape == a.shape
            np.testing.assert_allclose(np.linalg.norm(b, axis=-1), 1.0, atol=1e-5)
            cos = (a * b).sum(-1)
            # Measured on this tiny random model: min 0.99997 over every token of three batches.
            assert cos.min() > 0.999
            assert np.abs(a - b).max() > 1e-5  # int8 rounding, not the fp32 model
        assert f8.cls.dtype == np.float32 and (f32.cls * f8.cls).sum(-1).min() > 0.995  # measured: 0.9990


# ------------------------------------------------------------------------------------ recorded
def test_settings_record_the_resolved_precision(tiny_model, monkeypatch):
    from HiMatchADLib.batch.resume import result_settings, settings_changes

    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    det = HiMatchDetector(model=tiny_model, device="cpu")  # the default is auto
    assert det.precision == "bf16" and det.settings()["precision"] == "bf16"
    monkeypatch.setattr(features, "cpu_flags", lambda: frozenset({"avx2"}))
    assert det.precision == "bf16"  # resolved once, at construction
    det = HiMatchDetector(model=tiny_model, device="cpu", precision="auto")
    assert det.precision == "fp32"
    # a batch resumed with auto compares the resolved precision with the recorded one
    now = result_settings(det)
    assert now["precision"] == "fp32"
    assert settings_changes(now, {"settings": dict(now)}) == []
    assert settings_changes(now, {"settings": {**now, "precision": "int8"}}) == ["precision int8 -> fp32"]
    assert settings_changes(now, {"settings": {**now, "precision": "bf16"}}) == ["precision bf16 -> fp32"]


def test_worker_detectors_share_a_model_by_resolved_precision(tiny_model, cpu_without_bf16):
    from HiMatchADLib.worker.server import Worker

    worker = Worker(lambda event: None)
    base = {"model": tiny_model, "device": "cpu", "resolution": RESOLUTION}
    a, _ = worker.detector({**base, "precision": "auto"})
    assert a.precision == "fp32"
    a._ensure_extractor()
    b, existed = worker.detector({**base, "precision": "fp32"})
    assert not existed and b.extractor is a.extractor  # auto is fp32 here: one loaded model
    c, _ = worker.detector({**base, "precision": "int8"})
    assert c.extractor is None and c.precision == "int8"


def test_bank_key_is_the_resolved_precision(tiny_model, normals_dir, tmp_path, cpu_without_bf16):
    folder = _two_normals(normals_dir, tmp_path / "n")
    cache = tmp_path / "cache"
    msgs: list = []

    def det(**kw):
        msgs.clear()
        return HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, device="cpu", cache_dir=cache,
                               progress=lambda m, d, t: msgs.append(m), **kw).fit(folder)

    d32 = det(precision="fp32")
    assert "Building normal bank" in msgs
    d8 = det(precision="int8")
    assert "Building normal bank" in msgs  # never the fp32 bank
    assert d8.bank.root != d32.bank.root
    assert d8.bank.manifest["features"] == {**d32.bank.manifest["features"], "precision": "int8"}
    t32 = np.asarray(d32.bank.tokens, np.float32)
    t8 = np.asarray(d8.bank.tokens, np.float32)
    assert t32.shape == t8.shape and not np.array_equal(t32, t8)
    assert (t32 * t8).sum(1).mean() > 0.99  # float16 storage of both
    auto = det()  # auto is fp32 on this CPU: the fp32 bank, not a new one
    assert "Building normal bank" not in msgs and auto.bank.root == d32.bank.root
    assert auto.bank.manifest["features"]["precision"] == "fp32"


def test_cli_int8_end_to_end(tiny_model, normals_dir, lesion_case, tmp_path, capsys):
    from scipy.stats import spearmanr

    from HiMatchADLib.cli.main import build_parser, main
    from HiMatchADLib.io.readers import read_image
    from HiMatchADLib.io.writers import write_image

    img, _ = lesion_case
    case = tmp_path / "case.nii.gz"
    write_image(img.array, img.geometry, case)
    folder = _two_normals(normals_dir, tmp_path / "n")
    heat = {}
    for p in ("fp32", "int8"):
        out = tmp_path / p
        argv = ["--quiet", "detect", str(case), "--normals", str(folder), "--out-dir", str(out), "--model", tiny_model,
                "--resolution", str(RESOLUTION), "--cache-dir", str(tmp_path / "cache"), "--method", "knn",
                "--device", "cpu", "--precision", p]
        assert main(argv) == 0, capsys.readouterr().err
        scores = json.loads((out / "case_scores.json").read_text())
        assert scores["settings"]["precision"] == p
        heat[p] = read_image(out / "case_heatmap.nii.gz")
        assert heat[p].geometry.same_as(img.geometry)
    a, b = heat["fp32"].array.ravel(), heat["int8"].array.ravel()
    assert not np.array_equal(a, b) and spearmanr(a, b)[0] > 0.98
    args = build_parser().parse_args(["detect", str(case), "--normals", "n", "--out-dir", "o"])
    assert args.precision == "auto"
    # the help lists the choices
    help_text = build_parser()._subparsers._group_actions[0].choices["detect"].format_help()
    assert "{auto,fp32,bf16,int8}" in help_text and "int8 (CPU only" in " ".join(help_text.split())

