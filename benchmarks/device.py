"""Accelerator check: backbone speed, detect wall time, peak memory and bf16 agreement on one GPU.

On a CUDA GPU (or Apple MPS) machine, from the repository root::

    PYTHONPATH=. python benchmarks/device.py --json device.json

measures, within ``--budget-s`` seconds (default 280; configurations that no longer fit are skipped
and listed as such):

1. forward: ms per slice of the backbone forward pass (:class:`FeatureExtractor.forward`, every
   stage it extracts, tokens back on the host) for fp32 and bf16 at each of ``--resolutions``
   (default 224, 448, 512 px), on ``--n-slices`` foreground slices of the normal volumes in
   batches of ``--batch-size``; one untimed warm-up pass, then ``--repeat`` timed passes, the
   device synchronised around each, the median reported; with the cosine of every bf16 patch token
   with its fp32 counterpart (median, 1st percentile);
2. detect: the whole ``himatchad detect`` process (Python start, model load, bank and calibration
   from the cache, prediction, writing) on a slab of ``--n-slices`` slices of a held-out volume,
   for fp32 and bf16, the bank built in ``--work`` by a first, untimed run; the median of
   ``--detect-repeat`` runs (precisions in turn), against the forward floor: the forward passes
   alone, in the same precision and at the same resolution, on the very model inputs detect feeds
   the backbone (recorded during one in-process prediction of the same query): wall / floor is
   what a user waits against the forward passes, predict / floor what detection costs beyond its
   forward passes (``timings_s.total`` of the scores JSON: features, matching, maps, fusion);
3. peak device memory of each configuration (``torch.cuda.max_memory_allocated``, reset before
   it; in the detect process, read when it ends; on MPS the largest
   ``torch.mps.current_allocated_memory`` seen after a batch);
4. Spearman rank agreement of the bf16 detect heatmap with the fp32 one (pixels either scores, and
   the per-slice scores).

``--normals`` defaults to ../shared/data/ixi-t1-normals when present, else phantom volumes as
``himatchad demo`` makes them. The default model, ../shared/models/dinov3-vits16-standin, has
random weights: speed and memory are those of the real ViT-S/16, agreements say how much bf16
changes what the detector computes. ``--device cpu`` runs the same measurements on the CPU (a
smoke check; memory "n/a")::

    PYTHONPATH=. python benchmarks/device.py --device cpu --resolutions 224 --budget-s 120

Prints the machine, the library versions, the precision support, a Markdown table and, with
``--json FILE``, every number to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from benchmarks.precision import _cosines, _slab, _slices  # noqa: E402

#: ``himatchad detect`` in a process of its own, writing the process's peak CUDA memory at exit
#: (argv: PEAK_FILE, then the command line's arguments).
DETECT_PROCESS = (
    "import json, sys\n"
    "from HiMatchADLib.cli import main\n"
    "rc = main(sys.argv[2:])\n"
    "torch = sys.modules.get('torch')\n"
    "peak = torch.cuda.max_memory_allocated() if torch is not None and torch.cuda.is_initialized() else None\n"
    "open(sys.argv[1], 'w').write(json.dumps({'peak_bytes': peak}))\n"
    "sys.exit(rc)\n"
)

PRECISIONS = ("fp32", "bf16")


# ------------------------------------------------------------------------------------- budget
class Budget:
    """Seconds left of ``--budget-s``; what did not fit is recorded and said."""

    def __init__(self, seconds: float, reserve: float = 3.0):
        self.t0 = time.perf_counter()
        self.seconds = float(seconds)
        self.reserve = reserve
        self.skipped: list = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, what: str, estimate_s: float) -> bool:
        if self.left() - self.reserve >= estimate_s:
            return True
        msg = f"{what}: skipped, budget nearly spent (needs ~{estimate_s:.0f} s, {max(self.left(), 0):.0f} s of {self.seconds:.0f} s left)"
        self.skipped.append(msg)
        print(msg, flush=True)
        return False


# ------------------------------------------------------------------------------------- device
def pick_device(name: str) -> str:
    import torch

    from HiMatchADLib.core.errors import HiMatchADError
    from HiMatchADLib.features.backbone import resolve_device

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        raise SystemExit("no accelerator: torch sees neither a CUDA GPU nor Apple MPS; pass --device cpu for a CPU smoke check")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise SystemExit("--device mps: torch reports MPS unavailable on this machine")
        return "mps"
    try:
        return resolve_device(name)  # cpu, cuda, cuda:N
    except HiMatchADError as exc:
        raise SystemExit(f"--device {name}: {exc}") from None


def _sync(kind: str) -> None:
    import torch

    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "synchronize"):
        torch.mps.synchronize()


class DeviceMemory:
    """Peak device memory of one configuration, MiB (None on CPU or where torch cannot say)."""

    def __init__(self, kind: str, device: str):
        self.kind, self.device = kind, device
        self.start = self.peak = None

    def _now(self):
        import torch

        if self.kind == "cuda":
            return torch.cuda.memory_allocated(self.device)
        if self.kind == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "current_allocated_memory"):
            return torch.mps.current_allocated_memory()
        return None

    def reset(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.kind == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "empty_cache"):
            torch.mps.empty_cache()
        self.start = self.peak = self._now()

    def sample(self) -> None:
        now = self._now()
        if now is not None:
            self.peak = max(self.peak or 0, now)

    def read(self) -> dict:
        import torch

        if self.kind == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        mib = (lambda b: None if b is None else round(b / 2**20, 1))
        return {"peak_mib": mib(self.peak), "resident_at_start_mib": mib(self.start)}


def bf16_support(kind: str, device: str) -> dict:
    """Whether bf16 runs here (and natively), and what the library's ``--precision auto`` picks."""
    import torch

    from HiMatchADLib.features.backbone import NATIVE_BF16_CPU_FLAGS, cpu_flags, cuda_native_bf16, resolve_precision

    if kind == "cuda":
        return {
            "bf16": bool(torch.cuda.is_bf16_supported()),
            "bf16_native": bool(cuda_native_bf16(device)),
            "auto": resolve_precision("auto", device),
            "fp32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),  # the patch embedding is a convolution
        }
    if kind == "mps":
        try:  # a tiny bf16 matrix product: older macOS / torch raise here
            a = torch.ones(8, 8, device="mps", dtype=torch.bfloat16)
            ok = bool(torch.isfinite((a @ a).float()).all().cpu())
            why = None
        except Exception as exc:
            ok, why = False, f"{type(exc).__name__}: {str(exc).strip()[:160]}"
        return {"bf16": ok, "bf16_native": ok, "auto": "n/a (the library runs on cpu or cuda)", "bf16_error": why,
                "fp32_matmul_precision": torch.get_float32_matmul_precision()}
    flags = cpu_flags()
    return {
        "bf16": True,
        "bf16_native": any(f in flags for f in NATIVE_BF16_CPU_FLAGS),
        "auto": resolve_precision("auto", "cpu"),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def describe_machine(kind: str, device: str) -> dict:
    import platform

    import torch

    from HiMatchADLib.evaluation.environment import environment

    env = environment()
    if kind == "cuda":
        p = torch.cuda.get_device_properties(torch.device(device))
        env.update(device_name=p.name, capability=f"{p.major}.{p.minor}", device_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda or torch.version.hip)
    elif kind == "mps":
        env.update(device_name=f"Apple MPS ({platform.machine()}, macOS {platform.mac_ver()[0]})")
    else:
        env.update(device_name=f"CPU {env['processor']}, {torch.get_num_threads()} torch thread(s)")
    return env


def make_extractor(args, device: str, kind: str, resolution: int, precision: str):
    """The project's :class:`FeatureExtractor` on ``device``. The library places models on cpu or
    cuda only; on MPS the extractor is made on cpu and its model moved."""
    from HiMatchADLib.features.extractor import FeatureExtractor

    if kind != "mps":
        return FeatureExtractor(args.model, device, resolution=resolution, batch_size=args.batch_size, precision=precision)
    ex = FeatureExtractor(args.model, "cpu", resolution=resolution, batch_size=args.batch_size, precision=precision)
    ex.net.to("mps")
    ex.device = "mps"
    return ex


# ------------------------------------------------------------------------------------- timing
def time_forward(ex, batches: list, kind: str, repeat: int, memory: DeviceMemory = None):
    """Model input ``batches`` ((B, 3, h, w) tensors on the device) through ``ex.forward``: one
    untimed pass (warm-up; its features are returned), then ``repeat`` timed passes. Returns
    (seconds per pass, features)."""
    from HiMatchADLib.features.extractor import Features

    out = [ex.forward(b) for b in batches]
    _sync(kind)
    feats = Features([np.concatenate([o.stages[s] for o in out]) for s in range(len(ex.stages))], np.concatenate([o.cls for o in out]), out[0].grid)
    if memory is not None:
        memory.reset()
    seconds = []
    for _ in range(max(1, repeat)):
        _sync(kind)
        t = time.perf_counter()
        for b in batches:
            ex.forward(b)
            if memory is not None and kind == "mps":
                memory.sample()
        _sync(kind)
        seconds.append(time.perf_counter() - t)
    return seconds, feats


def forward_sweep(args, device, kind, precisions, slices, budget: Budget) -> list:
    """(1) ms per slice, (3) peak memory, token cosines bf16 vs fp32, per resolution and precision."""
    from HiMatchADLib.features.canvas import to_model_input

    rows = []
    last = {}  # precision -> (resolution, seconds of its configuration)
    for res in args.resolutions:
        ref = None
        for p in precisions:
            what = f"forward {p} {res} px"
            est = 3.0
            if p in last:
                r0, s0 = last[p]
                est = 1.0 + s0 * (res / r0) ** 2
            if not budget.allows(what, est):
                rows.append({"kind": "forward", "precision": p, "resolution": res, "skipped": "budget"})
                continue
            ex = make_extractor(args, device, kind, res, p)
            t0 = time.perf_counter()  # the estimate of the next configuration leaves the model load out
            x = to_model_input(slices, ex.grid_for(*slices.shape[1:])).to(ex.device)
            mem = DeviceMemory(kind, device)
            seconds, feats = time_forward(ex, [x[i : i + ex.batch_size] for i in range(0, len(x), ex.batch_size)], kind, args.repeat, mem)
            n = len(x)
            row = {
                "kind": "forward", "precision": p, "resolution": res, "input_hw": list(x.shape[-2:]), "slices": n,
                "batch_size": ex.batch_size, "stages": ex.stages,
                "ms_per_slice": 1000 * statistics.median(seconds) / n, "ms_per_slice_min": 1000 * min(seconds) / n,
                "rounds_s": seconds, **mem.read(),
            }
            if ref is None:
                ref = feats
            else:
                row["vs_fp32"] = _cosines(ref, feats)
            rows.append(row)
            last[p] = (res, time.perf_counter() - t0)
            peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} MiB"
            print(f"{what}: {row['ms_per_slice']:.2f} ms/slice ({n} slices at {row['input_hw'][0]}x{row['input_hw'][1]}, peak {peak})", flush=True)
            del x
    return rows


