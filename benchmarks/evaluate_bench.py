"""Speed and memory of the detector's modes as the normal reference set grows.

For each size N of the normal set (an evenly spaced subsample of the data set's normal folder) the
bank is built from scratch in a fresh cache folder, then each mode is fitted on it (calibration,
and the mixture for ``dpmm``) and predicts the same M test slices. Reported:

- bank build: seconds in total and per normal slice, split into feature extraction, per-slice
  clustering (per-slice spherical k-means and the shared codebooks of every stage) and
  reading/preprocessing; its size on disk; the peak increase of resident memory while it was built
  (the bank is built first, on its own, so the modes' figures below do not include it);
- per mode: fitting seconds (calibration, DPMM; the bank build and the model loading excluded),
  prediction seconds per slice and their split as the detector reports it (query features,
  retrieval, stage maps, fusion, nearest-neighbour or mixture matching, upsampling), the peak
  increase of resident memory while the mode was fitted and used, and the size of the structure
  it searches (``knn``: every normal patch token as float32 in a faiss flat index; ``dpmm``: the
  mixture means; ``himatch``: the codebooks of every stage (float16), the
  per-slice codebook indices and the global descriptors).

The timings of the bank build and the fitting are taken by wrapping the library's functions from
the outside (feature extraction, k-means, reading, calibration, mixture fit); the library itself is
not modified. Run it when the machine is otherwise idle; fix the thread count (OMP_NUM_THREADS) for
comparable numbers.

Example (the LGG FLAIR development set, the random-weight stand-in model, 224 px)::

    OMP_NUM_THREADS=1 python benchmarks/evaluate_bench.py ../shared/data/lgg-flair-dev \\
        --model /work/shared/models/dinov3-vits16-standin --resolution 224 \\
        --normals 100,400,1400 --test 30 --out bench-out
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from HiMatchADLib.bank.build import build_or_load  # noqa: E402
from HiMatchADLib.evaluation.datasets import evenly_spaced, load_dataset  # noqa: E402
from HiMatchADLib.evaluation import MemoryProbe, environment, markdown_table, normals_folder  # noqa: E402
from HiMatchADLib.io.readers import read_image  # noqa: E402
from HiMatchADLib.core.atomic import write_text_atomic


class _Clock:
    """Accumulates the wall time of wrapped callables by key (wrappers are removed by ``restore``)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.scopes: dict[str, dict] = {}
        self._undo: list = []

    def wrap(self, owner, attr: str, key: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        clock = self

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock.t[key] = clock.t.get(key, 0.0) + time.perf_counter() - t0

        raw = owner.__dict__.get(attr, fn) if isinstance(owner, type) else fn  # keeps staticmethod wrappers
        setattr(owner, attr, timed)
        self._undo.append((owner, attr, raw))

    def wrap_scope(self, owner, attr: str, name: str) -> None:
        """Record, per call of ``owner.attr``, its wall time and what the other wrappers accrued inside it."""
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        clock = self

        def scoped(*a, **kw):
            before = dict(clock.t)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                inner = {k: v - before.get(k, 0.0) for k, v in clock.t.items() if v - before.get(k, 0.0) > 0}
                clock.scopes[name] = {"seconds": time.perf_counter() - t0, **inner}

        raw = owner.__dict__.get(attr, fn) if isinstance(owner, type) else fn
        setattr(owner, attr, scoped)
        self._undo.append((owner, attr, raw))

    def take(self) -> dict:
        out, self.t = self.t, {}
        return out

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def _instrument(clock: _Clock) -> None:
    from HiMatchADLib.bank import build as bank
    from HiMatchADLib.detector import detector
    from HiMatchADLib.features import extractor as features
    from HiMatchADLib.methods import dpmm

    clock.wrap(features.FeatureExtractor, "extract", "features")
    clock.wrap(bank, "spherical_kmeans", "clustering")
    clock.wrap(bank, "build_codebook", "clustering")
    clock.wrap(bank, "read_image", "read")
    clock.wrap(bank, "prepare_volume", "preprocess")
    clock.wrap(detector.HiMatchDetector, "_ensure_extractor", "model_load")
    clock.wrap(detector.HiMatchDetector, "_calibrate", "calibration")
    clock.wrap(dpmm.DpmmScorer, "fit", "dpmm_fit")
    clock.wrap_scope(bank, "_build", "bank_build")  # bank.build_or_load calls the module-level _build


def _state_mb(det) -> float | None:
    """Size of the structure the mode searches, in MB (see the module documentation)."""
    try:
        b = det.bank
        if det.method == "knn":
            return b.tokens.shape[0] * b.tokens.shape[1] * 4 / 2**20
        if det.method == "dpmm":
            return det.scorer.means.nbytes / 2**20
        return b.clustered_nbytes() / 2**20
    except AttributeError:
        return None


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run(args) -> dict:
    from HiMatchADLib.detector.detector import HiMatchDetector

    sizes = [int(s) for s in args.normals.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ds = load_dataset(args.dataset, max_test=args.test)
    pool = ds.normals
    queries = [read_image(c.image) for c in ds.cases]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Load the model once before any measurement (the detector reuses it): memory figures are then
    # those of the modes themselves, not of importing torch and loading the weights.
    from HiMatchADLib.features.backbone import load_backbone, resolve_device

    load_backbone(args.model, resolve_device(args.device or "auto"))
    clock = _Clock()
    _instrument(clock)
    mem = MemoryProbe()
    rows_bank, rows_method = [], []
    try:
        for n in sizes:
            if n > len(pool):
                print(f"skipping N={n}: only {len(pool)} normals", file=sys.stderr)
                continue
            cache = out / f"cache-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            folder = normals_folder(evenly_spaced(pool, n), ds.normal_dir, cache)
            kw = {k: v for k, v in {"resolution": args.resolution, "device": args.device, "batch_size": args.batch_size}.items() if v}
            # The bank first, in its own memory window: the modes' windows then hold only their own
            # fitting (calibration, mixture) and prediction.
            gc.collect()
            mem.reset()
            clock.take()
            builder = HiMatchDetector(model=args.model, cache_dir=cache, **kw)
            builder._ensure_extractor()
            b = build_or_load(folder, builder.extractor, builder._bank_settings(), cache)
            scope = clock.scopes.pop("bank_build", None)
            if scope is None:
                raise RuntimeError(f"the bank for N={n} was not built in this run (stale cache folder {cache}?)")
            bank_s = scope["seconds"]
            rows_bank.append({
                "normals": n,
                "slices": b.n_slices,
                "tokens": int(b.tokens.shape[0]),
                "build_s": round(bank_s, 2),
                "build_s_per_slice": round(bank_s / max(b.n_slices, 1), 4),
                "features_s": round(scope.get("features", 0.0), 2),
                "clustering_s": round(scope.get("clustering", 0.0), 2),
                "read_preprocess_s": round(scope.get("read", 0.0) + scope.get("preprocess", 0.0), 2),
                "disk_mb": round(_dir_mb(b.root), 1),
                "peak_rss_increase_mb": mem.read()["peak_rss_increase_mb"],
            })
            del b, builder
            for method in methods:
                gc.collect()
                mem.reset()
                clock.take()
                det = HiMatchDetector(model=args.model, method=method, cache_dir=cache, **kw)
                t0 = time.perf_counter()
                det.fit(folder)
                fit_s = time.perf_counter() - t0
                ft = clock.take()
                own_fit = fit_s - ft.get("model_load", 0.0)
                steps: dict[str, float] = {}
                n_slices = 0
                for q in queries:
                    res = det.predict(q)
                    n_slices += int(np.isfinite(res.slice_scores).sum())
                    for k, v in res.timings.items():
                        steps[k] = steps.get(k, 0.0) + float(v)
                m = mem.read()
                total = steps.get("total", sum(steps.values()))
                rows_method.append({
                    "normals": n,
                    "method": method,
                    "fit_s": round(own_fit, 2),
                    "calibration_s": round(ft.get("calibration", 0.0), 2),
                    "dpmm_fit_s": round(ft.get("dpmm_fit", 0.0), 2),
                    "predict_s_per_slice": round(total / max(n_slices, 1), 4),
                    "predict_shares": {k: round(v / total, 4) for k, v in steps.items() if k != "total" and total > 0},
                    "peak_rss_increase_mb": m["peak_rss_increase_mb"],
                    "peak_rss_mb": m["peak_rss_mb"],
                    "state_mb": None if _state_mb(det) is None else round(_state_mb(det), 2),
                })
                print(json.dumps(rows_method[-1]), flush=True)
                del det
            if not args.keep_cache:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        clock.restore()
    result = {
        "dataset": str(args.dataset),
        "model": args.model,
        "resolution": args.resolution,
        "test_slices": len(queries),
        "bank": rows_bank,
        "methods": rows_method,
        "environment": environment(),
        "command": " ".join(sys.argv),
    }
    write_text_atomic(out / "bench.json", json.dumps(result, indent=1) + "\n")
    md = render(result)
    write_text_atomic(out / "bench.md", md)
    print(md)
    return result


def render(result: dict) -> str:
    lines = [f"Bank build ({result['model']}, {result['resolution']} px):", ""]
    head = ["Normals", "Slices", "Tokens", "Build s", "s/slice", "Features", "Clustering", "Read+preprocess", "Disk MB", "Peak RSS +MB"]
    rows = []
    for b in result["bank"]:
        tot = b["build_s"] or 1.0
        rows.append([str(b["normals"]), str(b["slices"]), str(b["tokens"]), f"{b['build_s']:.1f}", f"{b['build_s_per_slice']:.3f}",
                     f"{100 * b['features_s'] / tot:.0f} %", f"{100 * b['clustering_s'] / tot:.0f} %",
                     f"{100 * b['read_preprocess_s'] / tot:.0f} %", f"{b['disk_mb']:.1f}", f"{b['peak_rss_increase_mb']:.0f}"])
    lines += [markdown_table(head, rows), ""]
    keys = sorted({k for r in result["methods"] for k in r["predict_shares"]})
    head = ["Normals", "Method", "Fit s", "Predict s/slice"] + keys + ["Peak RSS +MB", "Search state MB"]
    rows = []
    for r in result["methods"]:
        rows.append([str(r["normals"]), f"`{r['method']}`", f"{r['fit_s']:.1f}", f"{r['predict_s_per_slice']:.3f}"]
                    + [f"{100 * r['predict_shares'][k]:.0f} %" if k in r["predict_shares"] else "–" for k in keys]
                    + [f"{r['peak_rss_increase_mb']:.0f}", "–" if r["state_mb"] is None else f"{r['state_mb']:.1f}"])
    lines += [f"Per mode ({result['test_slices']} test slices; prediction time split as the detector reports it):", "", markdown_table(head, rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", type=Path, help="data set folder (BMAD or volumes layout)")
    p.add_argument("--model", required=True)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--normals", default="100,400,1400", help="comma-separated sizes of the normal set")
    p.add_argument("--test", type=int, default=30, help="test slices/volumes predicted per mode")
    p.add_argument("--methods", default="himatch,knn,dpmm")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--keep-cache", action="store_true")
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
