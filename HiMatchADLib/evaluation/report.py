"""The results as tables: ``results.md`` and the table printed on the console."""

from __future__ import annotations

import sys

from .records import DETECTOR_METHODS


def format_metric(x, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def format_seconds(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    is_3d = result["dataset"].get("is_3d")
    head = ["Method", "Image AUROC"] + (["Slice AUROC"] if is_3d else []) + [
        "Pixel AUROC", "AUPRO@0.3", "Pixel AP", "Best Dice", "Dice@auto", "s/case", "s/slice", "Fit s", "Peak RSS MB (+rise)",
    ]
    rows = []
    for name, r in result["results"].items():
        t, m = r["timing"], r.get("memory", {})
        row = [f"`{name}`", format_metric(r["image_auroc"])] + ([format_metric(r["slice_auroc"])] if is_3d else []) + [
            format_metric(r["pixel_auroc"]), format_metric(r["aupro"]), format_metric(r["pixel_ap"]), format_metric(r["best_dice"]), format_metric(r["dice_at_threshold"]),
            format_seconds(t["seconds_per_case_mean"]), format_seconds(t["seconds_per_slice"]), format_seconds(t["fit_seconds"]),
            "–" if not m.get("peak_rss_mb") else f"{m['peak_rss_mb']:.0f} (+{m.get('peak_rss_increase_mb', 0):.0f})",
        ]
        rows.append(row)
    return head, rows


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    ds, st = result["dataset"], result["settings"]
    det = st.get("detector", {})
    head, rows = table_rows(result)
    lines = [
        "# HiMatch-AD evaluation",
        "",
        f"- Data set: `{ds['root']}` ({ds['layout']} layout, {ds['variant']}, split `{ds['split']}`), "
        f"{'3D volumes' if ds.get('is_3d') else '2D images'}",
        f"- Normal reference set: {ds['n_normals']} of {ds['n_normals_available']} images/volumes in `{ds['normal_dir']}`",
        f"- Test cases: {ds['n_test']} of {ds['n_test_available']} ({ds['n_test_anomalous']} anomalous, {ds['n_test_normal']} normal)",
        f"- Model: `{det.get('model', 'default')}`; detector settings: "
        + (", ".join(f"{k}={v}" for k, v in det.items() if k not in ("model", "cache_dir")) or "defaults"),
    ]
    if result.get("command"):
        lines.append(f"- Command: `{result['command']}`")
    for note in ds.get("notes", []):
        lines.append(f"- Note: {note}")
    lines += ["", markdown_table(head, rows), ""]
    lines += [
        "Image AUROC: one score per " + ("volume" if ds.get("is_3d") else "image")
        + (" (slice AUROC: one per slice; a slice is anomalous when its mask has a voxel)" if ds.get("is_3d") else "")
        + ". Pixel metrics are pooled over all pixels of all test cases"
        + (f" (every lesion pixel and one normal pixel in {st['negative_pixel_stride']}, weighted by {st['negative_pixel_stride']})" if st["negative_pixel_stride"] > 1 else "")
        + f"; AUPRO is integrated to FPR {st['aupro_max_fpr']} and normalised (1 = perfect). Best Dice: best pooled Dice over "
        "all thresholds; Dice@auto: pooled Dice of the labelmap at the method's automatic threshold. s/case and s/slice: "
        "prediction time (features, matching, maps; image reading excluded); Fit s: model loading, bank build or cache load, "
        "calibration. Peak RSS: highest resident memory of the whole process while the method ran (+rise: above its "
        "level when the method started; the first mode also loads the model weights, later modes start from what the "
        "allocator kept after the previous one: for a clean figure run one mode per process, e.g. --methods knn).",
        "",
        "`intensity` and `intensity-dev` use no features: the normalised image itself, and its deviation from the normal "
        "set's intensity statistics at the same slice position. A feature-based mode is useful where it beats them.",
        "",
    ]
    steps = [(n, r["timing"]["steps_seconds_total"]) for n, r in result["results"].items() if n in DETECTOR_METHODS]
    if steps:
        keys = sorted({k for _, s in steps for k in s if k != "total"})
        lines += ["## Prediction time by step (share of the total prediction time)", ""]
        h = ["Method"] + keys + ["total s"]
        rr = []
        for n, s in steps:
            tot = s.get("total") or sum(s.values()) or 1.0
            rr.append([f"`{n}`"] + [f"{100 * s.get(k, 0.0) / tot:.0f} %" if k in s else "–" for k in keys] + [format_seconds(tot)])
        lines += [markdown_table(h, rr), ""]
    lines += [f"Wall time of the evaluation: {result['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def print_table(result: dict, file=None) -> None:
    head, rows = table_rows(result)
    rows = [[c.strip("`") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    print(fmt.format(*head), file=file or sys.stdout)
    for r in rows:
        print(fmt.format(*r), file=file or sys.stdout)