def detect_runs(args, device, kind, precisions, normals: Path, query: Path, work: Path, budget: Budget) -> dict:
    """(2) the whole detect process per precision (bank cached), its forward floor, (3) its peak memory."""
    from HiMatchADLib.cli.commands import detector_from_args
    from HiMatchADLib.cli.main import build_parser

    res = args.detect_resolution
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "HF_HUB_OFFLINE": "1"}
    cli_device = "cuda" if kind == "cuda" else "cpu"
    if kind == "cuda" and ":" in device:  # the command line knows "cuda" only: show it that one GPU
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = int(device.split(":", 1)[1])
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)

    def argv(p):
        return [
            "--quiet", "detect", str(query), "--normals", str(normals), "--out-dir", str(work / f"detect-{p}"),
            "--model", args.model, "--resolution", str(res), "--method", args.method, "--device", cli_device,
            "--precision", p, "--cache-dir", str(work / "cache"), "--slice-step", str(args.slice_step),
            "--batch-size", str(args.batch_size),
        ]

    def run(p, what: str):
        """(seconds, peak MiB) of one detect process; None when it failed or ran past the budget (stopped)."""
        peak_file = work / f"peak-{p}.json"
        t = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-c", DETECT_PROCESS, str(peak_file), *argv(p)], env=env,
                                  capture_output=True, text=True, timeout=max(1.0, budget.left() - budget.reserve))
        except subprocess.TimeoutExpired:
            budget.skipped.append(f"{what}: stopped after {time.perf_counter() - t:.0f} s, past the budget")
            print(budget.skipped[-1], flush=True)
            return None
        seconds = time.perf_counter() - t
        if done.returncode != 0:
            out["errors"][p] = f"{what} failed: {done.stderr.strip()[-2000:]}"
            print(out["errors"][p], flush=True)
            return None
        peak = json.loads(peak_file.read_text()).get("peak_bytes")
        return seconds, (None if peak is None else round(peak / 2**20, 1))

    out = {"resolution": res, "query": str(query), "normals": str(normals), "runs": {p: [] for p in precisions}, "build_s": {}, "errors": {}}
    for p in precisions:  # untimed: builds the bank and the calibration of this precision
        what = f"detect {p}: bank build (untimed)"
        if not budget.allows(what, max(out["build_s"].values(), default=20.0)):
            continue
        done = run(p, what)
        if done is not None:
            out["build_s"][p] = done[0]
            print(f"{what}: bank and calibration built in {done[0]:.1f} s", flush=True)
    built = [p for p in precisions if p in out["build_s"]]

    def timed_round(r: int) -> None:
        for p in built:
            what = f"detect {p} round {r + 1}"
            if p in out["errors"] or not budget.allows(what, out["runs"][p][-1]["wall_s"] if out["runs"][p] else 0.5 * out["build_s"][p]):
                continue
            done = run(p, what)
            if done is None:
                continue
            seconds, peak = done
            scores = json.loads(next((work / f"detect-{p}").glob("*_scores.json")).read_text())
            if scores["settings"]["precision"] != p:
                raise SystemExit(f"detect ran in {scores['settings']['precision']}, not {p}")
            out["runs"][p].append({"wall_s": seconds, "peak_mib": peak, "predict_s": scores["timings_s"]["total"],
                                   "features_s": scores["timings_s"]["features"], "slices": scores["slices"]})
            print(f"{what}: {seconds:.2f} s (predict {scores['timings_s']['total']:.2f} s)", flush=True)

    def floor(p) -> None:
        """The forward floor: the very model inputs detect feeds its extractor (recorded during one
        untimed prediction of the same query with the same settings), through that extractor alone."""
        last = out["runs"][p][-1] if out["runs"][p] else None
        if last is None or not budget.allows(f"detect {p}: forward floor", 3.0 + last["predict_s"] + last["features_s"] * (args.repeat + 1)):
            return
        ns = build_parser().parse_args(argv(p))
        ns.device = device
        det = detector_from_args(ns)
        with warnings.catch_warnings():  # the detect runs have reported them
            warnings.simplefilter("ignore")
            det.fit(normals)  # from the cache the first run built
            ex = det.extractor
            inputs, forward = [], ex.forward

            def recording(pixel_values):
                inputs.append(pixel_values.to(ex.device))
                return forward(pixel_values)

            ex.forward = recording
            try:
                det.predict(query)
            finally:
                del ex.forward
        seconds, _ = time_forward(ex, inputs, kind, args.repeat)
        shapes = sorted({tuple(b.shape[-2:]) for b in inputs})
        out["floor"][p] = {"slices": int(sum(len(b) for b in inputs)), "input_hw": list(shapes[-1]), "input_shapes": [list(s) for s in shapes],
                           "forward_floor_s": statistics.median(seconds), "rounds_s": seconds}
        f = out["floor"][p]
        print(f"detect {p}: forward floor {f['forward_floor_s']:.3f} s for {f['slices']} slices at "
              f"{', '.join(f'{h}x{w}' for h, w in shapes)}", flush=True)
        del det

    # One timed round of each precision, their floors, then the other rounds: what matters most first.
    out["floor"] = {}
    timed_round(0)
    for p in built:
        floor(p)
    for r in range(1, max(1, args.detect_repeat)):  # the precisions in turn, so each round sees the same machine
        timed_round(r)
    for p in built:
        runs = out["runs"][p]
        if not runs:
            continue
        wall = statistics.median(r["wall_s"] for r in runs)
        peaks = [r["peak_mib"] for r in runs if r["peak_mib"] is not None]
        f = out["floor"].get(p, {})
        out[p] = {
            "rounds": len(runs), "wall_s": wall, "predict_s": statistics.median(r["predict_s"] for r in runs),
            "slices": f.get("slices", runs[0]["slices"]), "input_hw": f.get("input_hw"),
            "forward_floor_s": f.get("forward_floor_s"), "ratio": wall / f["forward_floor_s"] if f else None,
            "peak_mib": max(peaks) if peaks else None,
        }
    return out


