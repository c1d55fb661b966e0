"""Export a fitted detector's normal bank as one file, and load a detector from such a file.

:func:`export_bank` writes what the detector needs to predict without the normal scans (see
:mod:`HiMatchADLib.bank.bankfile` for the layout): the bank's arrays, the subjects of its slices,
the calibration of the detector's method and, for ``dpmm``, the fitted mixture. One file serves
one method: the one it was exported for (its calibration and mixture depend on it). ``knn`` banks
carry no index: the exact search needs none, and an ``ivf``/``hnsw`` index is rebuilt from the
tokens (deterministically) where the file is used and cached there.

:func:`load_bank` opens and verifies a file, takes the settings it fixes (those left at their
defaults are taken from the file; one asked otherwise is refused, naming it), checks that the
loaded model has the weights the bank was made with, and makes the detector ready to predict.
"""

from __future__ import annotations

import datetime
import inspect
import io
import json
import math
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..bank.bankfile import BANK_FILE_FORMAT, KIND, BankFile, write_bank_file
from ..bank.store import NormalBank, array_files, default_cache_root, verify_checksums
from ..core.digest import json_hash
from ..core.errors import HiMatchADError
from ..core.version import __version__
from ..features.backbone import resolve_precision
from ..features.models import model_info
from ..methods.base import get_method
from .parameters import check_detector_parameters

#: Settings of the bank itself (the features and their clusters), fixed by any bank file.
BANK_SETTINGS = (
    "method", "resolution", "modality", "slice_axis", "pixel_spacing", "stages", "clusters_per_slice",
    "codebook_factor", "shared_codebook", "slice_step", "seed", "stage_norm", "precision",
)


def fixed_settings(det) -> dict:
    """The detector settings a bank file of ``det`` fixes: the bank's and its method's calibration key."""
    s = det.settings()
    names = list(BANK_SETTINGS) + [k for k in det.method_key() if k != "format"]
    spec = get_method(det.method)
    if spec.uses_knn_index:
        names.append("knn_index")
    if spec.uses_fusion:
        names.append("fusion")
    out = {}
    for n in dict.fromkeys(names):
        out[n] = det.pixel_spacing if n == "pixel_spacing" else det.modality if n == "modality" else s[n]
    return json.loads(json.dumps(out))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


class _Names:
    """Replaces the normal files' names (and their subjects') by opaque identifiers, in order."""

    def __init__(self, files: list, groups: list, subjects: list, folder: Optional[str]):
        self.files = {p: f"normal-{i + 1:04d}" for i, p in enumerate(files)}
        self.groups = {g: f"group-{i + 1:04d}" for i, g in enumerate(groups)}
        self.subjects = {s: f"subject-{i + 1:04d}" for i, s in enumerate(subjects)}
        pairs = {}
        for p, ident in self.files.items():
            path = Path(p)
            name = path.name
            stem = re.sub(r"(\.nii\.gz|\.[A-Za-z0-9]{1,5})$", "", name)
            for variant in (p, str(path.as_posix()), name, stem):
                if variant:
                    pairs.setdefault(variant, ident)
        for table in (self.groups, self.subjects):
            for name, ident in table.items():
                if name:
                    pairs.setdefault(str(name), ident)
        if folder:
            pairs[str(folder)] = "<normals>"
        self._pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))
        # What must not remain anywhere (short fragments like a two-letter stem are too common to test).
        self.secrets = [k for k, _ in self._pairs if len(k) >= 4]

    def text(self, s: str) -> str:
        for k, v in self._pairs:
            s = s.replace(k, v)
        return s

    def check(self, blob: bytes, what: str) -> None:
        low = blob.decode("utf-8", "replace")
        for k in self.secrets:
            if k in low:
                raise HiMatchADError(f"cannot anonymise the bank: a source name remains in {what}; export with --keep-names, or report this")


def _anonymise_bank(m: dict, names: _Names) -> dict:
    out = dict(m)
    out["folder"] = None
    out["files"] = [{"path": names.files[f["path"]]} for f in m["files"]]
    out["groups"] = [names.groups[g] for g in m["groups"]]
    out["skipped"] = [{"path": names.files.get(s["path"], "normal-skipped"), "reason": names.text(str(s["reason"]))} for s in m.get("skipped", [])]
    out["warnings"] = [names.text(str(w)) for w in m.get("warnings", [])]
    out["voxel_digests"] = {d: names.files.get(p, "normal") for d, p in (m.get("voxel_digests") or {}).items()}
    return out


