"""How long a "mark as normal" takes to become active, and what it costs the next detection.

For each method: a bank of the first N volumes, a detection of the next one, then a mark of
``--slices`` consecutive slices around its most anomalous one (their foreground). Prints the time of
the mark (reading and preparing the case, the model on the marked slices, writing the entry), the
entry's size, the first detection after it (which reads, verifies and clusters the entry) and the
detection time with and without the entry in alternation (``--repeat`` rounds, fastest kept), and
the change of the marked slices' scores.

    python benchmarks/feedback.py --normals ../shared/data/ixi-t1-normals --n-normals 3 \
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
    ap.add_argument("--n-normals", type=int, default=3, help="first N volumes form the bank; the next one is the case")
    ap.add_argument("--model", required=True)
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--methods", default="himatch,knn,dpmm")
    ap.add_argument("--slices", type=int, default=5, help="consecutive slices marked")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()

    import numpy as np
    import torch

    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.io.discovery import list_images

    files = list_images(args.normals)
    work = Path(tempfile.mkdtemp(prefix="himatchad-feedback-"))
    bank_dir = work / "normals"
    bank_dir.mkdir()
    for p in files[: args.n_normals]:
        shutil.copy2(p, bank_dir / p.name)
    case = files[args.n_normals]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, resolution {args.resolution}; bank {args.n_normals} volumes, case {case.name}")
    rows = {}
    for method in args.methods.split(","):
        det = HiMatchDetector(model=args.model, method=method, resolution=args.resolution, cache_dir=work / "cache")
        det.fit(bank_dir)
        det.feedback_dir = work / f"feedback-{method}"
        before = det.predict(case)  # also the warm-up
        top = int(np.nanargmax(before.slice_scores))
        half = args.slices // 2
        marked = [i for i in range(top - half, top - half + args.slices) if 0 <= i < len(before.slice_scores)]
        t = time.perf_counter()
        entry = det.mark_normal(case, slices=marked, note="benchmark")
        mark_s = time.perf_counter() - t
        t = time.perf_counter()
        after = det.predict(case)  # reads, verifies and clusters the new entry
        first_s = time.perf_counter() - t
        with_s, without_s = [], []
        for _ in range(args.repeat):
            det.use_feedback = True
            t = time.perf_counter()
            det.predict(case)
            with_s.append(time.perf_counter() - t)
            det.use_feedback = False
            t = time.perf_counter()
            det.predict(case)
            without_s.append(time.perf_counter() - t)
        det.use_feedback = True
        size = sum(p.stat().st_size for p in det.feedback_folder.glob(f"entry-{entry['id']}.*"))
        rows[method] = {
            "marked_slices": len(marked), "marked_patches": entry["region"]["patches"], "entry_kib": round(size / 1024, 1),
            "mark_s": round(mark_s, 3), "first_detect_after_s": round(first_s, 3),
            "detect_with_s": round(min(with_s), 3), "detect_without_s": round(min(without_s), 3),
            "with_over_without": round(min(with_s) / min(without_s), 3),
            "marked_slice_score_before": round(float(np.nanmean(before.slice_scores[marked])), 4),
            "marked_slice_score_after": round(float(np.nanmean(after.slice_scores[marked])), 4),
            "threshold": round(float(before.threshold), 4), "threshold_after": round(float(after.threshold), 4),
        }
        r = rows[method]
        print(
            f"{method:8s} mark {r['mark_s']:.2f} s ({r['marked_slices']} slices, {r['marked_patches']} patches, {r['entry_kib']} KiB); "
            f"first detect after {r['first_detect_after_s']:.2f} s; detect with/without {r['detect_with_s']:.2f}/{r['detect_without_s']:.2f} s "
            f"(x{r['with_over_without']}); marked slices' score {r['marked_slice_score_before']} -> {r['marked_slice_score_after']} "
            f"(threshold {r['threshold']} -> {r['threshold_after']})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