def heatmap_agreement(work: Path, precisions) -> dict:
    """(4) Spearman of the bf16 heatmap and slice scores with fp32's (the pixels either map scores)."""
    from scipy.stats import spearmanr

    from HiMatchADLib.io.readers import read_image

    def load(p):
        d = work / f"detect-{p}"
        heat = next(d.glob("*_heatmap.nii.gz"), None)
        scores = next(d.glob("*_scores.json"), None)
        if heat is None or scores is None:
            return None
        return read_image(heat).array.astype(np.float32), np.asarray(json.loads(scores.read_text())["slice_scores"], dtype=float)

    ref = load(precisions[0])
    out = {}
    for p in precisions[1:]:
        other = load(p)
        if ref is None or other is None:
            out[p] = {"skipped": "no detect output of both precisions"}
            continue
        (a, sa), (b, sb) = ref, other
        m = (a != 0) | (b != 0)
        ok = np.isfinite(sa) & np.isfinite(sb)
        out[p] = {
            "pixels": int(m.sum()),
            "heatmap_spearman": float(spearmanr(a[m], b[m])[0]) if m.sum() > 2 else float("nan"),
            "slice_score_spearman": float(spearmanr(sa[ok], sb[ok])[0]) if ok.sum() > 2 else float("nan"),
            "max_abs_diff": float(np.abs(a - b).max()),
        }
    return out


