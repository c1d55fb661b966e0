"""Would this installation give the same result as a scores JSON? (``himatchad reproduce``)

:func:`check_reproduction` compares what a result records (its ``"provenance"``, see
:mod:`.provenance`; for an older result, what its ``"settings"`` hold) with this installation, item
by item, and :func:`reproducible` says what that means:

- ``tool version``, ``python``, ``numpy``, ``torch``, ``transformers``, ``SimpleITK`` (and
  ``highdicom``, ``pydicom`` when the result recorded them), ``model`` (the id): informational;
  they do not decide (the method is tracked by its revision, the weights by their digest; another
  library version may change the last digits, which ``rerun`` measures);
- ``method revision``, ``weights digest`` (of the model named in the JSON, or ``model``; computed
  from its files without loading it), ``device`` (its type: cpu, cuda, mps), ``precision``,
  ``settings`` (those a detector made from the JSON's ``"settings"`` here would record, against
  those the result recorded), ``bank`` (the normal folder named in the JSON, or ``normals``: its
  content fingerprint, else the digest of its images' voxels; for a bank read from a bank file,
  that file, or ``bank_file``: its digest), ``input`` (the input named in the
  JSON, or ``input``, read again), ``feedback`` (the reader feedback entries the result recorded
  against those its feedback folder holds now): they decide;
- with ``rerun``: ``heatmap`` and ``slice scores``, the detection run again here and compared with
  the recorded maps (largest absolute difference).

Each :class:`Check` is ``same``, ``differs`` (``before -> now``) or ``cannot check`` (why).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..core.digest import array_digest, files_digest, json_hash
from ..core.errors import HiMatchADError
from ..core.version import __version__
from ..bank.bankfile import BankFile
from ..bank.feedback import read_entries
from ..bank.build import scan_normals
from ..features.backbone import cached_snapshot, is_local_model, resolve_device, resolve_precision, weights_digest
from ..io.dicom import find_series
from ..io.readers import dicom_input, read_image
from ..outputs.files import load_result
from .detector import METHOD_REVISION, HiMatchDetector
from .parameters import DETECTOR_PARAMETERS
from .provenance import DICOM_LIBRARIES, LIBRARIES, library_versions, normals_digest

SAME = "same"
DIFFERS = "differs"
CANNOT = "cannot check"


#: Largest absolute difference of a rerun's heatmap or slice scores that still counts as the same.
RERUN_TOLERANCE = 1e-5


#: Settings the ``settings`` item leaves to other items (or that do not change a result): the
#: version and revision, the device and precision, the model (its weights digest), where the
#: normals and caches lie (the bank), what the bank resolved, the batch size.
NOT_COMPARED = frozenset({
    "version", "method_revision", "device", "precision", "model", "batch_size", "cache_dir",
    "normals", "bank_file", "modality_used", "bank_modality", "bank_dims", "feedback",
})


def _feedback_check(prov: dict) -> tuple:
    """``(check, folder or None)``: the reader feedback entries the result recorded against those
    its feedback folder holds now (ids and the digests of their arrays)."""
    recorded = prov.get("feedback")
    folder = prov.get("feedback_folder")
    if not isinstance(recorded, list):
        return Check("feedback", CANNOT, why="not recorded (a result written before reader feedback)", decides=False), None
    want = {e.get("id"): e.get("arrays_sha256") for e in recorded if isinstance(e, dict)}
    if not folder:
        return (Check("feedback", SAME, why="none") if not want else
                Check("feedback", CANNOT, why="the result records no feedback folder")), None
    try:
        now = {e.id: e.meta["arrays"]["sha256"] for e in read_entries(folder)}
    except HiMatchADError as exc:
        return Check("feedback", CANNOT, why=str(exc)), None
    if now == want:
        return Check("feedback", SAME, why=f"{len(want)} entries" if want else "none"), Path(folder)
    gone = sorted(set(want) - set(now))
    new = sorted(set(now) - set(want))
    changed = sorted(k for k in set(want) & set(now) if want[k] != now[k])
    why = "; ".join(p for p in (
        f"removed since: {', '.join(gone)}" if gone else "", f"added since: {', '.join(new)}" if new else "",
        f"changed: {', '.join(changed)}" if changed else "") if p)
    return Check("feedback", DIFFERS, sorted(want), sorted(now), f"{why} (in {folder})"), Path(folder)


@dataclass
class Check:
    """One item of :func:`check_reproduction`."""

    item: str
    status: str  # SAME, DIFFERS or CANNOT
    before: Any = None
    now: Any = None
    why: str = ""
    decides: bool = True  # whether it changes the numbers (False: informational)

    def line(self) -> str:
        if self.status == CANNOT:
            return f"{self.item}: cannot check: {self.why}"
        if self.status == SAME:
            text = f"{self.item}: same" + (f" ({self.why})" if self.why else "")
        elif self.before is None and self.now is None:  # the why says what differs
            text = f"{self.item}: differs: {self.why}"
        else:
            text = f"{self.item}: differs: {_show(self.before)} -> {_show(self.now)}" + (f" ({self.why})" if self.why else "")
        if self.status == DIFFERS and not self.decides:
            text += " (informational)"
        return text

    def to_dict(self) -> dict:
        return {"item": self.item, "status": self.status, "before": self.before, "now": self.now, "why": self.why, "decides": self.decides}


def _show(value) -> str:
    if value is None:
        return "(none)"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _compare(item: str, before, now, decides: bool = True, missing: str = "", why: str = "") -> Check:
    if before is None and missing:
        return Check(item, CANNOT, None, now, missing, decides)
    return Check(item, SAME if before == now else DIFFERS, before, now, why, decides)


def reproducible(checks) -> str:
    """``"yes"`` (every item that decides is the same), ``"no"`` (one differs) or ``"not
    confirmed"`` (none differs, but one could not be checked)."""
    deciding = [c for c in checks if c.decides]
    if any(c.status == DIFFERS for c in deciding):
        return "no"
    if any(c.status == CANNOT for c in deciding):
        return "not confirmed"
    return "yes"


