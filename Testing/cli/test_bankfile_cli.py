"""``himatchad bank export`` then ``detect --bank`` / ``batch --bank``, and a broken bank file."""

from __future__ import annotations

import json

import numpy as np

from conftest import RESOLUTION
from HiMatchADLib.cli.main import main
from HiMatchADLib.io.readers import read_image
from HiMatchADLib.io.writers import write_image


def test_bank_export_then_detect_with_the_bank(tiny_model, normals_dir, cache_dir, lesion_case, tmp_path, capsys):
    img, _ = lesion_case
    case = write_image(img.array, img.geometry, tmp_path / "in" / "case.nii.gz")
    common = ["--model", tiny_model, "--resolution", str(RESOLUTION), "--k", "4", "--cache-dir", str(cache_dir)]
    bank = tmp_path / "brain.himatchad-bank"
    assert main(["--quiet", "bank", "export", str(normals_dir), "--out", str(bank), *common]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bank_file"] == str(bank) and info["bytes"] == bank.stat().st_size and info["names"] == "anonymised"
    # the bank gives the model, method and settings: none repeated
    assert main(["--quiet", "detect", str(case), "--bank", str(bank), "--out-dir", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c2")]) == 0
    assert main(["--quiet", "detect", str(case), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "n"), *common]) == 0
    a = read_image(tmp_path / "b" / "case_heatmap.nii.gz").array
    b = read_image(tmp_path / "n" / "case_heatmap.nii.gz").array
    assert np.array_equal(a, b)
    assert main(["--quiet", "batch", str(tmp_path / "in"), "--bank", str(bank), "--out-dir", str(tmp_path / "bt"), "--cache-dir", str(tmp_path / "c2")]) == 0
    capsys.readouterr()
    # an option given explicitly must agree with the bank, even at its default value (448 here)
    assert main(["--quiet", "detect", str(case), "--bank", str(bank), "--out-dir", str(tmp_path / "x"), "--resolution", "448"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resolution 128 (asked: 448)" in err[0]
    assert np.array_equal(read_image(tmp_path / "bt" / "case_heatmap.nii.gz").array, a)


def test_detect_with_a_broken_bank_file_is_one_error_line(lesion_case, tmp_path, capsys):
    img, _ = lesion_case
    case = write_image(img.array, img.geometry, tmp_path / "case.nii.gz")
    broken = tmp_path / "broken.himatchad-bank"
    broken.write_bytes(b"PK\x03\x04 not really")
    capsys.readouterr()
    assert main(["--quiet", "detect", str(case), "--bank", str(broken), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "broken.himatchad-bank" in err[0]


def test_normals_and_bank_are_exclusive(lesion_case, tmp_path, capsys):
    import pytest

    for extra in ([], ["--normals", "n", "--bank", "b"]):
        with pytest.raises(SystemExit) as exc:
            main(["--quiet", "detect", "x.nii.gz", "--out-dir", str(tmp_path / "o"), *extra])
        assert exc.value.code == 2
    assert "--bank" in capsys.readouterr().err


def test_bank_alone_on_a_folder_named_export_is_still_the_bank_command():
    from HiMatchADLib.cli.main import _route_bank_export

    assert _route_bank_export(["--quiet", "bank", "export", "N", "--out", "f"]) == ["--quiet", "bank export", "N", "--out", "f"]
    assert _route_bank_export(["bank", "export"]) == ["bank", "export"]
    assert _route_bank_export(["detect", "bank", "export"]) == ["detect", "bank", "export"]


def test_batch_with_a_bank_file_refuses_the_ray_engine(fitted, lesion_case, tmp_path, capsys):
    bank = fitted("himatch").export_bank(tmp_path / "b.himatchad-bank")
    img, _ = lesion_case
    write_image(img.array, img.geometry, tmp_path / "in" / "case.nii.gz")
    capsys.readouterr()
    assert main(["--quiet", "batch", str(tmp_path / "in"), "--bank", str(bank), "--out-dir", str(tmp_path / "o"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine ray needs --normals" in err[0]
