"""Speed and memory of detection with a cached bank, against the backbone's forward passes alone.

Prints bank build time, per-slice detection time, peak memory (RSS) and the ratio
end-to-end detection time / backbone forward time on the same slices, for each method. Detection
and the forward passes alone are timed in alternation (``--repeat`` rounds, fastest kept), and the
ratio is also given within one detection run: total / the feature-extraction part of it.

    python benchmarks/speed.py --normals ../shared/data/ixi-t1-normals --n-normals 3 \
        --model ../shared/models/dinov3-vits16-standin --resolution 448
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--normals", required=True)
    ap.add_argument("--n-normals", type=int, default=4, help="first N volumes form the bank; the next one is the query")
    ap.add_argument("--model", required=True)
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--methods", default="himatch,knn,dpmm")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timed rounds (detect, then forward); the fastest of each is kept")
    args = ap.parse_args()

    import torch

    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.io.discovery import list_images
    from HiMatchADLib.evaluation.memory import peak_rss_mib
    from HiMatchADLib.features.slicing import prepare_volume
    from HiMatchADLib.io.readers import read_image

    files = list_images(args.normals)
    work = Path(tempfile.mkdtemp(prefix="himatchad-bench-"))
    bank_dir = work / "normals"
    bank_dir.mkdir()
    for p in files[: args.n_normals]:
        shutil.copy2(p, bank_dir / p.name)
    query = files[args.n_normals]
    cache = work / "cache"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, resolution {args.resolution}")
    print(f"bank: {args.n_normals} volumes from {args.normals}; query: {query.name}")
    out = {}
    for i, method in enumerate(args.methods.split(",")):
        det = HiMatchDetector(model=args.model, method=method, resolution=args.resolution, batch_size=args.batch_size, cache_dir=cache)
        t = time.perf_counter()
        det.fit(bank_dir)
        fit_s = time.perf_counter() - t
        if i == 0:
            print(f"bank build + calibration ({method}): {fit_s:.1f} s, {det.bank.n_slices} slices, build {det.bank.manifest['build_seconds']:.1f} s")
        det.predict(query)  # warm-up (faiss index, caches)
        # Backbone alone on the same slices, same batches (model input preparation included).
        prep = prepare_volume(read_image(query), det.modality, det.slice_axis)
        todo = prep.slices_with_foreground()
        e2e = fwd = float("inf")
        for _ in range(max(1, args.repeat)):  # interleaved, so both see the same machine
            t = time.perf_counter()
            r = det.predict(query)
            if time.perf_counter() - t < e2e:
                e2e, res = time.perf_counter() - t, r
            t = time.perf_counter()
            for b in range(0, len(todo), args.batch_size):
                det.extractor.extract(prep.canonical[todo[b : b + args.batch_size]])
            fwd = min(fwd, time.perf_counter() - t)
        n = len(todo)
        beyond = res.timings["total"] - res.timings["features"]
        out[method] = {
            "fit_s": round(fit_s, 2),
            "slices": n,
            "detect_s": round(e2e, 2),
            "per_slice_ms": round(1000 * e2e / n, 1),
            "forward_s": round(fwd, 2),
            "ratio_detect_to_forward": round(e2e / fwd, 3),
            "beyond_features_s": round(beyond, 2),
            "ratio_within_run": round(res.timings["total"] / res.timings["features"], 3),
            "stage_s": {k: round(v, 3) for k, v in res.timings.items()},
        }
        print(
            f"{method:8s} detect {e2e:6.1f} s ({1000 * e2e / n:6.1f} ms/slice), backbone alone {fwd:6.1f} s, ratio {e2e / fwd:.3f}; "
            f"within the detect run: {beyond:.2f} s beyond the features, ratio {res.timings['total'] / res.timings['features']:.3f}; fit {fit_s:.1f} s"
        )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    print(json.dumps(out, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
