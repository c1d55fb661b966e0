"""The panel's bank files and provenance (``HiMatchAD.py`` on ``slicer-core``, Qt stand-ins):

- a run with a bank file sends ``"bank"`` and only the settings the file leaves free; exactly one of
  a normal folder and a bank file; a file that is not a bank file is refused with one message;
- what a bank file holds, read without torch;
- what made a result (its provenance) and the verdict of ``himatchad reproduce``, run in a child
  process, for a matching and a mismatching result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from HiMatchADLib import mrml  # noqa: E402
from HiMatchADLib.bank.bankfile import BankFile  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError  # noqa: E402
from HiMatchADLib.core.version import __version__  # noqa: E402
from HiMatchADLib.mrml.jobs import BANK_FREE_SETTINGS, DetectionRunner, bank_file_info  # noqa: E402
from test_slicer_logic import HiMatchAD, add_case, logic, scene, settings  # noqa: E402,F401  (fixtures)

TIMEOUT = 300


@pytest.fixture(scope="module")
def bank_file(fitted, tmp_path_factory):
    """A real bank file of the tiny model's himatch bank (k 4, resolution 128), names anonymised."""
    return fitted("himatch").export_bank(tmp_path_factory.mktemp("bankfile") / "brain.himatchad-bank")


class RecordingClient:
    """A worker client that records the requests it is given and answers nothing."""

    python = sys.executable

    def __init__(self):
        self.sent = []

    def send(self, request):
        self.sent.append(json.loads(json.dumps(request)))
        return f"r{len(self.sent)}"

    def poll(self):
        return []

    def cancel(self):
        return []

    def shutdown(self, timeout=None):
        pass

    def environment(self):
        return dict(os.environ)


def panel(HiMatchAD, **values):  # noqa: F811
    """The parameter node's values, as the panel holds them."""
    pn = dict(
        normalsSource=HiMatchAD.NormalsSource.BANK, bankFile="", normalsFolder="", model=HiMatchAD.DEFAULT_MODEL,
        method=HiMatchAD.Method.KNN, k=16, modality=HiMatchAD.Modality.CT, device=HiMatchAD.Device.CPU, resolution=896,
        targetFpr=0.05, batchSize=4, inputVolume=None,
    )
    pn.update(values)
    return types.SimpleNamespace(**pn)


@pytest.fixture
def recording(HiMatchAD, monkeypatch):  # noqa: F811
    """Every logic object's runner sends to a RecordingClient."""
    client = RecordingClient()
    monkeypatch.setattr(HiMatchAD.HiMatchADLogic, "_sharedRunner", DetectionRunner(client))
    return client


