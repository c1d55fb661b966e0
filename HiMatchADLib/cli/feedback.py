"""``himatchad feedback add|list|remove``: reader feedback ("mark as normal") from the command line.

``add RESULT_JSON --region LABELMAP | --slices A-B``: the region of the result's case (a labelmap on
its grid, e.g. an edited ``<name>_labelmap.nii.gz``, and/or a range of slices along the axis the
result was sliced) is normal; the detector the result was made with (its settings, model and normal
bank, its input checked unchanged) turns it into a feedback entry beside the bank. ``list`` and
``remove`` take the result (whose JSON names the feedback folder) or ``--feedback DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.errors import HiMatchADError
from ..core.progress import tqdm_callback
from ..detector.feedback import list_feedback, mark_normal, remove_feedback
from ..detector.reproduce import read_scores_json, result_detector


def slice_range(text: str) -> list:
    """``"12"``, ``"10-14"`` (both included) or ``"3,5,10-12"`` -> slice indices."""
    out = []
    try:
        for part in str(text).split(","):
            a, _, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if b else int(a)
            if hi < lo or lo < 0:
                raise ValueError
            out.extend(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"slices are N, A-B or a comma-separated list of them (0-based), not {text!r}") from None
    return out


def add_subparser(sub) -> argparse.ArgumentParser:
    f = sub.add_parser(
        "feedback", help="mark regions of a result as normal (reader feedback), list or remove such marks",
        description="Reader feedback: a region marked normal becomes normal evidence of every later detection with the "
        "same normal bank (kept beside the bank, never written into it; the threshold is not changed).",
    )
    fs = f.add_subparsers(dest="feedback_command", metavar="ACTION")
    fs.required = True
    a = fs.add_parser("add", help="mark a region of a result's case as normal")
    a.add_argument("scores", metavar="RESULT_JSON", help="the <name>_scores.json of the result")
    a.add_argument("--region", default=None, metavar="LABELMAP", help="a labelmap on the case's grid: its non-zero voxels are normal")
    a.add_argument("--slices", type=slice_range, default=None, metavar="A-B",
                   help="slices (0-based, along the axis the result was sliced; N, A-B or a list): their foreground, or the --region within them")
    a.add_argument("--note", default="", help="why it is normal (kept with the entry)")
    a.add_argument("--feedback", default=None, metavar="DIR", help="the feedback folder (default: the one the result's run used)")
    a.add_argument("--input", default=None, help="the case's input instead of the path the JSON records")
    a.add_argument("--normals", default=None, metavar="NORMALS_DIR", help="normal folder instead of the one the JSON names")
    a.add_argument("--bank", default=None, metavar="BANK_FILE", help="bank file instead of the one the JSON names")
    a.add_argument("--cache-dir", default=None)
    a.set_defaults(func=cmd_feedback_add)
    ls = fs.add_parser("list", help="list the feedback entries")
    ls.add_argument("scores", nargs="?", default=None, metavar="RESULT_JSON", help="a result whose run used the feedback folder")
    ls.add_argument("--feedback", default=None, metavar="DIR", help="the feedback folder")
    ls.add_argument("--json", action="store_true", help="print the entries' records as JSON")
    ls.set_defaults(func=cmd_feedback_list)
    rm = fs.add_parser("remove", help="remove feedback entries")
    rm.add_argument("ids", nargs="*", metavar="ID", help="entry ids (or unique starts of them)")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    rm.add_argument("--result", dest="scores", default=None, metavar="RESULT_JSON", help="a result whose run used the feedback folder")
    rm.add_argument("--feedback", default=None, metavar="DIR", help="the feedback folder")
    rm.set_defaults(func=cmd_feedback_remove)
    return f


def _folder(args) -> Path:
    if args.feedback:
        return Path(args.feedback).expanduser()
    if not args.scores:
        raise HiMatchADError("name the feedback folder (--feedback DIR) or a result whose run used it")
    data = read_scores_json(args.scores)
    folder = (data.get("provenance") or {}).get("feedback_folder") if isinstance(data.get("provenance"), dict) else None
    if not folder:
        raise HiMatchADError(f"{args.scores} records no feedback folder (a result of an older version); give it with --feedback DIR")
    return Path(folder)


def _line(meta: dict) -> str:
    r = meta.get("region", {})
    sl = r.get("slices") or []
    where = f"slices {sl[0]}-{sl[-1]}" if len(sl) > 1 else (f"slice {sl[0]}" if sl else "")
    note = f"  \"{meta['note']}\"" if meta.get("note") else ""
    return f"{meta['id']}  {meta['created']}  {meta.get('case', {}).get('name', '?')}  {r.get('kind', '?')} {where}, {r.get('patches', '?')} patches{note}"


def cmd_feedback_add(args) -> int:
    if args.region is None and args.slices is None:
        raise HiMatchADError("say what is normal: --region LABELMAP and/or --slices A-B")
    progress = None if getattr(args, "quiet", False) else tqdm_callback()
    det, source, data = result_detector(
        args.scores, normals=args.normals, bank_file=args.bank, input=args.input, cache_dir=args.cache_dir, progress=progress)
    if args.feedback:
        det.feedback_dir = Path(args.feedback).expanduser()
    case = {"name": data.get("name"), "input": data.get("input"), "input_digest": data.get("input_digest")}
    meta = mark_normal(det, source, region=args.region, slices=args.slices, note=args.note, case=case)
    print(f"added {_line(meta)}")
    print(f"feedback folder: {det.feedback_folder} (used by the next detection with this normal bank; the threshold is unchanged)")
    return 0


def cmd_feedback_list(args) -> int:
    folder = _folder(args)
    entries = list_feedback(folder)
    if args.json:
        print(json.dumps({"folder": str(folder), "entries": entries}, indent=1))
        return 0
    print(f"feedback folder: {folder} ({len(entries)} entries)")
    for m in entries:
        print(_line(m))
    return 0


def cmd_feedback_remove(args) -> int:
    folder = _folder(args)
    ids = [m["id"] for m in list_feedback(folder)] if args.all else list(args.ids)
    if not ids and not args.all:
        raise HiMatchADError("name the entries to remove (their ids, see 'himatchad feedback list') or give --all")
    for i in ids:
        meta = remove_feedback(folder, i)
        print(f"removed {meta.get('id', i)}")
    return 0