def summary_line(checks) -> str:
    verdict = reproducible(checks)
    if verdict == "yes":
        return "reproducible: yes (everything that decides the numbers is the same)"
    differs = [c.item for c in checks if c.decides and c.status == DIFFERS]
    cannot = [c.item for c in checks if c.decides and c.status == CANNOT]
    parts = ([f"differs: {', '.join(differs)}"] if differs else []) + ([f"cannot check: {', '.join(cannot)}"] if cannot else [])
    return f"reproducible: {verdict} ({'; '.join(parts)})"


def read_scores_json(path: Union[str, os.PathLike]) -> dict:
    """The scores JSON at ``path``, or :class:`HiMatchADError` saying why it cannot be read."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HiMatchADError(f"scores JSON not found: {p}") from None
    except IsADirectoryError:
        raise HiMatchADError(f"{p} is a folder; give a <name>_scores.json file") from None
    except OSError as exc:
        raise HiMatchADError(f"cannot read {p}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise HiMatchADError(f"{p} is not a readable scores JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise HiMatchADError(f"{p} is not a HiMatch-AD scores JSON (it has no settings)")
    return data


# ------------------------------------------------------------------------------- the items
def _model_digest(model: str) -> tuple:
    """``(weights digest, why not)`` of ``model`` from its files, without loading it."""
    path = Path(model).expanduser()
    if is_local_model(model):
        if not path.is_dir():
            return None, f"the model folder {path} is not here; give the model with --model"
        digest = weights_digest(path)
        return digest, "" if digest else f"the model folder {path} holds no weight files"
    snap = cached_snapshot(model)
    if snap is None:
        return None, f"the model {model} is not in the local Hugging Face cache (a detection with it downloads it)"
    digest = weights_digest(snap)
    return digest, "" if digest else f"the cached model {model} holds no weight files"


def _device_checks(recorded_device, recorded_precision, device: Optional[str], precision: Optional[str]) -> tuple:
    """``(device check, precision check, device here, precision here)``."""
    asked = device or recorded_device or "auto"
    why = ""
    try:
        now = resolve_device(asked)
    except HiMatchADError as exc:
        now, why = resolve_device("auto"), f"{asked} is not available here: {exc}"

    def kind(d):
        return None if d is None else str(d).split(":")[0]

    dev = Check("device", SAME if kind(recorded_device) == kind(now) else DIFFERS, recorded_device, now, why)
    if recorded_device is None:
        dev = Check("device", CANNOT, None, now, "the result does not record its device")
    p_asked = precision or recorded_precision or "auto"
    try:
        p_now, p_why = resolve_precision(p_asked, now), ""
    except HiMatchADError as exc:
        p_now, p_why = resolve_precision("auto", now), f"{p_asked} cannot run on {now}: {exc}"
    prec = _compare("precision", recorded_precision, p_now, missing="the result does not record its precision", why=p_why)
    return dev, prec, now, p_now


def _detector_keywords(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k in DETECTOR_PARAMETERS}


def _settings_check(top: dict, recorded: dict, detector) -> Check:
    """The settings a detector made here from the JSON's ``"settings"`` records, against those recorded."""
    current = json.loads(json.dumps(detector.settings(), default=str))
    recorded = json.loads(json.dumps(recorded, default=str))
    changes = []
    for key in sorted((set(recorded) | set(current)) - NOT_COMPARED):
        before, now = recorded.get(key, "(not recorded)"), current.get(key, "(not a setting of this version)")
        if before != now:
            changes.append(f"{key} {_show(before)} -> {_show(now)}")
    if not changes:
        return Check("settings", SAME)
    return Check("settings", DIFFERS, why=", ".join(changes))


