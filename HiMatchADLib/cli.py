"""The ``himatchad`` command line: bank, detect, batch, demo (and evaluate, synth).

Errors a user can cause print one message (no traceback) and exit with status 2; an interrupted run
exits with 130. ``--debug`` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

from . import __version__
from .errors import Cancelled, HiMatchADError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
#: Largest ``--resolution``. DINOv3 features stay usable up to about 4k pixels, and no medical slice
#: needs more (CT/MRI matrices are at most 1024, OCT B-scans about 2048: beyond the image's own size
#: the model sees an upsampled image). At 4096 one slice is already 65 536 patch tokens; larger values
#: only exhaust memory inside the model.
MAX_RESOLUTION = 4096


def _threshold(value: str):
    if value == "auto":
        return value
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number, not '{value}'") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a finite number, not '{value}'")
    return v


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not '{value}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _resolution(value: str) -> int:
    v = _positive_int(value)
    if v > MAX_RESOLUTION:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RESOLUTION} pixels, not {v}")
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
    g.add_argument("--resolution", type=_resolution, default=448, help="longer side of the model input in pixels (default 448)")
    g.add_argument(
        "--pixel-spacing", default="auto", metavar="MM",
        help="in-plane pixel spacing (mm) every slice is resampled to before the model: 'auto' (default: from the "
        "normal set), a number, or 'off' (stretch each slice to --resolution)",
    )
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default auto)")
    g.add_argument("--batch-size", type=_positive_int, default=8, help="slices per forward pass (default 8)")
    g.add_argument("--slice-step", type=_positive_int, default=1, help="bank every n-th normal slice (default 1: all)")
    g.add_argument("--cache-dir", default=None, help="where banks are cached (default $HIMATCHAD_CACHE or ~/.cache/himatchad)")
    g.add_argument("--rebuild", action="store_true", help="rebuild the normal bank even if a cached one is current")
    g.add_argument(
        "--precision", default="auto", metavar="{auto,fp32,bf16,int8}",
        help="backbone precision: auto (default: bf16 where the GPU or CPU computes it natively, else fp32), fp32, "
        "bf16, or int8 (CPU only: int8 linear layers); fp16 is not supported by DINOv3",
    )
    if with_method:  # detect, batch, demo: read by detector_from_args
        from .detector import METHODS
        from .knn_index import KNN_INDEXES

        m = p.add_argument_group("detection")
        m.add_argument("--method", default="himatch", choices=METHODS, help="himatch (default), knn (AnomalyDINO) or dpmm (AnomalyDINO-DPMM)")
        m.add_argument("--k", type=_positive_int, default=8, help="normal reference slices per query slice (himatch; default 8)")
        m.add_argument(
            "--knn-index", default="exact", choices=KNN_INDEXES,
            help="knn only: exact nearest-neighbour search (default), or approximate ivf / hnsw (faster on large normal "
            "sets; built once and cached with the bank)",
        )
        m.add_argument("--threshold", type=_threshold, default="auto", help="'auto' (calibrated on held-out normals) or a value")
        m.add_argument("--fpr", type=_fraction, default=0.01, help="target pixel false-positive rate for --threshold auto (default 0.01)")
        m.add_argument("--min-size", type=_positive_int, default=None, help="remove anomalous components smaller than this many voxels")
        m.add_argument(
            "--consistency-mm", type=float, default=None, metavar="MM",
            help="volumes: fuse each slice's map with its neighbours' (Gaussian, sigma in mm); default off",
        )
        m.add_argument(
            "--subject-pattern", default=None, metavar="REGEX",
            help="regular expression with one group naming the subject of a normal file (searched in its path "
            "relative to the normal folder), e.g. '^(TCGA_[A-Z0-9]+_[0-9]+)_'; calibration holds out whole subjects",
        )


def add_dicom_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM")
    g.add_argument(
        "--series-filter", action="append", default=None, metavar="TERMS",
        help="DICOM series to analyse: comma-separated terms that must all match, KEY=VALUE (exact), KEY~REGEX (search), "
        "KEY!=VALUE or KEY!~REGEX, case-insensitive, KEY one of modality, description, number, uid; e.g. "
        "modality=MR,description~flair. Repeat the option to select series matching any of the filters",
    )
    g.add_argument("--dicom-seg", action="store_true", help="also write <name>_seg.dcm: the labelmap as a DICOM SEG of the input series (DICOM inputs)")
    g.add_argument("--dicom-heatmap", action="store_true", help="also write <name>_heatmap_pm.dcm: the heatmap as a DICOM parametric map (DICOM inputs)")


def _check_dicom_options(args) -> None:
    """Parse ``--series-filter`` (bad syntax is refused before any work) and check that the DICOM
    writer is installed when ``--dicom-seg``/``--dicom-heatmap`` ask for it."""
    if not hasattr(args, "series_filter"):
        return
    from .dicom import parse_series_filters

    args.series_filter = parse_series_filters(args.series_filter)
    if args.dicom_seg or args.dicom_heatmap:
        from .output import dicom_writers

        dicom_writers()


def _detect_input(inp: Path, args):
    """What ``detect`` analyses: the DICOM series ``--series-filter`` picks in a folder (or a DICOM
    file), else the file. DICOM options on a non-DICOM input are refused."""
    from .imageio import dicom_input

    series = dicom_input(inp, args.series_filter)
    if series is not None:
        return series
    if args.series_filter:
        raise HiMatchADError(f"--series-filter selects DICOM series, but {inp} is not DICOM; leave the option out")
    if args.dicom_seg or args.dicom_heatmap:
        raise HiMatchADError(
            f"--dicom-seg and --dicom-heatmap need a DICOM input (a folder of DICOM files or a DICOM file); {inp} is not DICOM"
        )
    return inp


def detector_from_args(args, progress=None):
    from .detector import HiMatchDetector

    return HiMatchDetector(
        model=args.model,
        method=getattr(args, "method", "himatch"),
        k=getattr(args, "k", 8),
        knn_index=getattr(args, "knn_index", "exact"),
        modality=args.modality,
        slice_axis=args.slice_axis,
        resolution=args.resolution,
        pixel_spacing=getattr(args, "pixel_spacing", "auto"),
        threshold=getattr(args, "threshold", "auto"),
        target_fpr=getattr(args, "fpr", 0.01),
        min_component_size=getattr(args, "min_size", None),
        subject_pattern=getattr(args, "subject_pattern", None),
        consistency_mm=getattr(args, "consistency_mm", None),
        slice_step=args.slice_step,
        device=args.device,
        batch_size=args.batch_size,
        precision=getattr(args, "precision", "auto"),
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
        from .progress import print_line

        print_line(msg)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from .progress import print_line

    print_line(f"warning: {message}", file)


def _check_out_dir(out_dir: str) -> Path:
    """The output folder, refused before any computation when it is a file or cannot be written."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise HiMatchADError(f"--out-dir {out} exists and is not a folder")
    _check_writable(out, "--out-dir")
    return out


