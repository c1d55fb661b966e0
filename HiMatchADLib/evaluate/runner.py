"""``himatchad evaluate``: detection quality, speed and memory of the detector's modes, side by side.

For one data set (BMAD folders or the ``volumes`` layout, see :mod:`HiMatchADLib.datasets`), every
requested mode (``himatch``, ``knn`` = AnomalyDINO, ``dpmm`` = AnomalyDINO-DPMM) is fitted on the same
normal reference set with the same model and settings: the detectors share one cache folder and
the bank does not depend on the mode, so the features of the normal set are computed once and the
modes differ only in how they score. Two intensity-only baselines are computed by the same code:

``intensity``
    the image itself after the detector's own intensity normalisation (its modality preset), inside
    the detector's foreground. A bright lesion (e.g. on FLAIR) is found by brightness alone; every
    number of a feature-based mode should be read against this one.
``intensity-dev``
    ``|x - mu(p)| / sd(p)``: the deviation of the normalised intensity from the mean and standard
    deviation of the normal set's foreground intensities at the same relative slice position ``p``
    (ten bins of the position within the foreground extent for volumes; for 2D slices the trailing
    slice number of the file name relative to the range of that subject's slice numbers; one global
    bin when neither is known). Finds hyper- and hypo-intense lesions.

Their image (and slice) score is the mean of the top 1 % of foreground values (the AnomalyDINO
rule); their threshold for "Dice at the automatic threshold" is the (1 - target_fpr) quantile of
their values on normal-set foreground pixels.

Metrics (see :mod:`HiMatchADLib.metrics`): image AUROC (one score per 2D image or per volume),
slice AUROC for volumes (a slice is anomalous when its mask has a voxel), pixel AUROC, AUPRO to
FPR 0.3, pixel AP, best Dice and Dice at the detector's calibrated threshold (its labelmap), all
pooled over the test cases; time per case and per scored slice, with the detector's own breakdown
(features, retrieval, stage maps, fusion, ...); fitting time (model loading, bank build or cache
load, calibration, DPMM); peak resident memory of the process during each mode (Linux: the
high-water mark is reset before each mode; elsewhere the lifetime peak) and peak GPU memory.

Outputs in ``OUT``: ``results.md`` (tables), ``results.json`` (everything, including per-case
scores), ``results.png`` (ROC and PRO curves, and example slices with each map and the ground-truth
outline). Files are written atomically.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..datasets import LAYOUTS, SPLITS, TestCase, evenly_spaced, load_dataset
from ..errors import HiMatchADError
from ..imageio import Image, atomic_path, read_image, write_text_atomic
from ..metrics import PixelAccumulator, image_auroc, roc_points, top_fraction_mean

DETECTOR_METHODS = ("himatch", "knn", "dpmm")
BASELINES = ("intensity", "intensity-dev")
#: Pooled pixel metrics keep every lesion pixel and, above this many pixels in total, every n-th
#: normal pixel (see ``metrics.PixelAccumulator``); about 1 GB of memory at the peak.
DEFAULT_MAX_PIXELS = 20_000_000
DEFAULT_OUT = "himatchad-eval"


# ============================================================================================
# small helpers


class _MemoryProbe:
    """Peak resident memory of this process between ``reset()`` and ``read()`` (and peak GPU memory)."""

    def __init__(self) -> None:
        self.resettable = False
        self.start_mb = 0.0

    @staticmethod
    def _status_mb(key: str) -> Optional[float]:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return float(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def reset(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start_mb = self._status_mb("VmRSS") or 0.0
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict:
        peak = self._status_mb("VmHWM")
        if peak is None:
            import resource

            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = ru / (1024.0 * 1024.0) if sys.platform == "darwin" else ru / 1024.0
        out = {
            "peak_rss_mb": round(peak, 1),
            "rss_at_start_mb": round(self.start_mb, 1),
            "peak_rss_increase_mb": round(max(peak - self.start_mb, 0.0), 1),
            "peak_is_per_method": self.resettable,
        }
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


_SLICE_NO = re.compile(r"^(.*?)[_\-. ]*(\d+)$")


def name_positions(paths: Sequence[Path]) -> dict[str, float]:
    """Relative slice position of 2D slices from names ``<subject>_<slice number>``.

    ``(n - min_n) / (max_n - min_n)`` over the slices of the same subject in ``paths``; NaN when a
    name has no trailing number or its subject has one slice number only.
    """
    from ..imageio import strip_suffix

    parsed: dict[str, tuple[str, int]] = {}
    for p in paths:
        m = _SLICE_NO.match(strip_suffix(p))
        if m:
            parsed[str(p)] = (m.group(1), int(m.group(2)))
    ranges: dict[str, list[int]] = {}
    for subj, n in parsed.values():
        r = ranges.setdefault(subj, [n, n])
        r[0], r[1] = min(r[0], n), max(r[1], n)
    out = {}
    for p in paths:
        key = str(p)
        if key in parsed:
            subj, n = parsed[key]
            lo, hi = ranges[subj]
            out[key] = (n - lo) / (hi - lo) if hi > lo else float("nan")
        else:
            out[key] = float("nan")
    return out


def _image_pixels(path: Path) -> int:
    """Number of voxels of an image from its header (falls back to reading it)."""
    import SimpleITK as sitk

    if path.is_file():
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(str(path))
            r.ReadImageInformation()
            return int(np.prod(r.GetSize()))
        except RuntimeError:
            pass
    return int(read_image(path).array.size)


def _read_mask(case: TestCase, shape: tuple) -> Optional[np.ndarray]:
    """Binary ground truth of a case on the image grid; all zero for a normal case without mask."""
    if case.mask is None:
        return None if case.label else np.zeros(shape, dtype=bool)
    m = read_image(case.mask).array
    if m.shape != tuple(shape):
        raise HiMatchADError(
            f"{case.mask}: mask shape {tuple(m.shape)} (z, y, x) differs from its image {case.image.name} {tuple(shape)}; "
            "masks must be on the image's voxel grid"
        )
    return np.nan_to_num(m) > 0


def normals_folder(paths: Sequence[Path], normal_dir: Path, cache_root: Optional[Path]) -> Path:
    """A folder holding exactly ``paths``: ``normal_dir`` itself or a folder of links to them.

    The detector fits on a folder; a subsample (``--max-normals``) becomes a folder of symbolic links
    (copies where links are not allowed) under the cache, named by the hash of the chosen files, so
    repeated runs reuse one cached bank.
    """
    from ..imageio import list_images

    paths = [Path(p) for p in paths]
    if [str(p) for p in list_images(normal_dir)] == [str(p) for p in paths]:
        return normal_dir
    if cache_root is None:
        from ..bank import default_cache_root

        cache_root = default_cache_root()
    digest = hashlib.sha256("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()[:16]
    folder = Path(cache_root) / "subsets" / f"{normal_dir.name}-{len(paths)}-{digest}"
    names = []
    seen: set = set()
    for i, p in enumerate(paths):
        name = p.name if p.name not in seen else f"{i:05d}_{p.name}"
        seen.add(name)
        names.append(name)
    wanted = dict(zip(names, paths))
    if folder.is_dir():
        have = {q.name for q in folder.iterdir() if not q.name.startswith(".")}
        if have == set(names):
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    for q in folder.iterdir():
        if q.name not in wanted and (q.is_symlink() or q.is_file()):
            q.unlink()
    for name, src in wanted.items():
        dst = folder / name
        if dst.exists() or dst.is_symlink():
            continue
        try:
            os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
        except OSError:
            import shutil

            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    return folder


# ============================================================================================
# one case's output, whatever produced it


@dataclass
class CaseOutput:
    heatmap: np.ndarray  # (nz, ny, nx) on the input grid
    foreground: np.ndarray
    labelmap: Optional[np.ndarray]
    threshold: float
    volume_score: float
    slice_scores: np.ndarray  # indexed along ``slice_axis`` of the input grid
    slice_axis: int
    seconds: float
    timings: dict = field(default_factory=dict)
    device: Optional[str] = None


def _from_result(res, seconds: float) -> CaseOutput:
    return CaseOutput(
        heatmap=np.asarray(res.heatmap, dtype=np.float32),
        foreground=np.asarray(res.foreground, dtype=bool),
        labelmap=np.asarray(res.labelmap, dtype=bool),
        threshold=float(res.threshold),
        volume_score=float(res.volume_score),
        slice_scores=np.asarray(res.slice_scores, dtype=np.float64),
        slice_axis=int(res.slice_axis),
        seconds=seconds,
        timings=dict(res.timings or {}),
        device=(res.settings or {}).get("device"),
    )


# ============================================================================================
# intensity-only baselines


class IntensityBaselines:
    """The ``intensity`` and ``intensity-dev`` maps (see the module documentation)."""

    n_bins = 10
    min_bin_pixels = 1000
    max_samples = 1_000_000

    def __init__(self, modality: str = "auto", slice_axis: str = "auto", target_fpr: float = 0.01):
        self.modality = modality
        self.slice_axis = slice_axis
        self.target_fpr = float(target_fpr)
        self.mu = np.zeros(self.n_bins + 1)
        self.sd = np.ones(self.n_bins + 1)
        self.thresholds: dict[str, float] = {}
        self.positions: dict[str, float] = {}
        self.info: dict = {}

    def _prepare(self, image: Image):
        from ..preprocess import prepare_volume

        return prepare_volume(image, self.modality, self.slice_axis)

    def _bins(self, positions: np.ndarray) -> np.ndarray:
        p = np.asarray(positions, dtype=float)
        b = np.clip(np.floor(np.nan_to_num(p, nan=-1.0) * self.n_bins), 0, self.n_bins - 1).astype(int)
        return np.where(np.isfinite(p), b, self.n_bins)  # the last bin is "position unknown"

    def _slice_positions(self, prep, path: Optional[Path]) -> np.ndarray:
        if prep.image.is_2d or prep.n_slices == 1:
            return np.array([self.positions.get(str(path), float("nan"))])
        return np.asarray(prep.positions, dtype=float)

    def fit(self, normals: Sequence[Path], on_item: Optional[Callable[[], None]] = None) -> "IntensityBaselines":
        self.positions = name_positions(normals)
        k = self.n_bins + 1
        cnt, s1, s2 = np.zeros(k), np.zeros(k), np.zeros(k)
        per_slice: list[tuple[np.ndarray, int]] = []
        total_fg = 0
        for path in normals:
            try:
                prep = self._prepare(read_image(path))
            except HiMatchADError:
                continue  # the detector skips such images too
            bins = self._bins(self._slice_positions(prep, path))
            for i in prep.slices_with_foreground():
                v = prep.canonical[i][prep.foreground[i]].astype(np.float64)
                b = int(bins[i])
                cnt[b] += v.size
                s1[b] += v.sum()
                s2[b] += (v * v).sum()
                per_slice.append((v[:: max(1, v.size // 4000)].astype(np.float32), b))
                total_fg += v.size
            if on_item:
                on_item()
        if total_fg == 0:
            raise HiMatchADError("the normal reference set has no foreground to compute the intensity baselines from")
        g_mu = s1.sum() / cnt.sum()
        g_sd = math.sqrt(max(s2.sum() / cnt.sum() - g_mu**2, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = s1 / cnt
            sd = np.sqrt(np.maximum(s2 / cnt - mu**2, 0.0))
        use = cnt >= self.min_bin_pixels
        self.mu = np.where(use, mu, g_mu)
        self.sd = np.maximum(np.where(use, sd, g_sd), 1e-3)
        vals = np.concatenate([v for v, _ in per_slice])
        bins = np.concatenate([np.full(v.size, b) for v, b in per_slice])
        if vals.size > self.max_samples:
            step = vals.size // self.max_samples + 1
            vals, bins = vals[::step], bins[::step]
        q = 1.0 - self.target_fpr
        self.thresholds = {
            "intensity": float(np.quantile(vals, q)),
            "intensity-dev": float(np.quantile(np.abs(vals - self.mu[bins]) / self.sd[bins], q)),
        }
        self.info = {
            "position_bins": self.n_bins,
            "bin_mean": [round(float(x), 5) for x in self.mu],
            "bin_sd": [round(float(x), 5) for x in self.sd],
            "bin_pixels": [int(x) for x in cnt],
            "thresholds": self.thresholds,
            "threshold_rule": f"{q:g} quantile of normal-set foreground values",
        }
        return self

    def predict(self, image: Image, path: Optional[Path] = None) -> dict[str, CaseOutput]:
        t0 = time.perf_counter()
        prep = self._prepare(image)
        t_prep = time.perf_counter() - t0
        x, fg = prep.canonical, prep.foreground
        bins = self._bins(self._slice_positions(prep, path))
        mu = self.mu[bins][:, None, None]
        sd = self.sd[bins][:, None, None]
        maps = {"intensity": np.where(fg, x, 0.0).astype(np.float32), "intensity-dev": np.where(fg, np.abs(x - mu) / sd, 0.0).astype(np.float32)}
        n = prep.n_slices
        order = np.arange(n)
        if prep.reorientation.flips[prep.slice_axis_canonical]:
            order = order[::-1]
        fg_in = prep.to_input_grid(fg)
        out = {}
        for name, m in maps.items():
            t = time.perf_counter()
            ss = np.full(n, np.nan)
            for i in range(n):
                if fg[i].any():
                    ss[i] = top_fraction_mean(m[i][fg[i]])
            in_scores = np.full(n, np.nan)
            in_scores[order] = ss
            heat = prep.to_input_grid(m)
            thr = self.thresholds[name]
            out[name] = CaseOutput(
                heatmap=heat,
                foreground=fg_in,
                labelmap=(heat > thr) & fg_in,
                threshold=thr,
                volume_score=top_fraction_mean(m[fg]) if fg.any() else float("nan"),
                slice_scores=in_scores,
                slice_axis=prep.slice_axis_input,
                seconds=t_prep + time.perf_counter() - t,
                timings={"preprocess": t_prep, "maps": time.perf_counter() - t},
            )
        return out


# ============================================================================================
# accumulation per method


class _MethodRecord:
    def __init__(self, name: str, stride: int, max_fpr: float = 0.3):
        self.name = name
        self.pixels = PixelAccumulator(negative_stride=stride, max_fpr=max_fpr)
        self.labels: list[int] = []
        self.scores: list[float] = []
        self.slice_labels: list[np.ndarray] = []
        self.slice_scores: list[np.ndarray] = []
        self.seconds: list[float] = []
        self.slices_scored: list[int] = []
        self.timings: dict[str, float] = {}
        self.thresholds: list[float] = []
        self.per_case: dict[str, dict] = {}
        self.fit: dict = {}
        self.memory: dict = {}
        self.device: Optional[str] = None
        self.summary: dict = {}

    def add(self, case: TestCase, out: CaseOutput, gt: Optional[np.ndarray], is_3d: bool) -> None:
        if gt is not None and out.heatmap.shape != gt.shape:
            raise HiMatchADError(
                f"{case.name}: the {self.name} heatmap has shape {out.heatmap.shape} but the ground truth {gt.shape}; "
                "the detector must return maps on the input grid"
            )
        self.labels.append(case.label)
        self.scores.append(out.volume_score)
        self.seconds.append(out.seconds)
        n_scored = int(np.isfinite(out.slice_scores).sum()) if out.slice_scores is not None else 1
        self.slices_scored.append(max(n_scored, 1))
        self.thresholds.append(out.threshold)
        if out.device:
            self.device = out.device
        for k, v in (out.timings or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.timings[k] = self.timings.get(k, 0.0) + float(v)
        if is_3d and gt is not None:
            other = tuple(a for a in range(3) if a != out.slice_axis)
            lab = gt.any(axis=other)
            sc = np.asarray(out.slice_scores, dtype=np.float64)
            keep = np.isfinite(sc)
            self.slice_labels.append(lab[keep].astype(int))
            self.slice_scores.append(sc[keep])
        if gt is not None:
            self.pixels.add(out.heatmap, gt, out.labelmap)
        self.per_case[case.name] = {"score": _r(out.volume_score), "seconds": round(out.seconds, 4)}

    def finish(self, is_3d: bool) -> dict:
        pm = self.pixels.compute().to_dict()
        n = len(self.seconds)
        sec = np.asarray(self.seconds)
        res = {
            "image_auroc": _r(image_auroc(self.labels, self.scores)),
            "slice_auroc": None,
            **{k: _r(v) if isinstance(v, float) else v for k, v in pm.items()},
            "threshold": _r(float(np.median(self.thresholds))) if self.thresholds else None,
            "timing": {
                "cases": n,
                "seconds_per_case_mean": _r(float(sec.mean())) if n else None,
                "seconds_per_case_median": _r(float(np.median(sec))) if n else None,
                "seconds_per_slice": _r(float(sec.sum() / max(sum(self.slices_scored), 1))) if n else None,
                "slices_scored": int(sum(self.slices_scored)),
                "fit_seconds": self.fit.get("seconds"),
                "steps_seconds_total": {k: round(v, 4) for k, v in sorted(self.timings.items())},
            },
            "memory": self.memory,
            "device": self.device,
            "fit": self.fit,
        }
        if is_3d and self.slice_labels:
            res["slice_auroc"] = _r(image_auroc(np.concatenate(self.slice_labels), np.concatenate(self.slice_scores)))
        self.summary = res
        return res


def _r(x, nd: int = 6):
    if x is None:
        return None
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return x
    return round(xf, nd) if math.isfinite(xf) else None


# ============================================================================================
# examples for the figure


class _Examples:
    """A few cases shown in the figure: one display slice each, the same for every method."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.data: dict[str, dict] = {}

    def wants(self, name: str) -> bool:
        return name in self.names

    def add(self, case: TestCase, image: Image, gt: Optional[np.ndarray], method: str, out: CaseOutput) -> None:
        d = self.data.get(case.name)
        if d is None:
            view = _display_view(image, gt, out)
            img2d = _take(image.array, view)
            d = {"view": view, "image": img2d, "gt": None if gt is None else _take(gt, view), "maps": {}, "thresholds": {}, "label": case.label}
            self.data[case.name] = d
        d["maps"][method] = _take(out.heatmap, d["view"]).astype(np.float32)
        d["thresholds"][method] = out.threshold


