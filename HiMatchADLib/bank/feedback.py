"""Reader feedback on disk: "this is normal" entries, an overlay of a normal bank.

A feedback folder holds one entry per mark, each as two files written atomically, arrays first:
``entry-<id>.npz`` (the marked slices' CLS tokens and the tokens of their marked patches at every
stage) and ``entry-<id>.json`` (what was marked, when, on which case, with which model and bank
settings, and the SHA-256 of the arrays file). The JSON is written last, so an entry without one is
not an entry. The bank itself is never rewritten: removing every entry gives back the bank as it was.

Reading verifies every entry (its format, the arrays' digest and shapes); a damaged entry is
refused with :class:`HiMatchADError` naming it and how to remove it, never skipped in silence.

Where a detector keeps its feedback by default: beside the bank, ``<bank cache folder>.feedback``
for a bank built from a normal folder, ``<bank file>.feedback`` for a bank file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..core.atomic import atomic_path, write_text_atomic
from ..core.errors import HiMatchADError

FEEDBACK_FORMAT = 1
_ID = re.compile(r"^[0-9a-f]{12}$")


@dataclass
class FeedbackEntry:
    """One "mark as normal": its record (``meta``) and its arrays (``cls`` (J, D), ``offsets``
    (J + 1,) into the token rows of every marked slice, ``tokens[s]`` (N, D) at stage position
    ``s``, float16 as in the bank)."""

    meta: dict
    cls: np.ndarray
    offsets: np.ndarray
    tokens: list = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.meta["id"]

    def slice_tokens(self, stage_pos: int, j: int) -> np.ndarray:
        return self.tokens[stage_pos][self.offsets[j] : self.offsets[j + 1]]

    @property
    def n_slices(self) -> int:
        return int(self.cls.shape[0])

    def summary(self) -> dict:
        """What a result's provenance records of an active entry."""
        m = self.meta
        return {
            "id": m["id"], "created": m["created"], "note": m.get("note", ""), "case": m.get("case", {}),
            "region": m.get("region", {}), "model": m.get("model", {}), "arrays_sha256": m["arrays"]["sha256"],
        }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def feedback_folder(path: Union[str, os.PathLike]) -> Path:
    return Path(path).expanduser()


def write_entry(folder: Union[str, os.PathLike], meta: dict, cls: np.ndarray, offsets: np.ndarray, tokens: list) -> FeedbackEntry:
    """Write a new entry (arrays, then its JSON, each atomically); returns it with its ``id``."""
    folder = feedback_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HiMatchADError(f"cannot create the feedback folder {folder}: {exc.strerror or exc}") from exc
    arrays = {"cls": np.ascontiguousarray(cls, np.float32), "offsets": np.asarray(offsets, np.int64)}
    for s, t in enumerate(tokens):  # float16, as the bank stores its tokens and centroids
        arrays[f"tokens_{s}"] = np.ascontiguousarray(t, np.float16)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    digest = _sha256(data)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entry_id = _sha256(f"{digest}{created}{meta.get('note', '')}".encode())[:12]
    while (folder / f"entry-{entry_id}.json").exists():  # the same mark twice within a second
        entry_id = _sha256(entry_id.encode())[:12]
    meta = {"format": FEEDBACK_FORMAT, "id": entry_id, "created": created, **meta,
            "arrays": {"file": f"entry-{entry_id}.npz", "sha256": digest, "bytes": len(data)}}
    with atomic_path(folder / meta["arrays"]["file"]) as tmp:
        tmp.write_bytes(data)
    write_text_atomic(folder / f"entry-{entry_id}.json", json.dumps(meta, indent=1))
    return FeedbackEntry(meta, arrays["cls"], arrays["offsets"], [arrays[f"tokens_{s}"] for s in range(len(tokens))])


def _damaged(path: Path, why: str) -> HiMatchADError:
    entry = path.stem.replace("entry-", "")
    return HiMatchADError(
        f"the feedback entry {path.parent / path.name} is damaged ({why}); remove it with "
        f"'himatchad feedback remove {entry} --feedback {path.parent}' or restore it"
    )