def _bank_file_check(bank: dict, bank_file: Optional[str]) -> tuple:
    """``(check, bank file or None)`` of a result whose bank was read from a bank file."""
    where = bank_file or bank.get("bank_file")
    if not where:
        return Check("bank", CANNOT, why="its bank was read from a bank file the result does not name; give it with --bank"), None
    path = Path(where).expanduser()
    if not path.is_file():
        return Check("bank", CANNOT, why=f"the bank file {path} is not here; give it with --bank"), None
    try:
        now = BankFile.open(path).digest
    except HiMatchADError as exc:
        return Check("bank", CANNOT, why=str(exc)), None
    return Check("bank", SAME if now == bank["bank_file_digest"] else DIFFERS, bank["bank_file_digest"], now, f"the bank file {path}"), path


def _bank_check(prov: dict, recorded: dict, normals: Optional[str], bank_file: Optional[str] = None) -> tuple:
    """``(check, normal folder or None, bank file or None)``: the bank file when the result's bank
    was read from one (or ``bank_file`` is given) and no ``normals`` are given, else the folder."""
    bank = prov.get("bank") if isinstance(prov.get("bank"), dict) else {}
    if bank_file or (bank.get("bank_file_digest") and not normals):
        if not bank.get("bank_file_digest"):
            return Check("bank", CANNOT, why="the result's bank was not read from a bank file; give its normal folder with --normals"), None, None
        check, path = _bank_file_check(bank, bank_file)
        return check, None, path
    check, folder = _folder_check(bank, recorded, normals)
    return check, folder, None


def _folder_check(bank: dict, recorded: dict, normals: Optional[str]) -> tuple:
    """``(check, normal folder or None)``."""
    folder = normals or bank.get("folder") or recorded.get("normals")
    if not folder:
        return Check("bank", CANNOT, why="the result names no normal folder; give it with --normals"), None
    root = Path(folder).expanduser()
    if not root.is_dir():
        return Check("bank", CANNOT, why=f"the normal folder {root} is not here; give it with --normals"), None
    before = bank.get("digest")
    if before is None:
        return Check("bank", CANNOT, why="the result records no bank digest (written before provenance was recorded)"), root
    try:
        root, files, fps = scan_normals(root)
    except HiMatchADError as exc:
        return Check("bank", CANNOT, why=str(exc)), root
    content = json_hash(fps)
    if content == before:
        return Check("bank", SAME), root
    want = bank.get("normals_digest")
    if want:  # the same images elsewhere (copied: other times or paths): compare their voxels
        skipped = set(bank.get("skipped") or [])
        digests = []
        for f, fp in zip(files, fps):
            if fp["path"] in skipped:
                continue
            try:
                digests.append(array_digest(read_image(f).array))
            except HiMatchADError:
                continue
        now = normals_digest(digests)
        if now == want:
            return Check("bank", SAME, why="the same normal images; their file times or paths differ"), root
        return Check("bank", DIFFERS, want, now, f"the normal images in {root} differ"), root
    return Check("bank", DIFFERS, before, content, f"the files in {root} differ"), root


def _read_input(data: dict, path: Path):
    """What the result was computed on at ``path``: its DICOM series (the recorded one) or the file."""
    series_uid = (data.get("series") or {}).get("series_uid") if isinstance(data.get("series"), dict) else None
    if path.is_dir() and series_uid:
        for s in find_series(path):
            if s.series_uid == series_uid:
                return s
        raise HiMatchADError(f"{path} holds no DICOM series {series_uid}")
    return dicom_input(path) or path


