"""Clinical-size timings: seconds per volume, peak memory and bank build time per normal volume, on
synthetic volumes with clinical geometry, per model resolution and precision; and batch throughput
(cases per minute) with the batch runner's prefetch off and on, side by side.

Volumes (synthetic, written once under ``--work`` and reused; ``--size-factor`` shrinks every
matrix dimension for a quick check, and the table says so):

- ``mri``: brain T1, 1 mm isotropic, 256 x 256 x 176 stored as sagittal slices (IXI's orientation),
  int16; the MRI preset slices it axially (256 slices of 256 x 176 pixels).
- ``ct``: abdomen, 512 x 512 x 400 at 0.8 x 0.8 x 1.5 mm, int16 Hounsfield units with -3024 padding
  outside the circular field of view; the CT preset slices it axially.
- ``oct``: macular cube, 128 B-scans of 512 x 496 (6 x 1.94 x 6 mm), uint8; the OCT preset slices
  along the most widely spaced axis, i.e. one model slice per B-scan.

Each measurement runs in a fresh process (this script with ``--child``), so its peak resident
memory (VmHWM) is that of one whole detection: model and cached bank loaded, the volume read,
prepared, matched, its maps made and its outputs written. "detect s" is the wall time of
``predict`` + ``save`` with the bank already cached, after one untimed detection on one batch of
slices (model and bank loading and first-call costs excluded: a worker pays them once). With ``--max-slices K`` the model runs on K evenly spaced foreground slices of the
volume while everything else (reading, preprocessing, full-size maps, writing) runs on the whole
volume; the per-slice part (features, matching, maps) is extrapolated linearly to every slice, and
the table marks those rows. ``--check-extrapolation`` runs the first configuration once in full too
and prints both numbers.

Bank build time per normal volume: a bank of ``--n-normals`` synthetic normal volumes of the same
kind is built (in its own process, cache emptied first) and its build time divided by their number.

Batch mode (``--mode batch``): the first ``--ixi-normals`` IXI volumes form the bank, the next
``--ixi-cases`` are the cases; one process runs the batch with prefetch off, then on (each into a
fresh output folder, after one untimed detection and with the files read once beforehand, so both
find them in the page cache; ``--repeat`` alternates the order and keeps the fastest), and checks
that both summaries agree.

    python benchmarks/clinical.py --model ../shared/models/dinov3-vits16-standin \\
        --volumes mri,ct,oct --resolutions 224,448 --precisions fp32,bf16 --max-slices 32 --check-extrapolation
    python benchmarks/clinical.py --mode batch --model ../shared/models/dinov3-vits16-standin \\
        --ixi ../shared/data/ixi-t1-normals --ixi-normals 4 --ixi-cases 8 --resolutions 224
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmark this checkout's library

from HiMatchADLib.evaluation.memory import peak_rss_mib, rss_mib  # noqa: E402

#: Sagittal storage of IXI: index i runs anterior -> posterior, j inferior -> superior, k right -> left.
SAGITTAL = ((0.0, 0.0, -1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

VOLUMES = {
    "mri": {"size": (256, 256, 176), "spacing": (1.0, 1.0, 1.0), "direction": SAGITTAL, "dtype": "int16", "modality": "mri"},
    "ct": {"size": (512, 512, 400), "spacing": (0.8, 0.8, 1.5), "direction": IDENTITY, "dtype": "int16", "modality": "ct"},
    "oct": {"size": (512, 496, 128), "spacing": (6.0 / 512, 1.94 / 496, 6.0 / 128), "direction": IDENTITY, "dtype": "uint8", "modality": "oct"},
}


# ------------------------------------------------------------------------------- synthetic volumes
def _grid(ny: int, nx: int):
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    return (y + 0.5) / ny * 2 - 1, (x + 0.5) / nx * 2 - 1  # [-1, 1]


def _ct(size, rng) -> np.ndarray:
    """Abdomen/lower chest, int16 HU: air, body with fat rim, liver, kidneys, spine, lungs at the top,
    -3024 outside the circular field of view."""
    nx, ny, nz = size
    yy, xx = _grid(ny, nx)
    fov = yy**2 + xx**2 > 1.0
    out = np.empty((nz, ny, nx), np.int16)
    for z in range(nz):
        t = z / max(nz - 1, 1)
        a, b = 0.80 + 0.05 * np.sin(3 * t), 0.58 + 0.04 * np.cos(2 * t)
        body = (xx / a) ** 2 + ((yy - 0.05) / b) ** 2
        s = np.full((ny, nx), -1000.0, np.float32)
        s[body < 1] = -100  # fat
        s[body < 0.82] = 40  # soft tissue
        s[((xx + 0.35) / 0.35) ** 2 + ((yy + 0.05) / 0.3) ** 2 < 1 - 0.6 * t] = 60  # liver, smaller upwards
        for cx in (-0.3, 0.3):
            s[((xx - cx) / 0.1) ** 2 + ((yy - 0.25) / 0.14) ** 2 < 1] = 30  # kidneys
        s[(xx / 0.09) ** 2 + ((yy - 0.42) / 0.09) ** 2 < 1] = 650  # vertebral body
        if t > 0.7:  # lung bases
            r = (t - 0.7) / 0.3
            for cx in (-0.38, 0.38):
                s[((xx - cx) / (0.28 * r + 0.02)) ** 2 + ((yy + 0.05) / (0.35 * r + 0.02)) ** 2 < 1] = -850
        s += rng.normal(0, 12, s.shape).astype(np.float32)
        s[fov] = -3024
        out[z] = np.clip(s, -3024, 3071).astype(np.int16)
    return out


def _mri(size, rng) -> np.ndarray:
    """T1 head stored sagittally (numpy ``(k, j, i)`` = (left-right, inferior-superior, anterior-posterior)):
    scalp fat, skull, grey and white matter, ventricles, noise; int16."""
    ni, nj, nk = size
    jj, ii = _grid(nj, ni)
    out = np.empty((nk, nj, ni), np.int16)
    for k in range(nk):
        lr = (k + 0.5) / nk * 2 - 1
        head = (lr / 0.78) ** 2 + (ii / 0.85) ** 2 + ((jj - 0.05) / 0.8) ** 2
        s = np.zeros((nj, ni), np.float32)
        s[head < 1] = 160  # scalp
        s[head < 0.9] = 20  # skull
        brain = (lr / 0.68) ** 2 + (ii / 0.74) ** 2 + ((jj - 0.1) / 0.66) ** 2
        s[brain < 1] = 70  # grey matter
        s[brain < 0.75] = 110  # white matter
        s[(lr / 0.12) ** 2 + (ii / 0.3) ** 2 + ((jj - 0.15) / 0.15) ** 2 < 1] = 25  # ventricles
        s += rng.normal(0, 4, s.shape).astype(np.float32)
        out[k] = np.clip(s, 0, 32767).astype(np.int16)
    return out


def _oct(size, rng) -> np.ndarray:
    """Macular cube: B-scans (depth x width) with retinal layer bands, a foveal pit, speckle; uint8."""
    nx, ny, nz = size
    depth = np.arange(ny, dtype=np.float32)[:, None] / ny
    xs = np.linspace(-1, 1, nx, dtype=np.float32)[None, :]
    out = np.empty((nz, ny, nx), np.uint8)
    for z in range(nz):
        zc = (z + 0.5) / nz * 2 - 1
        pit = 0.06 * np.exp(-(xs**2 + zc**2) / 0.05)
        top = 0.35 + 0.03 * xs**2 + pit
        s = np.full((ny, nx), 8.0, np.float32)
        for offset, thickness, value in ((0.0, 0.02, 170), (0.02, 0.08, 90), (0.10, 0.06, 60), (0.16, 0.04, 120), (0.25, 0.03, 230)):
            s[(depth >= top + offset) & (depth < top + offset + thickness)] = value
        s *= rng.gamma(4.0, 0.25, s.shape).astype(np.float32)  # speckle
        out[z] = np.clip(s, 0, 255).astype(np.uint8)
    return out


GENERATORS = {"mri": _mri, "ct": _ct, "oct": _oct}


def volume_spec(kind: str, size_factor: float) -> dict:
    spec = dict(VOLUMES[kind])
    if size_factor != 1.0:
        size = tuple(max(8, int(round(s * size_factor))) for s in spec["size"])
        spec["spacing"] = tuple(sp * s0 / s for sp, s0, s in zip(spec["spacing"], spec["size"], size))  # same field of view
        spec["size"] = size
    return spec


def write_volume(kind: str, spec: dict, seed: int, path: Path) -> Path:
    """Generate one synthetic volume of ``kind`` and write it (skipped when ``path`` exists)."""
    import SimpleITK as sitk

    if path.exists():
        return path
    arr = GENERATORS[kind](spec["size"], np.random.default_rng(seed))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spec["spacing"])
    img.SetDirection(tuple(np.asarray(spec["direction"], float).reshape(-1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    sitk.WriteImage(img, str(tmp), True)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------- measurements
def _detector(job: dict):
    from HiMatchADLib import HiMatchDetector

    return HiMatchDetector(
        model=job["model"], method=job["method"], modality=job["modality"], resolution=job["resolution"],
        precision=job["precision"], batch_size=job["batch_size"], cache_dir=job["cache"], device=job["device"],
    )


def child_bank(job: dict) -> dict:
    """Build the bank of ``job["normals"]`` (the cache is empty) and calibrate."""
    det = _detector(job)
    t = time.perf_counter()
    det.fit(job["normals"])
    return {
        "fit_s": time.perf_counter() - t,
        "build_s": float(det.bank.manifest["build_seconds"]),
        "bank_slices": int(det.bank.n_slices),
        "peak_rss_mib": peak_rss_mib(),
    }


def child_detect(job: dict) -> dict:
    """One detection with a cached bank: ``predict`` + ``save`` of ``job["query"]``."""
    import warnings

    from HiMatchADLib.features import slicing as preprocess

    det = _detector(job)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit(job["normals"])
    load_s = time.perf_counter() - t
    rss_loaded = rss_mib()
    counted: dict = {}
    every = preprocess.PreparedVolume.slices_with_foreground
    limit = {"k": job["batch_size"]}  # the warm-up below runs one batch of slices

    def some(self, min_pixels: int = 1):
        todo = every(self, min_pixels)
        counted["all"] = len(todo)
        if limit["k"] and len(todo) > limit["k"]:
            todo = todo[np.linspace(0, len(todo) - 1, limit["k"]).round().astype(int)]
        counted["run"] = len(todo)
        return todo

    preprocess.PreparedVolume.slices_with_foreground = some
    det.predict(job["query"])  # warm-up, not timed: a worker has run the model before (first-call costs)
    limit["k"] = job.get("max_slices")
    t = time.perf_counter()
    res = det.predict(job["query"])
    predict_s = time.perf_counter() - t
    t = time.perf_counter()
    det.save(res, job["out"])
    save_s = time.perf_counter() - t
    timings = dict(res.timings)
    per_slice_keys = ("features", "maps", "matching", "retrieval", "stage_maps", "fusion")
    per_slice_s = sum(timings.get(key, 0.0) for key in per_slice_keys)
    wall = predict_s + save_s
    n_all = counted.get("all", int(np.isfinite(res.slice_scores).sum()))
    n_run = counted.get("run", n_all)
    full = wall + per_slice_s * (n_all - n_run) / max(n_run, 1)
    return {
        "load_s": load_s, "predict_s": predict_s, "save_s": save_s, "detect_s": full, "measured_s": wall,
        "slices": n_all, "slices_run": n_run, "extrapolated": n_run < n_all,
        "peak_rss_mib": peak_rss_mib(), "rss_loaded_mib": rss_loaded,
        "timings": {key: round(v, 3) for key, v in timings.items()},
        "shape": list(res.heatmap.shape),
    }


def run_child(op: str, job: dict) -> dict:
    """Run ``op`` in a fresh Python process and return what it reports."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", op, json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{op} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


