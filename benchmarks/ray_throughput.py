"""Batch throughput (cases per minute) of the local engine and of the Ray engine with 1, 2... workers,
measured side by side in one run on the same cases, bank and machine.

The first ``--n-normals`` volumes of ``--data`` form the normal bank (built once, before timing); the
next ``--n-cases`` are the cases. Every configuration processes all cases into its own output folder.
One local Ray cluster (``--cpus`` CPUs) serves every Ray configuration. For each it prints the wall
time of the whole batch (worker start included), the throughput after the first worker was ready,
the mean seconds per case inside a worker, and checks that the scores equal the local engine's.

    python benchmarks/ray_throughput.py --data ../shared/data/ixi-t1-normals --n-normals 3 --n-cases 6 \\
        --model ../shared/models/dinov3-vits16-standin --resolution 224 --workers 1,2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder of volumes: normals first, then cases")
    ap.add_argument("--n-normals", type=int, default=3)
    ap.add_argument("--n-cases", type=int, default=6)
    ap.add_argument("--model", required=True)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--method", default="himatch")
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to measure, comma separated")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray cluster")
    ap.add_argument("--no-local", action="store_true", help="skip the local engine")
    ap.add_argument("--cache-dir", default=None, help="bank cache to keep between runs (default: a temporary one)")
    args = ap.parse_args()

    import ray
    import torch

    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.batch.runner import run_batch
    from HiMatchADLib.io.discovery import list_images
    from HiMatchADLib.io.readers import read_image
    from HiMatchADLib.features.slicing import prepare_volume

    files = list_images(args.data)
    if len(files) < args.n_normals + args.n_cases:
        raise SystemExit(f"{args.data} has {len(files)} volumes; need {args.n_normals + args.n_cases}")
    work = Path(tempfile.mkdtemp(prefix="himatchad-ray-bench-"))
    normals, cases = work / "normals", work / "cases"
    normals.mkdir()
    cases.mkdir()
    for p in files[: args.n_normals]:
        os.symlink(p.resolve(), normals / p.name)
    for p in files[args.n_normals : args.n_normals + args.n_cases]:
        os.symlink(p.resolve(), cases / p.name)
    slices = sum(prepare_volume(read_image(p), "auto", "auto").n_slices for p in sorted(cases.iterdir()))

    det = HiMatchDetector(model=args.model, method=args.method, resolution=args.resolution, cache_dir=args.cache_dir or work / "cache")
    t = time.perf_counter()
    det.fit(normals)
    print(f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, resolution {args.resolution}, method {args.method}")
    print(f"bank: {args.n_normals} volumes ({det.fit_info['slices']} slices) in {time.perf_counter() - t:.1f} s; "
          f"cases: {args.n_cases} volumes, {slices} slices")

    configs = ([("local", None)] if not args.no_local else []) + [("ray", int(w)) for w in args.workers.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False, logging_level="ERROR")
    results = []
    reference = None
    try:
        for engine, workers in configs:
            out = work / f"out-{engine}-{workers or 1}"
            first: list = []

            def progress(message, done, total):
                if message.startswith("Case") and not first:
                    first.append(time.perf_counter())

            options = {"workers": workers, "cpus_per_worker": max(1, args.cpus // workers)} if engine == "ray" else None
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            rows = run_batch(det, cases, out, progress=progress, log=lambda m: None, engine=engine, engine_options=options)
            wall = time.perf_counter() - t0
            steady = (t0 + wall) - first[0]
            bad = [r["case"] for r in rows if r["status"] != "ok"]
            if bad:
                raise SystemExit(f"{engine} x{workers}: cases not ok: {bad}")
            scores = [float(r["volume_score"]) for r in rows]
            if reference is None:
                reference = scores
            same = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(scores, reference))
            per_case = sum(float(r["seconds"]) for r in rows) / len(rows)
            name = "local (1 process)" if engine == "local" else f"ray, {workers} worker{'s' if workers > 1 else ''} x {options['cpus_per_worker']} CPU"
            load = f"{load0:.1f}/{os.getloadavg()[0]:.1f}"
            results.append((name, wall, len(rows) / wall * 60, len(rows) / steady * 60, per_case, slices / len(rows) / per_case, same, load))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'engine':<28} {'wall s':>8} {'cases/min':>10} {'cases/min*':>11} {'s/case':>8} {'slices/s/worker':>16} {'max rel. score diff':>20} {'load before/after':>18}")
    for name, wall, cpm, steady_cpm, per_case, sps, same, load in results:
        print(f"{name:<28} {wall:8.1f} {cpm:10.2f} {steady_cpm:11.2f} {per_case:8.1f} {sps:16.2f} {same:20.1e} {load:>18}")
    print("cases/min: whole batch incl. starting the workers; cases/min*: after the first worker was ready; "
          "s/case: mean time of one case inside its worker; load: 1-minute load average of the machine")


if __name__ == "__main__":
    main()