def export_bank(det, path, keep_names: bool = False) -> Path:
    """Write the fitted detector's bank, calibration and method state to the bank file ``path``."""
    det._check_fitted()
    if getattr(det, "bank_file", None) is not None:
        raise HiMatchADError(f"this detector's bank was loaded from the bank file {det.bank_file}; share that file itself")
    bank = det.bank
    root = Path(bank.root)
    try:
        verify_checksums(root, bank.manifest)
    except ValueError as exc:
        raise HiMatchADError(f"the cached normal bank at {root} is damaged ({exc}); build it again (--rebuild) before exporting") from None
    m = bank.manifest
    cal = json.loads(json.dumps(det.calibration))
    subjects = list(det.subjects)
    fit_warnings = [str(w) for w in det.fit_warnings]
    if keep_names:
        bank_manifest = m
        subject_names = subjects
        names = None
    else:
        names = _Names([f["path"] for f in m["files"]], list(m["groups"]), subjects, m.get("folder"))
        bank_manifest = _anonymise_bank(m, names)
        subject_names = [names.subjects[s] for s in subjects]
        cal["held_out_groups"] = [names.subjects.get(s, names.text(str(s))) for s in cal.get("held_out_groups", [])]
        cal["warnings"] = [names.text(str(w)) for w in cal.get("warnings", [])]
        fit_warnings = [names.text(w) for w in fit_warnings]
    members = {f"bank/{n}": root / n for n in array_files(root)}
    members["subjects.npy"] = _npy_bytes(np.asarray(det.slice_subject, np.int32))
    cal_bytes = json.dumps(cal, indent=1).encode("utf-8")
    members["calibration.json"] = cal_bytes
    if det.method == "dpmm":
        members["dpmm.npz"] = _npz_bytes(det.scorer.fitted)
    info = det.extractor.info
    catalogue = model_info(det.model)
    used_files = {int(f) for f in np.unique(bank.slice_file)}
    manifest = {
        "kind": KIND,
        "format": BANK_FILE_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": "HiMatch-AD",
        "tool_version": __version__,
        "names": "kept" if keep_names else "anonymised",
        "model": {
            "id": det.model,
            "weights_digest": info.get("weights_digest"),
            "fingerprint": det.extractor.fingerprint,
            "licence": catalogue.licence if catalogue is not None else "unknown (local folder)",
            "precision": det.precision,
            "stage_norm": det.stage_norm,
            "patch_size": det.extractor.patch_size,
            "dim": det.extractor.dim,
        },
        "method": det.method,
        "settings": fixed_settings(det),
        "method_key": json.loads(json.dumps(det.method_key())),
        "modality": m["settings"].get("modality"),
        "pixel_spacing_mm": m["settings"].get("pixel_spacing_mm"),
        "counts": {
            "subjects": len(subjects),
            "volumes": len(used_files),
            "slices": int(bank.n_slices),
            "tokens": int(bank.tokens.shape[0]),
            "skipped": len(m.get("skipped", [])),
        },
        "subjects": subject_names,
        "fit_warnings": fit_warnings,
        "bank": bank_manifest,
    }
    if names is not None:
        names.check(json.dumps(manifest).encode("utf-8"), "the manifest")
        names.check(cal_bytes, "the calibration")
    return write_bank_file(path, manifest, members)


def _same(a, b) -> bool:
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _adopt(det, fixed: dict, bank_modality: Optional[str], bank_spacing, what: str, asked=None) -> None:
    """Take the settings ``fixed`` by a bank file: a setting not asked (``asked``: the names the
    caller set; None: those whose value differs from the constructor's default) takes the file's
    value; one asked must agree with it (else :class:`HiMatchADError` naming each)."""
    defaults = {n: p.default for n, p in inspect.signature(type(det).__init__).parameters.items() if n != "self"}
    given = dict(getattr(det, "_given", {}))
    new = {n: given.get(n, defaults.get(n)) for n in given}
    conflicts = []
    for name, value in fixed.items():
        raw = given.get(name, defaults.get(name))
        unasked = (name not in asked or raw in ("auto", None)) if asked is not None else _same(raw, defaults.get(name))
        if unasked:  # "auto" and None leave the choice to the bank
            new[name] = value
            continue
        mine = getattr(det, name)
        ok = _same(mine, value)
        if name == "modality":
            ok = ok or _same(mine, bank_modality)
        if name == "pixel_spacing":
            ok = ok or (mine is None and bank_spacing is None) or (mine not in (None, "auto") and bank_spacing is not None and _same(mine, bank_spacing))
        if name == "precision":
            ok = ok or _same(mine, value)
        if not ok:
            conflicts.append(f"{name} {json.dumps(value)} (asked: {json.dumps(mine)})")
        else:
            new[name] = raw
    if conflicts:
        raise HiMatchADError(
            f"the bank file {what} was made with other settings than those asked: it needs {'; '.join(conflicts)}; leave "
            "these settings out (the bank's are used) or export a bank with them"
        )
    values = check_detector_parameters(new)
    before = {n: getattr(det, n, None) for n in ("model", "stages", "resolution", "precision", "stage_norm", "device", "batch_size")}
    for name, value in values.items():
        setattr(det, name, value)
    det.precision = resolve_precision(det.precision, det.device)
    after = {n: getattr(det, n, None) for n in before}
    if det.extractor is not None and (before != after or list(det.extractor.stages) != list(fixed.get("stages", det.extractor.stages))):
        det.extractor = None


