"""A fault campaign: realistic but hostile inputs, each of which must end in a correct result or a
clear error, never a plausible-looking wrong result with exit 0.

    python benchmarks/fault_campaign.py --work /tmp/campaign

Every case builds its own constructed input (phantoms, DICOM series written with pydicom, a random
tiny DINOv3), runs it through the Python API, the command line (in-process, exit code and stderr
kept) or the worker process, and checks the outcome against what is right for it: the same map as
a clean reference, or an error naming the cause. It prints one line per case and exits 1 when any
case fails. The cases are grouped by the classes of faults in ``docs/reliability.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from HiMatchADLib import HiMatchADError, HiMatchDetector  # noqa: E402
from HiMatchADLib.cli.main import main as cli_main  # noqa: E402
from HiMatchADLib.core.geometry import Geometry, Image  # noqa: E402
from HiMatchADLib.evaluation.phantom import make_phantom  # noqa: E402
from HiMatchADLib.features.backbone import build_random_model  # noqa: E402
from HiMatchADLib.io.readers import read_image  # noqa: E402
from HiMatchADLib.io.writers import write_image  # noqa: E402

SHAPE = (16, 64, 64)
RES = 128
CASES: list = []


def case(klass: str, what: str):
    def wrap(fn):
        CASES.append((klass, what, fn))
        return fn

    return wrap


class Ctx:
    def __init__(self, work: Path):
        self.work = work
        self.model = str(build_random_model(work / "model", "tiny", seed=0))
        self.normals = work / "normals"
        for i in range(5):
            img, _ = make_phantom(SHAPE, seed=10 + i)
            write_image(img.array, img.geometry, self.normals / f"normal_{i}.nii.gz")
        self.cache = work / "cache"
        self.det = self.detector()
        self.lesion, _ = make_phantom(SHAPE, seed=1000, lesion=True, lesion_radius=0.35, name="case")
        self.ref = self.det.predict(self.lesion)

    def detector(self, normals=None, **kw):
        kw = {"model": self.model, "method": "knn", "k": 4, "resolution": RES, "cache_dir": self.cache, **kw}
        return HiMatchDetector(**kw).fit(normals or self.normals)

    def path(self, name: str) -> Path:
        p = self.work / "cases" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def cli(self, *args) -> tuple:
        args = list(args) + ([] if "--normals" in args else ["--normals", str(self.normals)])
        if "--cache-dir" not in args:
            args += ["--cache-dir", str(self.cache)]
        if "--method" not in args:
            args += ["--method", "knn"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli_main([*args, "--model", self.model, "--resolution", str(RES)])
            except SystemExit as exc:  # argparse
                code = exc.code
        return code, err.getvalue()


def one_error(code, err: str) -> bool:
    """Exit 2 and exactly one ``error:`` line on stderr (progress lines may precede it)."""
    return code == 2 and len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def last_line(err: str) -> str:
    return (err.strip().splitlines() or [""])[-1][:140]


def refused(fn, *words) -> tuple:
    try:
        fn()
    except HiMatchADError as exc:
        msg = str(exc)
        return all(w in msg for w in words), f"refused: {msg[:140]}"
    return False, "no error"


def same_map(res, ref, atol=1e-4) -> bool:
    return res.heatmap.shape == ref.heatmap.shape and np.allclose(res.heatmap, ref.heatmap, atol=atol) and np.array_equal(res.labelmap, ref.labelmap)


# ----------------------------------------------------------------------------- 1. outliers
def _outliers(arr, value, n, seed=0):
    out = arr.copy()
    idx = np.random.default_rng(seed).choice(arr.size, n, replace=False)
    out.reshape(-1)[idx] = value
    return out, idx


@case("1 outliers", "20 voxels at -5e4 in the query: same labelmap elsewhere, warning")
def c_outlier_neg(c):
    arr, idx = _outliers(c.lesion.array, -5e4, 20)
    res = c.det.predict(Image(arr, c.lesion.geometry, name="case"))
    keep = np.ones(arr.size, bool)
    keep[idx] = False
    diff = int((res.labelmap.reshape(-1)[keep] != c.ref.labelmap.reshape(-1)[keep]).sum())
    warned = any("extreme values" in w for w in res.warnings)
    return diff <= 50 and warned, f"{diff} labelmap voxels differ (of {c.ref.anomalous_voxels}), warned={warned}"


@case("1 outliers", "one voxel at 3e38 (float32 max): scored, same labelmap elsewhere")
def c_outlier_max(c):
    arr, idx = _outliers(c.lesion.array, 3e38, 1, seed=1)
    res = c.det.predict(Image(arr, c.lesion.geometry, name="case"))
    diff = int((res.labelmap != c.ref.labelmap).sum())
    return diff <= 50 and res.anomalous_voxels > 0, f"{diff} labelmap voxels differ, {res.anomalous_voxels} anomalous"


@case("1 outliers", "int32 volume with 3 voxels at 2e9")
def c_outlier_int(c):
    arr, _ = _outliers(c.lesion.array.round(), 2e9, 3, seed=2)
    p = c.path("int32.nii.gz")
    write_image(arr.astype(np.int32), c.lesion.geometry, p)
    res = c.det.predict(p)
    diff = int((res.labelmap != c.ref.labelmap).sum())
    return diff <= 100, f"{diff} labelmap voxels differ"


@case("1 outliers", "CT with one voxel at -3e6: body and window unchanged")
def c_outlier_ct(c):
    from HiMatchADLib.features.slicing import prepare_volume

    ct = np.where(c.lesion.array > 50, 40.0, -1000.0).astype(np.float32)
    a = prepare_volume(Image(ct, c.lesion.geometry))
    bad, _ = _outliers(ct, -3e6, 1, seed=3)
    b = prepare_volume(Image(bad, c.lesion.geometry))
    return a.modality == b.modality == "ct" and int((a.foreground != b.foreground).sum()) <= 1, f"modalities {a.modality}/{b.modality}"


@case("1 outliers", "one normal with 5 voxels at +1e7: threshold unchanged, warned")
def c_outlier_normal(c):
    d = c.work / "normals_outlier"
    shutil.copytree(c.normals, d, dirs_exist_ok=True)
    img = read_image(d / "normal_1.nii.gz")
    arr, _ = _outliers(img.array, 1e7, 5, seed=4)
    write_image(arr, img.geometry, d / "normal_1.nii.gz")
    det = c.detector(d)
    t0, t1 = c.det.calibration["threshold"], det.calibration["threshold"]
    warned = any("normal image normal_1" in w and "extreme" in w for w in det.fit_info["warnings"])
    return abs(t1 - t0) <= 1e-3 * abs(t0) and warned, f"threshold {t0:.5g} -> {t1:.5g}, warned={warned}"


# ----------------------------------------------------------------------------- 2. resume
def _batch(c, inp, out):
    return c.cli("batch", str(inp), "--out-dir", str(out))


def _rows(out):
    import csv

    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _resume_case(c, name, damage):
    inp, out = c.work / f"r_{name}" / "in", c.work / f"r_{name}" / "out"
    shutil.rmtree(inp.parent, ignore_errors=True)
    write_image(c.lesion.array, c.lesion.geometry, inp / "a.nii.gz")
    _batch(c, inp, out)
    damage(inp, out)
    code, err = _batch(c, inp, out)
    return code, _rows(out)[0]


@case("2 resume", "labelmap cut to 10 bytes: recomputed")
def c_resume_cut(c):
    code, row = _resume_case(c, "cut", lambda i, o: (o / "a_labelmap.nii.gz").write_bytes((o / "a_labelmap.nii.gz").read_bytes()[:10]))
    return row["status"] == "ok" and "damaged" in row["message"], f"{row['status']}: {row['message'][:90]}"


@case("2 resume", "heatmap swapped for another case's heatmap: recomputed")
def c_resume_swap(c):
    def damage(i, o):
        other = c.work / "swap_other"
        det_res = c.det.predict(make_phantom(SHAPE, seed=5, lesion=True)[0])
        from HiMatchADLib.outputs.files import save_result

        det_res.name = "a"
        save_result(det_res, other)
        shutil.copyfile(other / "a_heatmap.nii.gz", o / "a_heatmap.nii.gz")

    code, row = _resume_case(c, "swap", damage)
    return row["status"] == "ok" and "damaged" in row["message"], f"{row['status']}: {row['message'][:90]}"


@case("2 resume", "input replaced by rsync -a style copy (old mtime, same size): recomputed")
def c_resume_rsync(c):
    def damage(i, o):
        st = (i / "a.nii.gz").stat()
        other, _ = make_phantom(SHAPE, seed=6, lesion=True)
        write_image(other.array, other.geometry, i / "a.nii.gz")
        os.utime(i / "a.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns))

    code, row = _resume_case(c, "rsync", damage)
    return row["status"] == "ok" and "content changed" in row["message"], f"{row['status']}: {row['message'][:90]}"


@case("2 resume", "scores JSON without output digests (an older result): recomputed")
def c_resume_nodigest(c):
    def damage(i, o):
        p = o / "a_scores.json"
        d = json.loads(p.read_text())
        d.pop("output_digests")
        p.write_text(json.dumps(d))

    code, row = _resume_case(c, "nodigest", damage)
    return row["status"] == "ok" and "no digests" in row["message"], f"{row['status']}: {row['message'][:90]}"


@case("2 resume", "input touched, content unchanged: done earlier")
def c_resume_touch(c):
    code, row = _resume_case(c, "touch", lambda i, o: os.utime(i / "a.nii.gz"))
    return row["status"] == "done earlier", f"{row['status']}"


# ----------------------------------------------------------------------------- 3. nothing scored
@case("3 nothing scored", "a 2x2x50 rod: exit 2, one error line")
def c_rod(c):
    p = c.path("rod.nii.gz")
    write_image(np.full((50, 2, 2), 500, np.float32) + np.arange(50, dtype=np.float32)[:, None, None], Image.from_array(np.zeros((50, 2, 2), np.float32)).geometry, p)
    code, err = c.cli("detect", str(p), "--out-dir", str(c.path("rod_out")))
    return one_error(code, err), f"exit {code}: {last_line(err)}"


@case("3 nothing scored", "in-plane spacing 1e-4 mm with a common-spacing bank: exit 2")
def c_tiny_spacing(c):
    img, _ = make_phantom(SHAPE, seed=7)
    p = c.path("tiny_spacing.nii.gz")
    write_image(img.array, Image.from_array(img.array, spacing=(1e-4, 1e-4, 2.0)).geometry, p)
    code, err = c.cli("detect", str(p), "--out-dir", str(c.path("ts_out")))
    return code == 2 and not list(c.path("ts_out").glob("*_scores.json")), f"exit {code}: {last_line(err)}"


@case("3 nothing scored", "volume with foreground in one slice only: scored, slices_scored recorded")
def c_one_slice(c):
    arr = np.zeros(SHAPE, np.float32)
    arr[8] = c.lesion.array[8]
    res = c.det.predict(Image(arr, c.lesion.geometry, name="one"))
    d = res.to_dict()
    return d["slices_scored"] >= 1 and d["slices"] == SHAPE[0], f"{d['slices_scored']} of {d['slices']} slices scored"


# ----------------------------------------------------------------------------- 4. pixel semantics
def _dicom(c, folder, volume, mutate=None, **kw):
    sys.path.insert(0, str(REPO / "Testing"))
    sys.path.insert(0, str(REPO / "Testing" / "io"))
    import test_dicom_series as T

    T.write_series(folder, kw.pop("uid", "1.2.826.0.1.3680043.2.1125.77"), volume=volume, **kw)
    if mutate:
        import pydicom

        for f in sorted(folder.iterdir()):
            ds = pydicom.dcmread(f)
            mutate(ds)
            ds.save_as(f)


@case("4 pixel semantics", "MONOCHROME1, 12 bits stored, unsigned: the MONOCHROME2 map")
def c_mono1(c):
    vol = np.clip(c.lesion.array, 0, 4000).astype(np.int16)
    _dicom(c, c.path("m2"), vol, uid="1.2.3.77.1")

    def mono1(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.PixelData = (4095 - ds.pixel_array.astype(np.int32)).astype(np.uint16).tobytes()

    _dicom(c, c.path("m1"), vol, mono1, uid="1.2.3.77.2")
    a, b = c.det.predict(c.path("m2")), c.det.predict(c.path("m1"))
    return same_map(a, b), f"max |diff| {float(np.abs(a.heatmap - b.heatmap).max()):.2g}"


@case("4 pixel semantics", "DICOM with ImagerPixelSpacing only: spacing not taken for missing")
def c_imager_spacing(c):
    vol = np.clip(c.lesion.array, 0, 4000).astype(np.int16)

    def imager(ds):
        ds.ImagerPixelSpacing = ds.PixelSpacing
        del ds.PixelSpacing

    _dicom(c, c.path("imager"), vol, imager, uid="1.2.3.77.3")
    img = read_image(c.path("imager"))
    return img.spacing_recorded, f"spacing_recorded={img.spacing_recorded}, spacing {img.geometry.spacing}"


@case("4 pixel semantics", "DICOM without any pixel spacing: warned, not physical")
def c_no_spacing(c):
    vol = np.clip(c.lesion.array, 0, 4000).astype(np.int16)
    _dicom(c, c.path("nospacing"), vol, lambda ds: delattr(ds, "PixelSpacing"), uid="1.2.3.77.4")
    res = c.det.predict(c.path("nospacing"))
    warned = any("no PixelSpacing" in w for w in res.warnings)
    return warned, f"warned={warned}"


@case("4 pixel semantics", "complex128 NIfTI: its magnitude's map")
def c_complex(c):
    import SimpleITK as sitk

    phase = np.random.default_rng(0).uniform(-3, 3, SHAPE)
    im = sitk.GetImageFromArray((c.lesion.array * np.exp(1j * phase)).astype(np.complex128))
    im.SetSpacing(c.lesion.geometry.spacing)
    p = c.path("complex.nii.gz")
    sitk.WriteImage(im, str(p))
    res = c.det.predict(p)
    return same_map(res, c.ref, atol=1e-3) and any("magnitude" in w for w in res.warnings), f"anomalous {res.anomalous_voxels} vs {c.ref.anomalous_voxels}"


@case("4 pixel semantics", "NaN slab in a NIfTI: warned, the rest scored")
def c_nan(c):
    arr = c.lesion.array.copy()
    arr[:, :, :5] = np.nan
    import SimpleITK as sitk

    p = c.path("nan.nii.gz")
    im = sitk.GetImageFromArray(arr)  # (write_image refuses what it cannot read back: NIfTI NaN)
    im.SetSpacing(c.lesion.geometry.spacing)
    sitk.WriteImage(im, str(p))
    back = c.det.predict(p)
    return any("non-finite" in w for w in back.warnings) and np.isfinite(back.volume_score), f"{back.anomalous_voxels} anomalous"


@case("4 pixel semantics", "16-bit TIFF against an 8-bit PNG bank: the 8-bit map")
def c_tiff16(c):
    import SimpleITK as sitk
    from PIL import Image as PILImage

    bank = c.work / "png_bank"
    bank.mkdir(exist_ok=True)
    for i in range(4):
        a = make_phantom((1, 64, 64), seed=50 + i)[0].array[0]
        PILImage.fromarray(np.clip(a / a.max() * 255, 0, 255).astype(np.uint8)).save(bank / f"subj{'abcd'[i]}.png")
    q = make_phantom((1, 64, 64), seed=60, lesion=True)[0].array[0]
    q8 = np.clip(q / q.max() * 255, 0, 255).astype(np.uint8)
    PILImage.fromarray(q8).save(c.path("q8.png"))
    sitk.WriteImage(sitk.GetImageFromArray(q8.astype(np.uint16) * 257), str(c.path("q16.tif")))
    det = c.detector(bank, k=2)
    a, b = det.predict(c.path("q8.png")), det.predict(c.path("q16.tif"))
    return same_map(a, b), f"anomalous {a.anomalous_voxels} / {b.anomalous_voxels}"


# ----------------------------------------------------------------------------- 5. query vs bank
@case("5 query vs bank", "a normal saved as NRRD under another name, queried: refused")
def c_copy_nrrd(c):
    img = read_image(c.normals / "normal_2.nii.gz")
    p = c.path("renamed_copy.nrrd")
    write_image(img.array, img.geometry, p)
    return refused(lambda: c.det.predict(p), "is one of the normal images", "normal_2.nii.gz")


@case("5 query vs bank", "a single coronal slice with geometry vs axial normals: refused")
def c_coronal(c):
    v = read_image(c.normals / "normal_0.nii.gz")
    g = v.geometry
    one = Image(np.ascontiguousarray(v.array[:, 30:31, :]), Geometry((g.size[0], 1, g.size[2]), g.spacing, g.origin, g.direction), name="coronal")
    return refused(lambda: c.det.predict(one), "single coronal slice")


@case("5 query vs bank", "one-subject normal folder, automatic threshold: exit 2")
def c_one_subject(c):
    d = c.work / "one_subject"
    d.mkdir(exist_ok=True)
    shutil.copyfile(c.normals / "normal_0.nii.gz", d / "only.nii.gz")
    p = c.path("q1.nii.gz")
    write_image(c.lesion.array, c.lesion.geometry, p)
    code, err = c.cli("detect", str(p), "--normals", str(d), "--out-dir", str(c.path("one_out")))
    return code == 2 and "one subject" in err, f"exit {code}: {last_line(err)}"


@case("5 query vs bank", "one-subject normal folder with --threshold: analysed")
def c_one_subject_fixed(c):
    d = c.work / "one_subject"
    p = c.path("q1.nii.gz")
    code, err = c.cli("detect", str(p), "--normals", str(d), "--threshold", "0.3", "--out-dir", str(c.path("one_out2")))
    return code == 0 and (c.path("one_out2") / "q1_scores.json").exists(), f"exit {code}"


# ----------------------------------------------------------------------------- 6. 2D orientation
@case("6 2D orientation", "2D NIfTI stored column-flipped: the same map, flipped back")
def c_2d_colflip(c):
    normals = c.work / "n2d"
    for i in range(3):
        n, _ = make_phantom((1, 64, 64), seed=70 + i)
        write_image(n.array, n.geometry, normals / f"subject{i}_x.nii.gz")
    img, _ = make_phantom((1, 64, 64), seed=80, lesion=True, lesion_radius=0.3)
    g = img.geometry
    d = np.array(g.direction, float)
    origin = np.array(g.origin) + d[:, 0] * g.spacing[0] * 63
    d[:, 0] *= -1
    write_image(img.array, g, c.path("q2d.nii.gz"))
    write_image(np.ascontiguousarray(img.array[:, :, ::-1]), Geometry(g.size, g.spacing, tuple(origin), d, is_2d=True), c.path("q2d_flip.nii.gz"))
    det = c.detector(normals, k=2)
    a, b = det.predict(c.path("q2d.nii.gz")), det.predict(c.path("q2d_flip.nii.gz"))
    ok = np.allclose(b.heatmap[:, :, ::-1], a.heatmap, atol=1e-4)
    return ok, f"max |diff| {float(np.abs(b.heatmap[:, :, ::-1] - a.heatmap).max()):.2g}"


# ----------------------------------------------------------------------------- 7. hang
@case("7 hang", "--consistency-mm 1e12: finishes in seconds")
def c_consistency(c):
    p = c.path("cons.nii.gz")
    write_image(c.lesion.array, c.lesion.geometry, p)
    t = time.perf_counter()
    code, err = c.cli("detect", str(p), "--consistency-mm", "1e12", "--out-dir", str(c.path("cons_out")))
    s = time.perf_counter() - t
    return (code in (0, 2)) and s < 60, f"exit {code} in {s:.1f} s"


# ----------------------------------------------------------------------------- 8. worker
@case("8 worker", "worker: k=1.5, resolution 99999, 10^6 nested braces, then a good request")
def c_worker(c):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "HiMatchADLib", "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(REPO), env=env)
    p = c.path("wq.nii.gz")
    write_image(c.lesion.array, c.lesion.geometry, p)
    base = {"cmd": "detect", "input": str(p), "normals": str(c.normals), "out_dir": str(c.path("w_out")), "settings": {"model": c.model, "method": "knn", "resolution": RES, "cache_dir": str(c.cache)}}
    bad = [dict(base, settings=dict(base["settings"], k=1.5)), dict(base, settings=dict(base["settings"], resolution=99999))]
    lines = [json.dumps(b) for b in bad] + ["{" * 1_000_000, json.dumps(base)]
    out, _ = proc.communicate("\n".join(lines) + "\n", timeout=300)
    events = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
    kinds = [e.get("event") for e in events]
    errors = [e for e in events if e.get("event") == "error"]
    internal = [e for e in errors if e.get("internal")]
    ok = len(errors) >= 3 and not internal and (c.path("w_out") / "wq_scores.json").exists()
    return ok, f"events {kinds}, errors {[e.get('message', '')[:60] for e in errors]}, internal {len(internal)}"


# ----------------------------------------------------------------------------- 9. late errors
@case("9 late errors", "--out-dir a dangling symbolic link: exit 2 before any work")
def c_dangling(c):
    link = c.path("dangling_out")
    if not link.is_symlink():
        link.symlink_to(c.work / "does" / "not" / "exist")
    p = c.path("q9.nii.gz")
    write_image(c.lesion.array, c.lesion.geometry, p)
    code, err = c.cli("detect", str(p), "--out-dir", str(link))
    return code == 2 and "dangling_out" in err, f"exit {code}: {last_line(err)}"


@case("9 late errors", "an input name of 240 characters: exit 2 naming it, or a complete result")
def c_long_name(c):
    p = c.path("x" * 240 + ".nii.gz")
    write_image(c.lesion.array, c.lesion.geometry, p)  # 247 bytes: fits, and so must its temporary
    out = c.path("long_out")
    code, err = c.cli("detect", str(p), "--out-dir", str(out))
    done = any(out.glob("*_scores.json")) if out.exists() else False
    return (code == 2 and "xxxx" in err) or (code == 0 and done), f"exit {code}: {last_line(err)}"


@case("9 late errors", "a cache path that is a file: exit 2 before the bank")
def c_cache_file(c):
    f = c.path("cache_is_a_file")
    f.write_text("x")
    p = c.path("q9.nii.gz")
    write_image(c.lesion.array, c.lesion.geometry, p)
    code, err = c.cli("detect", str(p), "--out-dir", str(c.path("cf_out")), "--cache-dir", str(f), "--method", "dpmm")
    return code == 2 and "cache_is_a_file" in err, f"exit {code}: {last_line(err)}"


@case("9 late errors", "an output path that is a folder: exit 2 naming it")
def c_output_dir(c):
    out = c.path("od_out")
    (out / "q9_heatmap.nii.gz").mkdir(parents=True, exist_ok=True)
    write_image(c.lesion.array, c.lesion.geometry, c.path("q9.nii.gz"))
    code, err = c.cli("detect", str(c.path("q9.nii.gz")), "--out-dir", str(out))
    return code == 2 and "q9_heatmap.nii.gz" in err and ".tmp" not in err, f"exit {code}: {last_line(err)}"


@case("9 late errors", "NIfTI direction sheared by 3e-5: a result that reads back on its grid")
def c_shear(c):
    g = c.lesion.geometry
    d = np.array(g.direction, float)
    d[0, 1] = 3e-5
    p = c.path("shear.nii.gz")
    write_image(c.lesion.array, Geometry(g.size, g.spacing, g.origin, d), p)
    out = c.path("shear_out")
    code, err = c.cli("detect", str(p), "--out-dir", str(out))
    if code != 0:
        return one_error(code, err), f"exit {code}: {last_line(err)}"
    from HiMatchADLib.outputs.files import load_result

    back = load_result(out / "shear_scores.json")
    return np.allclose(back.geometry.direction, read_image(p).geometry.direction, atol=1e-6), "exit 0, result on the input's grid"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("-k", default="", help="run only the cases whose description contains this text")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.simplefilter("ignore")
    ctx = Ctx(args.work)
    failed = 0
    for n, (klass, what, fn) in enumerate(CASES, 1):
        if args.k and args.k not in what:
            continue
        t = time.perf_counter()
        try:
            ok, detail = fn(ctx)
        except Exception as exc:  # a crash is a failure of the case
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
            traceback.print_exc(file=sys.stderr)
        failed += not ok
        print(f"{n:2d} {'PASS' if ok else 'FAIL'} [{klass}] {what} | {detail} ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"{len(CASES) - failed} of {len(CASES)} cases hold")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
