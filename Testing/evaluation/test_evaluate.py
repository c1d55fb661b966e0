"""``evaluate`` on tiny generated data sets whose metric values are computed by hand.

The 2D set (BMAD brain layout, 64x64 8-bit PNGs): a 48x48 tissue square (rows/cols 8-55) on a zero
background, its left half 80 and its right half 120 (2304 tissue pixels per image).

- normals ``n1_1, n1_2, n2_1, n2_2``: exactly that;
- ``g1_1`` (normal): the same;
- ``g2_1`` (normal): plus a bright 4x4 spot of 200 in the left half (a false positive for brightness);
- ``b1_1`` (anomalous): plus a 6x6 lesion of 220 in the left half (mask = the lesion);
- ``b2_1`` (anomalous): plus an 8x8 lesion of 40 in the right half (a dark lesion).

Pixel counts over the four test images (4 x 4096 = 16384): positives 36 at 220 and 64 at 40 (P = 100);
normal pixels 7168 at 0, 4556 at 80, 4544 at 120 and 16 at 200 (N = 16284).

``intensity`` baseline (value / 255, the 8-bit preset, inside the tissue foreground):
- image scores (mean of the top 1 % = 24 of 2304 tissue pixels): g1 120, g2 (16*200 + 8*120)/24 = 173.3,
  b1 220, b2 120 (all / 255). AUROC: 220 beats both normals (2), 120 ties 120 (0.5) -> 2.5 / 4 = 0.625.
- pixel AUROC: (36 * N + 64 * 7168) / (P * N) = 1044976 / 1628400.
- AUPRO: at t = 220 region b1 is found (PRO 0.5 at FPR 0); region b2 (40) is only reached after all 80- and
  120-pixels (FPR 0.56 > 0.3): PRO = 0.5 on [0, 0.3] -> 0.5.
- AP: 0.36 * 1 + 0.64 * 100 / 9216. Best Dice: t = 220: 2*36 / (36 + 100) = 72 / 136.
- Dice at the automatic threshold (0.99 quantile of normal foreground = 120/255, flagged when > it):
  TP 36, FP 16 -> 72 / (52 + 100) = 72 / 152.

``intensity-dev`` baseline (|x - 100/255| / (20/255); normal mean 100 and sd 20 at every position):
z = 1 for tissue, 5 for the 200 spot, 6 for the bright lesion, 3 for the dark one, 0 outside.
- image scores: g1 1, g2 (16*5 + 8*1)/24 = 3.67, b1 6, b2 3. AUROC: 6 beats both (2), 3 beats 1 (1) -> 0.75.
- pixel AUROC: (36 * N + 64 * (7168 + 9100)) / (P * N) = 1627376 / 1628400.
- AUPRO: PRO 0.5 on [0, 16/N], then 1 -> 1 - 0.5 * (16 / N) / 0.3.
- AP: 0.36 + 0.64 * 100 / 116. Best Dice: t = 3: TP 100, FP 16 -> 200 / 216.

The fake detector (heatmap = value / 255, image score = maximum, threshold 0.5) gives the ``intensity``
pixel values above, image scores g1 120, g2 200, b1 220, b2 120 -> AUROC 2.5 / 4, and Dice at 0.5
(flags 200 and 220) = 72 / 152.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from HiMatchADLib.core.errors import HiMatchADError
from HiMatchADLib.evaluation import add_subparser, evaluate, name_positions, normals_folder
from HiMatchADLib.core.geometry import Image
from HiMatchADLib.io.discovery import list_images
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.core.result import DetectionResult

N_NEG = 16284
EXPECTED = {
    "intensity": {
        "image_auroc": 0.625,
        "pixel_auroc": 1044976 / 1628400,
        "aupro": 0.5,
        "pixel_ap": 0.36 + 0.64 * 100 / 9216,
        "best_dice": 72 / 136,
        "dice_at_threshold": 72 / 152,
    },
    "intensity-dev": {
        "image_auroc": 0.75,
        "pixel_auroc": 1627376 / 1628400,
        "aupro": 1 - 0.5 * (16 / N_NEG) / 0.3,
        "pixel_ap": 0.36 + 0.64 * 100 / 116,
        "best_dice": 200 / 216,
    },
}
EXPECTED["fake"] = EXPECTED["intensity"]  # same map (value / 255), same image scores, same threshold


def _slice(spot=None, lesion=None) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((64, 64), np.uint8)
    a[8:56, 8:32] = 80
    a[8:56, 32:56] = 120
    m = np.zeros((64, 64), np.uint8)
    if spot is not None:
        a[spot] = 200
    if lesion is not None:
        sl, v = lesion
        a[sl] = v
        m[sl] = 255
    return a, m


def _save(arr: np.ndarray, path: Path) -> None:
    from PIL import Image as PILImage

    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def tiny_bmad(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bmad") / "Brain"
    for n in ("n1_1", "n1_2", "n2_1", "n2_2"):
        a = _slice()[0]
        a[0, 0] = 1  # a normal is not the test image g1_1 itself (that is refused)
        _save(a, root / "train" / "good" / f"{n}.png")
    _save(_slice()[0], root / "test" / "good" / "img" / "g1_1.png")
    _save(_slice(spot=(slice(20, 24), slice(12, 16)))[0], root / "test" / "good" / "img" / "g2_1.png")
    for name, lesion in (("b1_1", ((slice(30, 36), slice(14, 20)), 220)), ("b2_1", ((slice(40, 48), slice(40, 48)), 40))):
        a, m = _slice(lesion=lesion)
        _save(a, root / "test" / "Ungood" / "img" / f"{name}.png")
        _save(m, root / "test" / "Ungood" / "label" / f"{name}.png")
    return root


class FakeDetector:
    """Stands in for HiMatchDetector: heatmap = image / 255, score = maximum, threshold 0.5."""

    fitted: list = []

    def __init__(self, method: str, progress=None, **kwargs):
        self.method = method
        self.kwargs = kwargs
        self.fit_info: dict = {}

    def fit(self, folder):
        self.folder = Path(folder)
        self.fit_info = {"files": len(list_images(folder))}
        FakeDetector.fitted.append((self.method, self.folder, self.kwargs))
        return self

    def predict(self, image: Image) -> DetectionResult:
        heat = (image.array / 255.0).astype(np.float32)
        ss = heat.reshape(heat.shape[0], -1).max(1)
        return DetectionResult(
            heatmap=heat, foreground=image.array > 0, threshold=0.5, geometry=image.geometry, slice_axis=0,
            slice_scores=ss, volume_score=float(heat.max()), method=self.method,
            timings={"features": 0.001, "matching": 0.001, "total": 0.002}, settings={"device": "cpu"},
        )


def _check(values: dict, expected: dict) -> None:
    for k, v in expected.items():
        assert values[k] == pytest.approx(v, abs=2e-6), k


def test_hand_computed_values_with_a_fake_detector(tiny_bmad, tmp_path):
    FakeDetector.fitted.clear()
    out = tmp_path / "out"
    res = evaluate(
        tiny_bmad, out, methods=["knn", "dpmm"], max_normals=3, detector_kwargs={"cache_dir": tmp_path / "cache", "resolution": 64},
        progress=False, detector_factory=lambda m, **kw: FakeDetector(m, **kw), command="himatchad evaluate X",
    )
    r = res["results"]
    assert list(r) == ["knn", "dpmm", "intensity", "intensity-dev"]
    for m in ("knn", "dpmm"):
        _check(r[m], EXPECTED["fake"])
        assert r[m]["n_pixels"] == 4 * 4096 and r[m]["n_positive_pixels"] == 100 and r[m]["n_regions"] == 2
        assert r[m]["timing"]["cases"] == 4 and r[m]["timing"]["steps_seconds_total"]["features"] == pytest.approx(0.004)
        assert r[m]["slice_auroc"] is None  # 2D
    _check(r["intensity"], EXPECTED["intensity"])
    _check(r["intensity-dev"], EXPECTED["intensity-dev"])
    assert r["intensity"]["threshold"] == pytest.approx(120 / 255, abs=1e-6)
    # Both modes were fitted on one folder holding the 3 chosen normals, with the same settings.
    assert [f[0] for f in FakeDetector.fitted] == ["knn", "dpmm"]
    folders = {f[1] for f in FakeDetector.fitted}
    assert len(folders) == 1 and len(list_images(folders.pop())) == 3
    assert all(f[2]["resolution"] == 64 for f in FakeDetector.fitted)
    # Outputs.
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"]["knn"]["aupro"] == pytest.approx(0.5)
    assert on_disk["dataset"]["n_normals"] == 3 and on_disk["dataset"]["n_test"] == 4
    assert {c["name"]: c["scores"]["knn"] for c in on_disk["cases"]} == pytest.approx(
        {"g1_1": 120 / 255, "g2_1": 200 / 255, "b1_1": 220 / 255, "b2_1": 120 / 255}, abs=1e-6)
    md = (out / "results.md").read_text()
    assert "| `knn` | 0.625 | 0.642 | 0.500 |" in md and "`intensity-dev`" in md and "himatchad evaluate X" in md
    from PIL import Image as PILImage

    with PILImage.open(out / "results.png") as im:
        assert im.size[0] > 500 and im.size[1] > 500
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_pixel_subsampling_is_reported_and_close(tiny_bmad, tmp_path):
    res = evaluate(tiny_bmad, tmp_path / "o", methods=[], max_pixels=4096 * 2, progress=False, figure=False)
    r = res["results"]["intensity"]
    assert res["settings"]["negative_pixel_stride"] == 2 and r["negative_stride"] == 2
    assert r["n_positive_pixels"] == 100
    assert r["pixel_auroc"] == pytest.approx(EXPECTED["intensity"]["pixel_auroc"], abs=2e-3)
    assert r["aupro"] == pytest.approx(0.5, abs=1e-6)
    assert "one normal pixel in 2" in (tmp_path / "o" / "results.md").read_text()


def _volume_set(root: Path) -> Path:
    """Volumes layout, shape (4, 8, 8), tissue 1.0 in rows/cols 2-5 of every slice.

    Test 'a': lesion 3.0 in slices 1-2, rows/cols 3-4 (8 voxels, one 3D region) and a normal 2.0 voxel
    in slice 3. Test 'b' (normal): a 4.0 voxel in slice 0.
    Fake detector (heatmap = image, slice score = slice maximum, volume score = maximum, threshold 0.5):
    - slice scores a [1, 3, 3, 2], b [4, 1, 1, 1]; labels a [0, 1, 1, 0], b 0 -> slice AUROC 10/12;
    - volume scores a 3 < b 4 -> image AUROC 0;
    - normal voxels: 384 at 0, 118 at 1, 1 at 2, 1 at 4 (N = 504) -> pixel AUROC 8 * 503 / (8 * 504);
    - AUPRO: the 4.0 voxel first (FPR 1/504, PRO 0), then the region -> 1 - (1/504) / 0.3;
    - best Dice at t = 3: 16 / 17; Dice at 0.5: TP 8, FP 120 -> 16 / 136.
    """
    geo = Image.from_array(np.zeros((4, 8, 8), np.float32), spacing=(1.0, 1.0, 2.0)).geometry
    base = np.zeros((4, 8, 8), np.float32)
    base[:, 2:6, 2:6] = 1.0
    for n in ("n1", "n2"):
        write_image(base, geo, root / "normal" / f"{n}.nii.gz")
    a, ma = base.copy(), np.zeros((4, 8, 8), np.uint8)
    a[1:3, 3:5, 3:5] = 3.0
    ma[1:3, 3:5, 3:5] = 1
    a[3, 2, 2] = 2.0
    b = base.copy()
    b[0, 5, 5] = 4.0
    for n, img, m in (("a", a, ma), ("b", b, np.zeros((4, 8, 8), np.uint8))):
        write_image(img, geo, root / "test" / "img" / f"{n}.nii.gz")
        write_image(m, geo, root / "test" / "label" / f"{n}.nii.gz")
    return root


class FakeVolumeDetector(FakeDetector):
    def predict(self, image: Image) -> DetectionResult:
        heat = image.array.astype(np.float32)
        return DetectionResult(
            heatmap=heat, foreground=heat > 0, threshold=0.5, geometry=image.geometry, slice_axis=0,
            slice_scores=heat.reshape(heat.shape[0], -1).max(1), volume_score=float(heat.max()), method=self.method,
        )


def test_volumes_slice_auroc_by_hand(tmp_path):
    root = _volume_set(tmp_path / "vols")
    res = evaluate(root, tmp_path / "o", methods=["himatch"], progress=False, detector_factory=lambda m, **kw: FakeVolumeDetector(m, **kw))
    r = res["results"]["himatch"]
    assert res["dataset"]["is_3d"] is True
    _check(r, {
        "slice_auroc": 10 / 12, "image_auroc": 0.0, "pixel_auroc": 503 / 504, "aupro": 1 - (1 / 504) / 0.3,
        "best_dice": 16 / 17, "dice_at_threshold": 16 / 136,
    })
    assert r["n_regions"] == 1
    assert r["timing"]["slices_scored"] == 8
    assert "Slice AUROC" in (tmp_path / "o" / "results.md").read_text()
    assert res["results"]["intensity"]["slice_auroc"] is not None


def test_errors_a_user_can_make(tiny_bmad, tmp_path):
    with pytest.raises(HiMatchADError, match="unknown method"):
        evaluate(tiny_bmad, tmp_path / "o", methods=["patchcore"], progress=False)
    with pytest.raises(HiMatchADError, match="no known data set layout"):
        evaluate(tmp_path, tmp_path / "o", progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(HiMatchADError, match="not a folder"):
        evaluate(tiny_bmad, tmp_path / "afile", methods=[], progress=False)
    bad = tmp_path / "badmask"
    import shutil

    shutil.copytree(tiny_bmad, bad)
    _save(np.zeros((32, 32), np.uint8), bad / "test" / "Ungood" / "label" / "b1_1.png")
    with pytest.raises(HiMatchADError, match="mask shape"):
        evaluate(bad, tmp_path / "o", methods=[], progress=False)


def test_name_positions_and_normals_folder(tmp_path):
    pos = name_positions([Path("s_1.png"), Path("s_3.png"), Path("s_5.png"), Path("t_7.png"), Path("x.png")])
    assert pos["s_1.png"] == 0.0 and pos["s_3.png"] == 0.5 and pos["s_5.png"] == 1.0
    assert np.isnan(pos["t_7.png"]) and np.isnan(pos["x.png"])
    src = tmp_path / "normals"
    for i in range(4):
        _save(np.full((8, 8), 10 * i, np.uint8), src / f"c{i}.png")
    files = list_images(src)
    assert normals_folder(files, src, tmp_path / "cache") == src  # all of them: the folder itself
    sub = normals_folder(files[:2], src, tmp_path / "cache")
    assert sub != src and [p.name for p in list_images(sub)] == ["c0.png", "c1.png"]
    assert normals_folder(files[:2], src, tmp_path / "cache") == sub  # stable: the cached bank is reused


def test_cli_subcommand_with_fake_detector(tiny_bmad, tmp_path, monkeypatch, capsys):
    import HiMatchADLib.evaluation.runner as runner

    monkeypatch.setattr(runner, "_detector_factory", lambda m, **kw: FakeDetector(m, **kw))
    parser = argparse.ArgumentParser(prog="himatchad")
    add_subparser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["evaluate", str(tiny_bmad), "--methods", "knn", "--out-dir", str(out), "--max-test", "2", "--quiet", "--examples", "2"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "knn" in text and "intensity-dev" in text and "results.json" in text
    assert json.loads((out / "results.json").read_text())["dataset"]["n_test"] == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", str(tiny_bmad), "--max-test", "0"])


def test_package_api_and_the_helpers_the_benchmark_uses():
    import HiMatchADLib.evaluation as ev
    from HiMatchADLib.cli.main import build_parser

    assert all(hasattr(ev, name) for name in ev.__all__)
    # The himatchad parser registers the sub-command through the package's add_subparser.
    args = build_parser().parse_args(["evaluate", "DATA", "--methods", "knn"])
    assert args.func is ev.run_evaluate_cli and args.methods == "knn" and args.max_pixels == ev.DEFAULT_MAX_PIXELS
    assert ev.markdown_table(["Method", "AUROC"], [["`knn`", "0.500"]]) == "| Method | AUROC |\n|---|---:|\n| `knn` | 0.500 |"
    env = ev.environment()
    assert env["numpy"] == np.__version__ and env["python"].count(".") == 2
    probe = ev.MemoryProbe()
    probe.reset()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, written
    mem = probe.read()
    del block
    assert mem["peak_rss_mb"] >= mem["rss_at_start_mb"] > 0
    if mem["peak_is_per_method"]:  # Linux: the high-water mark was reset, so the rise is this block's
        assert 50 <= mem["peak_rss_increase_mb"] < 1000


# ---------------------------------------------------------------------------------------------
# end to end with the real detector and a tiny random DINOv3


@pytest.fixture(scope="module")
def tiny_dinov3_p8(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny_dinov3")
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
        num_register_tokens=4, image_size=64,
    )
    torch.manual_seed(0)
    transformers.DINOv3ViTModel(cfg).save_pretrained(folder)
    return folder


def _detector_available() -> bool:
    try:
        from HiMatchADLib.detector.detector import HiMatchDetector  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _detector_available(), reason="HiMatchADLib.detector not available")
def test_end_to_end_real_detector_2d(tiny_bmad, tiny_dinov3_p8, tmp_path):
    out = tmp_path / "e2e"
    res = evaluate(
        tiny_bmad, out, detector_kwargs={"model": str(tiny_dinov3_p8), "resolution": 64, "cache_dir": str(tmp_path / "cache"), "device": "cpu"},
        progress=False,
    )
    r = res["results"]
    assert list(r) == ["himatch", "knn", "dpmm", "intensity", "intensity-dev"]
    for m in ("himatch", "knn", "dpmm"):
        for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "best_dice"):
            assert r[m][k] is not None and 0.0 <= r[m][k] <= 1.0, (m, k)
        assert r[m]["n_pixels"] == 4 * 4096 and r[m]["timing"]["cases"] == 4
        assert r[m]["timing"]["seconds_per_case_mean"] > 0 and r[m]["memory"]["peak_rss_mb"] > 0
    # One bank for the three modes (same cache folder), built once.
    assert len({r[m]["fit"]["cache"] for m in ("himatch", "knn", "dpmm")}) == 1
    # The baselines are independent of the detector: the hand values hold here too.
    _check(r["intensity"], EXPECTED["intensity"])
    _check(r["intensity-dev"], EXPECTED["intensity-dev"])
    assert (out / "results.png").stat().st_size > 10_000


@pytest.mark.skipif(not _detector_available(), reason="HiMatchADLib.detector not available")
def test_end_to_end_real_detector_on_synthetic_volumes(tiny_dinov3_p8, tmp_path):
    from HiMatchADLib.evaluation.synth import SynthConfig, make_synthetic_dataset

    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (12, 32, 32)], indexing="ij")
    inside = (z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1
    src = tmp_path / "normals"
    for i in range(5):
        vol = np.where(inside, 300.0 + 60 * np.sin(3 * x + i), 0.0) + rng.normal(0, 5, inside.shape)
        img = Image.from_array(vol.clip(0).astype(np.float32), spacing=(2.0, 2.0, 3.0))
        write_image(img.array, img.geometry, src / f"s{i}.nii.gz")
    data = tmp_path / "synth"
    make_synthetic_dataset(src, data, SynthConfig(seed=0, n_holdout=3, n_normal_test=1, radius_mm=(5.0, 7.0), margin_mm=2.0, min_depth=0.2))
    res = evaluate(
        data, tmp_path / "o", methods=["knn", "dpmm"],
        detector_kwargs={"model": str(tiny_dinov3_p8), "resolution": 64, "cache_dir": str(tmp_path / "cache"), "device": "cpu"},
        progress=False, n_examples=2,
    )
    assert res["dataset"]["is_3d"] and res["dataset"]["n_test_anomalous"] == 2
    for m in ("knn", "dpmm", "intensity"):
        assert res["results"][m]["slice_auroc"] is not None and res["results"][m]["pixel_auroc"] is not None
    assert (tmp_path / "o" / "results.png").exists()


def _cli_available() -> bool:
    try:
        from HiMatchADLib.cli.main import main  # noqa: F401
    except ImportError:
        return False
    return _detector_available()


@pytest.mark.skipif(not _cli_available(), reason="HiMatchADLib.cli not available")
def test_himatchad_cli_runs_evaluate_and_reports_user_errors(tiny_bmad, tiny_dinov3_p8, tmp_path, capsys):
    from HiMatchADLib.cli.main import main

    out = tmp_path / "cli"
    code = main([
        "--quiet", "evaluate", str(tiny_bmad), "--model", str(tiny_dinov3_p8), "--resolution", "64", "--methods", "knn",
        "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out), "--max-normals", "2",
    ])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    assert list(r["results"]) == ["knn", "intensity", "intensity-dev"] and r["dataset"]["n_normals"] == 2
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "nowhere"), "--out-dir", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_bmad), "--methods", "patchcore", "--out-dir", str(out)]) == 2
    assert main(["synth", str(tiny_bmad), "--out", str(tmp_path / "s")]) == 2  # 2D slices: needs volumes
