"""``results.png``: ROC and PRO curves, and example slices with each method's map and the ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.atomic import atomic_path
from ..core.geometry import Image, canonical_reorientation
from .baselines import BASELINES
from .datasets import TestCase
from .records import CaseOutput
from .report import format_metric


class Examples:
    """A few cases shown in the figure: one display slice each, the same for every method."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.data: dict[str, dict] = {}

    def wants(self, name: str) -> bool:
        return name in self.names

    def add(self, case: TestCase, image: Image, gt: Optional[np.ndarray], method: str, out: CaseOutput) -> None:
        d = self.data.get(case.name)
        if d is None:
            view = _display_view(image, gt, out)
            img2d = _take(image.array, view)
            d = {"view": view, "image": img2d, "gt": None if gt is None else _take(gt, view), "maps": {}, "thresholds": {}, "label": case.label}
            self.data[case.name] = d
        d["maps"][method] = _take(out.heatmap, d["view"]).astype(np.float32)
        d["thresholds"][method] = out.threshold


def _display_view(image: Image, gt: Optional[np.ndarray], out: CaseOutput):
    """How to cut the display slice: None for 2D, else (reorientation, canonical axis, index, aspect)."""
    if image.is_2d or image.array.shape[0] == 1:
        sx, sy = image.geometry.spacing[:2]
        return (None, 0, 0, sy / sx)

    reo = canonical_reorientation(image.geometry.direction)
    c = list(reo.axes).index(out.slice_axis)
    ref = gt if gt is not None and gt.any() else out.foreground
    area = reo.to_canonical(ref).sum(axis=tuple(a for a in range(3) if a != c))
    idx = int(np.argmax(area))
    sp = reo.canonical_spacing(image.geometry.spacing)
    rows, cols = [a for a in range(3) if a != c]
    return (reo, c, idx, sp[rows] / sp[cols])


def _take(arr: np.ndarray, view) -> np.ndarray:
    reo, c, idx, _ = view
    if reo is None:
        return np.asarray(arr[0])
    return np.ascontiguousarray(np.take(reo.to_canonical(np.asarray(arr)), idx, axis=c))


def make_figure(path: Path, curves: dict, examples: Examples, result: dict) -> Path:
    """ROC (image, pixel) and PRO curves, and example slices with maps and ground-truth outlines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(curves)
    ex = [examples.data[n] for n in examples.names if n in examples.data]
    ex_names = [n for n in examples.names if n in examples.data]
    ncols = 1 + len(names)
    nrows = 1 + len(ex)
    fig = Figure(figsize=(2.6 * max(ncols, 3), 2.8 + 2.5 * len(ex)), dpi=110)
    FigureCanvasAgg(fig)
    top = 1.0 - 0.45 / (2.8 + 2.5 * len(ex))
    gs = fig.add_gridspec(nrows, 6 * ncols, height_ratios=[1.15] + [1.0] * len(ex), hspace=0.35, wspace=0.6, top=top)
    span = (6 * ncols) // 3
    axes = [fig.add_subplot(gs[0, i * span : (i + 1) * span - (1 if i < 2 else 0)]) for i in range(3)]
    colours = {n: c for n, c in zip(names, ["C0", "C1", "C2", "0.45", "0.7", "C3", "C4"])}
    styles = {n: ("--" if n in BASELINES else "-") for n in names}
    for n in names:
        (fx, fy), pc = curves[n]
        r = result["results"][n]
        axes[0].plot(fx, fy, styles[n], color=colours[n], label=f"{n} ({format_metric(r['image_auroc'])})")
        if pc:
            axes[1].plot(pc["roc_fpr"], pc["roc_tpr"], styles[n], color=colours[n], label=f"{n} ({format_metric(r['pixel_auroc'])})")
            axes[2].plot(pc["pro_fpr"], pc["pro"], styles[n], color=colours[n], label=f"{n} ({format_metric(r['aupro'])})")
    unit = "volume" if result["dataset"].get("is_3d") else "image"
    for ax, title, xl, yl in (
        (axes[0], f"{unit.capitalize()}-level ROC", "FPR", "TPR"),
        (axes[1], "Pixel-level ROC", "FPR", "TPR"),
        (axes[2], f"PRO curve (FPR ≤ {result['settings']['aupro_max_fpr']})", "FPR", "PRO"),
    ):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
        ax.grid(alpha=0.3)
    axes[2].set_xlim(0, result["settings"]["aupro_max_fpr"])
    # One colour scale per method over the shown slices.
    vmax = {}
    for n in names:
        vals = [d["maps"][n] for d in ex if n in d["maps"]]
        vmax[n] = max([float(np.percentile(v, 99.5)) for v in vals] + [1e-6]) if vals else 1.0
    for row, (cname, d) in enumerate(zip(ex_names, ex), start=1):
        img = d["image"].astype(np.float32)
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        aspect = d["view"][3]
        ax = fig.add_subplot(gs[row, 0:6])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        if d["gt"] is not None and d["gt"].any():
            ax.contour(d["gt"].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(f"{cname[:28]} ({'anomalous' if d['label'] else 'normal'})", fontsize=7)
        ax.axis("off")
        for j, n in enumerate(names, start=1):
            ax = fig.add_subplot(gs[row, 6 * j : 6 * (j + 1)])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
            if n in d["maps"]:
                m = d["maps"][n]
                ax.imshow(np.ma.masked_less_equal(m, 0), cmap="inferno", vmin=0, vmax=vmax[n], alpha=0.6, aspect=aspect, interpolation="bilinear")
            if d["gt"] is not None and d["gt"].any():
                ax.contour(d["gt"].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            if row == 1:
                ax.set_title(n, fontsize=8)
            ax.axis("off")
    fig.suptitle(
        f"{Path(result['dataset']['root']).name}: {result['dataset']['n_test']} test cases, {result['dataset']['n_normals']} normals"
        " (green: ground truth)",
        fontsize=10,
        y=1.0 - 0.1 / (2.8 + 2.5 * len(ex)),
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)
