"""Synthetic lesions: a ``volumes``-layout evaluation set made from a folder of healthy volumes.

``himatchad synth NORMALS_DIR --out DATASET_DIR`` (or :func:`make_synthetic_dataset`):

1. The volumes of ``NORMALS_DIR`` (sorted by name) are shuffled with the seed; ``n_holdout`` of them
   are held out, the rest become the normal reference set ``DATASET_DIR/normal/``.
2. ``n_normal_test`` held-out volumes are kept untouched as normal test cases (all-zero mask); every
   other held-out volume receives ``lesions`` (a random count in the range) synthetic lesions.
3. A lesion is a randomly rotated ellipsoid of random radius (``radius_mm``, in millimetres, with
   per-axis factors in 0.7-1.3) whose outline is roughened by smooth random noise (Gaussian-filtered
   white noise, amplitude ``roughness``). Its intensity change is smooth: a weight ``w`` that is 1
   in the core and falls to 0 across the outline with a tanh profile (``edge`` is its width as a
   fraction of the radius); the mask is ``w >= 0.5``. A *hyper-intense* lesion adds
   ``w * c * I99`` (``I99`` = 99th percentile of the foreground, ``c`` drawn from ``hyper_contrast``);
   a *hypo-intense* lesion multiplies by ``1 - w * c`` (``c`` from ``hypo_contrast``). The texture of
   the tissue is kept (the change is additive or multiplicative). Each lesion is hyper-intense with
   probability ``p_hyper``.
4. Lesions lie inside the foreground: centres are drawn among foreground voxels at least
   ``max(radius + margin_mm, min_depth * D)`` from the background (Euclidean distance in mm; ``D`` is
   the largest such distance in the volume, so in a whole-head scan lesions fall inside the skull
   rather than in the scalp), and the change and the mask are confined to the foreground. The foreground is the largest connected component above
   ``fg_fraction`` of the volume's 99th percentile (relative to its minimum), with holes filled.

Every output volume carries its source's exact geometry (size, spacing, origin, direction) and is
written as float32 (NIfTI ``.nii.gz``), with the intensities the reader returns (scale slope
applied), so normal and lesioned volumes share one encoding. Masks are uint8 (0/1). The run is
described in ``DATASET_DIR/synth.json`` (seed, settings, per-lesion centre in index and LPS mm,
radii, type, contrast, size) and ``DATASET_DIR/README.md``. The same inputs and seed give the same
data set.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.atomic import write_text_atomic
from ..core.errors import HiMatchADError
from ..core.geometry import Image
from ..core.progress import tqdm_callback
from ..io.discovery import list_images
from ..io.formats import strip_suffix
from ..io.readers import read_image
from ..io.writers import write_image


@dataclass
class SynthConfig:
    seed: int = 0
    n_holdout: Optional[int] = None  # default: about a third of the volumes (at least 2)
    n_normal_test: Optional[int] = None  # default: a third of the held-out volumes (at least 1)
    lesions: tuple[int, int] = (1, 3)  # lesions per anomalous volume (inclusive range)
    radius_mm: tuple[float, float] = (4.0, 14.0)
    hyper_contrast: tuple[float, float] = (0.25, 0.6)
    hypo_contrast: tuple[float, float] = (0.35, 0.7)
    p_hyper: float = 0.5
    roughness: float = 0.25
    edge: float = 0.15
    margin_mm: float = 8.0
    min_depth: float = 0.5  # centres at least this fraction of the deepest foreground distance inside
    fg_fraction: float = 0.1

    def validate(self) -> None:
        lo, hi = self.lesions
        if lo < 1 or hi < lo:
            raise HiMatchADError(f"--lesions must be MIN MAX with 1 <= MIN <= MAX (got {lo} {hi})")
        if self.radius_mm[0] <= 0 or self.radius_mm[1] < self.radius_mm[0]:
            raise HiMatchADError(f"--radius-mm must be MIN MAX with 0 < MIN <= MAX (got {self.radius_mm})")
        for name in ("hyper_contrast", "hypo_contrast"):
            a, b = getattr(self, name)
            if a < 0 or b < a or (name == "hypo_contrast" and b > 1):
                raise HiMatchADError(f"{name} must be a range within [0, {'1' if name == 'hypo_contrast' else 'inf'})")
        if not 0 <= self.p_hyper <= 1:
            raise HiMatchADError("p_hyper must be within [0, 1]")


def foreground_mask(array: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Head/organ mask: voxels above ``min + fraction * (p99 - min)``, largest 3D component, holes filled."""
    from scipy import ndimage

    a = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=float(np.nanmin(array)))
    lo = float(a.min())
    hi = float(np.percentile(a, 99))
    if hi <= lo:
        return np.zeros(a.shape, dtype=bool)
    fg = a > lo + fraction * (hi - lo)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(fg)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _lesion_weight(
    rng: np.random.Generator, shape: tuple, spacing_zyx: np.ndarray, center: np.ndarray, axes_mm: np.ndarray, cfg: SynthConfig
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Smooth lesion weight in [0, 1] on a box around ``center`` (numpy index order)."""
    from scipy import ndimage

    extent = 1.0 + cfg.roughness + 3 * cfg.edge
    half = np.ceil(extent * axes_mm.max() / spacing_zyx).astype(int) + 1
    lo = np.maximum(center - half, 0)
    hi = np.minimum(center + half + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, center, spacing_zyx)], indexing="ij")
    xyz = np.stack([g.ravel() for g in grids])  # (3, n) in mm, numpy axis order
    u = _random_rotation(rng).T @ xyz
    d = np.sqrt(((u / axes_mm[:, None]) ** 2).sum(0)).reshape(grids[0].shape)
    # Smooth random roughening of the outline (correlation length about half the radius).
    noise = rng.standard_normal(d.shape)
    sigma_vox = np.maximum(0.5 * axes_mm.mean() / spacing_zyx, 0.5)
    noise = ndimage.gaussian_filter(noise, sigma_vox, mode="nearest")
    sd = float(noise.std())
    if sd > 0:
        noise /= sd
    d_eff = d * (1.0 + cfg.roughness * np.clip(noise, -2.5, 2.5) / 2.5)
    w = 0.5 * (1.0 - np.tanh((d_eff - 1.0) / cfg.edge))
    return box, w


def insert_lesions(image: Image, rng: np.random.Generator, cfg: SynthConfig, n_lesions: Optional[int] = None):
    """Insert lesions into a 3D ``image``; returns (new float32 array, uint8 mask, list of lesion dicts)."""
    from scipy import ndimage

    if image.is_2d or image.array.shape[0] < 2:
        raise HiMatchADError(f"{image.name}: synthetic lesions are made in 3D volumes; this image is 2D")
    arr = np.nan_to_num(image.array.astype(np.float32), nan=0.0)
    fg = foreground_mask(arr, cfg.fg_fraction)
    if fg.sum() < 100:
        raise HiMatchADError(f"{image.name}: no foreground found to place lesions in (is the volume empty?)")
    spacing_zyx = np.asarray(image.geometry.spacing[::-1], dtype=float)
    # Distance to the background, the field-of-view edge counting as background (a neck cut off by
    # the field of view is not "deep inside").
    dist = ndimage.distance_transform_edt(np.pad(fg, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    i99 = float(np.percentile(arr[fg], 99))
    n = int(rng.integers(cfg.lesions[0], cfg.lesions[1] + 1)) if n_lesions is None else int(n_lesions)
    out = arr.copy()
    mask = np.zeros(arr.shape, dtype=bool)
    lesions = []
    for _ in range(n):
        for _attempt in range(20):
            radius = float(rng.uniform(*cfg.radius_mm))
            axes = radius * rng.uniform(0.7, 1.3, size=3)
            depth = max(axes.max() + cfg.margin_mm, cfg.min_depth * float(dist.max()))
            candidates = np.flatnonzero(dist.ravel() >= depth)
            if candidates.size == 0:
                candidates = np.flatnonzero(dist.ravel() >= 0.5 * dist.max())
            center = np.array(np.unravel_index(int(candidates[rng.integers(candidates.size)]), arr.shape))
            box, w = _lesion_weight(rng, arr.shape, spacing_zyx, center, axes, cfg)
            w = w * fg[box]
            m = w >= 0.5
            if m.sum() >= 8:
                break
        hyper = bool(rng.random() < cfg.p_hyper)
        if hyper:
            c = float(rng.uniform(*cfg.hyper_contrast))
            out[box] = out[box] + (w * c * i99).astype(np.float32)
        else:
            c = float(rng.uniform(*cfg.hypo_contrast))
            out[box] = out[box] * (1.0 - w * c).astype(np.float32)
        mask[box] |= m
        ijk = center[::-1].astype(float)
        lesions.append(
            {
                "type": "hyper" if hyper else "hypo",
                "contrast": round(c, 4),
                "center_index_ijk": [int(v) for v in center[::-1]],
                "center_lps_mm": [round(float(v), 3) for v in image.geometry.index_to_physical(ijk)],
                "radius_mm": round(radius, 3),
                "axes_mm": [round(float(a), 3) for a in axes],
                "voxels": int(m.sum()),
            }
        )
    return out.astype(np.float32), mask.astype(np.uint8), lesions


def _is_volume(path: Path) -> bool:
    """True for a 3D image with more than one slice (read from the header; DICOM folders count as 3D)."""
    import SimpleITK as sitk

    if path.is_dir():
        return True
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
    except RuntimeError as exc:
        raise HiMatchADError(f"cannot read {path}: not a readable image") from exc
    size = r.GetSize()
    return len(size) >= 3 and sorted(size[:3])[0] > 1


def _out_name(path: Path) -> str:
    return strip_suffix(path) + ".nii.gz"


def make_synthetic_dataset(normals_dir, out_dir, cfg: Optional[SynthConfig] = None, overwrite: bool = False, progress=None) -> dict:
    """Build a ``volumes``-layout data set (see the module documentation); returns the manifest."""
    cfg = cfg or SynthConfig()
    cfg.validate()
    normals_dir, out_dir = Path(normals_dir), Path(out_dir)
    sources = list_images(normals_dir)
    if len(sources) < 3:
        raise HiMatchADError(f"{normals_dir}: {len(sources)} volume(s) found; at least 3 are needed (normal set + test cases)")
    try:
        if out_dir.resolve() == normals_dir.resolve() or normals_dir.resolve() in out_dir.resolve().parents:
            raise HiMatchADError("--out must be outside NORMALS_DIR (the normal folder would then contain the test set)")
    except OSError:
        pass
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise HiMatchADError(f"{out_dir} exists and is not empty; choose a new folder or pass --overwrite")
    names = [_out_name(p) for p in sources]
    if len(set(names)) != len(names):
        raise HiMatchADError(f"{normals_dir}: two inputs share a file name stem; rename them so every case has its own name")
    flat = [p.name for p in sources if not _is_volume(p)]
    if flat:
        raise HiMatchADError(
            f"{normals_dir}: synthetic lesions are made in 3D volumes, but {len(flat)} input(s) are 2D images "
            f"(e.g. {flat[0]}); give a folder of NIfTI/NRRD/MHA volumes or DICOM series"
        )
    n = len(sources)
    n_hold = cfg.n_holdout if cfg.n_holdout is not None else max(2, int(round(n / 3)))
    if not 2 <= n_hold <= n - 1:
        raise HiMatchADError(f"--n-holdout must be between 2 and {n - 1} for {n} volumes (got {n_hold})")
    n_norm_test = cfg.n_normal_test if cfg.n_normal_test is not None else max(1, n_hold // 3)
    if not 0 <= n_norm_test <= n_hold - 1:
        raise HiMatchADError(f"--n-normal-test must be between 0 and {n_hold - 1} (got {n_norm_test})")

    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    held = sorted(order[:n_hold].tolist())
    bank = sorted(order[n_hold:].tolist())
    held_order = rng.permutation(held).tolist()
    lesion_test = set(held_order[n_norm_test:])  # the first n_norm_test of held_order stay untouched

    if overwrite and out_dir.exists():
        for sub in ("normal", "test/img", "test/label"):
            d = out_dir / sub
            if d.is_dir():
                for p in d.iterdir():
                    if p.is_file() and p.name.endswith(".nii.gz"):
                        p.unlink()

    manifest = {
        "tool": "himatchad synth",
        "source": str(normals_dir.resolve()),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "n_holdout": n_hold,
        "n_normal_test": n_norm_test,
        "normal": [],
        "test": [],
    }
    done: dict = {}

    def tick(msg: str, total: int) -> None:  # one bar per step, counted from 0
        done[msg] = done.get(msg, 0) + 1
        if progress is not None:
            progress(msg, done[msg], total)

    for i in bank:
        img = read_image(sources[i])
        write_image(np.nan_to_num(img.array, nan=0.0).astype(np.float32), img.geometry, out_dir / "normal" / names[i])
        manifest["normal"].append({"name": names[i], "source": sources[i].name})
        tick("normal reference set", len(bank))
    for i in held:
        img = read_image(sources[i])
        if img.is_2d:
            raise HiMatchADError(f"{sources[i]}: synthetic lesions need 3D volumes; this is a 2D image")
        case_rng = np.random.default_rng([cfg.seed, i])  # per case: independent of the others
        if i in lesion_test:
            arr, mask, lesions = insert_lesions(img, case_rng, cfg)
        else:
            arr, mask, lesions = np.nan_to_num(img.array, nan=0.0).astype(np.float32), np.zeros(img.array.shape, np.uint8), []
        write_image(arr, img.geometry, out_dir / "test" / "img" / names[i])
        write_image(mask, img.geometry, out_dir / "test" / "label" / names[i])
        manifest["test"].append(
            {
                "name": names[i],
                "source": sources[i].name,
                "label": int(bool(lesions)),
                "lesions": lesions,
                "lesion_voxels": int(mask.sum()),
            }
        )
        tick("test cases", len(held))
    write_text_atomic(out_dir / "synth.json", json.dumps(manifest, indent=2) + "\n")
    write_text_atomic(out_dir / "README.md", _readme(manifest, cfg))
    return manifest


def _readme(manifest: dict, cfg: SynthConfig) -> str:
    n_les = sum(1 for t in manifest["test"] if t["label"])
    return (
        "# Synthetic-lesion evaluation set (volumes layout)\n\n"
        f"Made by `himatchad synth` from `{manifest['source']}` with seed {cfg.seed}.\n\n"
        f"- `normal/`: {len(manifest['normal'])} untouched volumes, the normal reference set.\n"
        f"- `test/img/`: {len(manifest['test'])} held-out volumes: {n_les} with synthetic lesions, "
        f"{len(manifest['test']) - n_les} untouched (normal test cases).\n"
        "- `test/label/`: one uint8 mask per test volume (1 = lesion; all zero for a normal case).\n"
        "- `synth.json`: settings and every lesion (type, contrast, centre, radii, size).\n\n"
        "Lesions are smooth hyper- or hypo-intense blobs of random size and shape inside the foreground; "
        "see `HiMatchADLib/synth.py` for the exact model. Volumes keep their source geometry exactly.\n"
    )


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register ``himatchad synth``; the parsed namespace's ``func(args)`` returns the exit code."""
    p = subparsers.add_parser(
        "synth",
        help="make a volumes-layout evaluation set with synthetic lesions from healthy volumes",
        description=(
            "Hold out some healthy volumes, insert smooth hyper- and hypo-intense lesions of random size and "
            "shape inside the foreground of most of them, and write DATASET_DIR/normal/ (reference set), "
            "DATASET_DIR/test/img/, DATASET_DIR/test/label/ (masks; all zero for untouched normal test cases) "
            "and DATASET_DIR/synth.json. Seeded: the same inputs and seed give the same data set."
        ),
    )
    p.add_argument("normals_dir", metavar="NORMALS_DIR", help="folder of healthy 3D volumes")
    p.add_argument("--out", required=True, metavar="DATASET_DIR", help="output folder (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--n-holdout", type=int, default=None, help="volumes held out as test cases (default: a third)")
    p.add_argument("--n-normal-test", type=int, default=None, help="held-out volumes left untouched (default: a third of the held-out)")
    p.add_argument("--lesions", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"), help="lesions per anomalous volume (default 1 3)")
    p.add_argument("--radius-mm", type=float, nargs=2, default=(4.0, 14.0), metavar=("MIN", "MAX"), help="lesion radius range in mm (default 4 14)")
    p.add_argument("--p-hyper", type=float, default=0.5, help="probability that a lesion is hyper-intense (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty DATASET_DIR")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bar")
    p.set_defaults(func=run_synth_cli)
    return p


def run_synth_cli(args) -> int:
    cfg = SynthConfig(
        seed=args.seed,
        n_holdout=args.n_holdout,
        n_normal_test=args.n_normal_test,
        lesions=tuple(args.lesions),
        radius_mm=tuple(args.radius_mm),
        p_hyper=args.p_hyper,
    )
    manifest = make_synthetic_dataset(
        args.normals_dir, args.out, cfg, overwrite=args.overwrite, progress=None if getattr(args, "quiet", False) else tqdm_callback()
    )
    n_les = sum(t["label"] for t in manifest["test"])
    n_lesions = sum(len(t["lesions"]) for t in manifest["test"])
    print(
        f"{args.out}: {len(manifest['normal'])} normal reference volumes, {len(manifest['test'])} test volumes "
        f"({n_les} with {n_lesions} synthetic lesions, {len(manifest['test']) - n_les} normal)"
    )
    return 0
