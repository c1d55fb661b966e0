"""The ``himatchad`` command line: bank, detect, batch, demo, reproduce (and evaluate, synth).

Errors a user can cause print one message (no traceback) and exit with status 2; an interrupted run
exits with 130. ``--debug`` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional

from ..batch.engines import get_engine, list_engines
from ..core.errors import Cancelled, HiMatchADError, ModelAccessError
from ..core.progress import close_bars, print_line
from ..core.version import __version__
from ..evaluation.command import add_subparser as add_evaluate_subparser
from ..evaluation.synth import add_subparser as add_synth_subparser
from .checks import preflight, write_folders
from .commands import cmd_bank, cmd_bank_export, cmd_batch, cmd_demo, cmd_detect, cmd_worker
from .options import add_dicom_options, add_feedback_options, add_model_options, add_picture_options, positive_int_arg
from .feedback import add_subparser as add_feedback_subparser
from .reproduce import add_subparser as add_reproduce_subparser
from .report import add_subparser as add_report_subparser

EXIT_USER_ERROR = 2


EXIT_INTERRUPTED = 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print_line(f"warning: {message}", file)


def _os_error_message(exc: OSError, args=None) -> str:
    """One line for an operating-system error: what failed, on which path, what to do."""
    import errno

    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename:
        where = f" {exc.filename}"
    else:
        folders = write_folders(args) if args is not None else []
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

    close_bars()
    sys.stdout.flush()
    print(" ".join(str(message).split("\n")).strip(), file=sys.stderr, flush=True)


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

    # "himatchad bank export NORMALS --out FILE" (main() routes the two words here)
    be = sub.add_parser(
        "bank export", help="write the normal bank of a folder, calibrated for one method, to one file to share (detect --bank FILE)"
    )
    be.add_argument("normals", metavar="NORMALS_DIR")
    be.add_argument("--out", required=True, metavar="FILE", help="the bank file to write (e.g. brain-flair.himatchad-bank)")
    be.add_argument(
        "--keep-names", action="store_true",
        help="keep the normal files' names and subjects in the file (default: replaced by normal-0001, subject-0001, ...)",
    )
    add_model_options(be)
    be.set_defaults(func=cmd_bank_export)

    d = sub.add_parser("detect", help="detect anomalies in one volume or image")
    d.add_argument("input", metavar="INPUT", help="NIfTI/NRRD/MHA file, DICOM folder or file, or PNG/JPEG/TIFF slice")
    _add_normals_source(d)
    d.add_argument("--out-dir", required=True, metavar="OUT")
    add_model_options(d)
    add_picture_options(d)
    add_feedback_options(d)
    add_dicom_options(d)
    d.set_defaults(func=cmd_detect)

    bt = sub.add_parser("batch", help="detect on every input of a folder (resumable, CSV summary)")
    bt.add_argument("input_dir", metavar="INPUT_DIR")
    _add_normals_source(bt)
    bt.add_argument("--out-dir", required=True, metavar="OUT")
    bt.add_argument("--overwrite", action="store_true", help="recompute every case, even those finished earlier with the same settings")
    eg = bt.add_argument_group("engine")
    eg.add_argument("--engine", default="local", choices=list_engines(), help="; ".join(f"{e}: {get_engine(e).title}" for e in list_engines()) + " (default local)")
    eg.add_argument("--address", default=None, metavar="ADDR", help="Ray cluster to use ('auto', 'ray://head:10001'); default: start a local one")
    eg.add_argument("--workers", type=positive_int_arg, default=None, metavar="W", help="Ray actors (default 2)")
    eg.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="GPUs per Ray actor; a fraction shares a GPU (default 0)")
    eg.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs per Ray actor (default 1)")
    add_model_options(bt)
    add_picture_options(bt)
    add_feedback_options(bt)
    add_dicom_options(bt)
    bt.set_defaults(func=cmd_batch)

    dm = sub.add_parser("demo", help="generate a small synthetic data set and run detection on it")
    dm.add_argument("--out-dir", default="himatchad-demo", metavar="OUT")
    dm.add_argument("--normals-count", type=positive_int_arg, default=6, help=argparse.SUPPRESS)
    dm.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    add_model_options(dm)
    dm.set_defaults(func=cmd_demo, model=None, resolution=224)
    for a in dm._actions:  # demo: no default model (pretrained if cached, else a random stand-in)
        if a.dest == "model":
            a.default = None
            a.help = "Hugging Face id or local folder (default: pretrained DINOv3 if cached locally, else a random stand-in)"
        if a.dest == "resolution":
            a.default = 224
            a.help = "shorter side of the model input (demo default 224, for speed)"

    wk = sub.add_parser("worker", help="serve detection requests as JSON lines on stdin/stdout (the 3D Slicer module's worker process)")
    wk.add_argument(
        "--parent-pid", type=positive_int_arg, default=None, metavar="PID",
        help="exit when the process PID ends (the application that started the worker); default: when the parent process changes (POSIX)",
    )
    wk.set_defaults(func=cmd_worker)

    add_reproduce_subparser(sub)
    add_feedback_subparser(sub)
    add_report_subparser(sub)
    add_evaluate_subparser(sub)
    add_synth_subparser(sub)
    return p


def _add_normals_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--normals", metavar="NORMALS_DIR", help="folder of normal scans (the bank is built and cached)")
    src.add_argument("--bank", metavar="BANK_FILE", help="a bank file made by 'himatchad bank export' (no normal scans needed)")


def _route_bank_export(argv: list) -> list:
    """``bank export X ...`` -> the ``bank export`` command (``bank export`` alone is the bank of a folder named export)."""
    i = next((n for n, a in enumerate(argv) if not a.startswith("-")), None)
    if i is not None and argv[i] == "bank" and len(argv) > i + 2 and argv[i + 1] == "export":
        return [*argv[:i], "bank export", *argv[i + 2 :]]
    return argv


def _given_options(argv: list) -> set:
    """The destinations of the options given on ``argv`` (parsed again with every default suppressed)."""

    def suppress(parser) -> None:
        parser._defaults.clear()
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    suppress(sp)
            else:
                a.default = argparse.SUPPRESS

    p = build_parser()
    suppress(p)
    return set(vars(p.parse_args(argv)))


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    argv = _route_bank_export(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    args.given_options = _given_options(argv)  # what a bank file must not override (detect --bank)
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
        _print_error(f"error: {exc.message('cli') if isinstance(exc, ModelAccessError) else exc}")
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
