"""Option groups and value types of the command line."""

from __future__ import annotations

import argparse
import re

from ..detector.parameters import (
    add_method_tuning,
    argtype,
    fraction_value,
    positive_int,
    resolution_value,
    threshold_value,
)
from ..features.backbone import DEFAULT_MODEL
from ..features.presets import MODALITIES
from ..features.slicing import SLICE_AXES
from ..methods.base import get_method, list_methods
from ..methods.knn_index import KNN_INDEXES

threshold_arg = argtype(threshold_value)
positive_int_arg = argtype(positive_int)
resolution_arg = argtype(resolution_value)
fraction_arg = argtype(fraction_value)


def device_arg(value: str) -> str:
    """auto, cpu, cuda, cuda:N or mps (whether torch finds it is checked when the model is loaded)."""
    v = str(value).strip().lower()
    if v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v):
        return v
    raise argparse.ArgumentTypeError(f"invalid device '{value}': choose auto, cpu, cuda, cuda:N or mps")

def add_model_options(p: argparse.ArgumentParser, with_method: bool = True) -> None:
    g = p.add_argument_group("model and features")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"Hugging Face id or local model folder (default {DEFAULT_MODEL})")
    g.add_argument("--modality", default="auto", choices=MODALITIES, help="intensity preset (default auto)")
    g.add_argument("--slice-axis", default="auto", choices=SLICE_AXES, help="slicing direction (default: the modality's)")
    g.add_argument(
        "--resolution", type=resolution_arg, default=448,
        help="shorter side of the model input in pixels (default 448; 512 gives DINOv3/16 a 32x32 grid on square slices)",
    )
    g.add_argument(
        "--pixel-spacing", default="auto", metavar="MM",
        help="in-plane pixel spacing (mm) every slice is resampled to before the model: 'auto' (default: from the "
        "normal set), a number, or 'off' (stretch each slice to --resolution)",
    )
    g.add_argument(
        "--device", default="auto", type=device_arg, metavar="{auto,cpu,cuda,cuda:N,mps}",
        help="compute device: auto (default: a CUDA GPU, else an Apple GPU (mps), else the CPU), cpu, cuda, cuda:N, or mps",
    )
    g.add_argument("--batch-size", type=positive_int_arg, default=8, help="slices per forward pass (default 8)")
    g.add_argument("--slice-step", type=positive_int_arg, default=1, help="bank every n-th normal slice (default 1: all)")
    g.add_argument("--cache-dir", default=None, help="where banks are cached (default $HIMATCHAD_CACHE or ~/.cache/himatchad)")
    g.add_argument("--rebuild", action="store_true", help="rebuild the normal bank even if a cached one is current")
    g.add_argument(
        "--precision", default="auto", metavar="{auto,fp32,bf16,int8}",
        help="backbone precision: auto (default: bf16 where the GPU or CPU computes it natively, else fp32), fp32, "
        "bf16, or int8 (CPU only: int8 linear layers); fp16 is not supported by DINOv3",
    )
    if with_method:  # detect, batch, demo: read by detector_from_args

        m = p.add_argument_group("detection")
        m.add_argument("--method", default="himatch", choices=list_methods(), help="; ".join(f"{m}: {get_method(m).title}" for m in list_methods()) + " (default himatch)")
        m.add_argument("--k", type=positive_int_arg, default=8, help="normal reference slices per query slice (himatch; default 8)")
        add_method_tuning(m)
        m.add_argument(
            "--knn-index", default="exact", choices=KNN_INDEXES,
            help="knn only: exact nearest-neighbour search (default), or approximate ivf / hnsw (faster on large normal "
            "sets; built once and cached with the bank)",
        )
        m.add_argument("--threshold", type=threshold_arg, default="auto", help="'auto' (calibrated on held-out normals) or a value")
        m.add_argument("--fpr", type=fraction_arg, default=0.01, help="target pixel false-positive rate for --threshold auto (default 0.01)")
        m.add_argument("--min-size", type=positive_int_arg, default=None, help="remove anomalous components smaller than this many voxels")
        m.add_argument(
            "--consistency-mm", type=float, default=None, metavar="MM",
            help="volumes: fuse each slice's map with its neighbours' (Gaussian, sigma in mm); default off",
        )
        m.add_argument(
            "--subject-pattern", default=None, metavar="REGEX",
            help="regular expression with one group naming the subject of a normal file (searched in its path "
            "relative to the normal folder), e.g. '^(TCGA_[A-Z0-9]+_[0-9]+)_'; calibration holds out whole subjects",
        )


def add_picture_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-overview", dest="overview", action="store_false",
        help="do not write <name>_overview.png (the most anomalous slices with the heatmap, the slice-score curve and "
        "the result's numbers; written by default for volumes, a 2D input has its overlay PNG)",
    )


def add_feedback_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reader feedback")
    g.add_argument(
        "--feedback", default=None, metavar="DIR",
        help="the feedback folder ('himatchad feedback add'): regions marked normal (default: beside the normal bank)",
    )
    g.add_argument("--no-feedback", dest="use_feedback", action="store_false", help="ignore the reader feedback: the normal bank alone")


def add_dicom_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM")
    g.add_argument(
        "--series-filter", action="append", default=None, metavar="TERMS",
        help="DICOM series to analyse: comma-separated terms that must all match, KEY=VALUE (exact), KEY~REGEX (search), "
        "KEY!=VALUE or KEY!~REGEX, case-insensitive, KEY one of modality, description, number, uid; e.g. "
        "modality=MR,description~flair. Repeat the option to select series matching any of the filters",
    )
    g.add_argument("--dicom-seg", action="store_true", help="also write <name>_seg.dcm: the labelmap as a DICOM SEG of the input series (DICOM inputs)")
    g.add_argument("--dicom-heatmap", action="store_true", help="also write <name>_heatmap_pm.dcm: the heatmap as a DICOM parametric map (DICOM inputs)")
