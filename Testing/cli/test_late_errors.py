"""Faults that used to fail only after the whole computation, or named the wrong file: output names
near the file-system limit, an output path that is a folder, a dangling or looping --out-dir."""

from __future__ import annotations

import csv
import os

import pytest

from conftest import one_error_line, remount_read_only, tmpfs
from HiMatchADLib.core.atomic import atomic_path, name_max
from HiMatchADLib.evaluation.phantom import make_phantom
from HiMatchADLib.io.writers import write_image


def _case(path, seed=1):
    img, _ = make_phantom((16, 64, 64), seed=seed, lesion=True)
    write_image(img.array, img.geometry, path)
    return path


def test_a_name_that_fits_fits_as_a_temporary_too(tmp_path):
    limit = name_max(tmp_path)
    name = "n" * (limit - len(".nii.gz")) + ".nii.gz"  # exactly the limit
    with atomic_path(tmp_path / name) as tmp:
        assert len(os.fsencode(tmp.name)) <= limit and tmp.name.endswith(".tmp.nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / name).read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left


def test_an_output_name_beyond_the_limit_is_refused_before_any_work(cli, tmp_path):
    limit = name_max(tmp_path)
    stem = "c" * (limit - len("_labelmap.nii.gz") + 1)  # its input name fits, its labelmap's does not
    inp = _case(tmp_path / "in" / f"{stem[: limit - len('.nii.gz')]}.nii.gz")
    code, _, err = cli("detect", str(inp), "--out-dir", str(tmp_path / "out"), cache=tmp_path / "never")
    assert code == 2
    assert "more than the file system" in one_error_line(err) and "rename the input" in err
    assert not (tmp_path / "never").exists()  # refused before the bank was built
    # In a batch it is that case's failed row; the other case is done.
    _case(tmp_path / "in" / "short.nii.gz", seed=2)
    code, _, err = cli("batch", str(tmp_path / "in"), "--out-dir", str(tmp_path / "b"))
    with open(tmp_path / "b" / "summary.csv", newline="") as f:
        rows = {r["case"][:5]: r for r in csv.DictReader(f)}
    assert rows["short"]["status"] == "ok"
    assert rows["ccccc"]["status"] == "failed" and "more than the file system" in rows["ccccc"]["message"]


def test_an_output_path_that_is_a_folder_is_named_up_front(cli, tmp_path):
    inp = _case(tmp_path / "case.nii.gz")
    out = tmp_path / "out"
    (out / "case_labelmap.nii.gz").mkdir(parents=True)
    code, _, err = cli("detect", str(inp), "--out-dir", str(out), cache=tmp_path / "never")
    line = one_error_line(err)
    assert code == 2 and str(out / "case_labelmap.nii.gz") in line and ".tmp" not in line
    assert not (tmp_path / "never").exists()


def test_a_failed_rename_names_the_final_path_not_the_temporary(tmp_path):
    (tmp_path / "busy.json").mkdir()
    with pytest.raises(OSError) as info:
        with atomic_path(tmp_path / "busy.json") as tmp:
            tmp.write_text("{}")
    assert info.value.filename == str(tmp_path / "busy.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_dangling_or_looping_out_dir_is_refused_before_any_work(cli, tmp_path, kind):
    inp = _case(tmp_path / "case.nii.gz")
    link = tmp_path / "out"
    if kind == "dangling":
        link.symlink_to(tmp_path / "gone" / "away")
    else:
        (tmp_path / "loop_b").symlink_to(link)
        link.symlink_to(tmp_path / "loop_b")
    code, _, err = cli("detect", str(inp), "--out-dir", str(link / "sub"), cache=tmp_path / "never")
    line = one_error_line(err)
    assert code == 2 and str(link) in line
    assert ("does not exist" if kind == "dangling" else "symbolic link loop") in line
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------- one direction tolerance, input to output
def _direction(shear: float = 0.0, stretch: float = 1.0):
    import numpy as np

    d = np.eye(3)
    d[0, 1] = shear  # the y axis leans towards x
    d[:, 2] *= stretch
    return d


def test_a_direction_accepted_on_input_is_accepted_when_written(tmp_path):
    import numpy as np

    from HiMatchADLib.core.geometry import DIRECTION_TOLERANCE, Image

    assert 5e-5 < DIRECTION_TOLERANCE
    arr = np.random.default_rng(3).random((4, 16, 16), dtype=np.float32)
    img = Image.from_array(arr, spacing=(0.7, 0.9, 2.5), origin=(1, 2, 3), direction=_direction(shear=5e-5))
    write_image(img.array, img.geometry, tmp_path / "x.nii.gz")  # NIfTI makes it orthonormal: within the tolerance
    assert (tmp_path / "x.nii.gz").is_file()


def test_a_sheared_input_is_refused_up_front_naming_it(cli, tmp_path):
    import numpy as np

    from HiMatchADLib.core.geometry import Image

    img, _ = make_phantom((16, 64, 64), seed=1)
    for name, d in (("sheared", _direction(shear=1e-3)), ("stretched", _direction(stretch=1.001))):
        bad = Image.from_array(img.array, spacing=(1, 1, 2), direction=d)
        path = tmp_path / "in" / f"{name}.mha"  # MetaImage keeps the matrix as it is
        write_image(bad.array, bad.geometry, path)
        code, _, err = cli("detect", str(path), "--out-dir", str(tmp_path / "o"), cache=tmp_path / "never")
        line = one_error_line(err)
        assert code == 2 and str(path) in line
        assert ("not perpendicular" if name == "sheared" else "not orthonormal") in line and "90.00 degrees" not in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "never").exists()
    assert np.isfinite(img.array).all()


def test_a_slightly_sheared_input_is_analysed_and_its_outputs_written(cli, tmp_path):
    from HiMatchADLib.core.geometry import Image

    img, _ = make_phantom((16, 64, 64), seed=1, lesion=True)
    off = Image.from_array(img.array, spacing=(1, 1, 2), direction=_direction(shear=5e-5))
    write_image(off.array, off.geometry, tmp_path / "in" / "case.mha")
    code, _, err = cli("detect", str(tmp_path / "in" / "case.mha"), "--out-dir", str(tmp_path / "o"))
    assert code == 0, err
    assert (tmp_path / "o" / "case_scores.json").is_file()


# ------------------------------------------------------------------ a cache that cannot be written
@pytest.fixture()
def no_model(monkeypatch):
    """Loading the model fails the test: what is refused must be refused before."""
    from HiMatchADLib.detector.detector import HiMatchDetector

    def refuse(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(HiMatchDetector, "_ensure_extractor", refuse)


def test_a_cache_that_cannot_be_created_is_refused_before_the_model_loads(cli, tmp_path, no_model):
    inp = _case(tmp_path / "case.nii.gz")
    with tmpfs(tmp_path / "ro", size="64m", options="ro") as ro:
        for command in (("detect", str(inp)), ("batch", str(tmp_path))):
            code, out, err = cli(*command, "--out-dir", str(tmp_path / "o"), cache=ro / "cache")
            line = one_error_line(err)
            assert code == 2 and out == "" and str(ro / "cache") in line and "cannot be created" in line


def _detect(tiny_model, normals, inp, out, cache, *extra):
    """``himatchad detect`` with the tiny model and the given method options (the ``cli`` fixture
    fixes ``--method knn``); returns (status, stderr)."""
    from conftest import RESOLUTION
    from HiMatchADLib.cli.main import main

    code = main(["--quiet", "detect", str(inp), "--out-dir", str(out), "--normals", str(normals), "--model", tiny_model,
                 "--resolution", str(RESOLUTION), "--cache-dir", str(cache), *extra])
    return code


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_is_refused_before_the_model_loads(tiny_model, normals_dir, tmp_path, no_model, capsys):
    inp = _case(tmp_path / "in" / "case.nii.gz")
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        for method in ("knn", "dpmm", "himatch"):
            code = _detect(tiny_model, normals_dir, inp, tmp_path / "o", cache, "--method", method)
            line = one_error_line(capsys.readouterr().err)
            assert code == 2 and str(cache) in line and "not writable" in line
    finally:
        cache.chmod(0o755)


def test_a_read_only_cache_serves_only_what_it_holds(tiny_model, normals_dir, tmp_path, monkeypatch, capsys):
    """A read-only cache with a bank calibrated for one method serves that method; another method
    (whose calibration or DPMM fit would be computed and then refused when saved) is refused before
    the model loads."""
    from HiMatchADLib.detector.detector import HiMatchDetector

    inp = _case(tmp_path / "in" / "case.nii.gz")
    with tmpfs(tmp_path / "cache", size="64m") as cache:
        assert _detect(tiny_model, normals_dir, inp, tmp_path / "o1", cache, "--method", "knn") == 0, capsys.readouterr().err
        remount_read_only(cache)
        assert _detect(tiny_model, normals_dir, inp, tmp_path / "o2", cache, "--method", "knn") == 0, capsys.readouterr().err
        loads = []

        def refuse(self):
            loads.append(self.method)
            raise AssertionError("the model was loaded")

        monkeypatch.setattr(HiMatchDetector, "_ensure_extractor", refuse)
        for extra in (("--method", "dpmm"), ("--method", "knn", "--knn-index", "hnsw"), ("--method", "knn", "--rebuild")):
            capsys.readouterr()
            code = _detect(tiny_model, normals_dir, inp, tmp_path / "o3", cache, *extra)
            line = one_error_line(capsys.readouterr().err)
            assert code == 2 and str(cache) in line and "not writable" in line, extra
        assert loads == [] and not (tmp_path / "o3").exists()


def test_a_cache_that_is_a_file_is_refused_for_root_too(normals_dir, tmp_path, monkeypatch, no_model, capsys):
    inp = _case(tmp_path / "case.nii.gz")
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("HIMATCHAD_CACHE", str(tmp_path / "cachefile"))
    from HiMatchADLib.cli.main import main

    code = main(["--quiet", "detect", str(inp), "--out-dir", str(tmp_path / "o"), "--normals", str(normals_dir)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and str(tmp_path / "cachefile") in line and "is a file" in line
    # The worker refuses it before a detector is made.
    from HiMatchADLib.worker.server import Worker

    events, made = [], []

    def factory(cache_dir=None):
        made.append(cache_dir)

    worker = Worker(events.append, detector_factory=factory)
    worker.handle({"id": "1", "cmd": "detect", "input": str(inp), "normals": str(normals_dir), "out_dir": str(tmp_path / "w"),
                   "settings": {"cache_dir": str(tmp_path / "cachefile" / "sub")}})
    assert made == [] and events[-1]["event"] == "error" and str(tmp_path / "cachefile") in events[-1]["message"]


def test_the_library_names_a_sheared_input_by_its_path(tiny_model, tmp_path):
    """A batch row and the Python API name the sheared file, not a placeholder output name."""
    import numpy as np

    from HiMatchADLib import HiMatchADError, HiMatchDetector
    from HiMatchADLib.core.geometry import Geometry

    img, _ = make_phantom((8, 32, 32), seed=3)
    g = img.geometry
    d = np.array(g.direction, float)
    d[:, 1] = [0.2, np.sqrt(1 - 0.04), 0.0]  # a unit column 11.5 degrees off: NRRD stores it, NIfTI could not
    path = tmp_path / "sheared_scan.nrrd"
    write_image(img.array, Geometry(g.size, g.spacing, g.origin, d), path)
    with pytest.raises(HiMatchADError, match=f"the axes of {path} are not perpendicular"):
        HiMatchDetector(model=tiny_model).check_query(path)
