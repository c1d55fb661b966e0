"""kNN indexes of the ``knn`` mode: build time, search time, recall@1 against the exact search, memory.

Builds (or loads from the cache) the normal bank of a data set's normal folder, extracts the
last-stage tokens of a subset of its test slices (evenly spaced, normal and anomalous), and for each
index (exact, ivf, hnsw) measures, in the same run on the same query tokens:

- build: seconds to build the index from the bank (ivf/hnsw: without a persisted copy; the time to
  load the persisted copy is given too) and its memory (exact: the float32 tokens; ivf/hnsw: the
  bytes of the persisted index, which holds what the index keeps in memory);
- search: seconds per query slice, searching batches of ``--batch-size`` slices at a time as
  ``predict`` does (``--repeat`` rounds, indexes interleaved, the fastest round of each kept), and the
  ratio to the exact search;
- recall@1: fraction of query tokens whose returned similarity equals the exact maximum within 1e-5
  (all tokens, and the 1 % most anomalous ones, which decide slice scores), the mean |patch score
  difference| and the largest |slice score difference| (top 1 % mean);
- calibration searches (each held-out slice without its own subject): recall and seconds per slice,
  for the searches the detector runs, and for faiss's HNSW graph search with the subject filter (which
  the detector does not use; see ``HiMatchADLib/knn_index.py``).

    OMP_NUM_THREADS=1 python benchmarks/knn_index.py --data ../shared/data/lgg-flair-dev \\
        --model ../shared/models/dinov3-vits16-standin --resolution 224 --queries 40

The bank is cached (``--cache-dir``, default the detector's cache), so only the first run builds it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _table(rows: list, cols: list) -> str:
    out = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in cols) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lgg-flair-dev"), help="data set (BMAD or volumes layout)")
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "dinov3-vits16-standin"))
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--cache-dir", default=None, help="bank cache (default: the detector's)")
    ap.add_argument("--queries", type=int, default=40, help="test images whose slices are the queries (evenly spaced)")
    ap.add_argument("--calibration-subjects", type=int, default=6, help="subjects whose slices are searched without their subject")
    ap.add_argument("--calibration-slices", type=int, default=8, help="slices per such subject")
    ap.add_argument("--batch-size", type=int, default=8, help="query slices per search call (predict's batch)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kinds", default="exact,ivf,hnsw")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()

    import faiss

    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.methods import knn_index as ki
    from HiMatchADLib.bank.build import build_or_load
    from HiMatchADLib.evaluation.datasets import load_dataset
    from HiMatchADLib.io.readers import read_image
    from HiMatchADLib.features.slicing import prepare_volume
    from HiMatchADLib.methods.maps import top_percent_mean

    ds = load_dataset(args.data, max_test=args.queries)
    det = HiMatchDetector(model=args.model, method="knn", resolution=args.resolution, cache_dir=args.cache_dir, device="cpu")
    det._ensure_extractor()
    t = time.perf_counter()
    bank = build_or_load(ds.normal_dir, det.extractor, det._bank_settings(ds.normal_dir), det.cache_dir, det.reporter)
    bank_s = time.perf_counter() - t
    det.bank = bank
    n, d = bank.tokens.shape
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, faiss threads {faiss.omp_get_max_threads()}")
    print(f"bank: {bank.n_slices} normal slices of {ds.normal_dir}, {n} tokens x {d} (model {args.model}, {args.resolution} px); ready in {bank_s:.1f} s")

    # Query tokens: the foreground patch tokens of the chosen test slices, as predict() extracts them.
    slices = []
    for case in ds.cases:
        prep = prepare_volume(read_image(case.image), **det._prep_settings())
        qs, _ = det._queries(prep, prep.slices_with_foreground())
        slices += [q.tokens[-1] for q in qs]
    batches = [np.ascontiguousarray(np.concatenate(slices[i : i + args.batch_size])) for i in range(0, len(slices), args.batch_size)]
    n_q = sum(s.shape[0] for s in slices)
    print(f"queries: {len(slices)} slices of {len(ds.cases)} test images ({ds.n_anomalous} anomalous), {n_q} tokens; batches of {args.batch_size} slices")

    # Calibration-like queries: slices of a few subjects, each searched without its own subject.
    rng = np.random.default_rng(0)
    groups = np.asarray(bank.slice_group)
    subjects = rng.choice(np.unique(groups), min(args.calibration_subjects, len(np.unique(groups))), replace=False)
    cal = []
    for g in subjects:
        members = np.flatnonzero(groups == g)
        members = members[np.linspace(0, members.size - 1, min(args.calibration_slices, members.size)).round().astype(int)]
        q = np.concatenate([np.asarray(bank.slice_tokens(i), np.float32) for i in members])
        cal.append((int(g), len(members), q, np.repeat(groups != g, np.diff(bank.tok_offsets))))
    n_cal = sum(c[1] for c in cal)

    kinds = [ki.check_knn_index(k) for k in args.kinds.split(",")]
    if "exact" not in kinds:
        kinds.insert(0, "exact")
    rows = {k: {"index": k} for k in kinds}
    searchers = {}
    for kind in kinds:
        bank._cache.clear()
        for p in bank.root.glob(f"knn_{kind}_*"):
            p.unlink()  # time a build, not a load
        t = time.perf_counter()
        s = ki.open_index(bank, kind)
        rows[kind]["build_s"] = time.perf_counter() - t
        if kind == "exact":
            rows[kind]["bytes"] = n * d * 4
        else:
            path = next(bank.root.glob(f"knn_{kind}_*.faiss"))
            rows[kind]["bytes"] = path.stat().st_size
            bank._cache.clear()
            t = time.perf_counter()
            s = ki.open_index(bank, kind)
            rows[kind]["load_s"] = time.perf_counter() - t
            assert s.info["how"] == "loaded"
        rows[kind]["params"] = ", ".join(f"{k}={v}" for k, v in s.params.items() if k != "kmeans_iterations") or "-"
        searchers[kind] = s

    best = {k: float("inf") for k in kinds}
    sims = {}
    for _ in range(max(1, args.repeat)):  # interleaved: every index sees the same machine
        for kind in kinds:
            t = time.perf_counter()
            out = [searchers[kind].max_sim(b) for b in batches]
            best[kind] = min(best[kind], time.perf_counter() - t)
            sims[kind] = np.concatenate(out)
    ex = sims["exact"]
    off = np.cumsum([0] + [s.shape[0] for s in slices])
    ex_slice = np.array([top_percent_mean(1.0 - ex[a:b]) for a, b in zip(off[:-1], off[1:])])
    for kind in kinds:
        r = rows[kind]
        r["search_ms"] = 1000 * best[kind] / len(slices)
        r["ratio"] = best[kind] / best["exact"]
        r["recall"] = float(np.mean(np.abs(sims[kind] - ex) <= 1e-5))
        top = ex <= np.quantile(ex, 0.01)  # the 1 % most anomalous tokens (lowest exact similarity)
        r["recall_top1"] = float(np.mean(np.abs(sims[kind] - ex)[top] <= 1e-5))
        r["mean_diff"] = float(np.mean(np.abs(sims[kind] - ex)))
        sl = np.array([top_percent_mean(1.0 - sims[kind][a:b]) for a, b in zip(off[:-1], off[1:])])
        r["slice_diff"] = float(np.max(np.abs(sl - ex_slice)))
        r["above_exact"] = int(np.sum(sims[kind] > ex + 1e-5))  # must be 0: every value is a real cosine

    # Calibration searches (without the query's subject).
    cal_sims, cal_t = {}, {}
    for kind in kinds:
        t = time.perf_counter()
        cal_sims[kind] = [searchers[kind].max_sim(q, keep) for _, _, q, keep in cal]
        cal_t[kind] = time.perf_counter() - t
    cal_rows = []
    cal_ex = np.concatenate(cal_sims["exact"])
    for kind in kinds:
        got = np.concatenate(cal_sims[kind])
        cal_rows.append({"search": kind, "recall": float(np.mean(np.abs(got - cal_ex) <= 1e-5)), "mean_diff": float(np.mean(np.abs(got - cal_ex))), "ms": 1000 * cal_t[kind] / n_cal})
    if "hnsw" in kinds:  # faiss's filtered graph search, which the detector does not use
        h = searchers["hnsw"]
        t = time.perf_counter()
        got = []
        for _, _, q, keep in cal:
            sel, _bitmap = ki.keep_selector(keep)
            D, _ = h.index.search(q, 1, params=faiss.SearchParametersHNSW(sel=sel, efSearch=int(h.params["efSearch"])))
            got.append(D[:, 0])
        got = np.concatenate(got)
        cal_rows.append({"search": "hnsw graph + selector (not used)", "recall": float(np.mean(np.abs(got - cal_ex) <= 1e-5)), "mean_diff": float(np.mean(np.abs(got - cal_ex))), "ms": 1000 * (time.perf_counter() - t) / n_cal})

    print()
    print(_table(list(rows.values()), [
        ("index", "{}"), ("params", "{}"), ("build_s", "{:.1f}"), ("load_s", "{:.2f}"), ("bytes", "{:,}"),
        ("search_ms", "{:.1f}"), ("ratio", "{:.3f}"), ("recall", "{:.4f}"), ("recall_top1", "{:.4f}"), ("mean_diff", "{:.2e}"), ("slice_diff", "{:.2e}"), ("above_exact", "{}"),
    ]))
    print()
    print(f"Calibration searches ({n_cal} slices of {len(cal)} subjects, each without its own subject):")
    print()
    print(_table(cal_rows, [("search", "{}"), ("ms", "{:.1f}"), ("recall", "{:.4f}"), ("mean_diff", "{:.2e}")]))
    print()
    print("search_ms: per query slice (fastest of the rounds); ratio: to exact; recall: recall@1 vs exact (|diff| <= 1e-5); "
          "recall_top1: the same over the 1 % most anomalous query tokens; mean_diff: mean |patch score difference|; "
          "slice_diff: largest |slice score difference| (top 1 % mean); above_exact: similarities above the exact maximum "
          "(must be 0); bytes: index memory")
    if args.json:
        Path(args.json).write_text(json.dumps({"bank_tokens": n, "dim": d, "query_slices": len(slices), "query_tokens": n_q, "rows": list(rows.values()), "calibration": cal_rows}, indent=1))


if __name__ == "__main__":
    main()