def _display_view(image: Image, gt: Optional[np.ndarray], out: CaseOutput):
    """How to cut the display slice: None for 2D, else (reorientation, canonical axis, index, aspect)."""
    if image.is_2d or image.array.shape[0] == 1:
        sx, sy = image.geometry.spacing[:2]
        return (None, 0, 0, sy / sx)
    from ..orientation import canonical_reorientation

    reo = canonical_reorientation(image.geometry.direction)
    c = list(reo.axes).index(out.slice_axis)
    ref = gt if gt is not None and gt.any() else out.foreground
    area = reo.to_canonical(ref).sum(axis=tuple(a for a in range(3) if a != c))
    idx = int(np.argmax(area))
    sp = reo.canonical_spacing(image.geometry.spacing)
    rows, cols = [a for a in range(3) if a != c]
    return (reo, c, idx, sp[rows] / sp[cols])


def _take(arr: np.ndarray, view) -> np.ndarray:
    reo, c, idx, _ = view
    if reo is None:
        return np.asarray(arr[0])
    return np.ascontiguousarray(np.take(reo.to_canonical(np.asarray(arr)), idx, axis=c))


# ============================================================================================
# the runner


def _detector_factory(method: str, **kwargs):
    from ..detector import HiMatchDetector

    return HiMatchDetector(method=method, **kwargs)


