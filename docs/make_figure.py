"""Make the README figure from real outputs of the library: anomaly heatmap over a slice.

The figure imitates the module's display in 3D Slicer: the slice with the highest anomaly score,
the heatmap as a foreground layer with the Inferno colour map (transparent where low), the outline
of the "Anomaly" segment at the calibrated threshold, the per-slice score plot (volumes) or the
retrieved normal references (2D images). Every pixel comes from ``HiMatchDetector.predict``.

Examples::

    # a case and a folder of normal scans of the same kind
    python docs/make_figure.py --normals /data/normals --case /data/case.nii.gz --out docs/figure.png

    # 2D slices with a ground-truth mask drawn as a dashed outline
    python docs/make_figure.py --normals lgg/train/good --case lgg/test/Ungood/img/x.png \\
        --mask lgg/test/Ungood/label/x.png --out docs/figure.png

    # synthetic head phantoms (no data needed; shows the mechanics, not clinical quality)
    python docs/make_figure.py --demo --out docs/figure.png

Options not given here take the detector's defaults (model facebook/dinov3-vits16-pretrain-lvd1689m,
method himatch, K 8).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEGMENT_COLOR = (1.0, 0.35, 0.1)  # the "Anomaly" segment's colour in Slicer (HiMatchADLib.mrml)
SLICE_BAR_COLOR = "#c44b4b"  # Slicer's red slice view
BACKGROUND = "#202124"


def _display_slice(result, image_array):
    """(image, heatmap, labelmap, foreground, title, slice index) of the most anomalous slice,
    in radiological display orientation for volumes."""
    from HiMatchADLib.core.geometry import canonical_reorientation

    index = result.most_anomalous_slice
    if result.geometry.is_2d or result.heatmap.shape[0] == 1:
        return image_array[0], result.heatmap[0], result.labelmap[0], result.foreground[0], "2D image", 0
    if index < 0:
        index = result.heatmap.shape[result.slice_axis] // 2
    reo = canonical_reorientation(result.geometry.direction)
    axis = reo.axes.index(int(result.slice_axis))  # canonical axis of the detector's slicing axis
    n = result.heatmap.shape[result.slice_axis]
    canonical_index = n - 1 - index if reo.flips[axis] else index
    names = {0: "axial", 1: "coronal", 2: "sagittal"}
    out = []
    for array in (image_array, result.heatmap, result.labelmap, result.foreground):
        out.append(np.take(reo.to_canonical(array), canonical_index, axis=axis))
    if axis in (1, 2):  # coronal/sagittal: superior at the top
        out = [np.flipud(a) for a in out]
    return (*out, f"{names[axis]} slice {index}", index)


def _spacing_aspect(result):
    from HiMatchADLib.core.geometry import canonical_reorientation

    if result.geometry.is_2d:
        return result.geometry.spacing[1] / result.geometry.spacing[0]
    reo = canonical_reorientation(result.geometry.direction)
    sp = reo.canonical_spacing(result.geometry.spacing)  # spacing of canonical numpy axes (k, j, i)
    axis = reo.axes.index(int(result.slice_axis))
    rows, cols = [a for a in range(3) if a != axis]
    return sp[rows] / sp[cols]


def render(result, image_array, out_path, mask=None, dpi=150):
    """Write the figure for ``result`` (and the input voxels ``image_array``) to ``out_path``."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image, heat, label, fg, slice_title, index = _display_slice(result, np.nan_to_num(image_array))
    if mask is not None:
        mask = _display_slice(result, mask.astype(np.float32))[0] > 0.5

    lo, hi = np.percentile(image[fg] if fg.any() else image, [0.5, 99.5])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    low, top = result.display_range()  # the module's colour window
    rgba = colormaps["inferno"](np.clip((heat - low) / (top - low), 0, 1))
    rgba[..., 3] = np.where(heat > low + 1e-3 * (top - low), 0.6, 0.0)  # below: transparent, as in Slicer

    fig = Figure(figsize=(10.5, 5.4), dpi=dpi, facecolor=BACKGROUND)
    FigureCanvasAgg(fig)
    is_volume = not result.geometry.is_2d and result.heatmap.shape[0] > 1
    view = fig.add_axes([0.02, 0.1, 0.5, 0.8])
    view.set_facecolor("black")
    aspect = _spacing_aspect(result)
    view.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="bilinear", aspect=aspect)
    view.imshow(rgba, interpolation="bilinear", aspect=aspect)
    if label.any():
        view.contour(label.astype(float), levels=[0.5], colors=[SEGMENT_COLOR], linewidths=1.6)
    if mask is not None and mask.any():
        view.contour(mask.astype(float), levels=[0.5], colors=["#5bd75b"], linewidths=1.2, linestyles="dashed")
    view.set_xticks([])
    view.set_yticks([])
    for spine in view.spines.values():
        spine.set_color(SLICE_BAR_COLOR)
        spine.set_linewidth(2)
    view.set_title(f"  R   {result.name}: {slice_title}", loc="left", color="white", fontsize=10,
                   backgroundcolor=SLICE_BAR_COLOR, pad=4)

    bar = fig.add_axes([0.535, 0.1, 0.012, 0.8])
    gradient = np.linspace(0, 1, 256)[:, None]
    bar.imshow(gradient, cmap="inferno", aspect="auto", origin="lower", extent=(0, 1, low, top))
    bar.axhline(result.threshold, color="white", linewidth=1.5)
    bar.set_xticks([])
    bar.tick_params(colors="white", labelsize=8)
    bar.set_ylabel("anomaly score (white line: threshold)", color="white", fontsize=8)

    side = fig.add_axes([0.63, 0.14, 0.35, 0.72])
    side.set_facecolor("#2b2c30")
    side.tick_params(colors="white", labelsize=8)
    for spine in side.spines.values():
        spine.set_color("#555")
    if is_volume:
        scores = np.asarray(result.slice_scores, dtype=float)
        xs = np.arange(scores.size)
        side.plot(xs, np.nan_to_num(scores, nan=0.0), color=SEGMENT_COLOR, marker="o", markersize=2.5, linewidth=1.2)
        side.axvline(index, color="white", linestyle=":", linewidth=1)
        side.set_xlabel("slice index", color="white", fontsize=9)
        side.set_ylabel("score", color="white", fontsize=9)
        side.set_title("Anomaly score per slice", color="white", fontsize=10)
    else:
        side.axis("off")
        rows = sorted(result.supports[0] if result.supports and result.supports[0] else [], key=lambda s: -s.similarity)[:8]
        lines = ["Normal references retrieved", ""] + [f"{s.similarity:6.3f}   {s.source}" for s in rows]
        side.text(0.02, 0.98, "\n".join(lines), color="white", fontsize=8.5, family="monospace", va="top", transform=side.transAxes)

    caption = (
        f"HiMatch-AD ({result.method}, model {Path(str(result.model)).name}): volume score {result.volume_score:.3g}, "
        f"{int(result.labelmap.sum())} voxels above threshold {result.threshold:.3g}. Orange outline: Anomaly segment"
        + ("; dashed green: reference lesion." if mask is not None and mask.any() else ".")
    )
    fig.text(0.02, 0.015, textwrap.fill(caption, 150), color="#cccccc", fontsize=8.5)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi, facecolor=BACKGROUND)
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--normals", help="folder of normal scans")
    parser.add_argument("--case", help="image or volume to examine")
    parser.add_argument("--mask", help="optional ground-truth mask of the case, drawn dashed")
    parser.add_argument("--demo", action="store_true", help="use synthetic head phantoms instead of --normals/--case")
    parser.add_argument("--out", default=str(Path(__file__).with_name("figure.png")), help="output PNG (default docs/figure.png)")
    parser.add_argument("--model", help="Hugging Face id or local folder of the DINOv3 model")
    parser.add_argument("--method", default="himatch", choices=("himatch", "knn", "dpmm"))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--modality", default="auto")
    parser.add_argument("--resolution", type=int, default=448)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", help="bank cache folder (default: the library's)")
    args = parser.parse_args(argv)

    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.io.readers import read_image
    from HiMatchADLib.core.progress import tqdm_callback

    with tempfile.TemporaryDirectory(prefix="himatchad-figure-") as tmp:
        if args.demo:
            from HiMatchADLib.evaluation.phantom import write_demo_dataset

            demo = write_demo_dataset(tmp)
            normals, case, mask_path = demo["normals"], demo["query"], demo["mask"]
        else:
            if not args.normals or not args.case:
                parser.error("give --normals and --case, or --demo")
            normals, case, mask_path = args.normals, args.case, args.mask
        options = {"method": args.method, "k": args.k, "modality": args.modality, "resolution": args.resolution,
                   "device": args.device, "cache_dir": args.cache_dir, "progress": tqdm_callback()}
        if args.model:
            options["model"] = args.model
        detector = HiMatchDetector(**options)
        detector.fit(normals)
        image = read_image(case)
        result = detector.predict(image)
        mask = read_image(mask_path).array > 0 if mask_path else None
        if mask is not None and mask.shape != result.heatmap.shape:
            mask = None
        path = render(result, image.array, args.out, mask=mask)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
