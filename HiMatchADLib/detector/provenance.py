"""What made a result: the ``"provenance"`` object of every scores JSON.

:func:`provenance` collects it once, in :meth:`HiMatchDetector.predict`, so that the command line,
the batch runner (both engines), the worker and the Slicer module all record the same thing:

- ``format``: 1 (this layout); ``tool`` ``"himatchad"``, ``version`` (the package version),
  ``method``, ``method_revision`` (:data:`~HiMatchADLib.detector.detector.METHOD_REVISION`); no
  time stamp, so that the same inputs give the same JSON (the file's own time says when);
- ``libraries``: ``python``, ``numpy``, ``torch``, ``transformers``, ``SimpleITK`` versions (None
  when not installed); ``highdicom`` and ``pydicom`` are added when DICOM outputs are written
  (:func:`HiMatchADLib.outputs.files.save_result`); ``platform``;
- ``device`` (the torch device the model ran on: ``cpu``, ``cuda``, ``cuda:N``, ``mps``),
  ``device_name`` (the GPU's name, else None), ``precision`` (``fp32``, ``bf16`` or ``int8``);
- ``model``: ``id`` (Hub id or local folder), ``weights_digest`` (``"sha256:<hex>"`` of the weight
  files, :func:`~HiMatchADLib.features.backbone.weights_digest`; None for a Hub model that is not
  in a local snapshot of the Hugging Face cache), ``licence`` (the catalogue's, None for a model
  it does not list), ``fingerprint`` (the model fingerprint the bank cache is keyed by),
  ``random_weights`` (True for a random stand-in made by
  :func:`~HiMatchADLib.features.backbone.build_random_model`: its results say nothing of the method);
- ``bank``: ``digest`` (the cached bank's content fingerprint: its manifest's ``content``, a hash
  of the normal files' paths, sizes and modification times), ``normals_digest`` (``"sha256:<hex>"``
  of the voxel digests of the normal images it holds: the same images copied elsewhere have the
  same one), ``folder``, ``files``, ``slices``, ``skipped`` (relative paths of the normal files it
  skipped), ``bank_file_digest`` (the digest of the bank file the bank was read from,
  :attr:`HiMatchDetector.bank_file_digest`, None when it was built from the normal folder) and
  ``bank_file`` (that file's path, else None);
- ``feedback``: the reader feedback entries the result was computed with (id, time, note, case
  digest, region, model, digest of the arrays; :mod:`.feedback`), an empty list when none, and
  ``feedback_folder``, where the detector keeps its feedback;
- ``settings``: the result's settings as recorded by the run (a copy of the JSON's ``"settings"``);
- ``input_digest``: the input's content (``bytes``, ``blake2b``), None for an array input.

Nothing here decides whether a batch case is done earlier (:mod:`HiMatchADLib.batch.resume` reads
``"settings"`` and ``"input_digest"``, not ``"provenance"``).
"""

from __future__ import annotations

import functools
import platform
from typing import Optional

from ..core.digest import json_hash
from ..core.version import __version__
from ..features.models import model_info
from .feedback import feedback_folder, feedback_summaries

PROVENANCE_FORMAT = 1


#: Distribution names of the libraries every result records (``python`` is added).
LIBRARIES = ("numpy", "torch", "transformers", "SimpleITK")


#: Added when DICOM outputs are written.
DICOM_LIBRARIES = ("highdicom", "pydicom")


@functools.lru_cache(maxsize=None)
def library_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name`` (None when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:  # a module installed without distribution metadata (e.g. inside 3D Slicer)
        import importlib

        return str(getattr(importlib.import_module(name), "__version__", None) or "") or None
    except Exception:
        return None


def library_versions(dicom: bool = False) -> dict:
    """``{"python": ..., "numpy": ..., "torch": ..., "transformers": ..., "SimpleITK": ...}`` (and,
    with ``dicom``, ``highdicom`` and ``pydicom``)."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES + (DICOM_LIBRARIES if dicom else ()):
        out[name] = library_version(name)
    return out


def normals_digest(voxel_digests) -> Optional[str]:
    """``"sha256:<hex>"`` of a set of voxel digests (:func:`HiMatchADLib.core.digest.array_digest`
    of each normal image), in no particular order; None for none."""
    digests = sorted(set(voxel_digests or ()))
    return "sha256:" + json_hash(digests) if digests else None


def _device_name(device: str) -> Optional[str]:
    if not str(device).startswith("cuda"):
        return None
    try:
        import torch

        return str(torch.cuda.get_device_name(device))
    except Exception:
        return None


def bank_provenance(bank) -> dict:
    """The ``"bank"`` entry for a loaded :class:`~HiMatchADLib.bank.store.NormalBank` (None: no bank)."""
    if bank is None:
        return {"digest": None, "normals_digest": None, "folder": None, "files": 0, "slices": 0, "skipped": [], "bank_file_digest": None, "bank_file": None}
    m = bank.manifest
    file_digest = getattr(bank, "bank_file_digest", None) or m.get("bank_file_digest")  # filled where a bank file records it
    return {
        "digest": m.get("content"),
        "normals_digest": normals_digest(m.get("voxel_digests")),
        "folder": m.get("folder"),
        "files": len(m.get("files", [])),
        "slices": int(m.get("n_slices", 0) or 0),
        "skipped": [s.get("path") for s in m.get("skipped", [])],
        "bank_file_digest": file_digest,
    }


def provenance(detector, result) -> dict:
    """The provenance object of ``result``, made by the fitted ``detector`` (see the module docstring)."""
    ex = detector.extractor
    info = ex.info if ex is not None else {}
    device = ex.device if ex is not None else detector.device
    catalogued = model_info(detector.model)
    return {
        "format": PROVENANCE_FORMAT,
        "tool": "himatchad",
        "version": __version__,
        "method": detector.method,
        "method_revision": result.settings.get("method_revision"),  # the detector's METHOD_REVISION
        "libraries": library_versions(),
        "platform": platform.platform(),
        "device": device,
        "device_name": _device_name(device),
        "precision": detector.precision,
        "model": {
            "id": detector.model,
            "weights_digest": info.get("weights_digest"),
            "licence": catalogued.licence if catalogued is not None else None,
            "fingerprint": info.get("fingerprint"),
            "random_weights": bool(info.get("random_weights", False)),  # a random stand-in (build_random_model)
        },
        "bank": {
            **bank_provenance(detector.bank),
            **({"bank_file_digest": detector.bank_file_digest} if getattr(detector, "bank_file_digest", None) else {}),
            "bank_file": str(detector.bank_file) if getattr(detector, "bank_file", None) else None,
        },
        "feedback_folder": str(feedback_folder(detector)) if feedback_folder(detector) is not None else None,
        "feedback": feedback_summaries(detector),  # the reader feedback entries the result was computed with
        "settings": dict(result.settings),
        "input_digest": dict(result.input_digest) if result.input_digest else None,
    }
