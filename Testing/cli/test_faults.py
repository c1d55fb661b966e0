"""Faults that used to give a plausible but wrong result with exit status 0: each now ends in a
correct result or one clear error (see docs/reliability.md for the table)."""

from __future__ import annotations

import errno
import io
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import RESOLUTION, one_error_line, remount_read_only, tmpfs
from HiMatchADLib.core import atomic
from HiMatchADLib.io import writers
from HiMatchADLib.detector.parameters import MAX_RESOLUTION
from HiMatchADLib.cli.main import main
from HiMatchADLib.core.errors import HiMatchADError
from HiMatchADLib.core.geometry import Image
from HiMatchADLib.io.discovery import list_images
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image
from HiMatchADLib.evaluation.phantom import make_phantom


# ------------------------------------------------------------------------------------------ helpers
def _random_volume(shape=(20, 64, 64), seed=0) -> Image:
    arr = np.random.default_rng(seed).random(shape, dtype=np.float32)  # incompressible
    return Image.from_array(arr, spacing=(0.8, 0.8, 2.0), origin=(-10.0, 5.0, 3.0))


@pytest.fixture(scope="module")
def case_file(tmp_path_factory, lesion_case):
    d = tmp_path_factory.mktemp("case")
    write_image(lesion_case[0].array, lesion_case[0].geometry, d / "case.nii.gz")
    return d / "case.nii.gz"


# --------------------------------------------------------------- 1. a full disk is not a result
def test_full_disk_write_raises_and_leaves_nothing_on_a_small_tmpfs(tmp_path):
    img = _random_volume()
    with tmpfs(tmp_path / "small", size="64k") as d:
        with pytest.raises(HiMatchADError, match="writing .*x.nii.gz failed"):
            write_image(img.array, img.geometry, d / "x.nii.gz")
        assert list(d.iterdir()) == []  # neither a truncated x.nii.gz nor a temporary