def _input_check(data: dict, prov: dict, input_path: Optional[str]) -> tuple:
    """``(check, what to read for a rerun or None)``."""
    before = prov.get("input_digest") or data.get("input_digest")
    where = input_path or data.get("input")
    if not where:
        return Check("input", CANNOT, why="the result names no input file (an array input); give it with --input"), None
    path = Path(where).expanduser()
    if not path.exists():
        return Check("input", CANNOT, why=f"the input {path} is not here; give it with --input"), None
    try:
        source = _read_input(data, path)
        files = list(read_image(source).dicom_files) if not isinstance(source, Path) else [path]
        now = files_digest(files)
    except (HiMatchADError, OSError) as exc:
        return Check("input", CANNOT, why=f"cannot read {path} again: {exc}"), None
    if not isinstance(before, dict):
        return Check("input", CANNOT, now=now, why="the result records no digest of its input"), source
    return Check("input", SAME if before == now else DIFFERS, before.get("blake2b"), now.get("blake2b")), source


def _rerun_checks(scores_path: Path, detector, normals: Optional[Path], bank_file: Optional[Path], source) -> list:
    old = load_result(scores_path)
    if bank_file is not None:
        detector.load_bank(bank_file)
    else:
        detector.fit(normals)
    new = detector.predict(source)
    checks = []
    if new.heatmap.shape != old.heatmap.shape:
        return [Check("heatmap", DIFFERS, list(old.heatmap.shape), list(new.heatmap.shape), "another grid")]  # shape before -> now
    diff = float(np.max(np.abs(new.heatmap.astype(np.float64) - old.heatmap))) if new.heatmap.size else 0.0
    checks.append(Check("heatmap", SAME if diff <= RERUN_TOLERANCE else DIFFERS, why=f"max abs difference {diff:.3g}"))
    a = np.asarray(old.slice_scores, np.float64)
    b = np.round(np.asarray(new.slice_scores, np.float64), 6).astype(np.float32).astype(np.float64)  # as the JSON stores them, read back
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        checks.append(Check("slice scores", DIFFERS, why="other slices were scored"))
    else:
        ok = ~np.isnan(a)
        d = float(np.max(np.abs(a[ok] - b[ok]))) if ok.any() else 0.0
        checks.append(Check("slice scores", SAME if d <= RERUN_TOLERANCE else DIFFERS, why=f"max abs difference {d:.3g}"))
    return checks


def _read_result(path: Path) -> tuple:
    """``(scores JSON, its provenance ({} for an older result), its settings, the settings its
    provenance records (else the same))``."""
    data = read_scores_json(path)
    prov = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    top = data["settings"]
    recorded = prov.get("settings") if isinstance(prov.get("settings"), dict) else top
    return data, prov, top, recorded