def test_a_run_with_a_bank_file_sends_the_bank_and_only_the_free_settings(HiMatchAD, scene, lesion_case, bank_file, normals_dir, recording, tiny_model, tmp_path):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic
    lg = Logic()
    node = add_case(scene, lesion_case)
    pn = panel(HiMatchAD, bankFile=str(bank_file), normalsFolder=str(normals_dir))
    # method kNN, K 16, CT, 896 px, FPR 0.05 are in the panel but fixed by the file: not sent
    assert Logic.referenceFromParameterNode(pn) == {"bank": str(bank_file)}
    assert Logic.settingsFromParameterNode(pn) == {"device": "cpu", "batch_size": 4}
    job = lg.startProcessing(node, **Logic.referenceFromParameterNode(pn), **Logic.settingsFromParameterNode(pn))
    request = recording.sent[-1]
    assert request["cmd"] == "detect" and request["bank"] == str(bank_file) and "normals" not in request
    assert request["settings"] == {"device": "cpu", "batch_size": 4}
    assert set(request["settings"]) <= set(BANK_FREE_SETTINGS)
    assert job.bank == str(bank_file) and job.normals is None
    assert lg.cancel()

    # The model goes only when the user chose one other than the default and the bank's own.
    assert "model" not in Logic.settingsFromParameterNode(panel(HiMatchAD, bankFile=str(bank_file), model=tiny_model))
    copy = str(tmp_path / "same-weights-elsewhere")
    assert Logic.settingsFromParameterNode(panel(HiMatchAD, bankFile=str(bank_file), model=copy)) == {
        "device": "cpu", "batch_size": 4, "model": copy}

    # With the folder, every setting of the panel goes, and no bank.
    folder = panel(HiMatchAD, normalsSource=HiMatchAD.NormalsSource.FOLDER, bankFile=str(bank_file), normalsFolder=str(normals_dir))
    assert Logic.referenceFromParameterNode(folder) == {"normalsFolder": str(normals_dir)}
    lg.startProcessing(node, **Logic.referenceFromParameterNode(folder), **Logic.settingsFromParameterNode(folder))
    request = recording.sent[-1]
    assert request["normals"] == str(normals_dir) and "bank" not in request
    assert request["settings"]["method"] == "knn" and request["settings"]["k"] == 16 and request["settings"]["resolution"] == 896
    assert lg.cancel()

    # The console API: with a bank, only the settings given go (a batch too).
    job = lg.processFolder(tmp_path, None, tmp_path / "out", background=True, bank=bank_file, device="cpu", threshold=2.5)
    request = recording.sent[-1]
    assert request["cmd"] == "batch" and request["bank"] == str(bank_file) and "normals" not in request
    assert request["settings"] == {"device": "cpu", "threshold": 2.5} and job.bank == str(bank_file)
    assert lg.cancel()


def test_exactly_one_of_a_normal_folder_and_a_bank_file(HiMatchAD, scene, lesion_case, bank_file, normals_dir, recording, tmp_path):  # noqa: F811
    runner = HiMatchAD.HiMatchADLogic().runner
    node = add_case(scene, lesion_case)
    with pytest.raises(HiMatchADError) as both:
        runner.start_detection(node, str(normals_dir), {}, bank=str(bank_file))
    assert str(both.value) == "give either a folder of normal scans or a bank file (made by 'himatchad bank export'), not both"
    with pytest.raises(HiMatchADError, match="^give a folder of normal scans or a bank file"):
        runner.start_detection(node, None, {})
    with pytest.raises(HiMatchADError, match="not both"):
        runner.start_batch(str(tmp_path), str(normals_dir), str(tmp_path / "out"), {}, bank=str(bank_file))
    with pytest.raises(HiMatchADError, match="does not exist"):
        runner.start_batch(str(tmp_path), str(tmp_path / "nowhere"), str(tmp_path / "out"), {})
    assert recording.sent == [] and not runner.busy  # nothing was sent


def test_a_file_that_is_not_a_bank_file_is_refused_with_one_message(HiMatchAD, scene, lesion_case, recording, tmp_path):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic
    notes = tmp_path / "notes.txt"
    notes.write_text("not a bank")
    broken = tmp_path / "broken.himatchad-bank"
    broken.write_bytes(b"PK\x03\x04 not really")
    problems = {
        notes: f"{notes} is not a HiMatch-AD bank file",
        broken: f"{broken} is not a readable HiMatch-AD bank file",
        tmp_path / "missing.himatchad-bank": "bank file not found",
        tmp_path: "is not a file",
    }
    for path, start in problems.items():
        problem = Logic.bankFileProblem(path)
        assert problem is not None and start in problem and "\n" not in problem, problem
        assert Logic.bankPanelText(path) == problem
    node = add_case(scene, lesion_case)
    with pytest.raises(HiMatchADError, match="is not a HiMatch-AD bank file"):
        Logic().startProcessing(node, bank=notes, device="cpu")
    assert recording.sent == []

    # The panel: the Detect button says why, and the bank row shows the same message.
    widget = HiMatchAD.HiMatchADWidget()
    widget.logic = Logic()
    widget._parameterNode = panel(HiMatchAD, bankFile=str(notes), inputVolume=node)
    assert widget._cannotApplyReason() == Logic.bankFileProblem(notes)
    widget._parameterNode.bankFile = ""
    assert widget._cannotApplyReason() == "Select a normal bank file"


