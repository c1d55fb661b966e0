"""``HiMatchDetector``: configure, ``fit`` on a folder of normal scans, ``predict`` on a volume.

The three modes (``himatch``, ``knn``, ``dpmm``) share one feature extractor and one cached bank,
so they can be compared on the same data. See ``HiMatchADLib.methods`` and ``docs/method.md`` for the maths.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..bank.build import build_or_load, scan_normals
from ..bank.store import BankSettings, NormalBank
from ..core.atomic import write_text_atomic
from ..core.digest import files_digest
from ..core.errors import HiMatchADError
from ..core.geometry import Image
from ..core.progress import ProgressCallback, Reporter
from ..core.result import DetectionResult
from ..core.version import __version__
from ..features.backbone import DEFAULT_MODEL, resolve_precision
from ..features.canvas import patch_foreground
from ..features.extractor import FeatureExtractor
from ..features.presets import PRESETS, resolve_modality
from ..features.slicing import (
    PreparedVolume,
    common_spacing,
    in_plane_extent,
    prepare_volume,
)
from ..io.dicom import DicomSeries
from ..io.readers import is_2d_file, read_image
from ..io.writers import check_storable
from ..methods.base import QuerySlice, get_method
from ..methods.maps import (
    fuse_slices,
    patch_to_pixels,
    top_percent_mean,
)
from ..outputs.files import save_result
from ..outputs.registry import check_outputs
from .calibration import CALIBRATION_FORMAT, calibrate, calibration_plan
from . import feedback
from .checks import check_query_against_bank
from .overview import display_volume
from .parameters import DETECTOR_PARAMETERS, check_detector_parameters
from .provenance import provenance
from . import sharing
from .subjects import subject_groups


@dataclass
class PreparedQuery:
    """A query read, checked and prepared by :meth:`HiMatchDetector.prepare`, for :meth:`~HiMatchDetector.predict`.

    ``settings`` are the preparation settings it was made with (``predict`` prepares the image again
    when the detector's differ). ``predict`` takes ``prep`` out of it (``prep`` is then None), so that
    the prepared volume is freed as soon as its maps are made; passed again, the query is prepared
    again from ``image``. It stands for the file it was read from: ``os.fspath(query)`` is that
    path, so code written for paths accepts it.
    """

    image: Image
    prep: Optional[PreparedVolume]
    settings: dict
    read_s: float  # seconds spent reading the image
    preprocess_s: float  # seconds spent preparing it

    def __fspath__(self) -> str:
        if self.image.path is None:
            raise TypeError(f"{self.image.name} was not read from a file")
        return str(self.image.path)


#: Revision of how the maps are computed from the same settings, recorded in every result's settings
#: so that a batch resumed with another revision recomputes its earlier results (2: the model
#: input's shorter side at ``resolution``, smoothing in image pixels per mode, one reliability
#: weight per stage map, no slice-position prior by default).
METHOD_REVISION = 2


class HiMatchDetector:
    """Training-free anomaly detector on frozen DINOv3 features.

    Parameters (all keyword):
        model: Hugging Face id or local folder of a DINOv3/DINOv2 ViT.
        method: ``"himatch"`` (default), ``"knn"`` (AnomalyDINO) or ``"dpmm"`` (AnomalyDINO-DPMM).
        k: number of normal reference slices retrieved per query slice (``himatch``).
        modality: ``"auto"``, ``"mri"``, ``"ct"``, ``"oct"`` or ``"8bit"`` (intensity preset).
        slice_axis: ``"auto"`` (the preset's), ``"axial"``, ``"coronal"``, ``"sagittal"``, ``"largest_spacing"``.
        resolution: shorter side of the model input in pixels (rounded to the patch size), as the
            references; the aspect is kept (see ``HiMatchADLib.features.canvas.model_grid``).
        pixel_spacing: in-plane pixel spacing (mm) at which every slice is resampled before the
            model, so one millimetre is the same number of model pixels in the normals and the query:
            ``"auto"`` (default: the normal set's median shorter field of view over ``resolution``;
            for OCT, whose preset keeps each B-scan's own pixels, None), a number, or None (stretch
            each slice's shorter side to ``resolution``, the papers' preprocessing). Stored with the bank; queries use the bank's. 2D PNG/JPEG/TIFF/BMP slices
            have no recorded spacing and are always stretched.
        knn_index: how ``knn`` finds each query token's nearest normal token: ``"exact"`` (default),
            ``"ivf"`` or ``"hnsw"`` (approximate, faster on large banks; see ``knn_index.py``). Only
            ``knn`` searches normal tokens: another method with an index other than ``"exact"`` is
            refused, and its settings do not record one.
        stages: transformer layers used by ``himatch`` (default four, evenly spaced). ``knn`` and
            ``dpmm`` use the last.
        stage_norm: pass every stage through the model's final layer norm (default, as DINOv3's
            ``get_intermediate_layers(norm=True)``); False keeps the intermediate hidden states raw.
        threshold: ``"auto"`` (calibrated on held-out normal slices at ``target_fpr``) or a number.
        target_fpr: pixel false-positive rate on held-out normal foreground for ``threshold="auto"``.
        min_component_size: components of the labelmap smaller than this many voxels are removed
            (default: the pixel area of one model patch).
        sigma: Gaussian smoothing of the pixel maps, in pixels of the image (the slice's own grid).
            None (default): the method's reference: 4 for ``knn`` (AnomalyDINO) and ``himatch``,
            0 (none) for ``dpmm`` (AnomalyDINO-DPMM). The resolved value is what ``sigma`` holds.
        position_window: opt-in slice-position prior for volumes (``himatch``): only normal slices
            whose relative position in their foreground extent lies within this distance of the
            query's are retrieved, when there are K of them. None (default): off, as in the paper
            (relative positions depend on each scan's coverage).
        fusion: how ``himatch`` fuses its calibrated stage maps: ``"reliability"`` (default: one
            weight per stage from its support disagreement on held-out normal slices), ``"mean"``,
            ``"max"`` or ``"variance"`` (the former per-pixel rule); see ``HiMatchADLib.methods.fusion``.
        clusters_per_slice: spherical k-means centroids summarising each normal slice per stage.
        shared_codebook: replace every slice centroid by its entry in a codebook shared by the normal
            set (opt-in; default False: the stage maps compare with each support slice's own centroids).
        codebook_factor: with ``shared_codebook``, the codebook of a stage has ``codebook_factor *
            sqrt(m)`` entries for ``m`` slice centroids (it grows as the square root of the normal set).
        dpmm_components, dpmm_max_tokens, dpmm_covariance, dpmm_concentration: the mixture's
            settings: truncation (200), normal tokens it is fitted on (a seeded sample of at most
            50 000), covariance type (``"diag"``), stick-breaking concentration prior (2, the
            reference's; None = scikit-learn's 1/dpmm_components). See docs/method.md.
        calibration_slices: number of held-out normal slices used for calibration (subjects are
            added until there are this many, when the normal set has them).
        consistency_mm: for volumes, fuse each slice's pixel map with those of the neighbouring
            slices (Gaussian weights, sigma in mm, up to 3 sigma; see ``fuse_slices`` in ``HiMatchADLib.methods.maps``). None
            (default): every slice's map on its own, as in the papers. Calibration fuses the same way.
        subject_pattern: regular expression with one group naming the subject of a normal file,
            searched in its path relative to the normal folder (e.g. ``r"^(TCGA_[A-Z0-9]+_[0-9]+)_"``).
            Calibration holds out whole subjects. Default None: a volume is its own subject, and 2D
            files named ``<subject>_<n>`` are grouped by ``<subject>``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``. batch_size: slices per forward pass.
        precision: ``"auto"`` (default), ``"fp32"``, ``"bf16"`` or ``"int8"`` (CPU only: dynamic
            int8 quantisation of the linear layers) for the backbone; float16 is refused (DINOv3 does
            not support it). ``auto`` is resolved here, once, to ``bf16`` on hardware that computes
            bfloat16 natively (CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or AMX) and ``fp32``
            elsewhere; ``self.precision``, the settings and the bank key hold the resolved value.
            Banks are cached per precision and device type.
        cache_dir: where banks are cached (default ``$HIMATCHAD_CACHE`` or ``~/.cache/himatchad``).
        progress: ``callback(message, done, total)``; cancel_event: ``threading.Event``.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        method: str = "himatch",
        k: int = 8,
        knn_index: str = "exact",
        modality: str = "auto",
        slice_axis: str = "auto",
        resolution: int = 448,
        pixel_spacing: Union[str, float, None] = "auto",
        stages: Optional[Sequence[int]] = None,
        threshold: Union[str, float] = "auto",
        target_fpr: float = 0.01,
        min_component_size: Optional[int] = None,
        sigma: Optional[float] = None,
        position_window: Optional[float] = None,
        fusion: str = "reliability",
        candidates: int = 32,
        alpha: float = 0.5,
        clusters_per_slice: int = 64,
        codebook_factor: float = 8.0,
        shared_codebook: bool = False,
        slice_step: int = 1,
        dpmm_components: int = 200,
        dpmm_max_tokens: int = 50000,
        dpmm_covariance: str = "diag",
        dpmm_concentration: Optional[float] = 2.0,
        calibration_slices: int = 48,
        consistency_mm: Optional[float] = None,
        subject_pattern: Optional[str] = None,
        device: str = "auto",
        batch_size: int = 8,
        stage_norm: bool = True,
        precision: str = "auto",
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        seed: int = 0,
        progress: Optional[ProgressCallback] = None,
        cancel_event=None,
    ):
        given = locals()
        self._given = {name: given[name] for name in DETECTOR_PARAMETERS}  # as passed (load_bank takes the bank's for defaults)
        values = check_detector_parameters(dict(self._given))
        for name, value in values.items():  # every keyword, checked and converted, is an attribute
            setattr(self, name, value)
        self.precision = resolve_precision(self.precision, self.device)  # once: "auto" -> what this hardware runs best
        self.reporter = Reporter(progress, cancel_event)
        self.extractor: Optional[FeatureExtractor] = None
        self.bank: Optional[NormalBank] = None
        self.scorer = None
        self.calibration: Optional[dict] = None
        self.normals_dir: Optional[Path] = None
        self.fit_info: dict = {}
        self.slice_subject: Optional[np.ndarray] = None  # subject index of each bank slice
        self.subjects: list = []  # subject names
        self.fit_warnings: list = []
        self._checked: Optional[PreparedQuery] = None  # the query last read by check_query
        self._fitted_pattern: Optional[str] = None
        self.bank_file: Optional[Path] = None  # the bank file load_bank() read the bank from
        self.bank_file_digest: Optional[str] = None  # its manifest's SHA-256 ("sha256:<hex>"; it records every member's)
        # Reader feedback ("mark as normal", :mod:`.feedback`): its folder (None: beside the bank) and whether it is used.
        self.feedback_dir: Optional[Path] = None
        self.use_feedback: bool = True
        self._feedback = None  # (evidence, folder state, folder, entries) of the last read

    # ------------------------------------------------------------------ settings
    def set_progress(self, progress: Optional[ProgressCallback] = None, cancel_event=None) -> None:
        self.reporter = Reporter(progress, cancel_event)

    def _describe_normals(self, folder: Optional[Path]) -> dict:
        """What the bank of ``folder`` records about its images, from their headers (and, for
        ``modality="auto"``, from reading up to three of them): the intensity preset, the
        dimensionality (``"2d"``, ``"3d"`` or ``"mixed"``) and the in-plane pixel spacing (mm) for
        ``pixel_spacing`` (see the class docstring)."""
        out = {"modality": self.modality, "dims": "", "pixel_spacing_mm": None if self.pixel_spacing in (None, "auto") else float(self.pixel_spacing)}
        if folder is None:
            return out

        _, files, _ = scan_normals(folder)
        extents, flat = [], []
        for f in files:
            try:
                flat.append(is_2d_file(f))
                extents.append(in_plane_extent(f, self.modality, self.slice_axis))
            except Exception:  # unreadable: the bank build skips it and says why
                extents.append(None)
        if flat:
            out["dims"] = "2d" if all(flat) else "3d" if not any(flat) else "mixed"
        if self.modality == "auto":
            seen: dict = {}
            for f in dict.fromkeys([files[0], files[len(files) // 2], files[-1]]):
                try:
                    seen[resolve_modality(read_image(f), "auto")] = f
                except HiMatchADError:
                    continue
            if len(seen) > 1:
                which = ", ".join(f"{Path(p).name} looks like {m}" for m, p in seen.items())
                raise HiMatchADError(f"the normal folder {folder} mixes modalities ({which}); pass the modality explicitly (--modality)")
            if seen:
                out["modality"] = next(iter(seen))
        # "auto": one spacing from the normal set, unless the preset keeps each slice's own pixels (OCT)
        if self.pixel_spacing == "auto" and PRESETS.get(out["modality"], {}).get("pixel_spacing") != "stretch":
            sp = common_spacing(extents, self.resolution, self._ensure_extractor().patch_size)
            out["pixel_spacing_mm"] = None if sp is None else float(f"{sp:.6g}")
        return out

    def _bank_settings(self, folder: Optional[Union[str, os.PathLike]] = None) -> BankSettings:
        """Settings of the normal bank of ``folder`` (the modality for ``"auto"``, the
        dimensionality and ``pixel_spacing="auto"`` are read from the folder)."""
        info = self._describe_normals(Path(folder).expanduser() if folder is not None else None)
        return BankSettings(
            modality=info["modality"],
            dims=info["dims"],
            slice_axis=self.slice_axis,
            resolution=self.resolution,
            pixel_spacing_mm=info["pixel_spacing_mm"],
            stages=tuple(self.extractor.stages),
            clusters_per_slice=self.clusters_per_slice,
            codebook_factor=self.codebook_factor,
            shared_codebook=self.shared_codebook,
            slice_step=self.slice_step,
            seed=self.seed,
        )

    def settings(self) -> dict:
        s = {
            "version": __version__,
            "method_revision": METHOD_REVISION,
            "method": self.method,
            "model": self.model,
            "k": self.k,
            "modality": self.modality,
            "slice_axis": self.slice_axis,
            "resolution": self.resolution,
            "pixel_spacing": self.pixel_spacing,
            "stages": list(self.extractor.stages) if self.extractor else self.stages,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "sigma": self.sigma,
            "position_window": self.position_window,
            "candidates": self.candidates,
            "alpha": self.alpha,
            "clusters_per_slice": self.clusters_per_slice,
            "codebook_factor": self.codebook_factor,
            "shared_codebook": self.shared_codebook,
            "slice_step": self.slice_step,
            "dpmm_components": self.dpmm_components,
            "dpmm_max_tokens": self.dpmm_max_tokens,
            "dpmm_covariance": self.dpmm_covariance,
            "dpmm_concentration": self.dpmm_concentration,
            "calibration_slices": self.calibration_slices,
            "subject_pattern": self.subject_pattern,
            "consistency_mm": self.consistency_mm,
            "device": self.extractor.device if self.extractor else self.device,
            "stage_norm": self.stage_norm,
            "precision": self.precision,
            "seed": self.seed,
        }
        if get_method(self.method).uses_knn_index:  # the other methods search no normal tokens
            s["knn_index"] = self.knn_index
        if get_method(self.method).uses_fusion:  # the other methods have one map
            s["fusion"] = self.fusion
        return s

    def method_key(self) -> dict:
        """The settings that change the method's scores (the calibration's cache key): the common
        ones and those the method's registry entry names."""
        keys = ["method", "target_fpr", "sigma", "calibration_slices", "subject_pattern", "consistency_mm", "seed"]
        keys += get_method(self.method).key_settings(self)
        s = self.settings()
        return {"format": CALIBRATION_FORMAT, **{k: s[k] for k in keys}}

    # ------------------------------------------------------------------ fit
    def _ensure_extractor(self) -> FeatureExtractor:
        if self.extractor is None:
            self.reporter("Loading model", 0, 1)
            self.extractor = FeatureExtractor(
                self.model, self.device, self.stages, self.resolution, self.batch_size, stage_norm=self.stage_norm, precision=self.precision,
                reporter=self.reporter,  # a model download reports its MB and can be cancelled
            )
            self.reporter("Loading model", 1, 1)
        return self.extractor

    def fit(self, normals_dir: Union[str, os.PathLike], rebuild: bool = False) -> "HiMatchDetector":
        """Build (or load from the cache) the normal bank of ``normals_dir`` and calibrate.

        A second call with an unchanged folder reuses the bank and calibration already in memory.
        """
        t0 = time.perf_counter()
        self._ensure_extractor()
        folder = Path(normals_dir).expanduser()
        bank = build_or_load(folder, self.extractor, self._bank_settings(folder), self.cache_dir, self.reporter, rebuild)
        same = (
            self.bank is not None
            and self.bank.root == bank.root
            and self.bank.manifest["content"] == bank.manifest["content"]
            and self._fitted_pattern == self.subject_pattern
        )
        if not same:
            self.bank = bank
            self.scorer = None
            self.calibration = None
        self.normals_dir = folder
        self.bank_file = self.bank_file_digest = None
        for s in self.bank.skipped:
            warnings.warn(f"normal image skipped: {s['path']}: {s['reason']}")
        if self.scorer is None:
            self.slice_subject, self.subjects, group_warnings = subject_groups(self.bank, self.subject_pattern)
            if len(self.subjects) < 2 and self.threshold == "auto":
                raise HiMatchADError(
                    f"the normal folder {folder} holds one subject ({self.subjects[0] if self.subjects else 'none'}): the "
                    "threshold is calibrated on normal slices held out with their subject, which needs at least two "
                    "subjects; add normal scans of another subject, give a fixed threshold (--threshold), or, if the "
                    "files are of different subjects, say how their names name them (--subject-pattern)"
                )
            self._fitted_pattern = self.subject_pattern
            self._prepare_method()
            self.fit_warnings = self.bank.warnings + group_warnings + list(self.calibration.get("warnings", [])) + self.scorer.fit_warnings()
            for w in self.fit_warnings:
                warnings.warn(w)
        self.fit_info = {
            "seconds": round(time.perf_counter() - t0, 3),
            **self.bank.describe(),
            "subjects": len(self.subjects),
            "calibration_slices": self.calibration.get("n_slices"),
            "calibration_subjects": len(self.calibration.get("held_out_groups", [])),
            "warnings": list(self.fit_warnings),
        }
        self.fit_info.update(self.scorer.describe())
        return self


    def load_bank(self, path: Union[str, os.PathLike], asked: Optional[Sequence[str]] = None) -> "HiMatchDetector":
        """Make the detector ready to predict from a bank file (``himatchad bank export``), without
        the normal scans; instead of :meth:`fit`. Returns the detector.

        The file is verified first (every member's SHA-256, its format version: a file of a newer
        format is refused). It fixes the bank's settings (model weights, precision, method,
        resolution, stages, clustering, preset, pixel spacing...) and the calibration key of its
        method (``k``, ``target_fpr``, ``sigma``...): a setting not asked is taken from the file, one
        asked with another value is refused, naming it. ``asked``: the keywords the caller set
        (the command line's given options, a worker request's settings); None (default): those whose
        value differs from the constructor's default. The detector then keeps the file's settings
        (a later :meth:`fit` uses them). The loaded model must have the
        weights the bank was made with (their ``weights_digest``); otherwise it is refused, naming
        the model and digest the bank needs. Errors: :class:`HiMatchADError`.
        """
        sharing.load_bank(self, path, asked)
        return self

    def export_bank(self, path: Union[str, os.PathLike], keep_names: bool = False) -> Path:
        """Write the fitted bank, the calibration of this detector's method (and the ``dpmm``
        mixture) to the one file ``path`` that :meth:`load_bank` reads; no voxel data. The normal
        files' names are replaced by opaque identifiers (``normal-0001``, subjects ``subject-0001``)
        unless ``keep_names``. Written under a temporary name, verified, then renamed; returns the path."""
        return sharing.export_bank(self, path, keep_names=keep_names)

    # ------------------------------------------------------------------ reader feedback
    def mark_normal(self, image, region=None, slices=None, note: str = "") -> dict:
        """Mark a region of ``image`` as normal: ``region`` (a labelmap on its grid: array,
        :class:`Image` or file) and/or ``slices`` (indices along the axis the detector slices).
        Its tokens become normal evidence of every later prediction (see :mod:`.feedback`), kept in
        :attr:`feedback_folder`, never in the bank; the threshold is not changed. Returns the
        entry's record (``id``, time, case digest, region, model, note)."""
        return feedback.mark_normal(self, image, region=region, slices=slices, note=note)

    def feedback_entries(self) -> list:
        """The feedback entries of :attr:`feedback_folder` (verified records, oldest first)."""
        return feedback.list_feedback(self)

    def remove_feedback(self, entry_id: str) -> dict:
        """Remove a feedback entry (its id, or a unique start of it); returns its record. With
        every entry removed the results are those of the bank alone, bit for bit."""
        return feedback.remove_feedback(self, entry_id)

    @property
    def feedback_folder(self) -> Optional[Path]:
        """Where the feedback is kept: :attr:`feedback_dir`, else beside the bank (None before one is loaded)."""
        return feedback.feedback_folder(self)

    def _prepare_method(self) -> None:
        bank = self.bank
        cal_ids, cal_groups = calibration_plan(self)
        scorer = get_method(self.method).make_scorer(self, cal_groups)
        self.scorer = scorer
        key = self.method_key()
        path = bank.extra_path("calib", key, ".json")
        cal = None
        if path.exists():
            try:
                cal = json.loads(path.read_text(encoding="utf-8"))
                if cal.get("key") != key:
                    cal = None
            except (OSError, ValueError):
                cal = None
        if cal is None:
            cal = self._calibrate(cal_ids, cal_groups)
            cal["key"] = key
            write_text_atomic(path, json.dumps(cal, indent=1))
        self.calibration = cal
        scorer.set_calibration(cal)

    def _calibrate(self, cal_ids: list, cal_groups: list) -> dict:
        """Score held-out normal slices (each against the bank without its own subject); see :mod:`.calibration`."""
        return calibrate(self, cal_ids, cal_groups)

    # ------------------------------------------------------------------ predict
    def _queries(self, prep: PreparedVolume, sel: np.ndarray) -> tuple[list, list]:
        ex = self.extractor
        feats = ex.extract(prep.canonical[sel], as_is=prep.plane is not None)
        pfg = patch_foreground(prep.foreground[sel], feats.grid, self.bank.manifest["settings"]["patch_foreground_fraction"])
        qs, masks = [], []
        for n, si in enumerate(sel):
            m = pfg[n]
            if not m.any():
                continue
            qs.append(QuerySlice(int(si), [t[n][m] for t in feats.stages], feats.cls[n], m, feats.grid, float(prep.positions[si])))
            masks.append(prep.native_foreground[si])
        return qs, masks

    def _pixel_map(self, patch: np.ndarray, q: QuerySlice, plane, native_hw: tuple) -> np.ndarray:
        """Patch scores of one slice -> pixel map on the slice's native grid, smoothed with a
        Gaussian of ``sigma`` native pixels (AnomalyDINO smooths the map resized to the image).
        With a common pixel spacing (``plane``) the map is made on the model canvas, with sigma
        converted to canvas pixels per axis, and resampled back to the native grid."""
        if plane is None:
            pix = patch_to_pixels(patch, q.fg, q.grid, native_hw, self.sigma)
        else:
            r0, r1, c0, c1 = plane.box
            h, w = plane.scaled_hw
            sig = (self.sigma * h / max(r1 - r0, 1), self.sigma * w / max(c1 - c0, 1))
            pix = plane.to_native(patch_to_pixels(patch, q.fg, q.grid, plane.canvas_hw, sig)[None])[0]
        transform = get_method(self.method).pixel_transform
        if transform is not None:
            transform(pix)
        return pix

    def _prep_settings(self) -> dict:
        """How images are prepared: with the bank's pixel spacing once a bank is loaded."""
        spacing = None
        modality = self.modality
        if self.bank is not None and self.extractor is not None:
            spacing = self.bank.manifest["settings"].get("pixel_spacing_mm")
            modality = self.bank.manifest["settings"].get("modality", modality) if modality == "auto" else modality
        out = {"modality": modality, "slice_axis": self.slice_axis, "spacing_mm": spacing}
        if spacing is not None:
            out.update(resolution=self.resolution, patch_size=self.extractor.patch_size)
        return out

    def _fuses_slices(self, img: Image, prep: PreparedVolume) -> bool:
        return bool(self.consistency_mm) and not img.is_2d and prep.n_slices > 1


    def _check_fitted(self) -> None:
        if self.bank is None or self.scorer is None:
            raise HiMatchADError("the detector has no normal bank yet: call fit(normals_dir) first")

    def prepare(self, image: Union[str, os.PathLike, Image, DicomSeries]) -> "PreparedQuery":
        """Read a query and prepare it for :meth:`predict`, without the model or the normal bank.

        Reads ``image`` (a path, a :class:`~HiMatchADLib.io.dicom.DicomSeries`, or an already read
        :class:`Image`): it must be readable, 2D or 3D, on a grid the output files can store exactly,
        and this detector's modality preset must find finite, non-constant values and a foreground
        in it; otherwise :class:`HiMatchADError` says why. Returns a :class:`PreparedQuery` to pass
        to :meth:`predict`.

        Thread-safe: it reads the detector's settings (and the loaded bank's pixel spacing and
        modality) but never changes the detector or runs the model, so it may run in another thread
        while :meth:`predict` analyses another query (the batch runner reads the next case so).
        """
        t = time.perf_counter()
        img = image if isinstance(image, Image) else read_image(image)
        check_storable(img.geometry, "map.nii.gz", source=img.path or img.name)  # outputs must be able to overlay it exactly
        t_read = time.perf_counter() - t
        t = time.perf_counter()
        settings = self._prep_settings()
        prep = prepare_volume(img, **settings)
        return PreparedQuery(img, prep, settings, t_read, time.perf_counter() - t)

    def check_query(self, image: Union[str, os.PathLike, Image, DicomSeries]) -> Image:
        """Read a query and check that it can be analysed (see :meth:`prepare`); returns the :class:`Image`.

        Passing the returned image to :meth:`predict` reuses the reading and the preparation. Call it
        before :meth:`fit` so that a bad input is reported before the normal bank is built.
        """
        self._checked = self.prepare(image)
        return self._checked.image

    def _prepared(self, image: Union[str, os.PathLike, Image, DicomSeries, "PreparedQuery"], timings: dict) -> tuple[Image, PreparedVolume]:
        """The query read and prepared: ``image`` itself when it is a :class:`PreparedQuery`, or by
        an earlier :meth:`check_query` of this very image, else now; prepared again when the
        preparation settings changed since (a bank loaded in between). The prepared volume is taken
        out of the query (used once), so that :meth:`predict` can free it as soon as the maps are
        made. ``timings`` gets the read and preprocess seconds either way."""
        query, self._checked = self._checked, None
        if isinstance(image, PreparedQuery):
            query = image
        elif query is not None and query.image is not image:
            query = None
        if query is None or query.prep is None or query.settings != self._prep_settings():
            query = self.prepare(query.image if query is not None else image)
        prep, query.prep = query.prep, None
        timings["read"], timings["preprocess"] = query.read_s, query.preprocess_s
        return query.image, prep

    @staticmethod
    def _input_digest(img: Image) -> dict:
        """What a result records of its input's content (a rerun compares it): the file(s) it was read from."""
        files = list(img.dicom_files) or ([img.path] if img.path and Path(img.path).is_file() else [])
        try:
            return files_digest(files) if files else {}
        except OSError as exc:
            raise HiMatchADError(f"cannot read {img.path} again to record its content: {exc.strerror or exc}") from exc

    def predict(self, image: Union[str, os.PathLike, Image, DicomSeries, "PreparedQuery"]) -> DetectionResult:
        """Detect anomalies in a 3D volume or 2D image (path, DICOM series, :class:`Image`, or a
        :class:`PreparedQuery` from :meth:`prepare`)."""
        self._check_fitted()
        t_start = time.perf_counter()
        timings = {"read": 0.0, "preprocess": 0.0, "features": 0.0, "maps": 0.0}
        t = time.perf_counter()
        img, prep = self._prepared(image, timings)
        bank_warnings = check_query_against_bank(self.bank.manifest["settings"], self.modality, img, prep, self.bank.manifest)
        t_start -= timings["read"] + timings["preprocess"] - (time.perf_counter() - t)  # total counts them once
        evidence = feedback.active_feedback(self)  # reader feedback, read again when its folder changed
        scorer_t0 = dict(self.scorer.timings)
        heat = np.zeros(prep.native_shape, np.float32)
        n = prep.n_slices
        slice_scores = np.full(n, np.nan, np.float32)
        supports: list = [[] for _ in range(n)]
        all_patch = []
        todo = prep.slices_with_foreground()
        msg = "Matching slices"
        self.reporter(msg, 0, len(todo))
        grid_px = None
        for b in range(0, len(todo), self.batch_size):
            sel = todo[b : b + self.batch_size]
            t = time.perf_counter()
            queries, _ = self._queries(prep, sel)
            timings["features"] += time.perf_counter() - t
            if queries:
                scores = self.scorer.score(queries)
                if evidence is not None:
                    self.scorer.apply_feedback(queries, scores, evidence)
                t = time.perf_counter()
                for q, s in zip(queries, scores):
                    pix = self._pixel_map(s.patch, q, prep.plane, heat.shape[1:])
                    heat[q.index] = pix * prep.native_foreground[q.index]
                    slice_scores[q.index] = top_percent_mean(s.patch)
                    supports[q.index] = s.supports
                    all_patch.append(s.patch)
                    grid_px = q.grid
                timings["maps"] += time.perf_counter() - t
            self.reporter(msg, min(b + self.batch_size, len(todo)), len(todo))
        for key, val in self.scorer.timings.items():
            timings[key] = val - scorer_t0.get(key, 0.0)
        if not all_patch:  # an empty result would read as "no anomaly"
            p = self.extractor.patch_size
            raise HiMatchADError(
                f"nothing in {img.name} could be scored: none of its {n} slices has enough foreground for one "
                f"{p}x{p}-pixel model patch ({len(todo)} with any foreground at all); it is too small, too finely sampled "
                "or empty after the intensity preset's foreground threshold"
            )
        if self._fuses_slices(img, prep):
            t = time.perf_counter()
            heat = fuse_slices(heat, prep.native_foreground, np.isfinite(slice_scores), prep.slice_spacing, self.consistency_mm)
            timings["maps"] += time.perf_counter() - t
        t = time.perf_counter()
        heat_in = prep.to_input_grid(heat)
        fg_in = prep.to_input_grid(prep.native_foreground)
        native_hw, plane, flipped = heat.shape[1:], prep.plane, prep.reorientation.flips[prep.slice_axis_canonical]
        prep_warnings, axis_in, modality_used = list(prep.warnings), prep.slice_axis_input, prep.modality
        del heat, prep  # the normalised volume and its canvas are freed before the labelmap is made
        order = np.arange(n)
        if flipped:
            order = order[::-1]  # slice i of the canonical stack is input index n-1-i
        in_scores = np.full(n, np.nan, np.float32)
        in_scores[order] = slice_scores
        in_supports: list = [None] * n
        for i in range(n):
            in_supports[order[i]] = supports[i]
        threshold = self.calibration["threshold"] if self.threshold == "auto" else float(self.threshold)
        min_size = self.min_component_size
        if min_size is None:
            if grid_px is None:
                min_size = 1
            else:
                p = self.extractor.patch_size
                if plane is None:  # native pixels per model pixel, per axis
                    fy, fx = native_hw[0] / (grid_px[0] * p), native_hw[1] / (grid_px[1] * p)
                else:
                    r0, r1, c0, c1 = plane.box
                    fy, fx = (r1 - r0) / plane.scaled_hw[0], (c1 - c0) / plane.scaled_hw[1]
                min_size = max(1, int(round(p * fy * p * fx)))
        volume_score = top_percent_mean(np.concatenate(all_patch))
        warn = prep_warnings + bank_warnings
        result = DetectionResult(
            heatmap=heat_in,
            foreground=fg_in,
            threshold=float(threshold),
            geometry=img.geometry,
            slice_axis=axis_in,
            slice_scores=in_scores,
            volume_score=volume_score,
            supports=in_supports,
            min_component_size=int(min_size),
            method=self.method,
            model=self.model,
            name=img.name,
            source_path=img.path,
            settings={
                **self.settings(),
                "modality_used": modality_used,
                "bank_modality": self.bank.manifest["settings"].get("modality"),
                "bank_dims": self.bank.manifest["settings"].get("dims"),
                "normals": str(self.normals_dir) if self.normals_dir else None,
                **({"feedback": [e.id for e in evidence.entries]} if evidence is not None else {}),
            },
            warnings=warn + [f"normal image skipped: {s['path']}: {s['reason']}" for s in self.bank.skipped] + list(self.fit_warnings),
            threshold_info={
                "mode": "auto" if self.threshold == "auto" else "fixed",
                "target_fpr": self.target_fpr if self.threshold == "auto" else None,
                "calibrated_threshold": float(self.calibration["threshold"]) if self.threshold == "auto" else None,
                "calibration_slices": self.calibration.get("n_slices"),
                "normal_slice_score": self.calibration.get("normal_slice_score"),
                "normal_pixel_median": (self.calibration.get("normal_pixel_quantiles") or {}).get("0.5"),
            },
        )
        result.image_array = img.array  # the input, for the overlay PNG (2D) or the overview picture (no copy)
        if img.dicom_series is not None:  # a DICOM input: what its DICOM SEG references
            result.source_files, result.source_series = tuple(img.dicom_files), img.dicom_series.to_dict()
        result.input_digest = self._input_digest(img)
        result.provenance = provenance(self, result)  # versions, device, weights, bank: what made it
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        result.timings = timings
        return result

    # ------------------------------------------------------------------ output
    def save(self, result: DetectionResult, out_dir: Union[str, os.PathLike], *, outputs: Sequence[str] = ()) -> dict:
        """Write heatmap, labelmap and scores JSON (and an overlay PNG for 2D inputs) to ``out_dir``,
        and the optional ``outputs`` named (:func:`~HiMatchADLib.outputs.registry.list_writers`; for a
        DICOM input ``"dicom_seg"``: a DICOM SEG, ``"dicom_heatmap"``: a parametric map; for a
        volume ``"overview"``: the overview picture, from the input kept by :meth:`predict` or read
        again from ``result.source_path``)."""
        outputs = check_outputs(outputs)
        if "overview" in outputs and not result.geometry.is_2d:
            result.display_image = display_volume(result)
        try:
            return save_result(result, out_dir, outputs=outputs)
        finally:
            result.display_image = None  # a float copy of the volume: not kept