def check_reproduction(
    scores_path: Union[str, os.PathLike],
    *,
    model: Optional[str] = None,
    normals: Optional[Union[str, os.PathLike]] = None,
    bank_file: Optional[Union[str, os.PathLike]] = None,
    input: Optional[Union[str, os.PathLike]] = None,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    rerun: bool = False,
    progress=None,
) -> list:
    """The :class:`Check` items of the result ``scores_path`` on this installation (see the module
    docstring). ``model``, ``normals``, ``bank_file``, ``input``, ``device``, ``precision``: instead
    of those the JSON names. ``rerun``: also run the detection again and compare the maps (needs the normal
    folder and the input). Raises :class:`HiMatchADError` for a JSON that cannot be read."""
    path = Path(scores_path).expanduser()
    data, prov, top, recorded = _read_result(path)
    no_prov = "not recorded (a result written before provenance was recorded)"
    checks = [
        _compare("tool version", prov.get("version", recorded.get("version")), __version__, decides=False, missing="not recorded"),
        _compare("method revision", prov.get("method_revision", recorded.get("method_revision")), METHOD_REVISION,
                 missing="not recorded (a result of a version before method revisions)"),
    ]
    libs = prov.get("libraries") if isinstance(prov.get("libraries"), dict) else None
    if libs is None:
        checks.append(Check("libraries", CANNOT, why=no_prov, decides=False))
    else:
        dicom = any(k in libs for k in DICOM_LIBRARIES)
        here = library_versions(dicom=dicom)
        for name in ("python",) + LIBRARIES + (DICOM_LIBRARIES if dicom else ()):
            checks.append(_compare(name, libs.get(name), here.get(name), decides=False, missing="not recorded"))

    rec_model = (prov.get("model") or {}) if isinstance(prov.get("model"), dict) else {}
    model_before = rec_model.get("id") or recorded.get("model") or data.get("model")
    model_now = model or model_before
    checks.append(_compare("model", model_before, model_now, decides=False, missing="the result names no model"))
    digest_before = rec_model.get("weights_digest")
    digest_now, why_not = _model_digest(model_now) if model_now else (None, "no model to check; give it with --model")
    if digest_now is None:
        checks.append(Check("weights digest", CANNOT, digest_before, None, why_not))
    elif digest_before is None:
        why = "the result records no weights digest" + (
            " (written before provenance was recorded)" if not prov else " (its Hub model was not in a local snapshot when it ran)"
        )
        checks.append(Check("weights digest", CANNOT, None, digest_now, why))
    else:
        checks.append(_compare("weights digest", digest_before, digest_now))

    dev, prec, device_now, precision_now = _device_checks(prov.get("device", recorded.get("device")), prov.get("precision", recorded.get("precision")), device, precision)
    checks += [dev, prec]

    detector = None
    try:
        kw = _detector_keywords(top)
        kw.update(model=model_now or kw.get("model"), device=device_now, precision=precision_now, progress=progress)
        if cache_dir is not None:
            kw["cache_dir"] = cache_dir
        detector = HiMatchDetector(**kw)
        checks.append(_settings_check(top, recorded, detector))
    except HiMatchADError as exc:
        checks.append(Check("settings", CANNOT, why=f"this version does not accept them: {exc}"))

    bank, folder, bank_path = _bank_check(prov, recorded, str(normals) if normals is not None else None, str(bank_file) if bank_file is not None else None)
    checks.append(bank)
    inp, source = _input_check(data, prov, str(input) if input is not None else None)
    checks.append(inp)
    fb, fb_folder = _feedback_check(prov)
    checks.append(fb)
    if detector is not None and fb_folder is not None:
        detector.feedback_dir = fb_folder  # a rerun uses the folder the result's run used

    if rerun:
        have_bank = folder is not None or bank_path is not None
        missing = [what for what, ok in (("the normal bank", have_bank), ("the input", source is not None), ("the settings", detector is not None)) if not ok]
        if missing:
            checks.append(Check("rerun", CANNOT, why=f"{' and '.join(missing)} cannot be used here (see above)"))
        else:
            checks += _rerun_checks(path, detector, folder, bank_path, source)
    return checks


def result_detector(
    scores_path: Union[str, os.PathLike], *, model: Optional[str] = None, normals=None, bank_file=None, input=None,
    cache_dir=None, progress=None,
) -> tuple:
    """``(detector, input, scores JSON)``: a detector with the settings and normal bank a result was made with
    (fitted on its normal folder, or loaded from its bank file; ``normals``, ``bank_file``, ``model``
    instead of those the JSON names) and the input it was computed on, checked to be the same
    content (``input`` instead of the recorded path). For "mark as normal" on a result
    (``himatchad feedback add``). Raises :class:`HiMatchADError` saying what is missing or changed."""
    path = Path(scores_path).expanduser()
    data, prov, top, recorded = _read_result(path)
    kw = _detector_keywords(top)
    kw.update(progress=progress)
    if model is not None:
        kw["model"] = model
    if cache_dir is not None:
        kw["cache_dir"] = cache_dir
    detector = HiMatchDetector(**kw)
    check, folder, bank_path = _bank_check(prov, recorded, None if normals is None else str(normals), None if bank_file is None else str(bank_file))
    if folder is None and bank_path is None:
        raise HiMatchADError(f"the normal bank of {path.name} cannot be used here: {check.why}")
    if check.status == DIFFERS:
        raise HiMatchADError(f"the normal bank of {path.name} changed since the result was made ({check.why or 'another digest'}); run the detection again first")
    inp, source = _input_check(data, prov, None if input is None else str(input))
    if source is None:
        raise HiMatchADError(f"the input of {path.name} cannot be used: {inp.why}")
    if inp.status == DIFFERS:
        raise HiMatchADError(f"the input of {path.name} changed since the result was made; run the detection again first")
    if bank_path is not None:
        detector.load_bank(bank_path)
    else:
        detector.fit(folder)
    fb = prov.get("feedback_folder")
    if fb and Path(fb) != detector.feedback_folder:
        detector.feedback_dir = Path(fb)  # the folder the result's run used (a --feedback folder)
    return detector, source, data