def _check_writable(folder: Path, option: str) -> None:
    """Refuse a folder this process cannot create files in (or, when it does not exist yet, whose
    nearest existing parent it cannot create it in). Nothing is left behind."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise HiMatchADError(f"{option} {folder} cannot be created: {probe} is a file, not a folder; choose another {option}")
    try:
        fd, name = tempfile.mkstemp(prefix=".himatchad-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        where = "" if probe == folder else f" (its parent {probe})"
        raise HiMatchADError(
            f"{option} {folder}{where} is not writable: {exc.strerror or exc}; choose a folder you can write to"
        ) from exc


def _check_cache_dir(args) -> None:
    """A cache folder that is a file is refused. A read-only cache is allowed (a complete bank can
    be read from it); building into it then fails with one clear message."""
    if not hasattr(args, "cache_dir"):
        return
    cache = args.cache_dir
    from .bank import default_cache_root

    root = Path(cache).expanduser() if cache else default_cache_root()
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "--cache-dir" if cache else "the cache folder ($HIMATCHAD_CACHE or ~/.cache/himatchad)"
        raise HiMatchADError(f"{what} {root} cannot be used: {probe} is a file, not a folder; give --cache-dir a folder")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _check_out_dir_against_inputs(args) -> None:
    """``--out-dir`` must not be the input folder (a batch would find nothing new to do, a DICOM
    series folder would get NIfTI files among its slices), nor the normal scans' folder or a folder
    inside it (the next bank would read the outputs as normal scans)."""
    out = getattr(args, "out_dir", None)
    if not isinstance(out, str):
        return
    out = _real(Path(out).expanduser())
    inputs = []
    if isinstance(getattr(args, "input_dir", None), str):
        inputs.append(("the input folder", Path(args.input_dir).expanduser()))
    if isinstance(getattr(args, "input", None), str):
        inp = Path(args.input).expanduser()
        if inp.exists():
            inputs.append(("the input folder", inp) if inp.is_dir() else ("the folder of the input", inp.parent))
    for what, folder in inputs:
        if folder.is_dir() and _real(folder) == out:
            raise HiMatchADError(f"--out-dir {args.out_dir} is {what} {folder}; choose another --out-dir (outputs and inputs must not mix)")
    normals = getattr(args, "normals", None)
    if isinstance(normals, str) and Path(normals).expanduser().is_dir():
        real = _real(Path(normals).expanduser())
        if out == real or real in out.parents:
            raise HiMatchADError(
                f"--out-dir {args.out_dir} is, or is inside, the normal scans' folder {normals}; the outputs would be read as normal "
                "scans next time. Choose an --out-dir outside it"
            )


def preflight(args) -> None:
    """Checks of a command's folders and input that fail fast, before any model or bank work."""
    _check_dicom_options(args)
    _check_cache_dir(args)
    _check_out_dir_against_inputs(args)


