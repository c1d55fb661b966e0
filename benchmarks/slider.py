"""Time per step of the panel's threshold slider, on Slicer's real MRML (``slicer-core``).

    .venv/bin/python benchmarks/slider.py [--shape 400 512 512] [--steps 9] [--min-size 64] [--dtype float32|uint8] [--around T]

A volume of ``--shape`` (nz ny nx; default 400 x 512 x 512, an oblique grid under a parent
transform) gets a hand-made result: a heatmap of that size (smooth background below the threshold,
a few blobs above it, speckle around them; float32, or ``--dtype uint8`` scaled by 60), a foreground
mask and ``min_component_size`` ``--min-size``. The result is imported (:func:`HiMatchADLib.mrml.result_to_nodes`, not timed), then
``--steps`` threshold steps are made as the slider makes them (``ResultNodes.set_threshold``, each a
slider step of 1/500 of the range away from the last), alternating up and down around the
calibrated threshold (or ``--around``, e.g. a low value where much of the volume is above it). Printed: milliseconds per step (median, min, max) and, per function of the
adapter and of the result that a step calls, the median milliseconds it took per step (the functions
are wrapped with timers; nested calls count in their callers too). After the last step the segment
is compared with ``heatmap > threshold`` (the result's labelmap), voxel for voxel, on the input grid.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: (module, attribute) pairs timed when they exist: the parts of one threshold step.
TIMED = (
    ("HiMatchADLib.core.result", "DetectionResult.labelmap_at"),
    ("HiMatchADLib.mrml.segments", "_segment_digest"),
    ("HiMatchADLib.mrml.segments", "is_edited"),
    ("HiMatchADLib.mrml.segments", "_resolve_edits"),
    ("HiMatchADLib.mrml.segments", "_ThresholdIndex.labelmap"),
    ("HiMatchADLib.mrml.segments", "_write_segment"),
    ("HiMatchADLib.mrml.segments", "_write_labelmap_node"),
    ("HiMatchADLib.mrml.segments", "_record"),
    ("HiMatchADLib.mrml.segments", "_place_segmentation"),
    ("HiMatchADLib.mrml.segments", "_import_labelmap_into_segment"),
    ("HiMatchADLib.mrml.segments", "labelmap_to_volume_node"),
    ("HiMatchADLib.mrml.segments", "labelmap_to_segmentation"),
)


def wrap_timers(times: dict) -> None:
    import importlib

    for module_name, attr in TIMED:
        module = importlib.import_module(module_name)
        owner, name = module, attr
        if "." in attr:
            cls, name = attr.split(".")
            owner = getattr(module, cls, None)
            if owner is None:  # another version of the code
                continue
        func = getattr(owner, name, None)
        if func is None or getattr(func, "_timed", False):
            continue

        def timed(*args, __func=func, __key=attr, **kwargs):
            t = time.perf_counter()
            try:
                return __func(*args, **kwargs)
            finally:
                times[__key] += time.perf_counter() - t

        timed = functools.wraps(func)(timed)
        timed._timed = True
        setattr(owner, name, timed)


def make_heatmap(shape, rng) -> tuple:
    """A float32 heatmap like a detector's: smooth low background, blobs above 1, speckle."""
    nz, ny, nx = shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, nz, dtype=np.float32), np.linspace(-1, 1, ny, dtype=np.float32),
                             np.linspace(-1, 1, nx, dtype=np.float32), indexing="ij", sparse=True)
    foreground = (zz**2 + yy**2 + xx**2) < 0.9
    heat = (0.3 + 0.2 * np.sin(6 * xx) * np.cos(5 * yy) * np.cos(3 * zz)).astype(np.float32)
    for c, r, peak in (((0.2, -0.3, 0.1), 0.12, 3.0), ((-0.4, 0.35, -0.2), 0.07, 2.0), ((0.1, 0.4, 0.45), 0.05, 1.6)):
        d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        heat = heat + (peak * np.exp(-d2 / (2 * r * r))).astype(np.float32)
    speckle = rng.random(shape, dtype=np.float32)
    heat += 0.35 * (speckle > 0.999)
    heat *= foreground
    return heat.astype(np.float32), np.broadcast_to(foreground, shape).copy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(400, 512, 512), metavar=("NZ", "NY", "NX"))
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--min-size", type=int, default=64, help="min_component_size of the result (voxels)")
    ap.add_argument("--dtype", choices=("float32", "uint8"), default="float32", help="heatmap voxel type")
    ap.add_argument("--around", type=float, default=None,
                    help="make the steps around this threshold instead of the calibrated one (float32 map units)")
    args = ap.parse_args(argv)

    import slicer
    from HiMatchADLib import mrml
    from HiMatchADLib.core.result import DetectionResult

    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case")
    m = np.eye(4)
    a = np.radians(20.0)
    m[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([0.5, 0.5, 1.2])
    m[:3, 3] = (-120.0, 80.0, -200.0)
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))
    slicer.util.updateVolumeFromArray(volume, rng.integers(0, 1000, shape, dtype=np.int16))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    t = np.eye(4)
    t[:3, 3] = (5.0, -3.0, 2.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(t))
    volume.SetAndObserveTransformNodeID(transform.GetID())

    t0 = time.perf_counter()
    heat, foreground = make_heatmap(shape, rng)
    geometry = mrml.geometry_from_ijk_to_ras(mrml.ijk_to_ras_matrix(volume), (shape[2], shape[1], shape[0]))
    threshold = 1.0
    if args.dtype == "uint8":
        heat, threshold = np.clip(np.rint(heat * 60.0), 0, 255).astype(np.uint8), 60.0
    result = DetectionResult(heatmap=heat, foreground=foreground, threshold=threshold, geometry=geometry, slice_axis=0,
                             slice_scores=heat.max(axis=(1, 2)), volume_score=float(heat.max()), supports=[[] for _ in range(shape[0])],
                             min_component_size=args.min_size, name="case")
    t1 = time.perf_counter()
    nodes = mrml.result_to_nodes(result, volume, scene=scene, show=False)
    t2 = time.perf_counter()
    print(f"shape {shape} ({np.prod(shape) / 1e6:.0f} M voxels), heatmap {heat.dtype}, min_component_size {args.min_size}; "
          f"anomalous voxels at {threshold}: {result.anomalous_voxels}")
    print(f"setup: result {1000 * (t1 - t0):.0f} ms, first import {1000 * (t2 - t1):.0f} ms")

    times: dict = defaultdict(float)
    wrap_timers(times)
    top = float(heat.max()) * 1.05
    step = top / 500.0 if args.dtype == "float32" else 1.0  # a uint8 map changes only at whole numbers
    per_step, parts = [], defaultdict(list)
    centre = threshold if args.around is None else args.around * (60.0 if args.dtype == "uint8" else 1.0)
    value = centre
    for i in range(args.steps):
        value = centre + step * ((i % 4) - 1.5)  # up and down around the centre
        times.clear()
        t = time.perf_counter()
        nodes.set_threshold(value)
        per_step.append(time.perf_counter() - t)
        for key, seconds in times.items():
            parts[key].append(seconds)
    ms = [1000 * s for s in per_step]
    print(f"threshold step: median {statistics.median(ms):.0f} ms (min {min(ms):.0f}, max {max(ms):.0f}) over {len(ms)} steps")
    for key, values in sorted(parts.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"  {key:45s} {1000 * statistics.median(values):7.1f} ms/step")

    segment = mrml.segment_to_array(nodes.segmentation, volume)
    exact = np.array_equal(segment, result.labelmap_at(value))
    print(f"segment after the last step equals the result's labelmap at {value:.4g}: {exact}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
