"""The overview picture of a volume's result: the most anomalous slices, the score curve, a header.

One PNG per case, for a person screening results without opening a viewer:

- the ``n`` slices with the highest slice scores, shown in anatomical order (along the slicing
  axis), each with the heatmap over the image (the result's display range, transparent near
  typical normal tissue) and the Anomaly labelmap's outline, in radiological display convention
  (:func:`radiological_view`: the patient's right on the viewer's left; anterior, or superior, at
  the top; sagittal slices with anterior on the left), with orientation letters at the edges and
  square physical pixels;
- the per-slice score curve with the shown slices marked and, when the threshold was calibrated,
  the median and 95th percentile of held-out normal slices' scores;
- a header: case, volume score, anomalous volume, heatmap threshold, method, model, and a warning
  line when the model is a random stand-in;
- a colour bar with the heatmap's scale (the same range as the slices).

The image is given already windowed to ``[0, 1]`` (the caller applies the intensity preset), so
this module needs only numpy, scipy and matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import HiMatchADError
from ..core.geometry import Geometry
from ..core.result import DetectionResult
from .overlay import colormap, composite

#: Orientation letters (left, right, top, bottom) of each display plane, radiological convention.
PLANE_LABELS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}

#: For each plane: the LPS world axis that runs left-to-right on screen and the one that runs
#: top-to-bottom, each with the sign of its direction (+1: increasing LPS coordinate).
_PLANE_AXES = {
    "axial": ((0, +1), (1, +1)),     # columns R -> L (+x), rows A -> P (+y)
    "coronal": ((0, +1), (2, -1)),   # columns R -> L (+x), rows S -> I (-z)
    "sagittal": ((1, +1), (2, -1)),  # columns A -> P (+y), rows S -> I (-z)
}


def top_slices(slice_scores: np.ndarray, n: int = 6) -> list:
    """Indices of the ``n`` highest finite slice scores, in slice (anatomical) order."""
    s = np.asarray(slice_scores, dtype=float)
    finite = np.flatnonzero(np.isfinite(s))
    order = finite[np.argsort(-s[finite], kind="stable")][: max(int(n), 0)]
    return sorted(int(i) for i in order)


def slice_plane(geometry: Geometry, axis: int) -> str:
    """``axial``, ``coronal`` or ``sagittal``: the LPS axis closest to the slices' normal
    (numpy ``axis`` of the arrays is ITK index axis ``2 - axis``)."""
    normal = np.asarray(geometry.direction, float)[:, 2 - int(axis)]
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def radiological_view(slice2d: np.ndarray, geometry: Geometry, axis: int) -> tuple:
    """One slice (numpy axes of the volume other than ``axis``, in order) -> ``(view, labels,
    aspect)``: the slice transposed/flipped so that it displays in radiological convention for
    its plane, the orientation letters (left, right, top, bottom) and the height/width of one
    displayed pixel (row spacing / column spacing)."""
    plane = slice_plane(geometry, axis)
    (col_world, col_sign), (row_world, row_sign) = _PLANE_AXES[plane]
    direction = np.asarray(geometry.direction, float)
    spacing = np.asarray(geometry.spacing, float)
    in_plane = [a for a in range(3) if a != int(axis)]  # numpy axes of slice2d's dimensions 0 and 1
    itk = [2 - a for a in in_plane]
    # which slice dimension runs along the screen's columns: the one closest to col_world
    col_dim = int(np.argmax([abs(direction[col_world, k]) for k in itk]))
    view = np.asarray(slice2d)
    if col_dim == 0:  # dimension 0 must become the columns: transpose
        view = view.T
        itk = itk[::-1]
    # now view[r, c]: rows along itk[0], columns along itk[1]
    if np.sign(direction[col_world, itk[1]]) != col_sign:
        view = view[:, ::-1]
    if np.sign(direction[row_world, itk[0]]) != row_sign:
        view = view[::-1, :]
    aspect = float(spacing[itk[0]] / spacing[itk[1]])
    return np.ascontiguousarray(view), PLANE_LABELS[plane], aspect


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, int(index), axis=int(axis))


def overview_panels(result: DetectionResult, grey: np.ndarray, n: int = 6) -> list:
    """The shown slices as dicts: ``index``, ``rgb`` (float RGB in [0, 1], radiological view),
    ``labels``, ``aspect``, ``score``; from the result and the windowed image volume ``grey``
    (values in [0, 1], on the result's grid)."""
    if grey.shape != result.heatmap.shape:
        raise ValueError(f"image {grey.shape} and heatmap {result.heatmap.shape} differ in shape")
    low, high = result.display_range()
    panels = []
    for i in top_slices(result.slice_scores, n):
        parts = [radiological_view(_slice(a, result.slice_axis, i), result.geometry, result.slice_axis)
                 for a in (grey, result.heatmap, result.labelmap)]
        rgb = composite(parts[0][0], parts[1][0], parts[2][0], low, high)
        panels.append({"index": i, "rgb": rgb, "labels": parts[0][1], "aspect": parts[0][2],
                       "score": float(result.slice_scores[i]), "labelmap": parts[2][0] > 0})
    return panels


def anomalous_volume_text(result: DetectionResult) -> str:
    voxels = int(result.anomalous_voxels)
    if result.geometry.is_2d:
        return f"{voxels} px ({voxels * result.voxel_measure / 100.0:.2f} cm²)"
    return f"{voxels} voxels ({voxels * result.voxel_measure / 1000.0:.2f} mL)"


def render_overview(result: DetectionResult, grey: np.ndarray, n: int = 6, model_label: Optional[str] = None,
                    stand_in: bool = False, dpi: int = 100):
    """The overview as a matplotlib Figure (Agg canvas attached); see :func:`write_overview`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator


    panels = overview_panels(result, grey, n)
    cols = max(1, min(3, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(3.2 * cols + 1.0, 3.2 * rows + 3.0), dpi=dpi)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(rows + 1, cols + 1, width_ratios=[1.0] * cols + [0.08],
                          height_ratios=[1.0] * rows + [0.7], hspace=0.3, wspace=0.15, top=0.86, bottom=0.07)
    low, high = result.display_range()
    for k, p in enumerate(panels):
        ax = fig.add_subplot(gs[k // cols, k % cols])
        ax.imshow(p["rgb"], aspect=p["aspect"], interpolation="nearest")
        left, right, top, bottom = p["labels"]
        h, w = p["rgb"].shape[:2]
        style = dict(color="yellow", fontsize=9, fontweight="bold", va="center", ha="center")
        ax.text(0.05 * w, h / 2, left, **style)  # inside the image, as viewers place them
        ax.text(0.95 * w, h / 2, right, **style)
        ax.text(w / 2, 0.05 * h, top, **style)
        ax.text(w / 2, 0.95 * h, bottom, **style)
        ax.set_title(f"slice {p['index']}: {p['score']:.3g}", fontsize=9, color="white")
        ax.set_xticks([])
        ax.set_yticks([])
    cax = fig.add_subplot(gs[:rows, cols])
    cmap = ListedColormap(colormap(np.linspace(0, 1, 256)))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin=low, vmax=high), cmap=cmap), cax=cax)
    bar.set_label("heatmap", color="white")
    bar.ax.tick_params(colors="white", labelsize=8)
    if np.isfinite(result.threshold):
        bar.ax.axhline(result.threshold, color="cyan", linewidth=1.5)
    curve = fig.add_subplot(gs[rows, :cols])
    s = np.asarray(result.slice_scores, float)
    curve.plot(np.arange(len(s)), s, color="0.85", linewidth=1.2)
    normal = (result.threshold_info or {}).get("normal_slice_score") or {}
    lines = [(k, float(normal[k])) for k in ("median", "p95") if isinstance(normal, dict) and normal.get(k) is not None]
    for (name, value), style in zip(lines, (":", "--")):
        curve.axhline(value, color="cyan", linestyle=style, linewidth=1, label=f"held-out normal slices, {name}")
    if lines:
        curve.legend(fontsize=7, loc="best", facecolor="0.2", labelcolor="white", edgecolor="0.4")
    shown = [p["index"] for p in panels]
    curve.plot(shown, s[shown], "o", color="orange", markersize=5)
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))  # slices are whole numbers
    curve.set_xlabel(f"slice (axis {result.slice_axis})", color="white", fontsize=8)
    curve.set_ylabel("slice score", color="white", fontsize=8)
    curve.tick_params(colors="white", labelsize=8)
    curve.set_facecolor("0.12")
    fig.set_facecolor("0.08")
    model = model_label or result.model or "?"
    header = (f"{result.name}    volume score {result.volume_score:.4g}    anomalous {anomalous_volume_text(result)}    "
              f"threshold {result.threshold:.4g}\nmethod {result.method}    model {model}")
    fig.text(0.02, 0.975, header, color="white", fontsize=10, va="top", family="monospace")
    if stand_in:
        fig.text(0.02, 0.925, "model with RANDOM weights (stand-in): the maps show the pipeline, not detection quality",
                 color="orange", fontsize=9, va="top")
    fig._himatchad = {"panels": panels, "colorbar": (low, high), "colorbar_axes": cax, "shown": shown}  # what was drawn, for checks
    return fig


def write_overview(result: DetectionResult, grey: np.ndarray, path, n: int = 6, model_label: Optional[str] = None,
                   stand_in: bool = False) -> Path:
    """Render the overview (:func:`render_overview`) and write it as PNG to ``path`` atomically
    (a temporary name in the same folder, renamed when complete)."""
    fig = render_overview(result, grey, n=n, model_label=model_label, stand_in=stand_in)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(os.fspath(tmp), format="png", facecolor=fig.get_facecolor())
    return path


def write_overview_output(result: DetectionResult, source_files, path) -> Path:
    """The ``"overview"`` output of :func:`~HiMatchADLib.outputs.files.save_result` (registry
    signature): the picture of a volume's result from its windowed input image,
    ``result.display_image``, which :meth:`HiMatchADLib.detector.HiMatchDetector.save` supplies.
    The stand-in warning comes from the result's provenance (``model.random_weights``)."""
    grey = getattr(result, "display_image", None)
    if grey is None:
        raise HiMatchADError(
            f"the overview picture of '{result.name}' needs its input image: write it with HiMatchDetector.save "
            "or HiMatchADLib.detector.overview.write_case_overview")
    model = (result.provenance or {}).get("model") if isinstance(result.provenance, dict) else None
    stand_in = bool(isinstance(model, dict) and model.get("random_weights"))
    return write_overview(result, grey, path, model_label=result.model, stand_in=stand_in)


__all__: Sequence[str] = (
    "top_slices", "slice_plane", "radiological_view", "overview_panels", "render_overview", "write_overview", "write_overview_output",
)
