"""The ``himatchad`` command line: bank, detect, batch, demo (and evaluate, synth).

Errors a user can cause print one message (no traceback) and exit with status 2; an interrupted run
exits with 130. ``--debug`` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from . import __version__
from .errors import Cancelled, HiMatchADError

EXIT_USER_ERROR = 2


def _threshold(value: str):
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number, not '{value}'") from None


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not '{value}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _fraction(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not '{value}'") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {v}")
    return v


def add_model_options(p: argparse.ArgumentParser, with_method: bool = True) -> None:
    from .features import DEFAULT_MODEL
    from .preprocess import MODALITIES, SLICE_AXES

    g = p.add_argument_group("model and features")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"Hugging Face id or local model folder (default {DEFAULT_MODEL})")
    g.add_argument("--modality", default="auto", choices=MODALITIES, help="intensity preset (default auto)")
    g.add_argument("--slice-axis", default="auto", choices=SLICE_AXES, help="slicing direction (default: the modality's)")
    g.add_argument("--resolution", type=_positive_int, default=448, help="longer side of the model input in pixels (default 448)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default auto)")
    g.add_argument("--batch-size", type=_positive_int, default=8, help="slices per forward pass (default 8)")
    g.add_argument("--slice-step", type=_positive_int, default=1, help="bank every n-th normal slice (default 1: all)")
    g.add_argument("--cache-dir", default=None, help="where banks are cached (default $HIMATCHAD_CACHE or ~/.cache/himatchad)")
    g.add_argument("--rebuild", action="store_true", help="rebuild the normal bank even if a cached one is current")
    if with_method:
        from .detector import METHODS

        m = p.add_argument_group("detection")
        m.add_argument("--method", default="himatch", choices=METHODS, help="himatch (default), knn (AnomalyDINO) or dpmm (AnomalyDINO-DPMM)")
        m.add_argument("--k", type=_positive_int, default=8, help="normal reference slices per query slice (himatch; default 8)")
        m.add_argument("--threshold", type=_threshold, default="auto", help="'auto' (calibrated on held-out normals) or a value")
        m.add_argument("--fpr", type=_fraction, default=0.01, help="target pixel false-positive rate for --threshold auto (default 0.01)")
        m.add_argument("--min-size", type=_positive_int, default=None, help="remove anomalous components smaller than this many voxels")


def detector_from_args(args, progress=None):
    from .detector import HiMatchDetector

    return HiMatchDetector(
        model=args.model,
        method=getattr(args, "method", "himatch"),
        k=getattr(args, "k", 8),
        modality=args.modality,
        slice_axis=args.slice_axis,
        resolution=args.resolution,
        threshold=getattr(args, "threshold", "auto"),
        target_fpr=getattr(args, "fpr", 0.01),
        min_component_size=getattr(args, "min_size", None),
        slice_step=args.slice_step,
        device=args.device,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        progress=progress,
    )


def _progress(args):
    from .progress import tqdm_callback

    return tqdm_callback(disable=getattr(args, "quiet", False))


def _fit(det, normals, args) -> None:
    det.fit(normals, rebuild=getattr(args, "rebuild", False))
    info = det.fit_info
    _say(args, f"normal bank: {info['slices']} slices from {info['files']} files ({info['skipped']} skipped), cache {info['cache']}")


def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


def _check_out_dir(out_dir: str) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise HiMatchADError(f"--out-dir {out} exists and is not a folder")
    return out


def _summary_line(res, paths) -> str:
    return (
        f"{res.name}: volume score {res.volume_score:.4f}, threshold {res.threshold:.4f}, "
        f"{res.anomalous_voxels} anomalous voxels, most anomalous slice {res.most_anomalous_slice} -> {paths['heatmap'].parent}"
    )


# ---------------------------------------------------------------------------------------- commands
def cmd_bank(args) -> int:
    from .detector import HiMatchDetector

    det = HiMatchDetector(
        model=args.model, modality=args.modality, slice_axis=args.slice_axis, resolution=args.resolution,
        slice_step=args.slice_step, device=args.device, batch_size=args.batch_size, cache_dir=args.cache_dir,
        progress=_progress(args),
    )
    t = time.perf_counter()
    det._ensure_extractor()
    from .bank import build_or_load

    bank = build_or_load(Path(args.normals).expanduser(), det.extractor, det._bank_settings(), det.cache_dir, det.reporter, args.rebuild)
    info = bank.describe()
    info["seconds"] = round(time.perf_counter() - t, 3)
    print(json.dumps(info, indent=1))
    for s in bank.skipped:
        print(f"warning: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


def cmd_detect(args) -> int:
    inp = Path(args.input).expanduser()
    if not inp.exists():
        raise HiMatchADError(f"input not found: {inp}")
    out = _check_out_dir(args.out_dir)
    det = detector_from_args(args, _progress(args))
    _fit(det, args.normals, args)
    res = det.predict(inp)
    paths = det.save(res, out)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(_summary_line(res, paths))
    return 0


def cmd_batch(args) -> int:
    from .batch import STATUS_DONE, STATUS_FAILED, STATUS_OK, SUMMARY_NAME, find_cases, run_batch, summary_counts

    out = _check_out_dir(args.out_dir)
    normals = os.path.abspath(Path(args.normals).expanduser())
    inputs = Path(args.input_dir).expanduser()
    find_cases(inputs, out, exclude=[normals])  # refuse a bad input folder before the bank is built

    def progress(message: str, done: int, total: int) -> None:
        if done < total:
            _say(args, message)

    options = None
    if args.engine == "ray":
        from .ray_engine import import_ray

        import_ray()  # say how to install Ray before the bank is built
        if not (args.gpus_per_worker >= 0 and args.cpus_per_worker > 0):
            raise HiMatchADError("--gpus-per-worker must be 0 or more and --cpus-per-worker more than 0")
        options = {
            "address": args.address, "workers": args.workers or 2,
            "gpus_per_worker": args.gpus_per_worker, "cpus_per_worker": args.cpus_per_worker,
        }
    elif args.address is not None or args.workers is not None or args.gpus_per_worker or args.cpus_per_worker != 1.0:
        raise HiMatchADError("--address, --workers, --gpus-per-worker and --cpus-per-worker need --engine ray")
    det = detector_from_args(args, _progress(args))
    _fit(det, normals, args)
    rows = run_batch(
        det, inputs, out, overwrite=args.overwrite, exclude=[normals], progress=progress,
        log=lambda m: print(f"warning: {m}", file=sys.stderr), engine=args.engine, engine_options=options,
    )
    n = summary_counts(rows)
    print(f"{n[STATUS_OK]} processed, {n[STATUS_DONE]} already done, {n[STATUS_FAILED]} failed; summary: {out / SUMMARY_NAME}")
    return 1 if n[STATUS_FAILED] else 0


def cmd_demo(args) -> int:
    import numpy as np

    from .features import DEFAULT_MODEL, build_random_model, load_backbone
    from .imageio import read_image
    from .phantom import write_demo_dataset

    out = _check_out_dir(args.out_dir)
    data = out / "data"
    paths = write_demo_dataset(data, n_normals=args.normals_count, shape=(24, 96, 96), seed=args.seed)
    model = args.model
    if model is None:
        try:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never goes to the network on its own
            load_backbone(DEFAULT_MODEL, "cpu")
            model = DEFAULT_MODEL
            print(f"using the pretrained model {DEFAULT_MODEL} found in the local Hugging Face cache")
        except HiMatchADError:
            model = str(build_random_model(out / "random-dinov3-vits16", "small", seed=0))
            print(
                "NOTE: pretrained DINOv3 weights are not available on this machine, so this demo uses a DINOv3 "
                "ViT-S/16 with RANDOM weights (untrained stand-in features). It checks that the installation and "
                "the pipeline work; its detections say nothing about the method's quality. For real use pass "
                "--model with a DINOv3 Hub id (after accepting its licence) or a local folder."
            )
    args.model = model
    det = detector_from_args(args, _progress(args))
    _fit(det, paths["normals"], args)
    res = det.predict(paths["query"])
    written = det.save(res, out)
    mask = read_image(paths["mask"]).array > 0
    lab = res.labelmap > 0
    inter = int((mask & lab).sum())
    dice = 2 * inter / max(int(mask.sum() + lab.sum()), 1)
    peak = np.unravel_index(int(np.argmax(res.heatmap)), res.heatmap.shape)
    found = bool(mask[peak])
    print(f"normal scans: {paths['normals']}")
    print(f"query with a synthetic lesion: {paths['query']} (lesion mask {paths['mask']})")
    for k, v in written.items():
        print(f"{k}: {v}")
    print(f"volume score {res.volume_score:.4f}; threshold {res.threshold:.4f}; {res.anomalous_voxels} anomalous voxels; Dice with the lesion {dice:.3f}")
    print(f"lesion found: {'yes' if found else 'no'} (heatmap peak {'inside' if mask[peak] else 'outside'} the lesion)")
    return 0


def cmd_worker(args) -> int:
    from .worker import main as worker_main

    return worker_main()


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="himatchad", description="Training-free anomaly detection in medical images on frozen DINOv3 features.")
    p.add_argument("--version", action="version", version=f"himatchad {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser("bank", help="build and cache the normal bank of a folder")
    b.add_argument("normals", metavar="NORMALS_DIR")
    add_model_options(b, with_method=False)
    b.set_defaults(func=cmd_bank)

    d = sub.add_parser("detect", help="detect anomalies in one volume or image")
    d.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file, DICOM series folder, or PNG/JPEG/TIFF slice")
    d.add_argument("--normals", required=True, metavar="NORMALS_DIR")
    d.add_argument("--out-dir", required=True, metavar="OUT")
    add_model_options(d)
    d.set_defaults(func=cmd_detect)

    bt = sub.add_parser("batch", help="detect on every input of a folder (resumable, CSV summary)")
    bt.add_argument("input_dir", metavar="INPUT_DIR")
    bt.add_argument("--normals", required=True, metavar="NORMALS_DIR")
    bt.add_argument("--out-dir", required=True, metavar="OUT")
    bt.add_argument("--overwrite", action="store_true", help="recompute every case, even those finished earlier with the same settings")
    eg = bt.add_argument_group("engine")
    eg.add_argument("--engine", default="local", choices=["local", "ray"], help="local: one process (default); ray: Ray actors, each loading the model and bank once")
    eg.add_argument("--address", default=None, metavar="ADDR", help="Ray cluster to use ('auto', 'ray://head:10001'); default: start a local one")
    eg.add_argument("--workers", type=_positive_int, default=None, metavar="W", help="Ray actors (default 2)")
    eg.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="GPUs per Ray actor; a fraction shares a GPU (default 0)")
    eg.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs per Ray actor (default 1)")
    add_model_options(bt)
    bt.set_defaults(func=cmd_batch)

    dm = sub.add_parser("demo", help="generate a small synthetic data set and run detection on it")
    dm.add_argument("--out-dir", default="himatchad-demo", metavar="OUT")
    dm.add_argument("--normals-count", type=_positive_int, default=6, help=argparse.SUPPRESS)
    dm.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    add_model_options(dm)
    dm.set_defaults(func=cmd_demo, model=None, resolution=224)
    for a in dm._actions:  # demo: no default model (pretrained if cached, else a random stand-in)
        if a.dest == "model":
            a.default = None
            a.help = "Hugging Face id or local folder (default: pretrained DINOv3 if cached locally, else a random stand-in)"
        if a.dest == "resolution":
            a.default = 224
            a.help = "longer side of the model input (demo default 224, for speed)"

    wk = sub.add_parser("worker", help="serve detection requests as JSON lines on stdin/stdout (the 3D Slicer module's worker process)")
    wk.set_defaults(func=cmd_worker)

    for modname in ("evaluate", "synth"):
        try:
            mod = __import__(f"HiMatchADLib.{modname}", fromlist=["add_subparser"])
        except ImportError:  # pragma: no cover - optional parts
            continue
        if hasattr(mod, "add_subparser"):
            mod.add_subparser(sub)
    return p


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.simplefilter("ignore", FutureWarning)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return int(args.func(args) or 0)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except HiMatchADError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        if args.debug:
            raise
        print("error: out of memory; try a smaller --resolution or --batch-size, or crop the volume", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: say so briefly; --debug shows the traceback
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
