"""Writing a detection result: heatmap, labelmap, scores JSON and (for 2D inputs) an overlay PNG;
on request the overview picture of a volume (``<name>_overview.png``) and, for a DICOM input, a
DICOM SEG of the labelmap and a DICOM parametric map of the heatmap.

Every file is written under a temporary name and renamed into place; the scores JSON comes last and
carries ``"complete": true``, so a folder with a readable JSON holds a finished result. The JSON's
``"outputs"`` names every file of the result (the DICOM ones included), which is how a rerun and
the input walk (:func:`own_outputs`) know them.

The DICOM writers live in :mod:`HiMatchADLib.dicom_seg` (``write_dicom_seg``,
``write_dicom_heatmap``; they need highdicom: ``pip install "himatchad[dicom]"``) and are imported
only when asked for.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from ..core.atomic import atomic_path, name_max, write_text_atomic
from ..core.digest import files_digest
from ..core.errors import HiMatchADError
from ..core.geometry import DIRECTION_TOLERANCE, Geometry
from ..core.result import DetectionResult, Support
from ..io.readers import read_image
from ..io.writers import write_image
from .overlay import overlay_rgb
from .registry import OUTPUT_WRITERS, get_writer, outputs_for


def output_paths(
    out_dir: Union[str, os.PathLike], name: str, is_2d: bool, foreground: bool = False, outputs: Iterable[str] = (),
) -> dict:
    """Where the outputs of ``name`` go. The foreground mask is written only on request (the worker
    asks for it, so that a result read back can be re-thresholded exactly), and so are the optional
    outputs named in ``outputs`` (:mod:`.registry`: ``<name>_seg.dcm``, ``<name>_heatmap_pm.dcm``)."""
    out = Path(out_dir)
    paths = {
        "heatmap": out / f"{name}_heatmap.nii.gz",
        "labelmap": out / f"{name}_labelmap.nii.gz",
        "scores": out / f"{name}_scores.json",
    }
    if is_2d:
        paths["overlay"] = out / f"{name}_overlay.png"
    if foreground:
        paths["foreground"] = out / f"{name}_foreground.nii.gz"
    for key in outputs_for(outputs, is_2d):  # a 2D input's picture is its overlay
        paths[key] = out / f"{name}{get_writer(key).suffix}"
    return paths


def check_output_paths(out_dir: Union[str, os.PathLike], name: str, is_2d: bool = True, foreground: bool = False, outputs: Iterable[str] = ()) -> None:
    """Refuse, before any work, outputs of ``name`` that cannot be written: a name longer than the
    file system allows, or a folder (or anything but a file) where an output file goes. With
    ``is_2d`` the overlay PNG is checked too (when it is not known yet whether the input is 2D)."""
    out = Path(out_dir).expanduser()
    longest = name_max(out)
    for key, path in output_paths(out, name, is_2d, foreground=foreground, outputs=outputs).items():
        n = len(os.fsencode(path.name))
        if n > longest:
            raise HiMatchADError(
                f"the output file name {path.name[:60]}... is {n} bytes long, more than the file system of {out} allows "
                f"({longest}): rename the input (its name names the outputs)"
            )
        if path.exists() and not path.is_file():
            raise HiMatchADError(f"cannot write the {key} output {path}: a folder (or another non-file) of that name is in the way; move it")


def output_damage(scores_path: Union[str, os.PathLike], data: dict, digests: bool = True) -> str:
    """What is wrong with the files a complete scores JSON ``data`` lists ("" when nothing): a
    missing file, or one whose size (or, with ``digests``, content) differs from what the JSON
    recorded when it was written (``"output_digests"``). A result that records no digests is
    reported as such: nothing then tells a cut or emptied file from the one written."""
    folder = Path(scores_path).parent
    names = {k: v for k, v in (data.get("outputs") or {}).items() if isinstance(v, str) and k != "scores"}
    recorded = data.get("output_digests")
    if not isinstance(recorded, dict):
        return "the earlier result records no digests of its outputs"
    for key, name in names.items():
        path = folder / name
        want = recorded.get(key)
        if not path.is_file():
            return f"its {key} output {name} is missing"
        if not isinstance(want, dict):
            return f"the earlier result records no digest of its {key} output {name}"
        try:
            size = path.stat().st_size
            if size != want.get("bytes") or (digests and files_digest([path]) != want):
                return f"its {key} output {name} was changed or damaged after it was written"
        except OSError as exc:
            return f"its {key} output {name} cannot be read ({exc.strerror or exc})"
    return ""


def is_complete(out_dir: Union[str, os.PathLike], name: str, digests: bool = True) -> bool:
    """True when the scores JSON of ``name`` says it is complete and every output it lists is there,
    as it was written (sizes, and with ``digests`` the content: :func:`output_damage`)."""
    p = output_paths(out_dir, name, False)
    try:
        data = json.loads(p["scores"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or not data.get("complete"):
        return False
    need = list(output_paths(out_dir, name, bool(data.get("geometry", {}).get("is_2d"))).values())
    need += [p["scores"].parent / v for v in (data.get("outputs") or {}).values() if isinstance(v, str)]
    return all(v.exists() for v in need) and not output_damage(p["scores"], data, digests)


def save_result(
    result: DetectionResult, out_dir: Union[str, os.PathLike], foreground: bool = False,
    outputs: Iterable[str] = (),
) -> dict:
    """Write the result next to nothing half-done; returns the written paths.

    The scores JSON of an earlier result of the same name is removed first, so that an interrupted
    re-run never leaves new maps beside an old JSON that says "complete". ``foreground``: also write
    ``<name>_foreground.nii.gz`` (uint8), which :func:`load_result` uses to re-threshold exactly.
    ``outputs``: names of optional outputs (:func:`~HiMatchADLib.outputs.registry.list_writers`),
    e.g. ``{"dicom_seg", "dicom_heatmap"}``: ``<name>_seg.dcm`` (DICOM SEG of the labelmap) /
    ``<name>_heatmap_pm.dcm`` (parametric map of the heatmap) referencing the source series
    (``result.source_files``; a result of a non-DICOM input is refused), ``"overview"``: the
    overview picture of a volume (``result.display_image`` needed, see
    :meth:`HiMatchADLib.detector.HiMatchDetector.save`; left out for a 2D input, whose picture is
    its overlay PNG). Optional outputs of an
    earlier result of the same name that are not written again are removed (they would not match
    the new maps).
    """
    outputs = outputs_for(outputs, result.geometry.is_2d)
    check_output_paths(out_dir, result.name, result.geometry.is_2d, foreground, outputs)
    writers = {}
    for key in outputs:
        writer = get_writer(key)
        if writer.needs == "dicom" and not result.source_files:
            raise HiMatchADError(
                f"a DICOM SEG or parametric map needs a DICOM input; {result.name} was read from "
                f"{result.source_path or 'an array'}, which is not DICOM"
            )
        writers[key] = writer.load()
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HiMatchADError(f"cannot create output folder {out}: {exc.strerror}") from exc
    paths = output_paths(out, result.name, result.geometry.is_2d, foreground=foreground, outputs=outputs)
    # Optional outputs of an earlier result under this name that are not written again (as the maps,
    # they are replaced by name): they would not match the new maps.
    stale = [out / f"{result.name}{w.suffix}" for key, w in OUTPUT_WRITERS.items() if key not in paths]
    try:
        paths["scores"].unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise HiMatchADError(f"cannot replace the earlier result {paths['scores']}: {exc.strerror}") from exc
    t = time.perf_counter()
    write_image(np.asarray(result.heatmap, np.float32), result.geometry, paths["heatmap"])  # no copy when already so
    write_image(np.asarray(result.labelmap, np.uint8), result.geometry, paths["labelmap"])
    if foreground:
        write_image(result.foreground.astype(np.uint8), result.geometry, paths["foreground"])
    if "overlay" in paths:
        from PIL import Image as PILImage

        img = getattr(result, "image_array", None)
        base = img[0] if img is not None else result.heatmap[0]
        rgb = overlay_rgb(base, result.heatmap[0], result.labelmap[0], result.threshold, result.display_floor)
        with atomic_path(paths["overlay"]) as tmp:
            PILImage.fromarray(rgb).save(tmp, format="PNG")
    for path in stale:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise HiMatchADError(f"cannot remove the earlier output {path}: {exc.strerror}") from exc
    sources = [str(f) for f in result.source_files]
    for key, write in writers.items():
        write(result, sources, paths[key])
    result.timings["write"] = time.perf_counter() - t
    data = result.to_dict()
    if isinstance(data.get("provenance"), dict) and any(get_writer(k).needs == "dicom" for k in writers):
        data["provenance"] = {**data["provenance"], "libraries": {**(data["provenance"].get("libraries") or {}), **_dicom_versions()}}
        result.provenance = data["provenance"]
    data["outputs"] = {k: v.name for k, v in paths.items()}
    data["output_digests"] = {k: files_digest([v]) for k, v in paths.items() if k != "scores"}
    data["complete"] = True
    write_text_atomic(paths["scores"], json.dumps(data, indent=1))
    return paths


def _dicom_versions() -> dict:
    """The versions of the libraries that write the DICOM outputs, for the JSON's provenance."""
    from importlib import metadata

    out = {}
    for name in ("highdicom", "pydicom"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_result(scores_path: Union[str, os.PathLike]) -> DetectionResult:
    """Read a complete result written by :func:`save_result` back into a :class:`DetectionResult`.

    The geometry is the one recorded in the JSON (full precision), checked against the maps' files.
    The foreground comes from ``<name>_foreground.nii.gz`` when it was written, otherwise it is the
    set of voxels with a positive heatmap (the heatmap is 0 outside the foreground). Raises
    :class:`HiMatchADError` for an incomplete or inconsistent result.
    """

    path = Path(scores_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HiMatchADError(f"cannot read the result {path}: {exc}") from exc
    if not isinstance(data, dict) or not data.get("complete"):
        raise HiMatchADError(f"{path} is not a complete result (was its run interrupted?); run the detection again")
    damage = output_damage(path, data)
    if damage and "no digest" not in damage:  # results written before digests were recorded stay readable
        raise HiMatchADError(f"{path.name}: {damage}; run the detection again")
    try:
        geometry = Geometry.from_dict(data["geometry"])
        files = {k: path.parent / v for k, v in data["outputs"].items()}
        heat = read_image(files["heatmap"])
        lab = read_image(files["labelmap"])
        fg = read_image(files["foreground"]) if "foreground" in files else None
    except KeyError as exc:
        raise HiMatchADError(f"{path} does not list its {exc.args[0]} output; run the detection again") from exc
    for img in (heat, lab) + ((fg,) if fg is not None else ()):
        g = img.geometry
        in_plane = slice(0, 2) if geometry.is_2d else slice(0, 3)
        if (
            g.size != geometry.size
            or not np.allclose(g.spacing[in_plane], geometry.spacing[in_plane], rtol=1e-5, atol=1e-5)
            or not np.allclose(g.origin[in_plane], geometry.origin[in_plane], rtol=1e-5, atol=1e-4)
            or not np.allclose(g.direction[in_plane, in_plane], geometry.direction[in_plane, in_plane], rtol=0, atol=DIRECTION_TOLERANCE)
        ):
            raise HiMatchADError(f"{img.path} does not lie on the grid recorded in {path.name}; run the detection again")

    def _num(x):
        return float("nan") if x is None else float(x)

    heatmap = heat.array.astype(np.float32, copy=False)
    foreground = (fg.array > 0) if fg is not None else heatmap > 0
    supports = [[Support(s["source"], int(s["slice_index"]), float(s["similarity"])) for s in sl] for sl in data.get("supports", [])]
    return DetectionResult(
        heatmap=heatmap,
        foreground=foreground,
        threshold=_num(data.get("threshold")),
        geometry=geometry,
        slice_axis=int(data["slice_axis"]),
        slice_scores=np.array([_num(x) for x in data.get("slice_scores", [])], dtype=np.float32),
        volume_score=_num(data.get("volume_score")),
        supports=supports,
        min_component_size=int(data.get("min_component_size", 1)),
        method=data.get("method", ""),
        model=data.get("model", ""),
        name=data.get("name", path.stem),
        source_path=data.get("input"),
        settings=data.get("settings", {}),
        timings={k: float(v) for k, v in data.get("timings_s", {}).items()},
        warnings=list(data.get("warnings", [])),
        threshold_info=data.get("threshold_info", {}),
        labelmap=(lab.array > 0).astype(np.uint8),
        source_series=data.get("series") if isinstance(data.get("series"), dict) else {},
        input_digest=data.get("input_digest") if isinstance(data.get("input_digest"), dict) else {},
        provenance=data.get("provenance") if isinstance(data.get("provenance"), dict) else {},  # {} for results written before it
    )