class Widget:
    def __init__(self):
        self.visible, self.enabled, self.text = True, True, ""

    def setVisible(self, visible):
        self.visible = bool(visible)


def test_the_bank_info_is_read_from_the_file_without_torch(HiMatchAD, bank_file, fitted, tiny_model, tmp_path):  # noqa: F811
    code = (
        "import json, sys\n"
        "from HiMatchADLib.mrml.jobs import bank_file_info\n"
        "info = bank_file_info(sys.argv[1])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps(info))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bank_file)], capture_output=True, text=True, timeout=120,
                         cwd=str(HiMatchAD.MODULE_DIR))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    det = fitted("himatch")
    assert info["model"] == tiny_model and info["method"] == "himatch" and info["anonymised"] is True
    assert info["slices"] == det.bank.n_slices and info["subjects"] == len(det.subjects) and info["resolution"] == 128
    assert info["digest"] == BankFile.open(bank_file).digest and info["tool_version"] == __version__
    text = HiMatchAD.HiMatchADLogic.bankInfoText(info)
    assert f"Model: {tiny_model}" in text and f"himatch; {det.bank.n_slices} normal slices of {len(det.subjects)} subjects" in text
    assert "Names anonymised" in text

    kept = det.export_bank(tmp_path / "kept.himatchad-bank", keep_names=True)
    assert bank_file_info(kept)["anonymised"] is False
    assert "Names of the normal scans kept" in HiMatchAD.HiMatchADLogic.bankPanelText(kept)

    # The panel shows the bank row, its info, and disables the settings the file fixes.
    widget = HiMatchAD.HiMatchADWidget()
    widget.logic = HiMatchAD.HiMatchADLogic()
    names = ("normalsPathLineEdit", "exampleDataButton", "bankPathLineEdit", "bankInfoLabel") + widget.BANK_FIXED_WIDGETS
    widget.ui = types.SimpleNamespace(**{n: Widget() for n in names})
    widget._parameterNode = panel(HiMatchAD, bankFile=str(bank_file))
    widget._updateReferenceWidgets()
    ui = widget.ui
    assert ui.bankPathLineEdit.visible and ui.bankInfoLabel.visible and not ui.normalsPathLineEdit.visible
    assert ui.bankInfoLabel.text == text
    assert not any(getattr(ui, n).enabled for n in widget.BANK_FIXED_WIDGETS)
    widget._parameterNode.normalsSource = HiMatchAD.NormalsSource.FOLDER
    widget._updateReferenceWidgets()
    assert ui.normalsPathLineEdit.visible and not ui.bankPathLineEdit.visible and ui.bankInfoLabel.text == ""
    assert all(getattr(ui, n).enabled for n in widget.BANK_FIXED_WIDGETS)


def test_the_provenance_text_of_a_real_scores_json(HiMatchAD, fitted, lesion_case, normals_dir, tiny_model, tmp_path):  # noqa: F811
    from HiMatchADLib.outputs.files import load_result, save_result

    img, _ = lesion_case
    paths = save_result(fitted("himatch").predict(img), tmp_path / "out")
    result = load_result(paths["scores"])
    prov = json.loads(paths["scores"].read_text())["provenance"]
    text = HiMatchAD.HiMatchADLogic.provenanceText(result)
    lines = text.splitlines()
    assert lines[0] == f"HiMatch-AD {__version__}, method himatch (revision {prov['method_revision']})"
    assert lines[1].startswith(f"Model: {tiny_model} (weights {prov['model']['weights_digest'][:19]}…)")
    assert prov["model"]["random_weights"] is True and "random stand-in weights" in lines[1]
    assert lines[2] == f"Device: cpu, precision {prov['precision']}"
    assert lines[3].startswith(f"Normal bank: {normals_dir}, 5 scans, {prov['bank']['slices']} slices")
    assert HiMatchAD.HiMatchADLogic.provenanceText(dataclasses.replace(result, provenance={})).startswith("Not recorded")


