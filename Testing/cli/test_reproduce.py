"""``himatchad reproduce SCORES_JSON``: one line per item, exit 0 when everything that decides
the numbers is the same, 1 when something differs or cannot be checked, 2 for an unreadable JSON."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from HiMatchADLib.cli.main import main
from HiMatchADLib.io.writers import write_image


@pytest.fixture(scope="module")
def case_file(lesion_case, tmp_path_factory):
    img, _ = lesion_case
    path = tmp_path_factory.mktemp("in") / "case.nii.gz"
    write_image(img.array, img.geometry, path)
    return path


@pytest.fixture()
def scores(cli, case_file, tmp_path):
    code, _, err = cli("detect", str(case_file), "--out-dir", str(tmp_path / "out"))
    assert code == 0, err
    return tmp_path / "out" / "case_scores.json"


def reproduce(capsys, *argv):
    code = main(["--quiet", "reproduce", *map(str, argv)])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    lines = out.out.splitlines()
    return code, {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in lines}, out


def edit(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


DECIDING = ("method revision", "weights digest", "device", "precision", "settings", "bank", "input")


def test_a_result_on_the_same_installation_is_the_same(scores, capsys):
    code, items, out = reproduce(capsys, scores)
    assert code == 0, out.out
    for item in DECIDING + ("tool version", "python", "numpy", "torch", "transformers", "SimpleITK", "model"):
        assert items[item] == "same", f"{item}: {items.get(item)}"
    assert items["reproducible"].startswith("yes")


def test_a_changed_setting_is_named_and_exits_1(scores, capsys):
    edit(scores, lambda d: d["settings"].update(sigma=2.0))  # the settings a rerun would use, not those of the run
    code, items, _ = reproduce(capsys, scores)
    assert code == 1
    assert items["settings"] == "differs: sigma 4.0 -> 2.0"
    assert items["reproducible"] == "no (differs: settings)"
    assert items["weights digest"] == "same" and items["bank"] == "same"


def test_other_weights_are_named_and_exit_1(scores, capsys):
    edit(scores, lambda d: d["provenance"]["model"].update(weights_digest="sha256:" + "0" * 64))
    code, items, _ = reproduce(capsys, scores)
    assert code == 1
    assert items["weights digest"].startswith("differs: sha256:" + "0" * 64 + " -> sha256:")
    assert items["reproducible"] == "no (differs: weights digest)"


def test_another_device_or_version_is_reported(scores, capsys):
    def change(d):
        d["provenance"].update(device="cuda:1", version="0.0.1")
        d["provenance"]["libraries"]["torch"] = "1.0.0"

    edit(scores, change)
    code, items, _ = reproduce(capsys, scores, "--device", "cpu")
    assert code == 1
    assert items["device"].startswith("differs: cuda:1 -> cpu")
    assert items["tool version"].startswith("differs: 0.0.1 -> ") and items["tool version"].endswith("(informational)")
    assert items["torch"].startswith("differs: 1.0.0 -> ") and items["torch"].endswith("(informational)")
    assert items["reproducible"] == "no (differs: device)"  # versions alone do not decide


def test_an_old_result_without_provenance_says_what_cannot_be_checked(scores, capsys):
    def old(d):
        del d["provenance"]
        d.pop("input_digest", None)

    edit(scores, old)
    code, items, _ = reproduce(capsys, scores)
    assert code == 1
    assert items["libraries"].startswith("cannot check: not recorded")
    assert items["weights digest"].startswith("cannot check: the result records no weights digest (written before provenance")
    assert items["bank"].startswith("cannot check: the result records no bank digest")
    assert items["input"] == "cannot check: the result records no digest of its input"
    assert items["settings"] == "same" and items["method revision"] == "same" and items["device"] == "same"
    assert items["reproducible"].startswith("not confirmed (cannot check: weights digest, bank, input)")


def test_the_normals_and_input_must_be_reachable(scores, case_file, normals_dir, tmp_path, capsys):
    moved = tmp_path / "elsewhere.nii.gz"
    shutil.copy(case_file, moved)
    edit(scores, lambda d: (d.update(input=str(tmp_path / "gone.nii.gz")), d["provenance"]["bank"].update(folder=str(tmp_path / "gone"))))
    edit(scores, lambda d: d["settings"].update(normals=str(tmp_path / "gone")))
    code, items, _ = reproduce(capsys, scores)
    assert code == 1
    assert items["bank"] == f"cannot check: the normal folder {tmp_path / 'gone'} is not here; give it with --normals"
    assert items["input"] == f"cannot check: the input {tmp_path / 'gone.nii.gz'} is not here; give it with --input"
    code, items, _ = reproduce(capsys, scores, "--normals", normals_dir, "--input", moved)
    assert code == 0 and items["bank"] == "same" and items["input"] == "same"


def test_copied_normals_are_the_same_images_and_changed_ones_differ(scores, normals_dir, case_file, tmp_path, capsys):
    copy = tmp_path / "normals-copy"
    shutil.copytree(normals_dir, copy)  # new modification times: another content fingerprint
    for f in copy.iterdir():
        os.utime(f, ns=(1, 1))
    code, items, _ = reproduce(capsys, scores, "--normals", copy)
    assert code == 0 and items["bank"] == "same (the same normal images; their file times or paths differ)"
    shutil.copy(case_file, copy / "normal_0.nii.gz")  # another image under a normal's name
    code, items, _ = reproduce(capsys, scores, "--normals", copy)
    assert code == 1 and items["bank"].startswith("differs: sha256:") and items["bank"].endswith(f"(the normal images in {copy} differ)")


def test_a_changed_input_differs(scores, lesion_case, tmp_path, capsys):
    img, _ = lesion_case
    other = tmp_path / "other.nii.gz"
    write_image(img.array * 1.01, img.geometry, other)
    code, items, _ = reproduce(capsys, scores, "--input", other)
    assert code == 1 and items["input"].startswith("differs: ")


def test_rerun_compares_the_maps(scores, tiny_model, cache_dir, capsys):
    code, items, out = reproduce(capsys, scores, "--rerun", "--cache-dir", cache_dir)
    assert code == 0, out.out
    assert items["heatmap"] == "same (max abs difference 0)" and items["slice scores"] == "same (max abs difference 0)"


def test_json_output(scores, capsys):
    code = main(["--quiet", "reproduce", str(scores), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["reproducible"] == "yes"
    assert {i["item"] for i in data["items"]} >= set(DECIDING)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", None])
def test_an_unreadable_json_exits_2(tmp_path, capsys, content):
    path = tmp_path / "x_scores.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code = main(["--quiet", "reproduce", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