def _write_folders(args) -> list:
    """The folders a command writes to, as the user named them (for messages)."""
    found = []
    if isinstance(getattr(args, "out_dir", None), str):
        found.append(f"--out-dir {args.out_dir}")
    if hasattr(args, "cache_dir"):
        from .bank import default_cache_root

        found.append(f"--cache-dir {args.cache_dir or default_cache_root()}")
    return found


def _os_error_message(exc: OSError, args=None) -> str:
    """One line for an operating-system error: what failed, on which path, what to do."""
    import errno

    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename:
        where = f" {exc.filename}"
    else:
        folders = _write_folders(args) if args is not None else []
        where = f" (in {' or '.join(folders)})" if folders else ""
    hint = {
        errno.ENOSPC: "free disk space or choose another folder (--out-dir, --cache-dir)",
        errno.EDQUOT: "free disk space or choose another folder (--out-dir, --cache-dir)",
        errno.EROFS: "the file system is read-only; choose a writable folder (--out-dir, --cache-dir)",
        errno.EACCES: "check the permissions or choose a folder you can write to (--out-dir, --cache-dir)",
        errno.EPERM: "check the permissions or choose a folder you can write to (--out-dir, --cache-dir)",
        errno.ENOTDIR: "a path that should be a folder is a file; check --out-dir and --cache-dir",
        errno.EEXIST: "a file is in the way; check --out-dir and --cache-dir",
    }.get(exc.errno, "check the path and try again")
    return f"cannot read or write{where}: {what}; {hint}"


def _print_error(message: str) -> None:
    """One line on stderr, on a line of its own (any progress bar is taken down first)."""
    from .progress import close_bars

    close_bars()
    sys.stdout.flush()
    print(" ".join(str(message).split("\n")).strip(), file=sys.stderr, flush=True)


def _summary_line(res, paths) -> str:
    return (
        f"{res.name}: volume score {res.volume_score:.4f}, threshold {res.threshold:.4f}, "
        f"{res.anomalous_voxels} anomalous voxels, most anomalous slice {res.most_anomalous_slice} -> {paths['heatmap'].parent}"
    )


# ---------------------------------------------------------------------------------------- commands
def cmd_bank(args) -> int:

    # The same detector settings as `detect`, so the bank built here is the one `detect` finds.
    det = detector_from_args(args, _progress(args))
    t = time.perf_counter()
    det._ensure_extractor()
    from .bank import build_or_load

    folder = Path(args.normals).expanduser()
    bank = build_or_load(folder, det.extractor, det._bank_settings(folder), det.cache_dir, det.reporter, args.rebuild)
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
    query = _detect_input(inp, args)
    det = detector_from_args(args, _progress(args))
    img = det.check_query(query)  # a bad input fails now, not after minutes of bank building
    _fit(det, args.normals, args)
    res = det.predict(img)
    paths = det.save(res, out, dicom_seg=args.dicom_seg, dicom_heatmap=args.dicom_heatmap)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(_summary_line(res, paths))
    return 0


