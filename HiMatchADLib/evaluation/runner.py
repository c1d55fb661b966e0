"""The evaluation run: every mode fitted on the same normals and predicting the same test cases, then
the baselines; writes ``results.json``, ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..core.atomic import write_text_atomic
from ..core.errors import HiMatchADError
from ..core.geometry import Image
from ..core.progress import tqdm_callback
from ..detector.detector import HiMatchDetector
from ..methods.base import get_method
from ..io.readers import read_image
from .baselines import BASELINES, IntensityBaselines
from .datasets import TestCase, evenly_spaced, load_dataset
from .environment import environment
from .figure import Examples, make_figure
from .inputs import image_pixels, name_positions, normals_folder, read_mask
from .memory import MemoryProbe
from .metrics import roc_points
from .records import DETECTOR_METHODS, MethodRecord, from_detection_result
from .report import render_markdown

#: Pooled pixel metrics keep every lesion pixel and, above this many pixels in total, every n-th
#: normal pixel (see ``metrics.PixelAccumulator``); about 1 GB of memory at the peak.
DEFAULT_MAX_PIXELS = 20_000_000


DEFAULT_OUT = "himatchad-eval"


def _detector_factory(method: str, **kwargs):
    return HiMatchDetector(method=method, **kwargs)


class _Progress:
    """tqdm bars: the detector's steps while fitting, one bar over the test cases while predicting."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.quiet_detector = False
        self._cb = None
        if enabled:
            self._cb = tqdm_callback()

    def detector_callback(self, message: str, done: int, total: int) -> None:
        if self._cb is not None and not self.quiet_detector:
            self._cb(message, done, total)

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="case", disable=not self.enabled, dynamic_ncols=True, leave=False)


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
        sizes[c.name] = image_pixels(c.image)
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
    examples = Examples([c.name for c in chosen])

    records: dict[str, MethodRecord] = {}
    is_3d = False
    # Slice positions of 2D test slices from their names, over the whole test listing (not only the
    # subsample), so that a subsample does not change a slice's position.
    test_positions = name_positions(ds.all_test_images or [c.image for c in ds.cases])
    cache_dir = kwargs.get("cache_dir")
    mem = MemoryProbe()
    fit_folder = None

    def run_pass(names: Sequence[str], predict: Callable[[Image, TestCase], dict], desc: str) -> None:
        nonlocal is_3d
        recs = {n: records[n] for n in names}
        with prog.bar(len(ds.cases), desc) as bar:
            for case in ds.cases:
                image = read_image(case.image)
                if not image.is_2d and image.array.shape[0] > 1:
                    is_3d = True
                gt = read_mask(case, image.array.shape)
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
        rec = records[method] = MethodRecord(method, stride, max_fpr)
        mem.reset()
        prog.quiet_detector = False
        t0 = time.perf_counter()
        own = kwargs if get_method(method).uses_fusion else {k: v for k, v in kwargs.items() if k not in ("fusion", "position_window")}
        det = factory(method, **own, progress=prog.detector_callback)
        if fit_folder is None:
            fit_folder = normals_folder(ds.normals, ds.normal_dir, Path(cache_dir).expanduser() if cache_dir else None)
        det.fit(fit_folder)
        rec.fit = {"seconds": round(time.perf_counter() - t0, 3), **_jsonable(getattr(det, "fit_info", {}) or {})}
        prog.quiet_detector = True

        def predict(image: Image, case: TestCase, det=det) -> dict:
            t = time.perf_counter()
            res = det.predict(image)
            return {method: from_detection_result(res, time.perf_counter() - t)}

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
            records[n] = MethodRecord(n, stride, max_fpr)
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
        "environment": environment(),
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