# ------------------------------------------------------------------------------------- output
def table(fwd: list, det: dict, agree: dict, precisions) -> str:
    head = ["measure", "precision", "px", "input", "slices", "ms/slice (median)", "wall s", "predict s", "forward floor s",
            "wall / floor", "predict / floor", "peak MiB", "vs fp32"]
    na = "n/a"
    rows = []
    for r in fwd:
        if r.get("skipped"):
            rows.append(["forward", r["precision"], str(r["resolution"]), "-", "-", "skipped (budget)", "-", "-", "-", "-", "-", "-", "-"])
            continue
        cos = r.get("vs_fp32")
        rows.append([
            "forward", r["precision"], str(r["resolution"]), f"{r['input_hw'][0]}x{r['input_hw'][1]}", str(r["slices"]),
            f"{r['ms_per_slice']:.2f}", f"{r['ms_per_slice'] * r['slices'] / 1000:.3f}", "-", "-", "-", "-",
            na if r["peak_mib"] is None else f"{r['peak_mib']:.0f} ({r['resident_at_start_mib']:.0f} resident)",
            f"token cos median {cos['cos_median']:.5f}, p1 {cos['cos_p1']:.5f}" if cos else "reference" if r["precision"] == "fp32" else "-",
        ])
    for p in precisions:
        d = det.get(p)
        if not d:
            why = "failed" if det.get("errors", {}).get(p) else "skipped"
            rows.append(["detect", p, str(det.get("resolution", "-")), "-", "-", why, "-", "-", "-", "-", "-", "-", "-"])
            continue
        a = agree.get(p, {})
        vs = "reference" if p == precisions[0] else (
            f"heatmap Spearman {a['heatmap_spearman']:.4f}, slice scores {a['slice_score_spearman']:.4f}" if "heatmap_spearman" in a else "-")
        no_floor = d["forward_floor_s"] is None
        rows.append([
            f"detect ({d['rounds']} run{'s' if d['rounds'] > 1 else ''})", p, str(det["resolution"]),
            "-" if no_floor else f"{d['input_hw'][0]}x{d['input_hw'][1]}", str(d["slices"]), f"{1000 * d['wall_s'] / d['slices']:.1f}",
            f"{d['wall_s']:.2f}", f"{d['predict_s']:.3f}", "skipped (budget)" if no_floor else f"{d['forward_floor_s']:.3f}",
            "-" if no_floor else f"{d['ratio']:.1f}", "-" if no_floor else f"{d['predict_s'] / d['forward_floor_s']:.2f}",
            na if d["peak_mib"] is None else f"{d['peak_mib']:.0f}", vs,
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "dinov3-vits16-standin"), help="Hugging Face id or local model folder")
    ap.add_argument("--device", default="auto", help="auto (cuda, then mps; no accelerator is an error), cuda, cuda:N, mps or cpu")
    ap.add_argument("--resolutions", default="224,448,512", help="comma-separated --resolution values (px) of the forward timing")
    ap.add_argument("--detect-resolution", type=int, default=None,
                    help="resolution of the detect timing (default 448, the command line's, when among --resolutions, else the largest)")
    default_normals = SHARED / "data" / "ixi-t1-normals"
    ap.add_argument("--normals", default=str(default_normals) if default_normals.is_dir() else None,
                    help="folder of normal volumes (default ../shared/data/ixi-t1-normals if present, else generated phantoms)")
    ap.add_argument("--n-normals", type=int, default=2, help="volumes in the detect bank (the next one gives the query slab)")
    ap.add_argument("--n-slices", type=int, default=None, help="slices of the forward timing and of the detect query slab (default 16; 4 on cpu)")
    ap.add_argument("--slice-step", type=int, default=None, help="bank every n-th normal slice (default 4; 12 on cpu)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", default="himatch")
    ap.add_argument("--repeat", type=int, default=None, help="timed forward passes per configuration, median reported (default 5; 3 on cpu)")
    ap.add_argument("--detect-repeat", type=int, default=None, help="timed detect runs per precision, median reported (default 3; 1 on cpu)")
    ap.add_argument("--work", default=None, help="working folder (bank cache, outputs); default a temporary one, removed at the end")
    ap.add_argument("--budget-s", type=float, default=280.0, help="skip configurations that no longer fit in this many seconds")
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args()
    budget = Budget(args.budget_s)

    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from HiMatchADLib.evaluation.phantom import write_demo_dataset
    from HiMatchADLib.io.discovery import list_images

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args.resolutions = [int(r) for r in str(args.resolutions).split(",") if r.strip()]
    if not args.resolutions:
        raise SystemExit("--resolutions: at least one")
    if args.detect_resolution is None:
        args.detect_resolution = 448 if 448 in args.resolutions else max(args.resolutions)
    device = pick_device(args.device)
    kind = torch.device(device).type
    for name, accelerator, cpu in (("n_slices", 16, 4), ("slice_step", 4, 12), ("repeat", 5, 3), ("detect_repeat", 3, 1)):
        if getattr(args, name) is None:  # a CPU smoke check does less of the same
            setattr(args, name, cpu if kind == "cpu" else accelerator)
    machine = describe_machine(kind, device)
    support = bf16_support(kind, device)
    precisions = [p for p in PRECISIONS if p != "bf16" or support["bf16"]]
    if "bf16" not in precisions:
        budget.skipped.append(f"bf16: unsupported on {device} ({support.get('bf16_error') or 'no bfloat16'}), not measured")

    print(f"device {device}: {machine['device_name']}" + (f", compute capability {machine['capability']}, {machine['device_memory_gib']} GiB, CUDA {machine['cuda']}" if kind == "cuda" else ""))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {machine['python']}, {machine['platform']}")
    tf32 = f", cuDNN TF32 {'on' if support['cudnn_tf32'] else 'off'}" if "cudnn_tf32" in support else ""
    print(f"precision: fp32 yes (float32 matmul precision '{support['fp32_matmul_precision']}'{tf32}); bf16 "
          + (("yes, native" if support["bf16_native"] else "yes, emulated (slower than fp32 expected)") if support["bf16"]
             else f"unsupported ({support.get('bf16_error') or 'no bfloat16 on this device'}): bf16 rows skipped")
          + f"; the library's --precision auto -> {support['auto']}")

    work = Path(args.work).expanduser() if args.work else Path(tempfile.mkdtemp(prefix="himatchad-device-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "device": device, "machine": machine, "precision_support": support}
    try:
        if args.normals:
            files = list_images(args.normals)
            source = args.normals
        else:
            demo = write_demo_dataset(work / "phantom", n_normals=args.n_normals, shape=(24, 96, 96), seed=0)
            files = list_images(demo["normals"]) + [demo["query"]]  # the demo's query, with its lesion, last
            source = f"phantoms (as himatchad demo makes them, in {work / 'phantom'})"
        if len(files) < args.n_normals + 1:
            raise SystemExit(f"{source}: need at least {args.n_normals + 1} volumes")
        normals = work / "normals"
        if not normals.exists():
            normals.mkdir()
            for f in files[: args.n_normals]:
                os.symlink(Path(f).resolve(), normals / Path(f).name)
        query = work / "query.nii.gz"
        if not query.exists():
            _slab(files[args.n_normals], query, args.n_slices)
        slices = _slices(files[: args.n_normals], args.n_slices)
        print(f"data: {source}; forward on {len(slices)} slices of {args.n_normals} normal volume(s); detect bank of "
              f"{args.n_normals} volume(s) (every {args.slice_step}th slice), query {args.n_slices} slices of {Path(files[args.n_normals]).name}")
        print(f"model {args.model}; batch size {args.batch_size}; budget {args.budget_s:.0f} s", flush=True)

        fwd = forward_sweep(args, device, kind, precisions, slices, budget)
        if kind == "mps":
            det = {"resolution": args.detect_resolution}
            budget.skipped.append("detect: skipped, the library (and himatchad detect --device) runs on cpu or cuda only, not on MPS")
            print(budget.skipped[-1])
        else:
            det = detect_runs(args, device, kind, precisions, normals, query, work, budget)
        agree = heatmap_agreement(work, precisions)
        result.update(forward=fwd, detect=det, agreement=agree, skipped=budget.skipped, elapsed_s=budget.elapsed())
        print()
        print(table(fwd, det, agree, precisions))
        print()
        for s in budget.skipped:
            print(f"- {s}")
        print(f"total {budget.elapsed():.0f} s of a {args.budget_s:.0f} s budget")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
            print(f"written: {args.json}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
