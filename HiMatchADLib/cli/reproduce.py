"""``himatchad reproduce SCORES_JSON``: would this installation give the same result?

One line per item (``ITEM: same``, ``ITEM: differs: OLD -> NEW``, ``ITEM: cannot check: WHY``; see
:mod:`HiMatchADLib.detector.reproduce`), then ``reproducible: yes|no|not confirmed (...)``. Exit
status 0 when everything that decides the numbers is the same, 1 when something differs or cannot
be checked, 2 when the JSON cannot be read (or another error a user can fix).
"""

from __future__ import annotations

import argparse
import json

from ..core.progress import tqdm_callback
from ..detector.reproduce import check_reproduction, reproducible, summary_line
from .options import device_arg


def add_subparser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser(
        "reproduce",
        help="say whether this installation would give the same result as a scores JSON, and what differs",
        description="Compare what a result recorded (tool and library versions, method revision, model weights digest, "
        "device, precision, settings, normal bank, input) with this installation. Exit status 0: everything that "
        "decides the numbers is the same; 1: something differs or cannot be checked; 2: the JSON cannot be read.",
    )
    r.add_argument("scores", metavar="SCORES_JSON", help="a <name>_scores.json written by detect, batch or the Slicer module")
    r.add_argument("--model", default=None, help="model to check instead of the one the JSON names (Hub id or local folder)")
    r.add_argument("--normals", default=None, metavar="NORMALS_DIR", help="normal folder instead of the one the JSON names")
    r.add_argument("--bank", default=None, metavar="BANK_FILE", help="bank file instead of the one the JSON names (a result made with --bank)")
    r.add_argument("--input", default=None, metavar="INPUT", help="input instead of the one the JSON names")
    r.add_argument("--device", default=None, type=device_arg, metavar="{auto,cpu,cuda,cuda:N,mps}", help="device instead of the recorded one")
    r.add_argument("--precision", default=None, metavar="{auto,fp32,bf16,int8}", help="precision instead of the recorded one")
    r.add_argument("--cache-dir", default=None, help="where banks are cached, for --rerun (default $HIMATCHAD_CACHE or ~/.cache/himatchad)")
    r.add_argument(
        "--rerun", action="store_true",
        help="also run the detection again (needs the normal folder or bank file, and the input) and compare the heatmap and slice scores",
    )
    r.add_argument("--json", action="store_true", help="print the items as one JSON object instead of lines")
    r.set_defaults(func=cmd_reproduce)
    return r


def cmd_reproduce(args) -> int:
    progress = None
    if args.rerun and not getattr(args, "quiet", False):
        progress = tqdm_callback()
    checks = check_reproduction(
        args.scores, model=args.model, normals=args.normals, bank_file=args.bank, input=args.input, device=args.device,
        precision=args.precision, cache_dir=args.cache_dir, rerun=args.rerun, progress=progress,
    )
    verdict = reproducible(checks)
    if args.json:
        print(json.dumps({"reproducible": verdict, "items": [c.to_dict() for c in checks]}, indent=1, default=str))
    else:
        for c in checks:
            print(c.line())
        print(summary_line(checks))
    return 0 if verdict == "yes" else 1
