"""Cases of a batch: every input file and DICOM series under a folder, with its output folder and name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional, Union

from ..core.errors import HiMatchADError
from ..io.dicom import DicomSeries
from ..io.discovery import input_path, own_outputs, real_path, walk_inputs
from ..io.formats import strip_suffix
from ..io.series_filters import matches, parse_series_filters

PathLike = Union[str, os.PathLike]


@dataclass
class Case:
    """One input and where its outputs go."""

    path: Path  # the input file or the folder of a DICOM series (as found under the input folder)
    case: str  # the input's path relative to the input folder, posix separators (see the module notes)
    name: str  # the output file prefix (``x`` for ``x.nii.gz``, the series' name for DICOM)
    out_dir: Path  # the mirrored sub-folder of the output folder
    series: Optional[DicomSeries] = None  # the DICOM series of a DICOM case

    @property
    def input(self):
        """What the detector reads: the file, or the DICOM series."""
        return self.series if self.series is not None else self.path

    @property
    def skip_reason(self) -> str:
        """Why this case is not analysed ("" when it is): the problem of its DICOM series."""
        return f"the DICOM series {self.series.problem}" if self.series is not None and self.series.problem else ""


# ------------------------------------------------------------------------------- finding the cases
def absolute_path(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def find_cases(
    input_dir: PathLike,
    out_dir: PathLike,
    exclude: Iterable[PathLike] = (),
    *,
    log: Optional[Callable[[str], None]] = None,
    series_filter=(),
) -> list:
    """Every case under ``input_dir`` and its output folder under ``out_dir``, sorted by ``case``.

    Walks the input folder (links followed, each real folder and file once), skipping the output
    folder, the ``exclude`` folders, hidden entries and outputs of this tool; every DICOM series is a
    case, unless ``series_filter`` (``--series-filter`` values, see
    :func:`HiMatchADLib.dicom.parse_series_filters`) leaves it out. Raises
    :class:`HiMatchADError` when the input folder is missing or lies inside the output or an excluded
    folder, when the output folder lies inside an excluded folder (its outputs would be read as
    normals), when two cases would write the same outputs, and when no case is found. Writes nothing.
    ``log(message)`` receives notes about skipped entries (default: none).
    """
    say = log or (lambda message: None)
    filters = parse_series_filters(series_filter)
    root = absolute_path(input_dir)
    if not root.exists():
        raise HiMatchADError(f"input folder not found: {root}")
    if not root.is_dir():
        raise HiMatchADError(f"not a folder: {root} (use 'himatchad detect' for a single input)")
    out_root = absolute_path(out_dir)
    out_real = out_root.resolve()
    root_real = root.resolve()
    excluded = []
    for e in exclude:
        if e is None:
            continue
        real = real_path(absolute_path(e))
        if real is not None:
            excluded.append(real)
    if _inside(root_real, out_real):
        raise HiMatchADError(f"the input folder {root} is the output folder {out_root} or inside it; choose an output folder outside the input")
    for ex in excluded:
        if _inside(root_real, ex):
            raise HiMatchADError(f"the input folder {root} is inside the excluded folder {ex} (the normal scans); nothing would be processed")
        if _inside(out_real, ex):
            raise HiMatchADError(
                f"the output folder {out_root} is inside {ex} (the normal scans); its outputs would be read as normal scans; "
                "choose an output folder outside it"
            )
    pruned = [out_real] + excluded

    found, own = walk_inputs(root, prune=pruned, skip_names=own_outputs, log=say)
    if own:
        say(f"skipped {len(own)} outputs of this tool found in the input folder, e.g. {own[0]}")
    left_out = [x for x in found if isinstance(x, DicomSeries) and not matches(x, filters)]
    if left_out:
        found = [x for x in found if not (isinstance(x, DicomSeries) and not matches(x, filters))]
        say(f"--series-filter {' or '.join(str(f) for f in filters)} left out {len(left_out)} DICOM series")
    if not found:
        why = f"; --series-filter left out all {len(left_out)} DICOM series" if left_out else ""
        raise HiMatchADError(f"no images found in {root} (outside the output folder and the normal scans){why}")

    cases = []
    for item in found:
        path = input_path(item)
        rel = PurePosixPath(path.relative_to(root).as_posix())
        out_dir = out_root / Path(*rel.parent.parts)
        if isinstance(item, DicomSeries):
            # The one image series of a folder is named after the folder; the others after their series.
            case = rel if item.name == Path(os.path.abspath(path)).name else rel / item.name
            cases.append(Case(path=path, case=str(case), name=item.name, out_dir=out_dir, series=item))
        else:
            cases.append(Case(path=path, case=str(rel), name=strip_suffix(path), out_dir=out_dir))
    cases.sort(key=lambda c: PurePosixPath(c.case).parts)

    taken: dict = {}
    for c in cases:  # case-insensitive: the outputs may land on a case-insensitive file system
        key = (c.out_dir, c.name.casefold())
        other = taken.setdefault(key, c)
        if other is not c:
            raise HiMatchADError(
                f"two inputs would write the same outputs ({c.out_dir / c.name}_*): {_shown(other)} and {_shown(c)}; "
                "rename or move one of them"
            )
    return cases


def _shown(case: Case) -> str:
    return str(case.path) if case.series is None else f"{case.path} (DICOM series {case.series.series_uid})"
