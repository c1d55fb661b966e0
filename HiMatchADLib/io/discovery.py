"""Input discovery: the images and DICOM series under a folder, links followed once, outputs of this tool left out."""

from __future__ import annotations

import errno
import json
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..core.errors import HiMatchADError
from ..core.progress import warn
from .dicom import DicomSeries, describe_files, is_dicom_candidate, mark_split_series
from .formats import is_image_file


def real_path(path: Path) -> Optional[Path]:
    """``path`` with every link resolved, or None for a link loop or an unreachable target."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):  # "Symlink loop" is a RuntimeError before Python 3.13
        return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def walk_inputs(
    root: Path,
    *,
    recursive: bool = True,
    prune: Iterable[Path] = (),
    skip_names: Optional[Callable[[list], set]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> tuple[list, list[Path]]:
    """The inputs under the folder ``root``, in the order found, and the files left out by
    ``skip_names``. An input is an image file (a ``Path``) or a DICOM series
    (:class:`~HiMatchADLib.io.dicom.DicomSeries`): every series of every folder is an input of its
    own, whether it can be analysed or not (its ``problem`` says).

    Breadth first, links followed, but every real folder is entered once and every real input kept
    once (of two ways to one input, the shorter). Skipped: hidden entries, link loops and dangling
    links, anything whose real path lies in one of the real folders ``prune``, and in each folder the
    file names returned by ``skip_names(entries)``. ``log(message)`` hears about loops and
    duplicates. A series found in several folders is marked unusable in each.
    """

    say = log or (lambda message: None)
    pruned = list(prune)
    root_real = real_path(root) or root
    found: list = []
    skipped: list[Path] = []
    seen_dirs = {root_real}
    seen_inputs: dict = {}

    def add(item, key, shown) -> None:
        first = seen_inputs.get(key)
        if first is not None:
            say(f"{shown} is the same input as {first}; processed once")
            return
        seen_inputs[key] = shown
        found.append(item)

    queue = deque([root])
    while queue:
        d = queue.popleft()
        try:
            entries = sorted(d.iterdir())
        except OSError as exc:
            raise HiMatchADError(f"cannot list folder {d}: {exc.strerror or exc}") from exc
        names = skip_names(entries) if skip_names is not None else set()
        candidates = []
        for p in entries:
            if p.name.startswith("."):
                continue
            real = real_path(p)
            if real is None:
                say(f"{p} is a symbolic link loop or a broken link; skipped")
                continue
            if any(_inside(real, q) for q in pruned):
                continue
            if p.is_dir():
                if recursive and real not in seen_dirs:
                    seen_dirs.add(real)
                    queue.append(p)
            elif p.name in names and (is_image_file(p) or is_dicom_candidate(p)):
                skipped.append(p)
            elif is_image_file(p):
                add(p, real, p)
            elif is_dicom_candidate(p):
                candidates.append(p)
        d_real = real_path(d) or d
        for series in describe_files(d, candidates):
            add(series, (d_real, series.series_uid), f"DICOM series {series.series_uid} in {d}")
    series_found = mark_split_series([x for x in found if isinstance(x, DicomSeries)])
    marked = iter(series_found)
    found = [next(marked) if isinstance(x, DicomSeries) else x for x in found]
    return found, skipped


def input_path(item) -> Path:
    """The path of an input found by :func:`walk_inputs`: the file, or the folder of a DICOM series."""
    return Path(item.folder) if isinstance(item, DicomSeries) else Path(item)


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Every input under ``folder``: image files and folders holding DICOM series, sorted (a folder
    once, however many series it holds: reading it picks its one image series or says why not).

    Hidden files and folders (our cache, ``.DS_Store``) and outputs of this tool (heatmaps, labelmaps,
    overlays named by one of our scores JSON beside them) are skipped. Symbolic links are followed,
    but a link loop or two links to one file give one input (:func:`walk_inputs`).
    """
    root = Path(folder)
    if not root.exists():
        raise HiMatchADError(f"folder not found: {root}")
    if not root.is_dir():
        raise HiMatchADError(f"not a folder: {root}")

    found, own = walk_inputs(root, recursive=recursive, skip_names=own_outputs)
    if own:
        warn(f"{root}: skipped {len(own)} outputs of this tool (e.g. {own[0].name}); they are not input images")
    return sorted(dict.fromkeys(input_path(x) for x in found))


_MAX_SCORES_JSON_BYTES = 64 * 1024 * 1024


def own_outputs(entries: list) -> set:
    """Names of files in one folder that are outputs of this tool, told by our scores JSON beside them.

    A scores JSON of ours names itself and its sibling outputs under ``"outputs"`` and records
    ``"settings"`` and ``"volume_score"``.
    """
    names: set = set()
    for p in entries:
        if not p.name.endswith("_scores.json") or p.name.startswith("."):
            continue
        try:
            if not p.is_file() or p.stat().st_size > _MAX_SCORES_JSON_BYTES:
                continue
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        outputs = data.get("outputs") if isinstance(data, dict) else None
        if not isinstance(outputs, dict) or outputs.get("scores") != p.name:
            continue
        if "settings" not in data or "volume_score" not in data:
            continue
        names.update(v for v in outputs.values() if isinstance(v, str) and "/" not in v and "\\" not in v)
    return names


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_links(path, name: str) -> None:
    """Refuse a folder to be written (``name`` is what the caller calls it) that is, or lies under, a
    symbolic link that leads nowhere: a dangling link or a link loop (creating the folder would fail
    only when the first output is written)."""
    given = Path(path).expanduser()
    for p in (given, *given.parents):
        if p.exists():
            return  # every link from here up leads somewhere
        if not p.is_symlink():
            continue
        where = f"{name} {path} is" if p == given else f"{name} {path} lies under {p}, which is"
        try:
            os.stat(p)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise HiMatchADError(f"{where} a symbolic link loop; choose another {name}") from exc
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        raise HiMatchADError(
            f"{where} a symbolic link to {target}, which does not exist; create the folder it points to or choose another {name}"
        )


def check_output_folder(out_dir, *, input=None, input_dir=None, normals=None, name: str = "--out-dir") -> None:
    """Refuse an output folder that is, or lies under, a dangling symbolic link or a link loop
    (:func:`check_links`), that is the input folder (a batch would find nothing new to do, a DICOM
    series folder would get NIfTI files among its slices), or the normal scans' folder or a folder
    inside it (the next bank would read the outputs as normal scans). ``name`` is what the caller
    calls the output folder in its messages."""
    if not isinstance(out_dir, (str, os.PathLike)):
        return
    check_links(out_dir, name)
    out = _real(Path(out_dir).expanduser())
    inputs = []
    if isinstance(input_dir, (str, os.PathLike)):
        inputs.append(("the input folder", Path(input_dir).expanduser()))
    if isinstance(input, (str, os.PathLike)):
        inp = Path(input).expanduser()
        if inp.exists():
            inputs.append(("the input folder", inp) if inp.is_dir() else ("the folder of the input", inp.parent))
    for what, folder in inputs:
        if folder.is_dir() and _real(folder) == out:
            raise HiMatchADError(f"{name} {out_dir} is {what} {folder}; choose another {name} (outputs and inputs must not mix)")
    if isinstance(normals, (str, os.PathLike)) and Path(normals).expanduser().is_dir():
        real = _real(Path(normals).expanduser())
        if out == real or real in out.parents:
            raise HiMatchADError(
                f"{name} {out_dir} is, or is inside, the normal scans' folder {normals}; the outputs would be read as normal "
                f"scans next time. Choose an {name} outside it"
            )