class _Progress:
    """tqdm bars: the detector's steps while fitting, one bar over the test cases while predicting."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.quiet_detector = False
        self._cb = None
        if enabled:
            from ..progress import tqdm_callback

            self._cb = tqdm_callback()

    def detector_callback(self, message: str, done: int, total: int) -> None:
        if self._cb is not None and not self.quiet_detector:
            self._cb(message, done, total)

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="case", disable=not self.enabled, dynamic_ncols=True, leave=False)


def _environment() -> dict:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    tf = sys.modules.get("transformers")
    if tf is not None:
        env["transformers"] = tf.__version__
    return env


def evaluate(
    dataset_dir,
    out_dir=DEFAULT_OUT,
    *,
    layout: str = "auto",
    split: str = "test",
    methods: Sequence[str] = DETECTOR_METHODS,
    baselines: bool = True,
    max_normals: Optional[int] = None,
    max_test: Optional[int] = None,
    detector_kwargs: Optional[dict] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    max_fpr: float = 0.3,
    n_examples: int = 4,
    figure: bool = True,
    progress: bool = True,
    command: Optional[str] = None,
    detector_factory: Optional[Callable] = None,
) -> dict:
    """Run the evaluation and write ``results.md``, ``results.json`` and ``results.png`` in ``out_dir``.

    ``detector_kwargs`` are passed to every ``HiMatchDetector`` (model, resolution, k, device,
    cache_dir, batch_size, seed, modality, slice_axis, threshold, target_fpr...). Returns the JSON
    content.
    """
    t_start = time.perf_counter()
    methods = [m.strip().lower() for m in methods if m and m.strip()]
    bad = [m for m in methods if m not in DETECTOR_METHODS]
    if bad:
        raise HiMatchADError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(DETECTOR_METHODS)}")
    if len(set(methods)) != len(methods):
        raise HiMatchADError("a method is listed twice in --methods")
    if not methods and not baselines:
        raise HiMatchADError("nothing to evaluate: no method and no baseline")
    kwargs = {k: v for k, v in (detector_kwargs or {}).items() if v is not None}
    if "target_fpr" in kwargs and not 0.0 < float(kwargs["target_fpr"]) < 1.0:
        raise HiMatchADError(f"the target false-positive rate must be between 0 and 1, not {kwargs['target_fpr']}")
    factory = detector_factory or _detector_factory
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise HiMatchADError(f"--out-dir {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # fail now rather than after hours of computing
    except OSError as exc:
        raise HiMatchADError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
    ds = load_dataset(dataset_dir, layout=layout, split=split, max_normals=max_normals, max_test=max_test)
    if not ds.cases:
        raise HiMatchADError(f"{dataset_dir}: no test cases")
    prog = _Progress(progress)

    # Pre-pass: sizes (for the pixel budget), lesion sizes (to choose the figure's examples).
    sizes, lesion = {}, {}
    for c in ds.cases:
        sizes[c.name] = _image_pixels(c.image)
        lesion[c.name] = 0
        if c.label and c.mask is not None:
            lesion[c.name] = int(np.count_nonzero(np.nan_to_num(read_image(c.mask).array)))
    pixel_total = sum(sizes[c.name] for c in ds.cases if not (c.label and c.mask is None))
    stride = 1
    if max_pixels and pixel_total > max_pixels:
        stride = int(math.ceil(pixel_total / max_pixels))
    with_mask = sorted((c for c in ds.cases if c.label and lesion[c.name] > 0), key=lambda c: (lesion[c.name], c.name))
    normal_cases = [c for c in ds.cases if not c.label]
    n_normal_ex = 1 if normal_cases and n_examples >= 2 else 0
    chosen = []
    if n_examples > n_normal_ex and with_mask:
        chosen += evenly_spaced(with_mask, n_examples - n_normal_ex)
    if n_normal_ex:
        chosen += evenly_spaced(normal_cases, 1)
    examples = _Examples([c.name for c in chosen])

    records: dict[str, _MethodRecord] = {}
    is_3d = False
    # Slice positions of 2D test slices from their names, over the whole test listing (not only the
    # subsample), so that a subsample does not change a slice's position.
    test_positions = name_positions(ds.all_test_images or [c.image for c in ds.cases])
    cache_dir = kwargs.get("cache_dir")
    mem = _MemoryProbe()
    fit_folder = None

    def run_pass(names: Sequence[str], predict: Callable[[Image, TestCase], dict], desc: str) -> None:
        nonlocal is_3d
        recs = {n: records[n] for n in names}
        with prog.bar(len(ds.cases), desc) as bar:
            for case in ds.cases:
                image = read_image(case.image)
                if not image.is_2d and image.array.shape[0] > 1:
                    is_3d = True
                gt = _read_mask(case, image.array.shape)
                outs = predict(image, case)
                for n, out in outs.items():
                    recs[n].add(case, out, gt, not image.is_2d and image.array.shape[0] > 1)
                    if examples.wants(case.name):
                        examples.add(case, image, gt, n, out)
                del outs
                bar.update(1)

    # ---- the detector's modes
    if methods and detector_factory is None:
        # Import the deep-learning libraries before the first measurement, so that the memory
        # reported for the first mode is not inflated by them (its model weights stay counted).
        import torch  # noqa: F401
        import transformers  # noqa: F401
    for method in methods:
        rec = records[method] = _MethodRecord(method, stride, max_fpr)
        mem.reset()
        prog.quiet_detector = False
        t0 = time.perf_counter()
        det = factory(method, **kwargs, progress=prog.detector_callback)
        if fit_folder is None:
            fit_folder = normals_folder(ds.normals, ds.normal_dir, Path(cache_dir).expanduser() if cache_dir else None)
        det.fit(fit_folder)
        rec.fit = {"seconds": round(time.perf_counter() - t0, 3), **_jsonable(getattr(det, "fit_info", {}) or {})}
        prog.quiet_detector = True

        def predict(image: Image, case: TestCase, det=det) -> dict:
            t = time.perf_counter()
            res = det.predict(image)
            return {method: _from_result(res, time.perf_counter() - t)}

        run_pass([method], predict, f"{method}: test cases")
        rec.memory = mem.read()
        del det, predict
        gc.collect()
        rec.finish(is_3d)

    # ---- the intensity baselines
    baseline_info = None
    if baselines:
        mem.reset()
        t0 = time.perf_counter()
        bl = IntensityBaselines(kwargs.get("modality", "auto"), kwargs.get("slice_axis", "auto"), kwargs.get("target_fpr", 0.01))
        with prog.bar(len(ds.normals), "intensity baselines: normal statistics") as bar:
            bl.fit(ds.normals, on_item=lambda: bar.update(1))
        fit_s = round(time.perf_counter() - t0, 3)
        for n in BASELINES:
            records[n] = _MethodRecord(n, stride, max_fpr)
            records[n].fit = {"seconds": fit_s}
        bl.positions.update(test_positions)
        run_pass(BASELINES, lambda image, case: bl.predict(image, case.image), "intensity baselines: test cases")
        m = mem.read()
        for n in BASELINES:
            records[n].memory = m
            records[n].finish(is_3d)
        baseline_info = bl.info

    # ---- outputs
    summary = {n: r.summary for n, r in records.items()}
    per_case = []
    for c in ds.cases:
        per_case.append(
            {
                **c.to_dict(),
                "lesion_voxels": lesion[c.name],
                "scores": {n: r.per_case.get(c.name, {}).get("score") for n, r in records.items()},
                "seconds": {n: r.per_case.get(c.name, {}).get("seconds") for n, r in records.items()},
            }
        )
    result = {
        "tool": "himatchad evaluate",
        "command": command,
        "dataset": {**ds.summary(), "is_3d": is_3d, "pixels_evaluated": pixel_total},
        "settings": {
            "methods": methods,
            "baselines": list(BASELINES) if baselines else [],
            "detector": _jsonable(kwargs),
            "max_normals": max_normals,
            "max_test": max_test,
            "max_pixels": max_pixels,
            "negative_pixel_stride": stride,
            "aupro_max_fpr": max_fpr,
            "fit_folder": str(fit_folder) if fit_folder else str(ds.normal_dir),
        },
        "baselines": baseline_info,
        "results": summary,
        "environment": _environment(),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "cases": per_case,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
    md = render_markdown(result)
    write_text_atomic(out_dir / "results.md", md)
    if figure:
        curves = {n: (roc_points(r.labels, r.scores), r.pixels.curves) for n, r in records.items()}
        make_figure(out_dir / "results.png", curves, examples, result)
    return result


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k == "progress" or callable(v):
            continue
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        elif isinstance(v, float) and not math.isfinite(v):
            v = None
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            v = str(v)
        out[k] = v
    return out


# ============================================================================================
# reports


def _fmt(x, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _fmt_time(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    is_3d = result["dataset"].get("is_3d")
    head = ["Method", "Image AUROC"] + (["Slice AUROC"] if is_3d else []) + [
        "Pixel AUROC", "AUPRO@0.3", "Pixel AP", "Best Dice", "Dice@auto", "s/case", "s/slice", "Fit s", "Peak RSS MB (+rise)",
    ]
    rows = []
    for name, r in result["results"].items():
        t, m = r["timing"], r.get("memory", {})
        row = [f"`{name}`", _fmt(r["image_auroc"])] + ([_fmt(r["slice_auroc"])] if is_3d else []) + [
            _fmt(r["pixel_auroc"]), _fmt(r["aupro"]), _fmt(r["pixel_ap"]), _fmt(r["best_dice"]), _fmt(r["dice_at_threshold"]),
            _fmt_time(t["seconds_per_case_mean"]), _fmt_time(t["seconds_per_slice"]), _fmt_time(t["fit_seconds"]),
            "–" if not m.get("peak_rss_mb") else f"{m['peak_rss_mb']:.0f} (+{m.get('peak_rss_increase_mb', 0):.0f})",
        ]
        rows.append(row)
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    ds, st = result["dataset"], result["settings"]
    det = st.get("detector", {})
    head, rows = table_rows(result)
    lines = [
        "# HiMatch-AD evaluation",
        "",
        f"- Data set: `{ds['root']}` ({ds['layout']} layout, {ds['variant']}, split `{ds['split']}`), "
        f"{'3D volumes' if ds.get('is_3d') else '2D images'}",
        f"- Normal reference set: {ds['n_normals']} of {ds['n_normals_available']} images/volumes in `{ds['normal_dir']}`",
        f"- Test cases: {ds['n_test']} of {ds['n_test_available']} ({ds['n_test_anomalous']} anomalous, {ds['n_test_normal']} normal)",
        f"- Model: `{det.get('model', 'default')}`; detector settings: "
        + (", ".join(f"{k}={v}" for k, v in det.items() if k not in ("model", "cache_dir")) or "defaults"),
    ]
    if result.get("command"):
        lines.append(f"- Command: `{result['command']}`")
    for note in ds.get("notes", []):
        lines.append(f"- Note: {note}")
    lines += ["", _md_table(head, rows), ""]
    lines += [
        "Image AUROC: one score per " + ("volume" if ds.get("is_3d") else "image")
        + (" (slice AUROC: one per slice; a slice is anomalous when its mask has a voxel)" if ds.get("is_3d") else "")
        + ". Pixel metrics are pooled over all pixels of all test cases"
        + (f" (every lesion pixel and one normal pixel in {st['negative_pixel_stride']}, weighted by {st['negative_pixel_stride']})" if st["negative_pixel_stride"] > 1 else "")
        + f"; AUPRO is integrated to FPR {st['aupro_max_fpr']} and normalised (1 = perfect). Best Dice: best pooled Dice over "
        "all thresholds; Dice@auto: pooled Dice of the labelmap at the method's automatic threshold. s/case and s/slice: "
        "prediction time (features, matching, maps; image reading excluded); Fit s: model loading, bank build or cache load, "
        "calibration. Peak RSS: highest resident memory of the whole process while the method ran (+rise: above its "
        "level when the method started; the first mode also loads the model weights, later modes start from what the "
        "allocator kept after the previous one: for a clean figure run one mode per process, e.g. --methods knn).",
        "",
        "`intensity` and `intensity-dev` use no features: the normalised image itself, and its deviation from the normal "
        "set's intensity statistics at the same slice position. A feature-based mode is useful where it beats them.",
        "",
    ]
    steps = [(n, r["timing"]["steps_seconds_total"]) for n, r in result["results"].items() if n in DETECTOR_METHODS]
    if steps:
        keys = sorted({k for _, s in steps for k in s if k != "total"})
        lines += ["## Prediction time by step (share of the total prediction time)", ""]
        h = ["Method"] + keys + ["total s"]
        rr = []
        for n, s in steps:
            tot = s.get("total") or sum(s.values()) or 1.0
            rr.append([f"`{n}`"] + [f"{100 * s.get(k, 0.0) / tot:.0f} %" if k in s else "–" for k in keys] + [_fmt_time(tot)])
        lines += [_md_table(h, rr), ""]
    lines += [f"Wall time of the evaluation: {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def print_table(result: dict, file=None) -> None:
    head, rows = table_rows(result)
    rows = [[c.strip("`") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    print(fmt.format(*head), file=file or sys.stdout)
    for r in rows:
        print(fmt.format(*r), file=file or sys.stdout)


# ============================================================================================
# figure


def make_figure(path: Path, curves: dict, examples: _Examples, result: dict) -> Path:
    """ROC (image, pixel) and PRO curves, and example slices with maps and ground-truth outlines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(curves)
    ex = [examples.data[n] for n in examples.names if n in examples.data]
    ex_names = [n for n in examples.names if n in examples.data]
    ncols = 1 + len(names)
    nrows = 1 + len(ex)
    fig = Figure(figsize=(2.6 * max(ncols, 3), 2.8 + 2.5 * len(ex)), dpi=110)
    FigureCanvasAgg(fig)
    top = 1.0 - 0.45 / (2.8 + 2.5 * len(ex))
    gs = fig.add_gridspec(nrows, 6 * ncols, height_ratios=[1.15] + [1.0] * len(ex), hspace=0.35, wspace=0.6, top=top)
    span = (6 * ncols) // 3
    axes = [fig.add_subplot(gs[0, i * span : (i + 1) * span - (1 if i < 2 else 0)]) for i in range(3)]
    colours = {n: c for n, c in zip(names, ["C0", "C1", "C2", "0.45", "0.7", "C3", "C4"])}
    styles = {n: ("--" if n in BASELINES else "-") for n in names}
    for n in names:
        (fx, fy), pc = curves[n]
        r = result["results"][n]
        axes[0].plot(fx, fy, styles[n], color=colours[n], label=f"{n} ({_fmt(r['image_auroc'])})")
        if pc:
            axes[1].plot(pc["roc_fpr"], pc["roc_tpr"], styles[n], color=colours[n], label=f"{n} ({_fmt(r['pixel_auroc'])})")
            axes[2].plot(pc["pro_fpr"], pc["pro"], styles[n], color=colours[n], label=f"{n} ({_fmt(r['aupro'])})")
    unit = "volume" if result["dataset"].get("is_3d") else "image"
    for ax, title, xl, yl in (
        (axes[0], f"{unit.capitalize()}-level ROC", "FPR", "TPR"),
        (axes[1], "Pixel-level ROC", "FPR", "TPR"),
        (axes[2], f"PRO curve (FPR ≤ {result['settings']['aupro_max_fpr']})", "FPR", "PRO"),
    ):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
        ax.grid(alpha=0.3)
    axes[2].set_xlim(0, result["settings"]["aupro_max_fpr"])
    # One colour scale per method over the shown slices.
    vmax = {}
    for n in names:
        vals = [d["maps"][n] for d in ex if n in d["maps"]]
        vmax[n] = max([float(np.percentile(v, 99.5)) for v in vals] + [1e-6]) if vals else 1.0
    for row, (cname, d) in enumerate(zip(ex_names, ex), start=1):
        img = d["image"].astype(np.float32)
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        aspect = d["view"][3]
        ax = fig.add_subplot(gs[row, 0:6])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        if d["gt"] is not None and d["gt"].any():
            ax.contour(d["gt"].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{cname[:28]} ({'anomalous' if d['label'] else 'normal'})", fontsize=7)
        ax.axis("off")
        for j, n in enumerate(names, start=1):
            ax = fig.add_subplot(gs[row, 6 * j : 6 * (j + 1)])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
            if n in d["maps"]:
                m = d["maps"][n]
                ax.imshow(np.ma.masked_less_equal(m, 0), cmap="inferno", vmin=0, vmax=vmax[n], alpha=0.6, aspect=aspect, interpolation="bilinear")
            if d["gt"] is not None and d["gt"].any():
                ax.contour(d["gt"].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            if row == 1:
                ax.set_title(n, fontsize=8)
            ax.axis("off")
    fig.suptitle(
        f"{Path(result['dataset']['root']).name}: {result['dataset']['n_test']} test cases, {result['dataset']['n_normals']} normals"
        " (green: ground truth)",
        fontsize=10,
        y=1.0 - 0.1 / (2.8 + 2.5 * len(ex)),
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


# ============================================================================================
# command line


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``himatchad evaluate``; the parsed namespace's ``func(args)`` returns the exit code."""
    from ..cli import _positive_int

    p = subparsers.add_parser(
        "evaluate",
        help="benchmark the himatch, knn and dpmm modes and intensity baselines on a labelled data set",
        description=(
            "Fit each mode on the data set's normal images (one shared feature bank), predict every test case, and "
            "report image AUROC, pixel AUROC, AUPRO (FPR 0.3), pixel AP, best Dice, Dice at the automatic threshold, "
            "time and memory, next to intensity-only baselines. Writes OUT/results.md, OUT/results.json and "
            "OUT/results.png. Layouts: BMAD (brain, liver, RESC; detected from the folders) or volumes "
            "(normal/, test/img/, test/label/)."
        ),
    )
    p.add_argument("dataset_dir", metavar="DATASET_DIR", help="data set folder")
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder layout (default: detected)")
    p.add_argument("--split", choices=SPLITS, default="test", help="BMAD split to evaluate (default test)")
    p.add_argument("--model", default=None, help="Hugging Face id or local folder of the DINOv3/DINOv2 model")
    p.add_argument("--methods", default=",".join(DETECTOR_METHODS), help="comma-separated modes (default himatch,knn,dpmm)")
    p.add_argument("--no-baselines", action="store_true", help="skip the intensity-only baselines")
    p.add_argument("--max-normals", type=_positive_int, default=None, metavar="N", help="use N normal images (evenly spaced, deterministic)")
    p.add_argument("--max-test", type=_positive_int, default=None, metavar="N", help="use N test cases (stratified, deterministic)")
    p.add_argument("--out-dir", default=DEFAULT_OUT, metavar="OUT", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--resolution", type=int, default=None, help="longer side of the model input in pixels (detector default 448)")
    p.add_argument("--k", type=int, default=None, help="normal slices retrieved per query slice (himatch)")
    p.add_argument("--modality", default=None, help="intensity preset: auto, mri, ct, oct, 8bit (default auto)")
    p.add_argument(
        "--slice-axis", default=None, choices=("auto", "axial", "coronal", "sagittal", "largest_spacing"),
        help="slicing direction of volumes (default: the modality's)",
    )
    p.add_argument(
        "--fpr", type=float, default=None,
        help="target pixel false-positive rate of the automatic thresholds (detector default 0.01; also used for the baselines)",
    )
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass")
    p.add_argument("--cache-dir", default=None, help="bank cache folder (default $HIMATCHAD_CACHE or ~/.cache/himatchad)")
    p.add_argument("--seed", type=int, default=None, help="seed of the detector's clustering and calibration split")
    p.add_argument("--examples", type=int, default=4, help="example cases in the figure (default 4)")
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"pixel budget of the pooled pixel metrics; above it, normal pixels are subsampled (default {DEFAULT_MAX_PIXELS:,}; 0 = exact)",
    )
    # SUPPRESS: a --quiet given before the sub-command (himatchad --quiet evaluate ...) is kept.
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    p.set_defaults(func=run_evaluate_cli)
    return p


def run_evaluate_cli(args) -> int:
    methods = [m for m in (args.methods or "").split(",") if m.strip()]
    kwargs = {
        "model": args.model,
        "resolution": args.resolution,
        "k": args.k,
        "modality": args.modality,
        "slice_axis": args.slice_axis,
        "target_fpr": args.fpr,
        "device": args.device,
        "batch_size": args.batch_size,
        "cache_dir": args.cache_dir,
        "seed": args.seed,
    }
    command = "himatchad " + " ".join(_quote(a) for a in sys.argv[1:]) if sys.argv and sys.argv[0] else None
    result = evaluate(
        args.dataset_dir,
        args.out_dir,
        layout=args.layout,
        split=args.split,
        methods=methods,
        baselines=not args.no_baselines,
        max_normals=args.max_normals,
        max_test=args.max_test,
        detector_kwargs=kwargs,
        max_pixels=args.max_pixels or None,
        n_examples=max(0, args.examples),
        progress=not getattr(args, "quiet", False),
        command=command,
    )
    print_table(result)
    out = Path(args.out_dir)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a.replace("'", "'\\''") + "'"
