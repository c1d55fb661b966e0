"""Time to first slice of ``himatchad detect`` with a cached bank, for one or more copies of the code.

    python benchmarks/startup.py --model ../shared/models/dinov3-vits16-standin --repeat 5 \
        [--other /path/to/another/checkout ...]

Each run is a fresh process (``python -m HiMatchADLib detect ...``) whose stderr is read as it is
written; the times are taken when the progress messages first appear: ``model`` = process start
to "Loading model", ``first_slice`` = process start to "Matching slices" (the model loaded, the bank
and calibration read, the query prepared), ``total`` = process end. The bank and calibration are
built once beforehand (not timed), so every timed run loads them from the cache. Runs of the
checkouts alternate, and the median of ``--repeat`` runs is printed with the ratio to the first
checkout, so that a comparison is side by side on the same machine and data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKS = {"model": "Loading model", "first_slice": "Matching slices"}


def make_data(folder: Path) -> tuple:
    sys.path.insert(0, str(REPO))
    from HiMatchADLib.evaluation.phantom import write_demo_dataset

    d = write_demo_dataset(folder, n_normals=4, shape=(24, 96, 96))
    return d["normals"], d["query"]


def run_once(checkout: Path, args: list) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "HiMatchADLib", *args], cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, text = {}, b""
    while True:
        chunk = p.stderr.read1(4096) if hasattr(p.stderr, "read1") else p.stderr.read(1)
        if not chunk:
            break
        text += chunk
        for key, mark in MARKS.items():
            if key not in seen and mark.encode() in text:
                seen[key] = time.perf_counter() - t0
    p.wait()
    if p.returncode != 0:
        raise SystemExit(f"{checkout}: exit {p.returncode}\n{text.decode(errors='replace')[-2000:]}")
    seen["total"] = time.perf_counter() - t0
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--other", action="append", default=[], type=Path, help="another checkout to time beside this one")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--method", default="knn")
    a = ap.parse_args()
    checkouts = [REPO] + [p.resolve() for p in a.other]
    with tempfile.TemporaryDirectory(prefix="himatchad-startup-") as tmp:
        tmp = Path(tmp)
        normals, query = make_data(tmp / "data")
        common = ["detect", str(query), "--normals", str(normals), "--model", str(Path(a.model).resolve()), "--resolution", str(a.resolution),
                  "--method", a.method, "--device", "cpu"]
        runs = {c: [] for c in checkouts}
        for c in checkouts:  # one cache per checkout, built before timing
            run_once(c, common + ["--cache-dir", str(tmp / f"cache{checkouts.index(c)}"), "--out-dir", str(tmp / "warm")])
        for r in range(a.repeat):
            for c in (checkouts if r % 2 == 0 else checkouts[::-1]):
                runs[c].append(run_once(c, common + ["--cache-dir", str(tmp / f"cache{checkouts.index(c)}"), "--out-dir", str(tmp / f"o{r}")]))
    base = {k: statistics.median(x[k] for x in runs[REPO]) for k in ("model", "first_slice", "total")}
    print(f"{'checkout':<40} {'to model s':>10} {'first slice s':>14} {'total s':>8} {'first slice / this':>19}")
    for c in checkouts:
        med = {k: statistics.median(x[k] for x in runs[c]) for k in ("model", "first_slice", "total")}
        print(f"{str(c)[-40:]:<40} {med['model']:>10.2f} {med['first_slice']:>14.2f} {med['total']:>8.2f} {med['first_slice'] / base['first_slice']:>19.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
