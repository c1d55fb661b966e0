"""Evaluation data sets: the BMAD benchmark folders as published, and a plain ``volumes`` layout.

BMAD (Bao et al., "BMAD: Benchmarks for Medical Anomaly Detection", CVPRW 2024); the variant is
recognised from the folders (names are matched case-insensitively):

``brain`` (BraTS2021 slices)::

    train/good/[img/]*.png                              normal reference set
    {valid,test}/good/img/*.png                         normal test images
    {valid,test}/Ungood/img/*.png                       anomalous test images
    {valid,test}/Ungood/{label,anomaly_mask}/*.png      their masks (same file stem)

``liver`` (BTCV + LiTS CT slices)::

    train/good/*.png
    {valid,test}/img/{good,Ungood}/*.png
    {valid,test}/label/Ungood/*.png                     (label/good, if present, is ignored)

``resc`` (retinal OCT B-scans)::

    Train/train/good/*.png
    Val/val/{good,Ungood}/*.png,   Val/val_label/Ungood/*.png
    Test/test/{good,Ungood}/*.png, Test/test_label/Ungood/*.png

``volumes`` (any 2D or 3D format :func:`~HiMatchADLib.io.readers.read_image` reads)::

    normal/                 normal volumes: the reference set
    test/img/<name>.<ext>   test volumes
    test/label/<name>.<ext> one mask per test volume (same stem); an all-zero mask marks a normal
                            test case, a non-zero one an anomalous case

A mask is matched to its image by file stem (``case7.png`` <- ``case7.png``, ``case7_mask.png``,
``case7_label.png`` or ``case7_seg.png``). Nonzero mask voxels are anomalous. An anomalous BMAD
image without a mask keeps ``mask=None``: it counts for the image-level metrics only.

Subsampling (``max_normals``, ``max_test``) is deterministic and needs no random generator: the
sorted list is sampled at evenly spaced positions, so that a subset covers every patient and slice
position of the listing; test cases are stratified (the anomalous fraction is kept, and both
classes are kept when both exist).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..core.errors import HiMatchADError
from ..io.discovery import list_images
from ..io.formats import strip_suffix
from ..io.readers import read_image

LAYOUTS = ("auto", "bmad", "volumes")


SPLITS = ("test", "valid")


MASK_SUFFIXES = ("", "_mask", "_label", "_seg", "_gt")


@dataclass
class TestCase:
    """One test image or volume with its ground truth."""

    __test__ = False  # not a pytest test class

    image: Path
    mask: Optional[Path]
    label: int  # 1 = anomalous, 0 = normal
    name: str = ""

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        self.mask = None if self.mask is None else Path(self.mask)
        self.label = int(self.label)
        if not self.name:
            self.name = strip_suffix(self.image)

    def to_dict(self) -> dict:
        return {"name": self.name, "image": str(self.image), "mask": None if self.mask is None else str(self.mask), "label": self.label}


@dataclass
class EvalDataset:
    """A data set resolved to files: the normal reference set and the labelled test cases."""

    root: Path
    layout: str  # "bmad" | "volumes"
    variant: str  # "brain" | "liver" | "resc" | "volumes"
    split: str
    normal_dir: Path
    normals: list[Path]
    cases: list[TestCase]
    n_normals_available: int = 0
    n_cases_available: int = 0
    notes: list = field(default_factory=list)
    all_test_images: list = field(default_factory=list)  # every test image of the split, before subsampling

    @property
    def n_anomalous(self) -> int:
        return sum(c.label for c in self.cases)

    @property
    def n_normal_test(self) -> int:
        return sum(1 - c.label for c in self.cases)

    @property
    def all_normals(self) -> bool:
        """True when ``normals`` is the complete content of ``normal_dir``."""
        return len(self.normals) == self.n_normals_available

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "variant": self.variant,
            "split": self.split,
            "normal_dir": str(self.normal_dir),
            "n_normals": len(self.normals),
            "n_normals_available": self.n_normals_available,
            "n_test": len(self.cases),
            "n_test_available": self.n_cases_available,
            "n_test_anomalous": self.n_anomalous,
            "n_test_normal": self.n_normal_test,
            "n_anomalous_without_mask": sum(1 for c in self.cases if c.label and c.mask is None),
            "notes": list(self.notes),
        }


def evenly_spaced(items: Sequence, n: Optional[int]) -> list:
    """``n`` items taken at evenly spaced positions of ``items`` (all of them when ``n`` is None or large).

    Position ``i`` of ``n`` is ``floor((i + 1/2) * len / n)``: the middle of each of ``n`` equal
    parts, so the first and last items are not favoured.
    """
    items = list(items)
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise HiMatchADError(f"a subsample size must be at least 1 (got {n})")
    idx = np.floor((np.arange(n) + 0.5) * len(items) / n).astype(int)
    return [items[i] for i in idx]


def subsample_cases(cases: Sequence[TestCase], n: Optional[int]) -> list[TestCase]:
    """Stratified, deterministic subsample of test cases (order: normal cases, then anomalous)."""
    cases = list(cases)
    if n is None or n >= len(cases):
        return cases
    if n < 1:
        raise HiMatchADError(f"--max-test must be at least 1 (got {n})")
    anomalous = [c for c in cases if c.label]
    normal = [c for c in cases if not c.label]
    n_anom = int(round(n * len(anomalous) / len(cases)))
    if anomalous and normal and n >= 2:
        n_anom = min(max(n_anom, 1), n - 1)
    n_anom = min(n_anom, len(anomalous))
    n_norm = min(n - n_anom, len(normal))
    return evenly_spaced(normal, n_norm) + evenly_spaced(anomalous, n_anom)


def _child(folder: Path, *names: str) -> Optional[Path]:
    """The sub-folder of ``folder`` named like one of ``names`` (case-insensitive), or None."""
    if not folder.is_dir():
        return None
    wanted = [n.lower() for n in names]
    try:
        entries = {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir()}
    except OSError:
        return None
    for n in wanted:
        if n in entries:
            return entries[n]
    return None


def _path(root: Path, *parts: str) -> Optional[Path]:
    """Follow ``parts`` (each may be ``a|b`` alternatives) case-insensitively from ``root``."""
    cur: Optional[Path] = root
    for part in parts:
        cur = _child(cur, *part.split("|")) if cur is not None else None
        if cur is None:
            return None
    return cur


def _images(folder: Optional[Path]) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return list_images(folder)


def _mask_index(folder: Optional[Path]) -> dict[str, Path]:
    if folder is None or not folder.is_dir():
        return {}
    return {strip_suffix(p): p for p in list_images(folder)}


def _find_mask(image: Path, masks: dict[str, Path]) -> Optional[Path]:
    stem = strip_suffix(image)
    for suf in MASK_SUFFIXES:
        if stem + suf in masks:
            return masks[stem + suf]
    return None


def _bmad_variant(root: Path) -> Optional[str]:
    if _path(root, "Train", "train", "good") is not None and (_path(root, "Test", "test") or _path(root, "Val", "val")):
        return "resc"
    if _path(root, "train", "good") is None:
        return None
    for split in ("test", "valid|val"):
        if _path(root, split, "img") is not None:
            return "liver"
        if _path(root, split, "good|Ungood") is not None:
            return "brain"
    return None


def detect_layout(root: str | os.PathLike) -> tuple[str, str]:
    """``(layout, variant)`` of a data set folder; :class:`HiMatchADError` when nothing matches."""
    root = Path(root)
    if not root.exists():
        raise HiMatchADError(f"data set folder not found: {root}")
    if not root.is_dir():
        raise HiMatchADError(f"not a folder: {root} (give the data set folder)")
    if _child(root, "normal") is not None and _path(root, "test", "img") is not None:
        return "volumes", "volumes"
    variant = _bmad_variant(root)
    if variant is not None:
        return "bmad", variant
    hint = ""
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    matching = [p.name for p in subs if _bmad_variant(p) or (_child(p, "normal") and _path(p, "test", "img"))]
    if matching:
        hint = f" It contains data sets in: {', '.join(matching)}; give one of those folders."
    found = ", ".join(p.name for p in subs[:12]) or "no sub-folders"
    raise HiMatchADError(
        f"{root} matches no known data set layout (found: {found}).{hint} Expected either the BMAD "
        "folders (brain: train/good + test/{good,Ungood}/img; liver: train/good + test/img/{good,Ungood}; "
        "RESC: Train/train/good + Test/test) or the volumes layout (normal/ + test/img/ + test/label/)."
    )


def _bmad_cases(root: Path, variant: str, split: str) -> tuple[Path, list[TestCase], list[str]]:
    notes: list[str] = []
    if variant == "resc":
        normal_dir = _path(root, "Train", "train", "good")
        top = "Test" if split == "test" else "Val"
        sub = "test" if split == "test" else "val"
        img_dir = _path(root, top, sub)
        lab_dir = _path(root, top, f"{sub}_label")
        good_dir = _path(img_dir, "good") if img_dir else None
        bad_dir = _path(img_dir, "Ungood") if img_dir else None
        mask_dir = _path(lab_dir, "Ungood") if lab_dir else None
        if mask_dir is None and lab_dir is not None:
            mask_dir = lab_dir
    elif variant == "liver":
        normal_dir = _path(root, "train", "good")
        split_dir = _path(root, "test" if split == "test" else "valid|val")
        good_dir = _path(split_dir, "img", "good") if split_dir else None
        bad_dir = _path(split_dir, "img", "Ungood") if split_dir else None
        mask_dir = _path(split_dir, "label", "Ungood") if split_dir else None
    else:  # brain
        normal_dir = _path(root, "train", "good")
        split_dir = _path(root, "test" if split == "test" else "valid|val")
        good_dir = _path(split_dir, "good") if split_dir else None
        if good_dir is not None and _child(good_dir, "img") is not None:
            good_dir = _child(good_dir, "img")
        bad = _path(split_dir, "Ungood") if split_dir else None
        bad_dir = _child(bad, "img") if bad is not None else None
        mask_dir = _child(bad, "label", "anomaly_mask") if bad is not None else None
    if normal_dir is None:
        raise HiMatchADError(f"{root}: the normal reference folder of this BMAD {variant} data set is missing")
    good = _images(good_dir)
    bad_imgs = _images(bad_dir)
    if not good and not bad_imgs:
        raise HiMatchADError(
            f"{root}: no test images found for split '{split}' of this BMAD {variant} data set"
            + (" (try --split valid)" if split == "test" else " (try --split test)")
        )
    masks = _mask_index(mask_dir)
    cases = [TestCase(p, None, 0) for p in good]
    missing = 0
    for p in bad_imgs:
        m = _find_mask(p, masks)
        missing += m is None
        cases.append(TestCase(p, m, 1))
    if missing:
        notes.append(
            f"{missing} of {len(bad_imgs)} anomalous images have no mask"
            + ("" if masks else " (no mask folder)")
            + "; they count for the image-level metrics only"
        )
    return normal_dir, cases, notes


def _mask_is_empty(path: Path) -> bool:
    arr = read_image(path).array
    return not bool(np.any(np.nan_to_num(arr) != 0))


def _volume_cases(root: Path) -> tuple[Path, list[TestCase], list[str]]:
    normal_dir = _child(root, "normal")
    img_dir = _path(root, "test", "img")
    lab_dir = _path(root, "test", "label|labels|mask|masks")
    images = _images(img_dir)
    if not images:
        raise HiMatchADError(f"{root}: test/img/ holds no readable images")
    if lab_dir is None:
        raise HiMatchADError(f"{root}: test/label/ is missing; every test volume needs a mask (all zero for a normal case)")
    masks = _mask_index(lab_dir)
    cases, without = [], []
    for p in images:
        m = _find_mask(p, masks)
        if m is None:
            without.append(p.name)
            continue
        cases.append(TestCase(p, m, 0 if _mask_is_empty(m) else 1))
    if without:
        raise HiMatchADError(
            f"{root}: no mask in test/label/ for {len(without)} test image(s), e.g. {without[0]}; "
            "give each test image a mask with the same file name (all zero for a normal case)"
        )
    cases.sort(key=lambda c: (c.label, str(c.image)))
    return normal_dir, cases, []


def load_dataset(
    root: str | os.PathLike,
    layout: str = "auto",
    split: str = "test",
    max_normals: Optional[int] = None,
    max_test: Optional[int] = None,
) -> EvalDataset:
    """Resolve a data set folder to its normal reference images and labelled test cases."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise HiMatchADError(f"unknown layout '{layout}' (use one of {', '.join(LAYOUTS)})")
    if split not in SPLITS:
        raise HiMatchADError(f"unknown split '{split}' (use one of {', '.join(SPLITS)})")
    found_layout, variant = detect_layout(root)
    if layout != "auto" and layout != found_layout:
        raise HiMatchADError(f"{root} looks like the '{found_layout}' layout, not '{layout}'; use --layout {found_layout} or auto")
    if found_layout == "volumes":
        normal_dir, cases, notes = _volume_cases(root)
        if split != "test":
            notes.append("the volumes layout has one test split; --split is ignored")
    else:
        normal_dir, cases, notes = _bmad_cases(root, variant, split)
    normals_all = list_images(normal_dir)
    if not normals_all:
        raise HiMatchADError(f"{normal_dir} holds no readable images: the normal reference set is empty")
    if max_normals is not None and max_normals < 1:
        raise HiMatchADError(f"--max-normals must be at least 1 (got {max_normals})")
    normals = evenly_spaced(normals_all, max_normals)
    chosen = subsample_cases(cases, max_test)
    return EvalDataset(
        root=root,
        layout=found_layout,
        variant=variant,
        split=split,
        normal_dir=normal_dir,
        normals=normals,
        cases=chosen,
        n_normals_available=len(normals_all),
        n_cases_available=len(cases),
        notes=notes,
        all_test_images=[c.image for c in cases],
    )
