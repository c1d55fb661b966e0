"""The commands: bank, detect, batch, demo, worker."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..bank.build import build_or_load
from ..batch.cases import find_cases
from ..batch.engines import get_engine
from ..batch.runner import run_batch
from ..batch.summary import (
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    SUMMARY_NAME,
    summary_counts,
)
from ..core.errors import HiMatchADError
from ..core.progress import print_line, tqdm_callback
from ..detector.detector import HiMatchDetector
from ..evaluation.metrics import dice, image_auroc
from ..evaluation.phantom import write_demo_dataset
from ..features.backbone import DEFAULT_MODEL, build_random_model, load_backbone
from ..io.readers import dicom_input, read_image
from ..outputs.files import check_output_paths
from ..worker.server import main as worker_main
from .checks import check_cache_for_run, check_input_direction, check_out_dir


def _detect_input(inp: Path, args):
    """What ``detect`` analyses: the DICOM series ``--series-filter`` picks in a folder (or a DICOM
    file), else the file. DICOM options on a non-DICOM input are refused."""

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
    det = _detector_from_args(args, progress)
    if getattr(args, "feedback", None):
        det.feedback_dir = Path(args.feedback).expanduser()
    det.use_feedback = getattr(args, "use_feedback", True)
    return det


def _detector_from_args(args, progress=None):
    return HiMatchDetector(
        model=args.model,
        method=getattr(args, "method", "himatch"),
        k=getattr(args, "k", 8),
        fusion=getattr(args, "fusion", "reliability"),
        position_window=getattr(args, "position_window", None),
        sigma=getattr(args, "sigma", None),
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
    return tqdm_callback(disable=getattr(args, "quiet", False))


#: Command-line option destinations that are named otherwise as detector keywords.
_OPTION_KEYWORDS = {"fpr": "target_fpr", "min_size": "min_component_size"}


def _fit(det, normals, args) -> None:
    if getattr(args, "bank", None):  # a bank file instead of the normal scans; the options given must agree with it
        given = getattr(args, "given_options", None)
        det.load_bank(args.bank, asked=None if given is None else {_OPTION_KEYWORDS.get(o, o) for o in given})
        info = det.fit_info
        _say(args, f"normal bank: {info['slices']} slices of {info['subjects']} subjects from the bank file {info['bank_file']}")
        return
    det.fit(normals, rebuild=getattr(args, "rebuild", False))
    info = det.fit_info
    _say(args, f"normal bank: {info['slices']} slices from {info['files']} files ({info['skipped']} skipped), cache {info['cache']}")


def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print_line(msg)


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

    folder = Path(args.normals).expanduser()
    bank = build_or_load(folder, det.extractor, det._bank_settings(folder), det.cache_dir, det.reporter, args.rebuild)
    info = bank.describe()
    info["seconds"] = round(time.perf_counter() - t, 3)
    print(json.dumps(info, indent=1))
    for s in bank.skipped:
        print(f"warning: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


def cmd_bank_export(args) -> int:
    """``bank export``: fit on the folder as ``detect`` would (bank, calibration, DPMM), then write one file."""
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise HiMatchADError(f"--out {out} is a folder; give the path of the bank file to write")
    if not out.parent.is_dir():
        raise HiMatchADError(f"--out {out}: the folder {out.parent} does not exist")
    det = detector_from_args(args, _progress(args))
    check_cache_for_run(det, args.normals, getattr(args, "rebuild", False))
    _fit(det, args.normals, args)
    t = time.perf_counter()
    path = det.export_bank(out, keep_names=args.keep_names)
    info = {
        "bank_file": str(path),
        "bytes": path.stat().st_size,
        "method": det.method,
        "slices": det.fit_info["slices"],
        "subjects": len(det.subjects),
        "names": "kept" if args.keep_names else "anonymised",
        "seconds": round(time.perf_counter() - t, 3),
    }
    print(json.dumps(info, indent=1))
    return 0


def cmd_detect(args) -> int:
    inp = Path(args.input).expanduser()
    if not inp.exists():
        raise HiMatchADError(f"input not found: {inp}")
    out = check_out_dir(args.out_dir)
    query = _detect_input(inp, args)
    det = detector_from_args(args, _progress(args))
    if not args.bank:
        check_cache_for_run(det, args.normals, getattr(args, "rebuild", False))
    check_input_direction(query)
    img = det.check_query(query)  # a bad input fails now, not after minutes of bank building
    check_output_paths(out, img.name, img.is_2d, outputs=args.outputs or ())
    _fit(det, args.normals, args)
    res = det.predict(img)
    paths = det.save(res, out, outputs=args.outputs)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(_summary_line(res, paths))
    return 0


def cmd_batch(args) -> int:
    out = check_out_dir(args.out_dir)
    normals = os.path.abspath(Path(args.normals).expanduser()) if args.normals else None
    exclude = [normals] if normals else []
    inputs = Path(args.input_dir).expanduser()
    find_cases(inputs, out, exclude=exclude, series_filter=args.series_filter)  # refuse a bad input folder before the bank is built

    def progress(message: str, done: int, total: int) -> None:
        if done < total:
            _say(args, message)

    options = None
    if args.engine == "ray" and args.bank:
        raise HiMatchADError("--engine ray needs --normals (its workers build their banks from the folder); use --engine local with --bank")
    if args.engine == "ray":
        get_engine("ray").check()  # say how to install Ray before the bank is built
        if not (args.gpus_per_worker >= 0 and args.cpus_per_worker > 0):
            raise HiMatchADError("--gpus-per-worker must be 0 or more and --cpus-per-worker more than 0")
        options = {
            "address": args.address, "workers": args.workers or 2,
            "gpus_per_worker": args.gpus_per_worker, "cpus_per_worker": args.cpus_per_worker,
        }
    elif args.address is not None or args.workers is not None or args.gpus_per_worker or args.cpus_per_worker != 1.0:
        raise HiMatchADError("--address, --workers, --gpus-per-worker and --cpus-per-worker need --engine ray")
    det = detector_from_args(args, _progress(args))
    if not args.bank:
        check_cache_for_run(det, normals, getattr(args, "rebuild", False))
    _fit(det, normals, args)
    rows = run_batch(
        det, inputs, out, overwrite=args.overwrite, exclude=exclude, progress=progress,
        log=lambda m: print(f"warning: {m}", file=sys.stderr), engine=args.engine, engine_options=options,
        series_filter=args.series_filter, outputs=args.outputs,
    )
    n = summary_counts(rows)
    skipped = f"{n[STATUS_SKIPPED]} skipped, " if n.get(STATUS_SKIPPED) else ""
    report = out / "report.html"
    shown = f"; report: {report}" if report.is_file() else ""
    print(f"{n[STATUS_OK]} processed, {n[STATUS_DONE]} already done, {skipped}{n[STATUS_FAILED]} failed; summary: {out / SUMMARY_NAME}{shown}")
    return 1 if n[STATUS_FAILED] else 0


def cmd_demo(args) -> int:
    import numpy as np


    out = check_out_dir(args.out_dir)
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
                "--model with a DINOv3 Hub id (after your access request is approved on the Hub), "
                "facebook/dinov2-small (Apache-2.0, no login needed) or a local model folder."
            )
    args.model = model
    det = detector_from_args(args, _progress(args))
    _fit(det, paths["normals"], args)
    res = det.predict(paths["query"])
    written = det.save(res, out, outputs=("overview",))
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
    print(f"look at the result: {written['overview']} (the most anomalous slices with the heatmap and the lesion outline)")
    if stand_in:
        print(
            "The synthetic lesion is large and bright on purpose: untrained features still separate it from the phantom's "
            "tissue, so this run shows the whole path. Subtle lesions need the pretrained DINOv3 weights."
        )
    return 0


def cmd_worker(args) -> int:
    return worker_main(parent_pid=getattr(args, "parent_pid", None))
