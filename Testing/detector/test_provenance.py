"""Every result records what made it (``"provenance"``), and older results stay readable."""

from __future__ import annotations

import json
import platform

import pytest

from HiMatchADLib.core.version import __version__
from HiMatchADLib.detector.detector import METHOD_REVISION
from HiMatchADLib.detector.provenance import library_versions, normals_digest
from HiMatchADLib.features.backbone import weights_digest
from HiMatchADLib.outputs.files import load_result


@pytest.fixture(scope="module")
def written(fitted, lesion_case, tmp_path_factory):
    img, _ = lesion_case
    det = fitted("knn")
    res = det.predict(img)
    out = tmp_path_factory.mktemp("prov")
    paths = det.save(res, out)
    return det, res, json.loads(paths["scores"].read_text(encoding="utf-8")), paths


def test_every_scores_json_records_its_provenance(written, tiny_model):
    det, res, data, _ = written
    p = data["provenance"]
    assert p["format"] == 1 and p["tool"] == "himatchad"
    assert p["version"] == __version__ and p["method_revision"] == METHOD_REVISION and p["method"] == "knn"
    libs = p["libraries"]
    assert libs["python"] == platform.python_version()
    assert set(libs) >= {"numpy", "torch", "transformers", "SimpleITK"} and all(libs[k] for k in ("numpy", "torch", "transformers", "SimpleITK"))
    assert "highdicom" not in libs  # only with DICOM outputs
    assert p["device"] == det.extractor.device == "cpu" and p["precision"] == det.precision
    assert p["model"]["id"] == tiny_model
    assert p["model"]["weights_digest"] == weights_digest(tiny_model) and p["model"]["weights_digest"].startswith("sha256:")
    assert p["model"]["licence"] is None  # a local folder is not in the catalogue
    assert p["model"]["random_weights"] is True  # the tests' model is a random stand-in
    bank = p["bank"]
    assert bank["digest"] == det.bank.manifest["content"]
    assert bank["normals_digest"] == normals_digest(det.bank.manifest["voxel_digests"]) and bank["normals_digest"].startswith("sha256:")
    assert bank["bank_file_digest"] is None and bank["files"] == 5 and bank["skipped"] == []
    assert p["feedback"] == []
    assert p["settings"] == data["settings"]
    assert p["input_digest"] is None  # an array input: no file


def test_the_input_digest_and_licence_are_recorded(fitted, lesion_case, tmp_path, monkeypatch):
    from HiMatchADLib.detector import provenance as prov
    from HiMatchADLib.features.models import model_info
    from HiMatchADLib.io.writers import write_image

    img, _ = lesion_case
    path = tmp_path / "case.nii.gz"
    write_image(img.array, img.geometry, path)
    det = fitted("knn")
    monkeypatch.setattr(det, "model", "facebook/dinov2-small")  # a catalogued id: its licence is recorded
    res = det.predict(path)
    assert res.provenance["input_digest"] == res.input_digest and res.input_digest["bytes"] == path.stat().st_size
    assert res.provenance["model"]["licence"] == model_info("facebook/dinov2-small").licence == "Apache-2.0"
    assert prov.library_versions(dicom=True)["highdicom"]


def test_provenance_is_read_back_and_old_results_stay_readable(written, tmp_path):
    _, res, data, paths = written
    back = load_result(paths["scores"])
    assert back.provenance == data["provenance"]
    old = dict(data)
    del old["provenance"]  # a result written before provenance was recorded
    paths["scores"].write_text(json.dumps(old), encoding="utf-8")
    try:
        back = load_result(paths["scores"])
        assert back.provenance == {} and "provenance" not in back.to_dict()
    finally:
        paths["scores"].write_text(json.dumps(data), encoding="utf-8")


def test_provenance_does_not_decide_whether_a_batch_case_is_done(fitted, lesion_case, tmp_path):
    """A batch resumed over results written before provenance existed, or on an installation with
    other library versions, does not recompute them for it."""
    from HiMatchADLib.batch import run_batch
    from HiMatchADLib.batch.summary import STATUS_DONE, STATUS_OK
    from HiMatchADLib.io.writers import write_image

    img, _ = lesion_case
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(img.array, img.geometry, inputs / "a.nii.gz")
    write_image(img.array[::-1].copy(), img.geometry, inputs / "b.nii.gz")
    det, out = fitted("knn"), tmp_path / "out"
    assert [r["status"] for r in run_batch(det, inputs, out, log=lambda m: None)] == [STATUS_OK, STATUS_OK]
    a, b = out / "a_scores.json", out / "b_scores.json"
    old = json.loads(a.read_text(encoding="utf-8"))
    assert old["provenance"]["input_digest"] == old["input_digest"]
    del old["provenance"]  # written before provenance was recorded
    a.write_text(json.dumps(old), encoding="utf-8")
    other = json.loads(b.read_text(encoding="utf-8"))
    other["provenance"]["libraries"]["torch"] = "0.0.1"  # another installation
    other["provenance"]["platform"] = "another machine"
    b.write_text(json.dumps(other), encoding="utf-8")
    rows = run_batch(det, inputs, out, log=lambda m: None)
    assert [r["status"] for r in rows] == [STATUS_DONE, STATUS_DONE], [r["message"] for r in rows]


def test_library_versions_lists_what_is_installed():
    v = library_versions()
    assert set(v) == {"python", "numpy", "torch", "transformers", "SimpleITK"}
    assert set(library_versions(dicom=True)) == set(v) | {"highdicom", "pydicom"}


def test_a_result_from_a_bank_file_records_the_files_digest(fitted, tiny_model, cache_dir, lesion_case, tmp_path, capsys):
    from HiMatchADLib import HiMatchDetector
    from HiMatchADLib.cli.main import main

    img, _ = lesion_case
    bank = fitted("knn").export_bank(tmp_path / "normals.himatchad-bank")
    det = HiMatchDetector(model=tiny_model, method="knn", resolution=128, cache_dir=cache_dir).load_bank(bank)
    from HiMatchADLib.io.writers import write_image

    write_image(img.array, img.geometry, tmp_path / "case.nii.gz")
    res = det.predict(tmp_path / "case.nii.gz")
    assert res.provenance["bank"]["bank_file_digest"] == det.bank_file_digest and det.bank_file_digest.startswith("sha256:")
    assert res.provenance["bank"]["bank_file"] == str(bank) and res.provenance["bank"]["folder"] is None
    paths = det.save(res, tmp_path / "out")

    def reproduce(*extra):
        code = main(["--quiet", "reproduce", str(paths["scores"]), *map(str, extra)])
        return code, {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in capsys.readouterr().out.splitlines()}

    code, lines = reproduce("--rerun", "--cache-dir", cache_dir)
    assert lines["bank"] == f"same (the bank file {bank})" and lines["weights digest"] == "same"
    assert lines["heatmap"] == "same (max abs difference 0)"
    assert code == 0 and lines["input"] == "same"
    bank.rename(tmp_path / "moved.himatchad-bank")
    code, lines = reproduce()
    assert code == 1 and lines["bank"] == f"cannot check: the bank file {bank} is not here; give it with --bank"
    other = fitted("knn").export_bank(tmp_path / "other.himatchad-bank", keep_names=True)  # the same bank, another file
    code, lines = reproduce("--bank", other)
    assert code == 1 and lines["bank"].startswith(f"differs: {det.bank_file_digest} -> sha256:")