def read_entry(path: Union[str, os.PathLike]) -> FeedbackEntry:
    """Read and verify one entry from its JSON ``path``: format, arrays digest, shapes."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, f"its record cannot be read: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), dict) or not isinstance(meta.get("id"), str):
        raise _damaged(path, "its record is not a feedback entry")
    if not isinstance(meta.get("format"), int) or meta["format"] > FEEDBACK_FORMAT:
        raise HiMatchADError(f"the feedback entry {path} is of format {meta.get('format')!r}, newer than this version reads ({FEEDBACK_FORMAT}); update himatchad")
    if path.name != f"entry-{meta['id']}.json" or not _ID.match(meta["id"]):
        raise _damaged(path, "its name and its id differ")
    arrays_path = path.parent / f"entry-{meta['id']}.npz"
    try:
        data = arrays_path.read_bytes()
    except OSError as exc:
        raise _damaged(path, f"its arrays {arrays_path.name} cannot be read: {exc.strerror or exc}") from None
    if len(data) != meta["arrays"].get("bytes") or _sha256(data) != meta["arrays"].get("sha256"):
        raise _damaged(path, f"its arrays {arrays_path.name} differ from the recorded digest")
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        cls, offsets = z["cls"], z["offsets"]
        stages = sorted(int(k.split("_")[1]) for k in z.files if k.startswith("tokens_"))
        tokens = [z[f"tokens_{s}"] for s in range(len(stages))]
    except Exception as exc:  # a zip or npy problem: the digest matched, so written so by hand
        raise _damaged(path, f"its arrays cannot be read: {exc}") from None
    n_stages = len(meta.get("bank", {}).get("stages") or [])
    ok = (
        cls.ndim == 2 and offsets.shape == (cls.shape[0] + 1,) and int(offsets[0]) == 0
        and np.all(np.diff(offsets) > 0) and stages == list(range(len(stages))) and len(tokens) == n_stages
        and all(t.ndim == 2 and t.shape == (int(offsets[-1]), cls.shape[1]) for t in tokens)
    )
    if not ok:
        raise _damaged(path, "its arrays have inconsistent shapes")
    return FeedbackEntry(meta, cls, offsets, tokens)


def entry_files(folder: Union[str, os.PathLike]) -> list:
    folder = feedback_folder(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("entry-") and p.suffix == ".json" and p.is_file())


def read_entries(folder: Union[str, os.PathLike]) -> list:
    """Every entry of ``folder``, verified, oldest first (an absent folder has none)."""
    folder = feedback_folder(folder)
    if folder.exists() and not folder.is_dir():
        raise HiMatchADError(f"the feedback folder {folder} is not a folder")
    entries = [read_entry(p) for p in entry_files(folder)]
    return sorted(entries, key=lambda e: (e.meta["created"], e.id))


def remove_entry(folder: Union[str, os.PathLike], entry_id: str) -> dict:
    """Remove the entry ``entry_id`` (or the only one whose id starts with it); returns its record."""
    folder = feedback_folder(folder)
    matches = [p for p in entry_files(folder) if p.stem[len("entry-"):].startswith(str(entry_id))] if entry_id else []
    if not matches:
        raise HiMatchADError(f"no feedback entry {entry_id!r} in {folder}")
    if len(matches) > 1:
        raise HiMatchADError(f"{entry_id!r} names {len(matches)} feedback entries in {folder}; give more of the id")
    path = matches[0]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {"id": path.stem[len("entry-"):]}
    try:
        path.unlink()  # the record first: without it the arrays are not an entry
        (folder / f"{path.stem}.npz").unlink(missing_ok=True)
    except OSError as exc:
        raise HiMatchADError(f"cannot remove the feedback entry {path}: {exc.strerror or exc}") from exc
    return meta


def check_compatible(entry: FeedbackEntry, model: dict, bank: dict) -> Optional[str]:
    """Why ``entry`` cannot be used with a detector of ``model`` (``id``, ``weights_digest``) and
    bank settings ``bank`` (None when it can): its tokens are only comparable with tokens of the
    same weights, preparation and stages."""
    em, eb = entry.meta.get("model", {}), entry.meta.get("bank", {})
    if em.get("weights_digest") and model.get("weights_digest") and em["weights_digest"] != model["weights_digest"]:
        return f"it was made with the model {em.get('id')} (weights {str(em['weights_digest'])[:12]}), not {model.get('id')} (weights {str(model['weights_digest'])[:12]})"
    if not (em.get("weights_digest") and model.get("weights_digest")) and em.get("id") != model.get("id"):
        return f"it was made with the model {em.get('id')}, not {model.get('id')}"
    if em.get("precision") != model.get("precision"):
        return f"it was made at {em.get('precision')} precision, not {model.get('precision')}"
    for key in sorted(set(eb) | set(bank)):
        if eb.get(key) != bank.get(key):
            return f"its {key} is {eb.get(key)!r}, this bank's is {bank.get(key)!r}"
    return None
