"""Backbone precision side by side: fp32, bf16 and int8 on the same data, in one run.

For each precision (``--precisions``, fp32 first: every other one is compared with it):

(a) speed, each as a ratio to fp32 in the same run:
    - forward: the backbone alone on one batch set of ``--n-slices`` IXI slices (model input
      already prepared; the fastest of ``--repeat`` rounds, the precisions taken in turn in each
      round so they see the same machine);
    - detect: the whole ``himatchad detect`` process (Python start, model load and, for int8,
      quantisation, bank and calibration from the cache, prediction, writing) on a slab of
      ``--n-slices`` slices of a held-out IXI volume, the bank already cached (a first, untimed
      run of the same command builds it); the fastest of ``--repeat`` rounds, the precisions in
      turn; with, for reference, the detector's own prediction time inside that process
      ("predict s": features, matching, fusion);
(b) token agreement with fp32: cosine of every patch token of every default stage on those IXI
    slices, its median and 1st percentile (all stages pooled) and the 1st percentile of the worst
    stage;
(c) evaluation: pixel AUROC on a small LGG FLAIR subset (``--max-normals`` normals,
    ``--max-cases`` test slices) and the Spearman rank correlation of each precision's heatmaps
    with fp32's over the pixels either map scores (non-zero), all cases pooled, and the median over
    cases.

On a random-weight stand-in model (../shared/models/dinov3-vits16-standin) the speeds are honest,
the detection numbers are not (its features are random projections); the agreement with fp32
says how much the precision changes what the detector computes. Run it on an otherwise idle
machine with a fixed thread count::

    OMP_NUM_THREADS=1 python benchmarks/precision.py --resolution 224 --n-slices 8 --max-cases 12

Prints a Markdown table (and, with ``--json``, writes every number to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _slices(files, n_slices: int, modality: str = "mri"):
    """``n_slices`` foreground slices evenly spaced over the volumes ``files`` (canonical, in [0, 1])."""
    from HiMatchADLib.io.readers import read_image
    from HiMatchADLib.features.slicing import prepare_volume

    pool = []
    for f in files:
        prep = prepare_volume(read_image(f), modality, "auto")
        pool += [prep.canonical[i] for i in prep.slices_with_foreground(min_pixels=prep.native_foreground[0].size // 10)]
    idx = np.linspace(0, len(pool) - 1, min(n_slices, len(pool))).round().astype(int)
    return np.stack([pool[i] for i in idx])


def _slab(src: Path, dst: Path, n_slices: int) -> Path:
    """The ``n_slices`` central slices (along the detector's slicing axis) of ``src``, with their geometry."""
    import SimpleITK as sitk

    from HiMatchADLib.io.readers import read_image
    from HiMatchADLib.features.slicing import prepare_volume

    axis = prepare_volume(read_image(src), "mri", "auto").slice_axis_input  # numpy (z, y, x) axis
    img = sitk.ReadImage(str(src))
    size = img.GetSize()[2 - axis]
    lo = max(0, size // 2 - n_slices // 2)
    index = [slice(None)] * 3
    index[2 - axis] = slice(lo, min(size, lo + n_slices))
    sitk.WriteImage(img[tuple(index)], str(dst))
    return dst


def _cosines(ref, other) -> dict:
    per_stage = [(a * b).sum(-1).ravel() for a, b in zip(ref.stages, other.stages)]
    pooled = np.concatenate(per_stage)
    return {
        "cos_median": float(np.median(pooled)),
        "cos_p1": float(np.percentile(pooled, 1)),
        "cos_p1_worst_stage": float(min(np.percentile(c, 1) for c in per_stage)),
        "cls_cos_min": float((ref.cls * other.cls).sum(-1).min()),
    }


def forward_and_tokens(args, precisions, ixi_files) -> dict:
    """(a) forward time and (b) token cosines on the same IXI slices."""
    import torch

    from HiMatchADLib.features.extractor import FeatureExtractor, Features
    from HiMatchADLib.features.canvas import to_model_input

    slices = _slices(ixi_files, args.n_slices)
    extractors = {p: FeatureExtractor(args.model, "cpu", resolution=args.resolution, batch_size=args.batch_size, precision=p) for p in precisions}
    first = extractors[precisions[0]]
    x = to_model_input(slices, first.grid_for(*slices.shape[1:]))
    batches = [x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    for ex in extractors.values():
        ex.forward(batches[0][:1])  # warm-up (allocations, kernel selection)
    best = {p: float("inf") for p in precisions}
    for _ in range(max(1, args.repeat)):
        for p, ex in extractors.items():
            t = time.perf_counter()
            for b in batches:
                ex.forward(b)
            best[p] = min(best[p], time.perf_counter() - t)
    feats = {}
    for p, ex in extractors.items():
        out = [ex.forward(b) for b in batches]
        feats[p] = Features([np.concatenate([o.stages[s] for o in out]) for s in range(len(ex.stages))], np.concatenate([o.cls for o in out]), out[0].grid)
    res = {"slices": int(len(x)), "input": list(x.shape[-2:]), "stages": first.stages, "torch_threads": torch.get_num_threads()}
    for p in precisions:
        res[p] = {"forward_s": best[p], **_cosines(feats[precisions[0]], feats[p])}
    return res


def detect_process(args, precisions, ixi_files, work: Path) -> dict:
    """(a) the whole ``himatchad detect`` process with the bank cached."""
    normals = work / "ixi-normals"
    normals.mkdir()
    for f in ixi_files[: args.n_normals]:
        os.symlink(f.resolve(), normals / f.name)
    query = _slab(ixi_files[args.n_normals], work / "query.nii.gz", args.n_slices)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "HF_HUB_OFFLINE": "1"}
    def command(p):
        return [
            sys.executable, "-m", "HiMatchADLib", "--quiet", "detect", str(query), "--normals", str(normals),
            "--out-dir", str(work / f"detect-{p}"), "--model", args.model, "--resolution", str(args.resolution),
            "--method", args.method, "--device", "cpu", "--precision", p, "--cache-dir", str(work / "cache"),
            "--slice-step", str(args.slice_step), "--batch-size", str(args.batch_size),
        ]

    def run(p) -> float:
        t = time.perf_counter()
        done = subprocess.run(command(p), env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"detect ({p}) failed: {done.stderr.strip()[-2000:]}")
        return seconds

    for p in precisions:
        run(p)  # untimed: builds the bank and the calibration of this precision
    out = {p: {"detect_s": float("inf")} for p in precisions}
    for _ in range(max(1, args.repeat)):  # the precisions in turn, so each round sees the same machine
        for p in precisions:
            seconds = run(p)
            if seconds < out[p]["detect_s"]:
                scores = json.loads(next((work / f"detect-{p}").glob("*_scores.json")).read_text())
                if scores["settings"]["precision"] != p:
                    raise SystemExit(f"detect ran in {scores['settings']['precision']}, not {p}")
                out[p] = {"detect_s": seconds, "predict_s": scores["timings_s"]["total"]}
    return out


def lgg_agreement(args, precisions, work: Path) -> dict:
    """(c) pixel AUROC on an LGG subset and heatmap rank agreement with fp32."""
    import warnings

    from scipy.stats import spearmanr

    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.evaluation.datasets import load_dataset
    from HiMatchADLib.evaluation import normals_folder
    from HiMatchADLib.evaluation.inputs import read_mask
    from HiMatchADLib.evaluation.metrics import PixelAccumulator

    ds = load_dataset(args.lgg, max_normals=args.max_normals, max_test=args.max_cases)
    folder = normals_folder(ds.normals, ds.normal_dir, work / "cache")
    maps: dict = {}
    out = {"normals": len(ds.normals), "cases": len(ds.cases), "anomalous": ds.n_anomalous}
    for p in precisions:
        det = HiMatchDetector(model=args.model, method=args.method, resolution=args.resolution, device="cpu", precision=p,
                              batch_size=args.batch_size, cache_dir=work / "cache")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det.fit(folder)
        acc = PixelAccumulator(keep_curves=False)
        maps[p] = []
        for case in ds.cases:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = det.predict(case.image)
            maps[p].append(res.heatmap.astype(np.float32))
            acc.add(res.heatmap, read_mask(case, res.heatmap.shape))
        # Pixels scored by either map: the background is 0 in both and would only add ties.
        pairs = [(a[(a != 0) | (b != 0)], b[(a != 0) | (b != 0)]) for a, b in zip(maps[precisions[0]], maps[p])]
        per_case = [spearmanr(a, b)[0] for a, b in pairs if a.size > 2]
        out[p] = {
            "pixel_auroc": acc.compute().pixel_auroc,
            "spearman_pooled": float(spearmanr(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs]))[0]),
            "spearman_case_median": float(np.nanmedian(per_case)) if per_case else float("nan"),
        }
    return out