def cmd_batch(args) -> int:
    from .batch import STATUS_DONE, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, SUMMARY_NAME, find_cases, run_batch, summary_counts

    out = _check_out_dir(args.out_dir)
    normals = os.path.abspath(Path(args.normals).expanduser())
    inputs = Path(args.input_dir).expanduser()
    find_cases(inputs, out, exclude=[normals], series_filter=args.series_filter)  # refuse a bad input folder before the bank is built

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
        series_filter=args.series_filter, dicom_seg=args.dicom_seg, dicom_heatmap=args.dicom_heatmap,
    )
    n = summary_counts(rows)
    skipped = f"{n[STATUS_SKIPPED]} skipped, " if n.get(STATUS_SKIPPED) else ""
    print(f"{n[STATUS_OK]} processed, {n[STATUS_DONE]} already done, {skipped}{n[STATUS_FAILED]} failed; summary: {out / SUMMARY_NAME}")
    return 1 if n[STATUS_FAILED] else 0


def cmd_demo(args) -> int:
    import numpy as np

    from .features import DEFAULT_MODEL, build_random_model, load_backbone
    from .imageio import read_image
    from .metrics import dice, image_auroc
    from .phantom import write_demo_dataset

    out = _check_out_dir(args.out_dir)
    data = out / "data"
    paths = write_demo_dataset(data, n_normals=args.normals_count, shape=(24, 96, 96), seed=args.seed)
    model = args.model
    stand_in = False
    if model is None:
        try:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never goes to the network on its own
            load_backbone(DEFAULT_MODEL, "cpu")
            model = DEFAULT_MODEL
            print(f"using the pretrained model {DEFAULT_MODEL} found in the local Hugging Face cache")
        except HiMatchADError:
            model = str(build_random_model(out / "random-dinov3-vits16", "small", seed=0))
            stand_in = True
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
    fg = res.foreground > 0
    auroc = image_auroc(mask[fg], res.heatmap[fg])  # every foreground voxel is one sample
    peak = np.unravel_index(int(np.argmax(res.heatmap)), res.heatmap.shape)
    print(f"normal scans: {paths['normals']}")
    print(f"query with a synthetic lesion: {paths['query']} (lesion mask {paths['mask']})")
    for k, v in written.items():
        print(f"{k}: {v}")
    print(f"volume score {res.volume_score:.4f}; threshold {res.threshold:.4f}; {res.anomalous_voxels} anomalous voxels")
    print(
        f"against the lesion mask: heatmap AUROC {auroc:.3f} over the foreground voxels (1 = every lesion voxel scores above "
        f"every other); Dice of the Anomaly labelmap {dice(lab, mask):.3f} (outlines follow {det.extractor.patch_size}-pixel "
        "model patches, so they are coarser than the lesion)"
    )
    print(f"lesion found: {'yes' if mask[peak] else 'no'} (heatmap peak {'inside' if mask[peak] else 'outside'} the lesion)")
    if stand_in:
        print(
            "The synthetic lesion is large and bright on purpose: untrained features still separate it from the phantom's "
            "tissue, so this run shows the whole path. Subtle lesions need the pretrained DINOv3 weights."
        )
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
    d.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file, DICOM folder or file, or PNG/JPEG/TIFF slice")
    d.add_argument("--normals", required=True, metavar="NORMALS_DIR")
    d.add_argument("--out-dir", required=True, metavar="OUT")
    add_model_options(d)
    add_dicom_options(d)
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
    add_dicom_options(bt)
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
    warnings.showwarning = _show_warning
    try:
        if args.func is not cmd_worker:
            preflight(args)
        return int(args.func(args) or 0)
    except Cancelled:
        _print_error("cancelled")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _print_error("interrupted")
        return EXIT_INTERRUPTED
    except HiMatchADError as exc:
        if args.debug:
            raise
        _print_error(f"error: {exc}")
        return EXIT_USER_ERROR
    except OSError as exc:  # a full disk, a read-only or missing folder: the user's to fix
        if args.debug:
            raise
        _print_error(f"error: {_os_error_message(exc, args)}")
        return EXIT_USER_ERROR
    except MemoryError:
        if args.debug:
            raise
        _print_error("error: out of memory; try a smaller --resolution or --batch-size, or crop the volume")
        return 1
    except Exception as exc:  # a bug: say so briefly; --debug shows the traceback
        if args.debug:
            raise
        _print_error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback and report it)")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