def load_bank(det, path, asked=None) -> None:
    """Make ``det`` ready to predict from the bank file ``path`` (see :func:`HiMatchDetector.load_bank`)."""
    bf = BankFile.open(path)
    man = bf.manifest
    what = str(bf.path)
    model = man.get("model") or {}
    fixed = dict(man.get("settings") or {})
    given_model = getattr(det, "_given", {}).get("model")
    defaults = {n: p.default for n, p in inspect.signature(type(det).__init__).parameters.items()}
    asked = None if asked is None else set(asked)
    if ("model" not in asked) if asked is not None else (given_model is None or _same(given_model, defaults["model"])):
        fixed["model"] = model.get("id")
    _adopt(det, fixed, man.get("modality"), man.get("pixel_spacing_mm"), what, asked)
    ex = det._ensure_extractor()
    need, have = model.get("weights_digest"), ex.info.get("weights_digest")
    same_model = need == have if (need or have) else model.get("fingerprint") == ex.fingerprint
    if not same_model or ex.dim != model.get("dim") or ex.patch_size != model.get("patch_size"):
        raise HiMatchADError(
            f"the bank file {what} was made with the model {model.get('id')} (weights {need or 'without a digest'}), but the "
            f"loaded model {det.model} has other weights ({have or 'without a digest'}); load the bank's model (--model)"
        )
    bank_manifest = man["bank"]
    key = json_hash(man)[:20]
    extras = (Path(det.cache_dir).expanduser() if det.cache_dir else default_cache_root()) / "bankfiles" / key
    try:
        extras.mkdir(parents=True, exist_ok=True)  # where an ivf/hnsw kNN index built from it is kept
    except OSError:
        pass

    try:
        bank = NormalBank.assemble(extras, bank_manifest, lambda n: bf.array(f"bank/{n}"), bf.npz("bank/slices.npz"))
    except (KeyError, ValueError) as exc:
        raise HiMatchADError(f"the bank file {what} is inconsistent ({exc}); export it again") from None
    subjects = bf.array("subjects.npy")
    if subjects.shape != (bank.n_slices,):
        raise HiMatchADError(f"the bank file {what} is inconsistent (subjects of {subjects.shape[0]} slices, {bank.n_slices} in the bank)")
    if man.get("method") != det.method:
        raise HiMatchADError(f"the bank file {what} serves the method {man.get('method')}, not {det.method}")
    cal = bf.json("calibration.json")
    want = json.loads(json.dumps(det.method_key()))
    if cal.get("key") != want or man.get("method_key") != want:
        raise HiMatchADError(
            f"the bank file {what} was calibrated with other settings than this detector uses (or by another calibration "
            "version); export it again with this version and these settings"
        )
    if bf.has("dpmm.npz"):
        bank.extras["dpmm"] = bf.npz("dpmm.npz")
    det.bank = bank
    det.bank_file = bf.path
    det.bank_file_digest = bf.digest
    det.normals_dir = None
    det.slice_subject = np.asarray(subjects, np.int64)
    det.subjects = list(man.get("subjects") or [])
    det._fitted_pattern = det.subject_pattern
    scorer = get_method(det.method).make_scorer(det, [])
    scorer.set_calibration(cal)
    det.scorer = scorer
    det.calibration = cal
    det.fit_warnings = list(man.get("fit_warnings") or [])
    for w in scorer.fit_warnings():
        if w not in det.fit_warnings:
            det.fit_warnings.append(w)
    for w in det.fit_warnings:
        warnings.warn(w)
    det.fit_info = {
        **bank.describe(),
        "bank_file": what,
        "subjects": len(det.subjects),
        "calibration_slices": cal.get("n_slices"),
        "calibration_subjects": len(cal.get("held_out_groups", [])),
        "warnings": list(det.fit_warnings),
    }
    det.fit_info.update(scorer.describe())