def wait_for(check):
    report = check.wait(timeout=TIMEOUT)
    assert not check.running and not check.workdir.exists()  # its temporary files are removed
    return report


def test_a_bank_run_in_the_worker_then_its_provenance_and_reproducibility(HiMatchAD, logic, scene, lesion_case, bank_file, fitted, settings, normals_dir, tmp_path):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic
    node = add_case(scene, lesion_case)
    pn = panel(HiMatchAD, bankFile=str(bank_file), device=HiMatchAD.Device.AUTO, batchSize=8)
    free = Logic.settingsFromParameterNode(pn)
    out = logic.process(node, **Logic.referenceFromParameterNode(pn), **free, cache_dir=str(tmp_path / "cache"))
    assert logic.lastRunInfo["bank"] == str(bank_file) and logic.lastRunInfo["normalsFolder"] is None
    expected = fitted("himatch").predict(mrml.image_from_volume_node(node))  # the folder's result
    np.testing.assert_allclose(out.result.heatmap, expected.heatmap, rtol=1e-4, atol=1e-5)
    bank = out.result.provenance["bank"]
    assert bank["bank_file_digest"] == bank_file_info(bank_file)["digest"] and bank["bank_file"] == str(bank_file)
    text = Logic.provenanceText(out.result)
    assert f"Normal bank: the bank file {bank_file} ({bank['bank_file_digest'][:19]}…)" in text

    report = wait_for(logic.startReproduceCheck(out))
    items = {i["item"]: i for i in report["items"]}
    assert report["reproducible"] == "yes", Logic.reproduceText(report)
    assert items["bank"]["status"] == "same" and items["input"]["status"] == "same"
    assert Logic.reproduceText(report).startswith("Reproducible here: yes")


def test_the_reproducibility_verdict_for_a_matching_and_a_mismatching_result(HiMatchAD, logic, scene, lesion_case, settings, normals_dir):  # noqa: F811
    Logic = HiMatchAD.HiMatchADLogic
    node = add_case(scene, lesion_case)
    out = logic.process(node, normals_dir, **settings)

    check = logic.startReproduceCheck()  # the last result
    with pytest.raises(RuntimeError, match="running"):
        logic.startReproduceCheck()
    report = wait_for(check)
    assert report["reproducible"] == "yes", Logic.reproduceText(report)
    assert Logic.reproduceText(report).splitlines()[0] == "Reproducible here: yes (everything that decides the numbers is the same)"

    # Other weights recorded, and the volume changed since: both differ, and both are said.
    prov = out.result.provenance
    other = dataclasses.replace(out.result, provenance={**prov, "model": {**prov["model"], "weights_digest": "sha256:" + "0" * 64}})
    changed = slicer.util.arrayFromVolume(node)
    changed[0] += 1
    slicer.util.arrayFromVolumeModified(node)
    report = wait_for(logic.startReproduceCheck(mrml.ResultNodes(other, node)))
    assert report["reproducible"] == "no"
    text = Logic.reproduceText(report)
    assert text.splitlines()[0] == "Reproducible here: no (something that decides the numbers differs)"
    assert f"weights digest: differs: sha256:{'0' * 64} -> {prov['model']['weights_digest']}" in text
    assert "\ninput: differs: " in text

    # A result the worker's JSON recorded no provenance for cannot be checked; a failed check says why.
    with pytest.raises(HiMatchADError, match="records no provenance"):
        logic.startReproduceCheck(mrml.ResultNodes(dataclasses.replace(out.result, provenance={}), node))
    assert Logic.reproduceText({"error": "cannot read it"}) == "The reproducibility check failed: cannot read it"
