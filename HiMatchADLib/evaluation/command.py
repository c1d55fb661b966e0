"""The ``himatchad evaluate`` sub-command."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..detector.parameters import add_method_tuning, argtype, positive_int
from .datasets import LAYOUTS, SPLITS
from .records import DETECTOR_METHODS
from .report import print_table
from .runner import DEFAULT_MAX_PIXELS, DEFAULT_OUT, evaluate


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``himatchad evaluate``; the parsed namespace's ``func(args)`` returns the exit code."""

    p = subparsers.add_parser(
        "evaluate",
        help="benchmark the himatch, knn and dpmm modes and intensity baselines on a labelled data set",
        description=(
            "Fit each mode on the data set's normal images (one shared feature bank), predict every test case, and "
            "report image AUROC, pixel AUROC, AUPRO (FPR 0.3), pixel AP, best Dice, Dice at the automatic threshold, "
            "time and memory, next to intensity-only baselines. Writes OUT/results.md, OUT/results.json and "
            "OUT/results.png. Layouts: BMAD (brain, liver, RESC; detected from the folders) or volumes "
            "(normal/, test/img/, test/label/)."
        ),
    )
    p.add_argument("dataset_dir", metavar="DATASET_DIR", help="data set folder")
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="folder layout (default: detected)")
    p.add_argument("--split", choices=SPLITS, default="test", help="BMAD split to evaluate (default test)")
    p.add_argument("--model", default=None, help="Hugging Face id or local folder of the DINOv3/DINOv2 model")
    p.add_argument("--methods", default=",".join(DETECTOR_METHODS), help=f"comma-separated modes (default {','.join(DETECTOR_METHODS)})")
    p.add_argument("--no-baselines", action="store_true", help="skip the intensity-only baselines")
    p.add_argument("--max-normals", type=argtype(positive_int), default=None, metavar="N", help="use N normal images (evenly spaced, deterministic)")
    p.add_argument("--max-test", type=argtype(positive_int), default=None, metavar="N", help="use N test cases (stratified, deterministic)")
    p.add_argument("--out-dir", default=DEFAULT_OUT, metavar="OUT", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--resolution", type=int, default=None, help="shorter side of the model input in pixels (detector default 448)")
    p.add_argument("--k", type=int, default=None, help="normal slices retrieved per query slice (himatch)")
    add_method_tuning(p)
    p.add_argument("--modality", default=None, help="intensity preset: auto, mri, ct, oct, 8bit (default auto)")
    p.add_argument(
        "--slice-axis", default=None, choices=("auto", "axial", "coronal", "sagittal", "largest_spacing"),
        help="slicing direction of volumes (default: the modality's)",
    )
    p.add_argument(
        "--fpr", type=float, default=None,
        help="target pixel false-positive rate of the automatic thresholds (detector default 0.01; also used for the baselines)",
    )
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass")
    p.add_argument("--cache-dir", default=None, help="bank cache folder (default $HIMATCHAD_CACHE or ~/.cache/himatchad)")
    p.add_argument("--seed", type=int, default=None, help="seed of the detector's clustering and calibration split")
    p.add_argument("--examples", type=int, default=4, help="example cases in the figure (default 4)")
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"pixel budget of the pooled pixel metrics; above it, normal pixels are subsampled (default {DEFAULT_MAX_PIXELS:,}; 0 = exact)",
    )
    # SUPPRESS: a --quiet given before the sub-command (himatchad --quiet evaluate ...) is kept.
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    p.set_defaults(func=run_evaluate_cli)
    return p


def run_evaluate_cli(args) -> int:
    methods = [m for m in (args.methods or "").split(",") if m.strip()]
    kwargs = {
        "model": args.model,
        "resolution": args.resolution,
        "k": args.k,
        "fusion": args.fusion,
        "position_window": args.position_window,
        "sigma": args.sigma,
        "modality": args.modality,
        "slice_axis": args.slice_axis,
        "target_fpr": args.fpr,
        "device": args.device,
        "batch_size": args.batch_size,
        "cache_dir": args.cache_dir,
        "seed": args.seed,
    }
    command = "himatchad " + " ".join(_quote(a) for a in sys.argv[1:]) if sys.argv and sys.argv[0] else None
    result = evaluate(
        args.dataset_dir,
        args.out_dir,
        layout=args.layout,
        split=args.split,
        methods=methods,
        baselines=not args.no_baselines,
        max_normals=args.max_normals,
        max_test=args.max_test,
        detector_kwargs=kwargs,
        max_pixels=args.max_pixels or None,
        n_examples=max(0, args.examples),
        progress=not getattr(args, "quiet", False),
        command=command,
    )
    print_table(result)
    out = Path(args.out_dir)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a.replace("'", "'\\''") + "'"
