"""Pre-flight checks of the command line: paths and folders checked before any work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..bank.store import default_cache_root
from ..core.errors import HiMatchADError
from ..io.discovery import check_output_folder
from ..io.series_filters import parse_series_filters
from ..outputs.registry import check_outputs, list_writers


def _check_dicom_options(args) -> None:
    """Parse ``--series-filter`` (bad syntax is refused before any work) and check that the DICOM
    writer is installed when ``--dicom-seg``/``--dicom-heatmap`` ask for it."""
    if not hasattr(args, "series_filter"):
        return

    args.series_filter = parse_series_filters(args.series_filter)
    args.outputs = check_outputs([name for name in list_writers() if getattr(args, name, False)], load=True)


def check_out_dir(out_dir: str) -> Path:
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

    root = Path(cache).expanduser() if cache else default_cache_root()
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "--cache-dir" if cache else "the cache folder ($HIMATCHAD_CACHE or ~/.cache/himatchad)"
        raise HiMatchADError(f"{what} {root} cannot be used: {probe} is a file, not a folder; give --cache-dir a folder")


def _check_out_dir_against_inputs(args) -> None:
    check_output_folder(getattr(args, "out_dir", None), input=getattr(args, "input", None), input_dir=getattr(args, "input_dir", None),
                        normals=getattr(args, "normals", None))


def preflight(args) -> None:
    """Checks of a command's folders and input that fail fast, before any model or bank work."""
    _check_dicom_options(args)
    _check_cache_dir(args)
    _check_out_dir_against_inputs(args)


def write_folders(args) -> list:
    """The folders a command writes to, as the user named them (for messages)."""
    found = []
    if isinstance(getattr(args, "out_dir", None), str):
        found.append(f"--out-dir {args.out_dir}")
    if hasattr(args, "cache_dir"):
        found.append(f"--cache-dir {args.cache_dir or default_cache_root()}")
    return found