def test_short_write_is_caught_before_the_rename(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: a writer that stops half-way without raising (as ITK's NIfTI
    writer does on ENOSPC)."""
    import SimpleITK as sitk

    real = sitk.WriteImage

    def short_write(image, path, *args):
        real(image, path, *args)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    img = _random_volume()
    monkeypatch.setattr(sitk, "WriteImage", short_write)
    for name in ("x.nii.gz", "x.nii", "x.nrrd"):
        with pytest.raises(HiMatchADError, match="failed"):
            write_image(img.array, img.geometry, tmp_path / name)
    # an all-zero labelmap cut short decompresses to the same zeros: the gzip check still sees it
    zeros = np.zeros((20, 64, 64), np.uint8)
    with pytest.raises(HiMatchADError, match="incomplete"):
        write_image(zeros, img.geometry, tmp_path / "lab.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_written_voxels_are_compared_with_what_was_meant(tmp_path, monkeypatch):
    import SimpleITK as sitk

    real = sitk.WriteImage
    img = _random_volume()

    def wrong_values(image, path, *args):
        arr = sitk.GetArrayFromImage(image)
        arr[0, 0, 0] += 1
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(image)
        real(out, path, *args)

    monkeypatch.setattr(sitk, "WriteImage", wrong_values)
    with pytest.raises(HiMatchADError, match="different voxel values"):
        write_image(img.array, img.geometry, tmp_path / "x.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_a_good_write_reads_back_exactly(tmp_path):
    img = _random_volume()
    for name in ("x.nii.gz", "x.nii", "x.nrrd", "x.mha"):
        write_image(img.array, img.geometry, tmp_path / name)
        back = read_image(tmp_path / name)
        assert np.array_equal(back.array, img.array) and back.geometry.same_as(img.geometry, tol=1e-5)


# ---------------------------------------------------------------- 2. truncated inputs are refused
@pytest.mark.parametrize("name, cut", [("x.nii.gz", 3000), ("x.nii.gz", 0.5), ("x.nii", 0.5), ("x.nii", 400)], ids=["gz-3000B", "gz-half", "nii-half", "nii-header-only"])
def test_truncated_nifti_is_refused(tmp_path, name, cut):
    img = _random_volume()
    write_image(img.array, img.geometry, tmp_path / name)
    data = (tmp_path / name).read_bytes()
    n = int(cut if cut >= 1 else len(data) * cut)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / name).write_bytes(data[:n])
    with pytest.raises(HiMatchADError, match="truncated"):
        read_image(tmp_path / "cut" / name)


def test_truncated_input_fails_detect_before_any_work(cli, tmp_path, case_file):
    data = case_file.read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "case.nii.gz").write_bytes(data[: len(data) // 2])
    cache = tmp_path / "cache"
    code, out, err = cli("detect", str(tmp_path / "in" / "case.nii.gz"), "--out-dir", str(tmp_path / "o"), cache=cache)
    assert code == 2 and out == ""
    assert "truncated" in one_error_line(err)
    assert not (tmp_path / "o").exists() and not cache.exists()  # refused before the bank was built


@pytest.mark.parametrize("name, compress", [("x.nrrd", False), ("x.nrrd", True), ("x.mha", False), ("x.mha", True)])
def test_truncated_nrrd_and_metaimage_are_refused(tmp_path, name, compress):
    import SimpleITK as sitk

    img = _random_volume()
    sitk.WriteImage(writers.to_sitk(img.array, img.geometry), str(tmp_path / name), compress)
    data = (tmp_path / name).read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(HiMatchADError, match="cannot read"):
        read_image(tmp_path / "cut" / name)


def test_a_truncated_normal_scan_is_left_out_of_the_bank(tmp_path, tiny_model, normals_dir):
    from HiMatchADLib import HiMatchDetector

    folder = tmp_path / "normals"
    folder.mkdir()
    for p in sorted(normals_dir.iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    whole = (folder / "normal_0.nii.gz").read_bytes()
    (folder / "normal_0.nii.gz").write_bytes(whole[: len(whole) // 2])
    det = HiMatchDetector(model=tiny_model, method="knn", resolution=RESOLUTION, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="normal_0.nii.gz.*truncated"):
        det.fit(folder)
    assert det.fit_info["skipped"] == 1 and det.bank.skipped[0]["path"].endswith("normal_0.nii.gz")
    assert det.bank.groups and not any("normal_0" in str(g) for g in det.bank.groups)  # no slice of it


def test_corrupt_gzip_data_is_refused(tmp_path):
    img = _random_volume()
    write_image(img.array, img.geometry, tmp_path / "x.nii.gz")
    data = bytearray((tmp_path / "x.nii.gz").read_bytes())
    data[-6] ^= 0xFF  # inside the CRC/length trailer
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.nii.gz").write_bytes(bytes(data))
    with pytest.raises(HiMatchADError, match="truncated or corrupt"):
        read_image(tmp_path / "bad" / "x.nii.gz")


# ------------------------------------------------------------------------ 3. symbolic link loops
def test_link_loops_and_duplicate_links_list_each_input_once(tmp_path):
    img = _random_volume((4, 16, 16))
    root = tmp_path / "normals"
    write_image(img.array, img.geometry, root / "a.nii.gz")
    write_image(img.array, img.geometry, root / "sub" / "b.nii.gz")
    (root / "sub" / "loop").symlink_to(root)  # sub/loop/sub/loop/... forever
    (root / "again.nii.gz").symlink_to(root / "sub" / "b.nii.gz")
    (root / "dangling.nii.gz").symlink_to(root / "nothere.nii.gz")
    found = list_images(root)
    assert sorted(p.relative_to(root).as_posix() for p in found) == ["a.nii.gz", "again.nii.gz"]
    assert len({p.resolve() for p in found}) == 2


# --------------------------------------------------------------- 4. non-orthogonal directions
def _sheared_direction() -> np.ndarray:
    col1 = np.array([0.2, 1.0, 0.0])
    return np.column_stack([[1.0, 0.0, 0.0], col1 / np.linalg.norm(col1), [0.0, 0.0, 1.0]])


def test_sheared_direction_is_kept_exactly_or_refused(tmp_path):
    arr = np.random.default_rng(1).random((6, 16, 16), dtype=np.float32)
    img = Image.from_array(arr, spacing=(0.7, 0.9, 2.5), origin=(1, 2, 3), direction=_sheared_direction())
    write_image(img.array, img.geometry, tmp_path / "in.mha")
    back = read_image(tmp_path / "in.mha")
    assert np.allclose(back.geometry.direction, _sheared_direction(), atol=1e-12)
    write_image(back.array, back.geometry, tmp_path / "copy.mha")  # MetaImage stores it: kept
    assert np.allclose(read_image(tmp_path / "copy.mha").geometry.direction, _sheared_direction(), atol=1e-12)
    with pytest.raises(HiMatchADError, match="not perpendicular.*[Rr]esample"):
        write_image(back.array, back.geometry, tmp_path / "heat.nii.gz")
    assert not (tmp_path / "heat.nii.gz").exists()


def test_sheared_input_is_refused_by_detect_before_any_work(cli, tmp_path, lesion_case):
    img = lesion_case[0]
    sheared = Image.from_array(img.array, spacing=(1, 1, 2), direction=_sheared_direction())
    write_image(sheared.array, sheared.geometry, tmp_path / "in" / "case.mha")
    cache = tmp_path / "cache"
    code, _, err = cli("detect", str(tmp_path / "in" / "case.mha"), "--out-dir", str(tmp_path / "o"), cache=cache)
    assert code == 2 and "not perpendicular" in one_error_line(err)
    assert not (tmp_path / "o").exists() and not cache.exists()


# ------------------------------------------------------------------------------------ 5. DICOM
def _dicom_series(folder: Path, uid: str, slices, seed: int = 0, description: str = "", tilt_mm: float = 0.0) -> Path:
    import SimpleITK as sitk

    img, _ = make_phantom((8, 32, 32), seed=seed)
    vol = sitk.GetImageFromArray(np.clip(img.array, 0, 3000).astype(np.int16))
    vol.SetSpacing((1.0, 1.0, 2.0))
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i, z in enumerate(slices):
        s = vol[:, :, z]
        x, y, zz = vol.TransformIndexToPhysicalPoint((0, 0, z))
        position = "\\".join(str(v) for v in (x, y + tilt_mm * z, zz))  # tilt: each slice shifted in y
        for tag, value in {
            "0008|0060": "MR", "0020|000d": uid + ".0", "0020|000e": uid, "0008|0018": f"{uid}.{i + 1}",
            "0020|0013": str(i + 1), "0020|0032": position, "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2",
            "0008|103e": description,
        }.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-3:]}_{i:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_dicom_folder_with_two_series_is_refused_with_the_list(tmp_path):
    d = tmp_path / "study"
    _dicom_series(d, "1.2.826.0.1.3680043.2.1125.7.101", range(8), description="T1 axial")
    _dicom_series(d, "1.2.826.0.1.3680043.2.1125.7.202", range(3), seed=1, description="localiser")
    with pytest.raises(HiMatchADError) as info:
        read_image(d)
    msg = str(info.value)
    assert "2 DICOM series" in msg and "folder of its own" in msg
    assert "1.2.826.0.1.3680043.2.1125.7.101 (8 files, MR T1 axial)" in msg and "7.202 (3 files, MR localiser)" in msg
    assert list_images(tmp_path) == [d]  # still listed as an input (so a batch reports it)


def test_dicom_series_alone_reads_with_its_spacing(tmp_path):
    img = read_image(_dicom_series(tmp_path / "s", "1.2.826.0.1.3680043.2.1125.7.303", range(8)))
    assert img.array.shape == (8, 32, 32) and np.isclose(img.geometry.spacing[2], 2.0)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    d = _dicom_series(tmp_path / "s", "1.2.826.0.1.3680043.2.1125.7.404", [0, 1, 2, 4, 5, 6, 7])
    with pytest.raises(HiMatchADError, match=r"not evenly spaced: slices are 2 mm apart except 4 mm after slice 3"):
        read_image(d)


def test_dicom_series_from_a_tilted_gantry_is_refused(tmp_path):
    d = _dicom_series(tmp_path / "s", "1.2.826.0.1.3680043.2.1125.7.707", range(8), tilt_mm=0.5)
    with pytest.raises(HiMatchADError, match="is sheared: its slices are shifted sideways by 3.5 mm over 14 mm"):
        read_image(d)


def test_dicom_series_with_two_slices_at_one_position_is_refused(tmp_path):
    d = _dicom_series(tmp_path / "s", "1.2.826.0.1.3680043.2.1125.7.606", [0, 1, 2, 3, 3, 4, 5, 6, 7])
    with pytest.raises(HiMatchADError, match="several slices at one position"):
        read_image(d)


# --------------------------------------------------------------- 6. and 8. option values
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_non_finite_threshold_is_refused(case_file, tmp_path, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["detect", str(case_file), "--normals", str(tmp_path), "--out-dir", str(tmp_path / "o"), f"--threshold={value}"])
    assert info.value.code == 2 and "finite number" in capsys.readouterr().err


def test_resolution_has_an_upper_bound(case_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["detect", str(case_file), "--normals", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--resolution", "100000"])
    assert info.value.code == 2 and f"at most {MAX_RESOLUTION}" in capsys.readouterr().err
    from HiMatchADLib.cli.main import build_parser

    args = build_parser().parse_args(["bank", str(tmp_path), "--resolution", str(MAX_RESOLUTION)])
    assert args.resolution == MAX_RESOLUTION


# ------------------------------------------------------------ 7. folders that cannot be written
def test_read_only_out_dir_is_refused_before_any_work(cli, tmp_path, case_file):
    with tmpfs(tmp_path / "ro", options="ro") as ro:
        cache = tmp_path / "cache"
        for command in (("detect", str(case_file)), ("batch", str(case_file.parent))):
            code, out, err = cli(*command, "--out-dir", str(ro / "out"), cache=cache)
            line = one_error_line(err)
            assert code == 2 and out == "" and "not writable" in line and str(ro / "out") in line
            assert not cache.exists()  # nothing computed


def test_cache_dir_that_is_a_file_is_refused(cli, tmp_path, case_file):
    (tmp_path / "cachefile").write_text("x")
    code, _, err = cli("detect", str(case_file), "--out-dir", str(tmp_path / "o"), cache=tmp_path / "cachefile")
    assert code == 2 and "is a file, not a folder" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_full_cache_disk_is_one_clear_error(cli, tmp_path, case_file):
    with tmpfs(tmp_path / "cache", size="16k") as cache:
        code, out, err = cli("detect", str(case_file), "--out-dir", str(tmp_path / "o"), cache=cache)
        line = one_error_line(err)
        assert code == 2 and out == ""
        assert "No space left on device" in line and str(cache) in line
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_read_only_cache_with_a_complete_bank_still_works(cli, tmp_path, case_file):
    with tmpfs(tmp_path / "cache", size="64m") as cache:
        code, _, err = cli("detect", str(case_file), "--out-dir", str(tmp_path / "o1"), cache=cache)
        assert code == 0, err
        remount_read_only(cache)
        code, _, err = cli("detect", str(case_file), "--out-dir", str(tmp_path / "o2"), cache=cache)
        assert code == 0, err
    a = read_image(tmp_path / "o1" / "case_heatmap.nii.gz").array
    b = read_image(tmp_path / "o2" / "case_heatmap.nii.gz").array
    assert np.array_equal(a, b)


def test_os_error_anywhere_in_a_command_isone_error_line(tmp_path, capsys, monkeypatch):
    cli_module = importlib.import_module("HiMatchADLib.cli.main")

    def failing(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "somewhere" / "file.npy"))

    monkeypatch.setattr(cli_module, "cmd_bank", failing)
    code = main(["--quiet", "bank", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert code == 2 and str(tmp_path / "somewhere" / "file.npy") in line and "free disk space" in line


# ------------------------------------------------------------------ 9. outputs among the inputs
def test_out_dir_that_is_the_input_folder_is_refused(cli, tmp_path, case_file, normals_dir):
    cache = tmp_path / "cache"
    before = sorted(p.name for p in case_file.parent.iterdir())
    for command in (("detect", str(case_file)), ("batch", str(case_file.parent))):
        code, _, err = cli(*command, "--out-dir", str(case_file.parent), cache=cache)
        assert code == 2 and "choose another --out-dir" in one_error_line(err)
    code, _, err = cli("detect", str(case_file), "--out-dir", str(normals_dir / "results"), cache=cache)
    assert code == 2 and "normal scans" in one_error_line(err)
    assert not (normals_dir / "results").exists()
    assert sorted(p.name for p in case_file.parent.iterdir()) == before and not cache.exists()


def test_dicom_folder_as_its_own_out_dir_is_refused(cli, tmp_path):
    d = _dicom_series(tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7.505", range(8))
    code, _, err = cli("detect", str(d), "--out-dir", str(d), cache=tmp_path / "cache")
    assert code == 2 and "is the input folder" in one_error_line(err)
    assert all(p.suffix == ".dcm" for p in d.iterdir())


# -------------------------------------------------------------------- 10. permissions of outputs
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_permissions_of_a_plain_open(tmp_path, umask):
    img = _random_volume((2, 8, 8))
    old = os.umask(umask)
    try:
        write_image(img.array, img.geometry, tmp_path / "x.nii.gz")
        atomic.write_text_atomic(tmp_path / "s.csv", "a\n")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("a")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == want
    for name in ("x.nii.gz", "s.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    atomic.write_text_atomic(tmp_path / "s.csv", "a\n")
    os.chmod(tmp_path / "s.csv", 0o640)
    atomic.write_text_atomic(tmp_path / "s.csv", "b\n")
    assert (tmp_path / "s.csv").stat().st_mode & 0o777 == 0o640 and (tmp_path / "s.csv").read_text() == "b\n"


# ------------------------------------------------------------------- 11. orphaned temporaries
def test_temporaries_of_killed_runs_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "out"
    script = (
        "import os, sys\n"
        "from HiMatchADLib.core.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(atomic.__file__).parents[2]))
    p = subprocess.run([sys.executable, "-c", script, str(out / "case_heatmap.nii.gz")], env=env)
    assert p.returncode == -9
    orphans = [q.name for q in out.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".case_heatmap.nii.gz.") and orphans[0].endswith(".tmp.nii.gz")
    # an old temporary without an owner (earlier versions), a fresh one of a live process, another file
    old = out / ".case_labelmap.nii.gz.abcd1234.tmp.nii.gz"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - atomic.STALE_TEMP_SECONDS - 60,) * 2)
    live = out / f".other.nii.gz.{os.getppid()}@{atomic._HOST}.zzzz9999.tmp.nii.gz"
    live.write_bytes(b"x")
    (out / ".keep.tmp").write_bytes(b"x")
    atomic._cleaned_folders.discard(os.path.abspath(out))
    atomic.write_text_atomic(out / "summary.csv", "a\n")
    assert sorted(q.name for q in out.iterdir()) == sorted([live.name, ".keep.tmp", "summary.csv"])


# --------------------------------------------------------------- 12. messages and progress bars
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_no_progress_bars_when_stderr_is_not_a_terminal():
    from HiMatchADLib.core.progress import tqdm_callback

    stream = io.StringIO()
    cb = tqdm_callback(stream=stream)
    for step in ("reading normals", "features"):
        for i in range(4):
            cb(step, i, 3)
    text = stream.getvalue()
    assert text == "reading normals\nfeatures\n"  # one line per step, no carriage returns


def test_error_after_a_progress_bar_starts_on_its_own_line(monkeypatch, tmp_path):
    cli_module = importlib.import_module("HiMatchADLib.cli.main")
    from HiMatchADLib.core.progress import tqdm_callback

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)

    held = []  # the callback outlives the command (a detector holds it), so its bar stays open

    def half_way(args):
        held.append(tqdm_callback())
        held[0]("building the normal bank", 3, 10)
        raise HiMatchADError("something the user can fix")

    monkeypatch.setattr(cli_module, "cmd_bank", half_way)
    assert main(["bank", str(tmp_path)]) == 2
    text = term.getvalue()
    assert "building the normal bank" in text  # a bar was drawn
    assert _render(text)[-1] == "error: something the user can fix"


def test_interrupted_starts_on_its_own_line(monkeypatch, tmp_path):
    cli_module = importlib.import_module("HiMatchADLib.cli.main")
    from HiMatchADLib.core.progress import tqdm_callback

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)

    held = []

    def half_way(args):
        held.append(tqdm_callback())
        held[0]("features", 1, 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "cmd_bank", half_way)
    assert main(["bank", str(tmp_path)]) == 130
    screen = _render(term.getvalue())
    assert screen[-1] == "interrupted"


def _render(text: str) -> list:
    """What a terminal shows: carriage return goes back to the line start, later text overwrites."""
    lines, cur = [], ""
    col = 0
    for ch in text:
        if ch == "\n":
            lines.append(cur.rstrip())
            cur, col = "", 0
        elif ch == "\r":
            col = 0
        else:
            cur = cur[:col] + ch + cur[col + 1 :]
            col += 1
    if cur:
        lines.append(cur.rstrip())
    return [ln for ln in lines if ln]


def test_outputs_of_this_tool_in_a_normal_folder_are_never_banked(fitted, normals_dir, lesion_case, tmp_path):
    """An earlier run's heatmap and labelmap left inside the folder of normal scans (say, an out-dir put
    there by hand) are recognised by their scores JSON and stay out of the bank."""
    import shutil

    from HiMatchADLib.io.discovery import list_images

    normals = tmp_path / "normals"
    shutil.copytree(normals_dir, normals)
    before = list_images(normals)
    det = fitted("knn")
    det.save(det.predict(lesion_case[0]), normals / "results")
    assert (normals / "results" / "case_heatmap.nii.gz").exists()
    with pytest.warns(UserWarning, match="outputs of this tool"):
        after = list_images(normals)
    assert [p.name for p in after] == [p.name for p in before]
    # A file that merely looks like an output (no scores JSON of ours beside it) is still an input.
    shutil.copy(normals / "results" / "case_heatmap.nii.gz", normals / "other_heatmap.nii.gz")
    with pytest.warns(UserWarning):
        assert normals / "other_heatmap.nii.gz" in list_images(normals)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "-inf", "nan"])
def test_the_detector_refuses_a_non_finite_threshold(value):
    """From Python too (the Slicer module and the worker pass settings straight to the detector)."""
    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.core.errors import HiMatchADError

    with pytest.raises(HiMatchADError, match="finite"):
        HiMatchDetector(threshold=value)


def _unscorable(folder: Path) -> list:
    """Volumes in which no slice has one model patch of foreground: a 1x1 in-plane column, an
    in-plane spacing of 0.02 mm (the head is a speck at the bank's pixel spacing), and an all-zero
    volume with one bright voxel."""
    from HiMatchADLib.evaluation.phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    column = np.linspace(100, 900, 64, dtype=np.float32).reshape(64, 1, 1)
    writers.write_image(column, Image.from_array(column).geometry, folder / "column.nii.gz")
    img, _ = make_phantom((8, 64, 64), seed=3)
    writers.write_image(img.array, Image.from_array(img.array, spacing=(0.02, 0.02, 2.0)).geometry, folder / "speck.nii.gz")
    dot = np.zeros((8, 64, 64), np.float32)
    dot[4, 30, 30] = 1000.0
    writers.write_image(dot, Image.from_array(dot).geometry, folder / "dot.nii.gz")
    return sorted(folder.glob("*.nii.gz"))


def test_nothing_scored_is_an_error_not_a_normal_result(cli, tmp_path):
    """No scorable slice used to end with exit 0, ``complete: true``, score NaN and 0 anomalous
    voxels (read as "no anomaly"). It is one ``error:`` line with exit 2 for ``detect``, and a
    ``failed`` row with the reason in a batch."""
    for path in _unscorable(tmp_path / "in"):
        code, _, err = cli("detect", str(path), "--out-dir", str(tmp_path / "o"))
        assert code == 2, (path.name, err)
        assert "could be scored" in one_error_line(err), err
        assert not list((tmp_path / "o").glob(f"{path.name.split('.')[0]}_scores.json"))
    code, out, err = cli("batch", str(tmp_path / "in"), "--out-dir", str(tmp_path / "b"))
    import csv

    rows = list(csv.DictReader((tmp_path / "b" / "summary.csv").open()))
    assert code == 1 and len(rows) == 3 and all(r["status"] == "failed" and "could be scored" in r["message"] for r in rows), rows


def test_a_result_says_how_many_slices_were_scored(cli, tmp_path, lesion_case):
    import json

    img = lesion_case[0]
    arr = img.array.copy()
    arr[:3] = 0.0  # three slices without foreground
    writers.write_image(arr, img.geometry, tmp_path / "part.nii.gz")
    code, _, err = cli("detect", str(tmp_path / "part.nii.gz"), "--out-dir", str(tmp_path / "o"))
    assert code == 0, err
    data = json.loads((tmp_path / "o" / "part_scores.json").read_text())
    assert data["slices"] == arr.shape[0] and data["slices_scored"] == sum(v is not None for v in data["slice_scores"])
    assert 0 < data["slices_scored"] <= arr.shape[0] - 3