# ------------------------------------------------------------------------------- the modes
def _split(text: str) -> list:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def mode_volumes(args) -> None:
    work = Path(args.work)
    rows = []
    check = None
    for kind in _split(args.volumes):
        spec = volume_spec(kind, args.size_factor)
        folder = work / f"{kind}-x{args.size_factor:g}"
        normals = folder / "normals"
        for i in range(args.n_normals):
            write_volume(kind, spec, 100 + i, normals / f"normal_{i}.nii.gz")
        query = write_volume(kind, spec, 1, folder / "cases" / "query.nii.gz")
        print(f"{kind}: {spec['size']} voxels (x, y, z) at {tuple(round(s, 4) for s in spec['spacing'])} mm, {spec['dtype']}, "
              f"{query.stat().st_size / 2**20:.0f} MiB on disk", flush=True)
        for res in (int(r) for r in _split(args.resolutions)):
            for precision in _split(args.precisions):
                cache = folder / f"cache-{res}-{precision}"
                shutil.rmtree(cache, ignore_errors=True)
                job = {
                    "model": args.model, "method": args.method, "modality": spec["modality"], "resolution": res,
                    "precision": precision, "batch_size": args.batch_size, "cache": str(cache), "device": args.device,
                    "normals": str(normals), "query": str(query), "out": str(folder / f"out-{res}-{precision}"),
                }
                bank = run_child("bank", job)
                det = run_child("detect", dict(job, max_slices=args.max_slices))
                row = {"kind": kind, "spec": spec, "resolution": res, "precision": precision, "bank": bank, "detect": det}
                rows.append(row)
                print(f"  {res} px {precision}: detect {det['detect_s']:.1f} s ({det['slices_run']}/{det['slices']} slices run), "
                      f"peak RSS {det['peak_rss_mib']:.0f} MiB, bank build {bank['build_s'] / args.n_normals:.1f} s per normal volume", flush=True)
                if args.check_extrapolation and check is None and det["extrapolated"]:
                    full = run_child("detect", dict(job, max_slices=None))
                    check = (row, full)
                shutil.rmtree(job["out"], ignore_errors=True)
    print()
    print(table(rows, args))
    if check is not None:
        row, full = check
        est = row["detect"]["detect_s"]
        print(f"\nExtrapolation check ({row['kind']}, {row['resolution']} px, {row['precision']}): "
              f"{row['detect']['slices_run']} of {row['detect']['slices']} slices run and extrapolated: {est:.1f} s; "
              f"whole volume run: {full['detect_s']:.1f} s ({100 * (est - full['detect_s']) / full['detect_s']:+.1f} %); "
              f"peak RSS {row['detect']['peak_rss_mib']:.0f} vs {full['peak_rss_mib']:.0f} MiB")