def table(precisions, fwd, det, lgg) -> str:
    base = precisions[0]
    head = [
        "precision", "forward s", "forward / fp32", "detect s", "detect / fp32", "predict s",
        "token cos median", "token cos p1", "p1 worst stage", "CLS cos min",
        "LGG pixel AUROC", "heatmap Spearman (pooled)", "heatmap Spearman (case median)",
    ]
    rows = []
    for p in precisions:
        f, d, g = fwd[p], det.get(p, {}), lgg.get(p, {})
        rows.append([
            p, f"{f['forward_s']:.2f}", f"{f['forward_s'] / fwd[base]['forward_s']:.2f}",
            f"{d['detect_s']:.1f}" if d else "-", f"{d['detect_s'] / det[base]['detect_s']:.2f}" if d else "-",
            f"{d['predict_s']:.2f}" if d else "-",
            f"{f['cos_median']:.5f}", f"{f['cos_p1']:.5f}", f"{f['cos_p1_worst_stage']:.5f}", f"{f['cls_cos_min']:.5f}",
            f"{g['pixel_auroc']:.4f}" if g else "-", f"{g['spearman_pooled']:.5f}" if g else "-",
            f"{g['spearman_case_median']:.5f}" if g else "-",
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "dinov3-vits16-standin"))
    ap.add_argument("--ixi", default=str(SHARED / "data" / "ixi-t1-normals"), help="folder of normal T1 volumes")
    ap.add_argument("--lgg", default=str(SHARED / "data" / "lgg-flair-dev"), help="BMAD-layout LGG FLAIR folder ('' to skip (c))")
    ap.add_argument("--precisions", default="fp32,bf16,int8", help="comma-separated; fp32 first (the reference)")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--n-slices", type=int, default=8, help="IXI slices of the forward timing and of the detect query slab")
    ap.add_argument("--n-normals", type=int, default=2, help="IXI volumes in the bank of the detect timing")
    ap.add_argument("--slice-step", type=int, default=4, help="bank every n-th normal slice of the detect timing")
    ap.add_argument("--max-normals", type=int, default=60, help="LGG normal slices in the bank")
    ap.add_argument("--max-cases", type=int, default=12, help="LGG test slices")
    ap.add_argument("--method", default="himatch")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timing rounds of the forward and of detect (the fastest is kept)")
    ap.add_argument("--skip-detect", action="store_true", help="leave out the whole-process detect timing")
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args()

    import torch

    from HiMatchADLib.features.backbone import check_precision, cpu_flags, resolve_precision
    from HiMatchADLib.io.discovery import list_images

    precisions = [check_precision(p.strip()) for p in args.precisions.split(",") if p.strip()]
    if precisions[0] != "fp32" or "auto" in precisions:
        raise SystemExit("--precisions: concrete precisions, fp32 first (the reference)")
    ixi_files = list_images(args.ixi)
    if len(ixi_files) < args.n_normals + 1:
        raise SystemExit(f"{args.ixi}: need at least {args.n_normals + 1} volumes")
    flags = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx") or f in ("avx2", "avx512_f"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
          f"CPU flags {', '.join(flags) or '-'}; auto -> {resolve_precision('auto', 'cpu')} here")
    print(f"model {args.model}, resolution {args.resolution}, method {args.method}")
    work = Path(tempfile.mkdtemp(prefix="himatchad-precision-"))
    try:
        t0 = time.perf_counter()
        fwd = forward_and_tokens(args, precisions, ixi_files)
        print(f"(a, b) {fwd['slices']} IXI slices at {fwd['input'][0]}x{fwd['input'][1]} px, stages {fwd['stages']}: {time.perf_counter() - t0:.0f} s", flush=True)
        det = {}
        if not args.skip_detect:
            t0 = time.perf_counter()
            det = detect_process(args, precisions, ixi_files, work)
            print(f"(a) detect: bank of {args.n_normals} IXI volumes (every {args.slice_step}th slice), query slab of "
                  f"{args.n_slices} slices: {time.perf_counter() - t0:.0f} s", flush=True)
        lgg = {}
        if args.lgg:
            t0 = time.perf_counter()
            lgg = lgg_agreement(args, precisions, work)
            print(f"(c) LGG: {lgg['normals']} normals, {lgg['cases']} test slices ({lgg['anomalous']} with tumour): {time.perf_counter() - t0:.0f} s", flush=True)
        print()
        print(table(precisions, fwd, det, lgg))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "forward_tokens": fwd, "detect": det, "lgg": lgg}, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
