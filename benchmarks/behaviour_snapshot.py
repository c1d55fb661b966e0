"""A fixed set of runs whose outputs are digested, to show that a change of code leaves behaviour alone.

    python benchmarks/behaviour_snapshot.py --work /tmp/snap --out before.json
    ... change the code ...
    python benchmarks/behaviour_snapshot.py --work /tmp/snap --out after.json --compare before.json

The runs go through the command line and the worker process only (``python -m HiMatchADLib``), so
the script does not depend on the package's inner layout. On the first call it writes its inputs
into ``--work/data`` (a random tiny DINOv3, phantom normals, a phantom with a lesion on an oblique
grid, 2D slices, a DICOM series) and reuses them afterwards; the cache and the outputs are made
anew on every call, at the same paths, so that the scores JSONs can be compared as they are.

Digested: every NIfTI output as the SHA-256 of its voxel array plus its geometry (bit-identical
arrays), every scores JSON with its timings removed, every DICOM SEG / parametric map as the
SHA-256 of its pixel data, and every summary.csv. ``--compare`` prints what differs and exits 1
if anything does.

Runs: detect himatch/knn/dpmm on the volume; himatch and knn on a 2D slice against 2D normals; a
batch with DICOM SEG and parametric map outputs (local engine); the same batch on the Ray engine;
one detect request through the worker process.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOLATILE = {"timings", "timings_s", "seconds", "elapsed_s", "time"}


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, **kw)
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}")
    return p


def make_data(data: Path) -> None:
    sys.path.insert(0, str(REPO))
    import SimpleITK as sitk

    try:
        from HiMatchADLib.features.backbone import build_random_model
    except ImportError:
        from HiMatchADLib.features.backbone import build_random_model
    from HiMatchADLib import Image, write_image
    from HiMatchADLib.evaluation.phantom import make_phantom

    data.mkdir(parents=True, exist_ok=True)
    build_random_model(data / "model", "tiny", seed=0)
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(30)
    oblique = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
    (data / "normals").mkdir()
    for i in range(5):
        img, _ = make_phantom((16, 64, 64), seed=10 + i)
        write_image(img.array, img.geometry, data / "normals" / f"normal_{i}.nii.gz")
    case, _ = make_phantom((16, 64, 64), seed=1000, lesion=True, lesion_radius=0.35, name="case")
    g = case.geometry
    (data / "cases").mkdir()
    write_image(case.array, type(g)(g.size, (0.9, 1.1, 2.0), (-20.0, 13.5, 4.0), oblique), data / "cases" / "case.nii.gz")
    # 2D: slices of the phantoms as 8-bit PNGs
    (data / "normals2d").mkdir()
    for i in range(5):
        img, _ = make_phantom((16, 64, 64), seed=10 + i)
        for z in (6, 8, 10):
            arr = img.array[z]
            png = np.clip(255 * (arr - arr.min()) / (np.ptp(arr) + 1e-6), 0, 255).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(png), str(data / "normals2d" / f"subj{i}_{z}.png"))
    arr = case.array[8]
    png = np.clip(255 * (arr - arr.min()) / (np.ptp(arr) + 1e-6), 0, 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(png), str(data / "slice.png"))
    # a DICOM series of the case (MR, oblique)
    write_dicom_series(case.array, oblique, data / "cases" / "dicom_case")
    del Image


def write_dicom_series(arr: np.ndarray, d: np.ndarray, folder: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True)
    root = "1.2.826.0.1.3680043.8.498.4242"
    study, series, frame = f"{root}.1", f"{root}.2", f"{root}.3"
    vals = np.clip((arr - arr.min()) / (np.ptp(arr) + 1e-6) * 1000, 0, 4000).astype(np.uint16)
    for k in range(arr.shape[0]):
        uid = f"{root}.10.{k + 1}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer = "MR", "Phantom Scanner"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PH-001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240105", "101500", "7", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 4, k + 1, "t1"
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])]
        ds.ImagePositionPatient = [f"{v:.8f}" for v in (np.array([-20.0, 13.5, 4.0]) + d[:, 2] * 2.0 * k)]
        ds.PixelSpacing, ds.SliceThickness = [1.1, 0.9], 2.0
        ds.Rows, ds.Columns = vals.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = vals[k].tobytes()
        ds.save_as(folder / f"im{k:03d}.dcm", enforce_file_format=True)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def digest(out: Path) -> dict:
    import SimpleITK as sitk

    found = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        key = str(p.relative_to(out))
        if p.name.endswith((".nii.gz", ".nrrd")):
            img = sitk.ReadImage(str(p))
            a = sitk.GetArrayViewFromImage(img)
            found[key] = {
                "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
                "dtype": str(a.dtype),
                "geometry": [list(img.GetSize()), list(img.GetSpacing()), list(img.GetOrigin()), list(img.GetDirection())],
            }
        elif p.name.endswith("_scores.json"):
            found[key] = strip(json.loads(p.read_text()))
        elif p.suffix == ".dcm":
            import pydicom

            ds = pydicom.dcmread(p)
            found[key] = {"sha256": hashlib.sha256(ds.pixel_array.tobytes()).hexdigest(), "sop_class": str(ds.SOPClassUID)}
        elif p.name == "summary.csv":
            with p.open() as f:
                rows = [{k: v for k, v in r.items() if k not in ("seconds",)} for r in csv.DictReader(f)]
            found[key] = rows
        elif p.suffix == ".png":
            found[key] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    return found


def worker_detect(data: Path, out: Path, cache: Path) -> dict:
    req = {
        "id": "w1", "cmd": "detect", "input": str(data / "cases" / "case.nii.gz"), "normals": str(data / "normals"),
        "out_dir": str(out / "worker"),
        "settings": {"model": str(data / "model"), "method": "knn", "resolution": 128, "cache_dir": str(cache), "device": "cpu"},
    }
    p = run([sys.executable, "-m", "HiMatchADLib", "worker"], input=json.dumps(req) + "\n" + json.dumps({"cmd": "shutdown"}) + "\n")
    events = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
    done = [e for e in events if e.get("event") in ("done", "error")]
    keep = ("event", "name", "volume_score", "threshold", "anomalous_voxels", "warnings", "reused", "model_reused")
    return {k: done[-1].get(k) for k in keep}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/himatchad-snapshot"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--no-ray", action="store_true")
    a = ap.parse_args()
    data, out, cache = a.work / "data", a.work / "out", a.work / "cache"
    if not data.exists():
        make_data(data)
    for d in (out, cache):
        shutil.rmtree(d, ignore_errors=True)
    py = [sys.executable, "-m", "HiMatchADLib", "--quiet"]
    common = ["--model", str(data / "model"), "--resolution", "128", "--cache-dir", str(cache), "--device", "cpu"]
    for method in ("himatch", "knn", "dpmm"):
        run(py + ["detect", str(data / "cases" / "case.nii.gz"), "--normals", str(data / "normals"), "--out-dir", str(out / f"vol_{method}"), "--method", method, "--k", "4"] + common)
    for method in ("himatch", "knn"):
        run(py + ["detect", str(data / "slice.png"), "--normals", str(data / "normals2d"), "--out-dir", str(out / f"png_{method}"), "--method", method, "--k", "4"] + common)
    run(py + ["batch", str(data / "cases"), "--normals", str(data / "normals"), "--out-dir", str(out / "batch_local"), "--method", "knn", "--dicom-seg", "--dicom-heatmap"] + common)
    if not a.no_ray:
        run(py + ["batch", str(data / "cases"), "--normals", str(data / "normals"), "--out-dir", str(out / "batch_ray"), "--method", "knn", "--engine", "ray", "--workers", "1"] + common)
    snap = {"outputs": digest(out), "worker": worker_detect(data, out, cache)}
    a.out.write_text(json.dumps(snap, indent=1, sort_keys=True))
    print(f"{len(snap['outputs'])} outputs digested -> {a.out}")
    if a.compare:
        before = strip(json.loads(a.compare.read_text()))  # a file written by an older version may keep more
        snap = strip(snap)
        diffs = [k for k in sorted(set(before["outputs"]) | set(snap["outputs"])) if before["outputs"].get(k) != snap["outputs"].get(k)]
        if before["worker"] != snap["worker"]:
            diffs.append("worker")
        for k in diffs:
            print(f"differs: {k}")
        print("identical" if not diffs else f"{len(diffs)} differences")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