def table(rows: list, args) -> str:
    import torch

    note = []
    if args.size_factor != 1.0:
        note.append(f"matrix sizes scaled by {args.size_factor:g} (same field of view): NOT clinical size")
    if args.max_slices:
        note.append(
            f"* = the model ran on {args.max_slices} evenly spaced slices of the whole volume and the per-slice part "
            "(features, matching, maps) was extrapolated linearly to every slice; the peak RSS of such a row misses "
            "the map memory of the slices not run (up to one float32 volume)"
        )
    head = (
        f"Model {Path(args.model).name}, method {args.method}, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch size {args.batch_size}; bank of {args.n_normals} normal volume(s) of each kind."
    )
    lines = [head] + [f"Note: {n}." for n in note] + [
        "",
        "| volume | grid (x, y, z) | spacing mm | slices | px | precision | detect s / volume | ms / slice | peak RSS MiB | RSS with model + bank MiB | bank build s / normal volume |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, spec = r["detect"], r["spec"]
        star = "*" if d["extrapolated"] else ""
        lines.append(
            f"| {r['kind']} | {'x'.join(map(str, spec['size']))} {spec['dtype']} | {' x '.join(f'{s:.3g}' for s in spec['spacing'])} "
            f"| {d['slices']} | {r['resolution']} | {r['precision']} | {d['detect_s']:.1f}{star} | {1000 * d['detect_s'] / max(d['slices'], 1):.0f}{star} "
            f"| {d['peak_rss_mib']:.0f} | {d['rss_loaded_mib']:.0f} | {r['bank']['build_s'] / args.n_normals:.1f} |"
        )
    return "\n".join(lines)


def mode_batch(args) -> None:
    import warnings

    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.batch.runner import run_batch
    from HiMatchADLib.io.discovery import list_images

    files = list_images(args.ixi)
    need = args.ixi_normals + args.ixi_cases
    if len(files) < need:
        raise SystemExit(f"{args.ixi} holds {len(files)} volumes; {need} are needed")
    work = Path(tempfile.mkdtemp(prefix="himatchad-clinical-batch-", dir=args.work))
    normals, cases = work / "normals", work / "cases"
    normals.mkdir()
    cases.mkdir()
    for p in files[: args.ixi_normals]:
        shutil.copy2(p, normals / p.name)
    for p in files[args.ixi_normals : need]:
        shutil.copy2(p, cases / p.name)
    for p in cases.iterdir():
        p.read_bytes()  # both runs find the cases in the page cache
    out_rows = []
    for res in (int(r) for r in _split(args.resolutions)):
        for precision in _split(args.precisions):
            det = HiMatchDetector(
                model=args.model, method=args.method, resolution=res, precision=precision, batch_size=args.batch_size,
                cache_dir=work / "cache", device=args.device,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                det.fit(normals)
                det.predict(sorted(cases.iterdir())[0])  # warm-up (first-call costs), not timed
            result: dict = {}
            for r in range(max(1, args.repeat)):
                for prefetch in ((False, True) if r % 2 == 0 else (True, False)):  # alternated: neither always goes first
                    out = work / f"out-{res}-{precision}-{prefetch}"
                    shutil.rmtree(out, ignore_errors=True)
                    t = time.perf_counter()
                    rows = run_batch(det, cases, out, prefetch=prefetch, log=lambda m: None)
                    seconds = time.perf_counter() - t
                    if prefetch not in result or seconds < result[prefetch][0]:
                        result[prefetch] = (seconds, rows)
            same = [{k: v for k, v in r.items() if k != "seconds"} for r in result[False][1]] == [
                {k: v for k, v in r.items() if k != "seconds"} for r in result[True][1]
            ]
            off, on = result[False][0], result[True][0]
            shares = []  # (read + prepare, compute, write) as shares of each case's time in the sequential run
            for r in result[False][1]:
                if r["status"] == "ok":
                    t = json.loads((work / f"out-{res}-{precision}-False" / r["scores"]).read_text())["timings_s"]
                    whole = t["total"] + t.get("write", 0.0)
                    first = t["read"] + t["preprocess"]
                    shares.append((first / whole, (t["total"] - first) / whole, t.get("write", 0.0) / whole))
            stages = np.mean(shares, axis=0) if shares else np.full(3, np.nan)
            out_rows.append((res, precision, off, on, same, stages))
            print(f"  {res} px {precision}: prefetch off {off:.1f} s, on {on:.1f} s, summaries identical: {same}", flush=True)
    import torch

    n = args.ixi_cases
    print()
    print(f"Batch throughput ({args.repeat} round(s), fastest kept) on {n} IXI T1 cases ({Path(args.ixi).name}; bank of {args.ixi_normals}), model {Path(args.model).name}, "
          f"method {args.method}, device {args.device}, {torch.get_num_threads()} threads, batch size {args.batch_size}.")
    print()
    print("Stage shares: reading + preparing / computing / writing, as shares of a case's time in the sequential run. With the")
    print("stages overlapped a batch goes at best as fast as its slowest stage (1 / the largest share), given a free core for each.")
    print()
    print("| px | precision | prefetch off: cases / min | prefetch on: cases / min | speed-up | stage shares | best possible | same summary |")
    print("|---:|---|---:|---:|---:|---|---:|---|")
    for res, precision, off, on, same, stages in out_rows:
        print(
            f"| {res} | {precision} | {60 * n / off:.2f} | {60 * n / on:.2f} | {off / on:.2f}x | "
            f"{' / '.join(f'{100 * v:.0f} %' for v in stages)} | {1 / np.max(stages):.2f}x | {'yes' if same else 'NO'} |"
        )
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        op, job = sys.argv[2], json.loads(sys.argv[3])
        out = {"bank": child_bank, "detect": child_detect}[op](job)
        print("RESULT " + json.dumps(out), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("volumes", "batch"), default="volumes")
    ap.add_argument("--model", required=True)
    ap.add_argument("--method", default="himatch")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resolutions", default="224,448")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated, passed to HiMatchDetector(precision=...)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default=None, help="folder for the synthetic volumes (kept and reused) and the banks (default: a temporary folder)")
    ap.add_argument("--volumes", default="mri,ct,oct", help=f"comma-separated, of {', '.join(VOLUMES)}")
    ap.add_argument("--size-factor", type=float, default=1.0, help="scale every matrix dimension (quick checks only)")
    ap.add_argument("--n-normals", type=int, default=3, help="synthetic normal volumes in each bank")
    ap.add_argument("--max-slices", type=int, default=None, help="run the model on this many slices per volume, extrapolate the rest")
    ap.add_argument("--check-extrapolation", action="store_true", help="also run the first extrapolated configuration in full")
    ap.add_argument("--ixi", default=str(REPO.parent / "shared" / "data" / "ixi-t1-normals"))
    ap.add_argument("--ixi-normals", type=int, default=4)
    ap.add_argument("--ixi-cases", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="batch mode: timed rounds (off/on, then on/off, ...); the fastest of each is kept")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    temporary = args.work is None
    if temporary:
        args.work = tempfile.mkdtemp(prefix="himatchad-clinical-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    try:
        (mode_batch if args.mode == "batch" else mode_volumes)(args)
    finally:
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
