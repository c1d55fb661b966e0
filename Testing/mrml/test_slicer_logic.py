"""The Slicer module's logic (``HiMatchAD.py``) on Slicer's real MRML (``slicer-core``) with a real
worker process.

``HiMatchAD.py`` imports Slicer's Qt-based modules at import time; here they are replaced by minimal
stand-ins (no widget is built), while MRML, ``slicer.util``, the worker and the library are the real
ones. The worker runs with this interpreter instead of ``PythonSlicer``.
"""

from __future__ import annotations

import csv
import importlib
import os
import pathlib
import sys
import threading
import time
import types
import unittest

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")
vtk = pytest.importorskip("vtk")

from conftest import RESOLUTION  # noqa: E402
from HiMatchADLib import Cancelled, mrml  # noqa: E402
from HiMatchADLib.core.errors import HiMatchADError  # noqa: E402
from HiMatchADLib.io.writers import write_image  # noqa: E402
from test_mrml_export import slicer_modules  # noqa: E402,F401  (fixture: slicer.modules for slicer.util)

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 300


def _stub_modules() -> dict:
    qt = types.ModuleType("qt")
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls=None: cls
    pnw.WithinRange = lambda low, high: ("WithinRange", low, high)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    return {"qt": qt, "slicer.parameterNodeWrapper": pnw, "slicer.ScriptedLoadableModule": slm}


class FakeApp:
    """The two things the logic asks of ``slicer.app``."""

    events = 0

    def testingEnabled(self):
        return True

    def processEvents(self):
        FakeApp.events += 1


@pytest.fixture(scope="module")
def HiMatchAD():
    with pytest.MonkeyPatch.context() as mp:
        for name, module in _stub_modules().items():
            if name not in sys.modules:
                mp.setitem(sys.modules, name, module)
        mp.setattr(slicer, "app", FakeApp(), raising=False)
        mp.setattr(slicer.util, "startupEnvironment", lambda: dict(os.environ), raising=False)
        mp.syspath_prepend(str(ROOT))
        sys.modules.pop("HiMatchAD", None)
        module = importlib.import_module("HiMatchAD")
        mp.setattr(module.HiMatchADLogic, "pythonSlicerExecutable", staticmethod(lambda: sys.executable))
        yield module
        sys.modules.pop("HiMatchAD", None)


@pytest.fixture
def scene(monkeypatch):
    s = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", s, raising=False)
    yield s
    s.Clear(1)


@pytest.fixture(scope="module")
def settings(tiny_model, cache_dir, fitted):
    fitted("himatch")  # the bank is in the shared cache before the worker asks for it
    return {"model": tiny_model, "k": 4, "resolution": RESOLUTION, "cache_dir": str(cache_dir)}


@pytest.fixture(scope="module")
def logic(HiMatchAD):
    lg = HiMatchAD.HiMatchADLogic()
    yield lg
    lg.shutdown()


def add_case(scene, lesion_case, name="case"):
    img, _ = lesion_case
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    m = np.eye(4)
    m[:3, :3] = np.array([[-0.9, 0.3, 0.0], [-0.3, -0.9, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, 1.0, 2.5])
    m[:3, 3] = (4.0, -8.0, 30.0)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))
    slicer.util.updateVolumeFromArray(node, img.array.astype(np.int16))
    return node


def test_dependencies_are_found_and_a_missing_one_is_named(HiMatchAD, logic, monkeypatch):
    logic.ensureDependencies(interactive=False)
    assert logic.dependenciesReady
    from HiMatchADLib.mrml import install as dependencies

    monkeypatch.setattr(dependencies, "missing", lambda reqs: ["torch>=2.1"])
    with pytest.raises(RuntimeError, match="torch>=2.1"):  # testing mode: nothing is installed
        logic.ensureDependencies(interactive=False)
    assert not logic.dependenciesReady


def test_process_runs_in_the_worker_and_reuses_it(HiMatchAD, logic, scene, settings, normals_dir, lesion_case):
    node = add_case(scene, lesion_case)
    messages = []
    out = logic.process(node, normals_dir, progress=lambda m, d, t: messages.append(m), **settings)
    pid = logic.lastRunInfo["workerPid"]
    assert pid != os.getpid() and messages
    assert np.allclose(mrml.ijk_to_ras_matrix(out.heatmap), mrml.ijk_to_ras_matrix(node))
    assert out.segmentation.GetSegmentation().GetSegmentIdBySegmentName("Anomaly") == out.segment_id
    assert int(mrml.segment_to_array(out.segmentation, node).sum()) == out.anomalous_voxels

    again = logic.process(node, normals_dir, **settings)
    assert logic.lastRunInfo["detectorReused"] and logic.lastRunInfo["workerPid"] == pid
    assert not any("bank" in m.lower() for m in logic.lastRunInfo["messages"])
    assert (again.heatmap.GetID(), again.segmentation.GetID()) == (out.heatmap.GetID(), out.segmentation.GetID())
    assert logic.setThreshold(float(out.result.heatmap.max()) + 1.0) == 0
    assert "mL" in HiMatchAD.HiMatchADLogic.anomalousSizeText(again)
    scored, slices = again.slices_scored
    assert scored == int(np.isfinite(again.result.slice_scores).sum()) and slices == len(again.result.slice_scores)
    text = HiMatchAD.HiMatchADLogic.scoreText(again)
    assert text.startswith(f"{again.volume_score:.4g}")
    assert (f"({scored} of {slices} slices scored)" in text) == (scored < slices)


def test_inputs_are_checked_and_cancel_leaves_the_scene(HiMatchAD, logic, scene, settings, normals_dir, lesion_case, tmp_path):
    node = add_case(scene, lesion_case)
    with pytest.raises(ValueError):
        logic.process(node, tmp_path / "missing", **settings)
    with pytest.raises(ValueError):
        logic.process(None, normals_dir, **settings)
    before = scene.GetNumberOfNodes()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        logic.process(node, normals_dir, cancelEvent=cancel, **dict(settings, cache_dir=str(tmp_path / "c")))
    assert scene.GetNumberOfNodes() == before and not logic.isRunning

    logic.startProcessing(node, normals_dir, **dict(settings, cache_dir=str(tmp_path / "c")))
    assert logic.isRunning
    with pytest.raises(HiMatchADError, match="already running"):
        logic.startProcessing(node, normals_dir, **settings)
    assert logic.cancel() and not logic.isRunning
    assert logic.pollJob() == [] and scene.GetNumberOfNodes() == before

    # A scene close while running: the job is cancelled, nothing is imported later.
    logic.startProcessing(node, normals_dir, **settings)
    assert logic.discardJob() is True and not logic.isRunning
    assert logic.pollJob() == [] and scene.GetNumberOfNodes() == before


def test_a_worker_error_reaches_the_panel_and_the_worker_goes_on(HiMatchAD, logic, scene, settings, normals_dir, lesion_case):
    node = add_case(scene, lesion_case)
    logic.startProcessing(node, normals_dir, **dict(settings, method="nonsense"))
    deadline = time.monotonic() + TIMEOUT
    events = []
    while not events and time.monotonic() < deadline:
        events = [e for e in logic.pollJob() if e[0] != "progress"]
        time.sleep(0.02)
    (kind, job, message), = events
    assert kind == "error" and "unknown method" in message
    assert not logic.isRunning
    out = logic.process(node, normals_dir, **settings)  # the panel is usable again
    assert out.heatmap is not None


def read_summary(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_process_folder_is_the_command_line_batch(HiMatchAD, logic, settings, normals_dir, lesion_case, tmp_path):
    from HiMatchADLib.cli.main import main

    img, _ = lesion_case
    incoming = tmp_path / "incoming"
    write_image(img.array, img.geometry, incoming / "a.nii.gz")
    write_image(img.array[:, ::-1].copy(), img.geometry, incoming / "site2" / "b.nrrd")
    (incoming / "broken.nii.gz").write_bytes(b"not an image")

    rows = logic.processFolder(incoming, normals_dir, tmp_path / "from-slicer", method="himatch", **settings)
    assert {r["case"]: r["status"] for r in rows} == {"a.nii.gz": "ok", "broken.nii.gz": "failed", "site2/b.nrrd": "ok"}
    assert (tmp_path / "from-slicer" / "site2" / "b_heatmap.nii.gz").exists()

    argv = ["--quiet", "batch", str(incoming), "--normals", str(normals_dir), "--out-dir", str(tmp_path / "from-cli"),
            "--model", settings["model"], "--k", "4", "--resolution", str(RESOLUTION), "--cache-dir", settings["cache_dir"],
            "--no-overview"]  # the panel's batch writes no overview pictures (Slicer shows the results; no matplotlib there)
    assert main(argv) == 1  # one case failed
    slicer_rows = read_summary(tmp_path / "from-slicer" / "summary.csv")
    cli_rows = read_summary(tmp_path / "from-cli" / "summary.csv")
    assert slicer_rows == cli_rows
    for row in (r for r in slicer_rows if r["status"] == "ok"):  # the same numbers in both result sets
        a = mrml_free_heatmap(tmp_path / "from-slicer" / row["heatmap"])
        b = mrml_free_heatmap(tmp_path / "from-cli" / row["heatmap"])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # Resumable, and in the background with progress.
    job = logic.processFolder(incoming, normals_dir, tmp_path / "from-slicer", background=True, method="himatch", **settings)
    assert logic.isRunning and job.kind == "batch"
    event = logic.runner.wait(timeout=TIMEOUT)
    assert event["counts"]["done earlier"] == 2


def mrml_free_heatmap(path):
    from HiMatchADLib.io.readers import read_image

    return read_image(path).array


@pytest.mark.slow
def test_module_self_test(HiMatchAD, scene, monkeypatch):
    """The module's own self-test (what Slicer's CTest runs), on slicer-core, through the worker."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    test = HiMatchAD.HiMatchADTest("test_HiMatchAD1")
    test.setUp()
    test.test_HiMatchAD1()


def test_a_rerun_over_a_hand_edited_segment_asks_first(HiMatchAD, logic, scene, slicer_modules, settings, normals_dir, lesion_case):  # noqa: F811 (the imported fixture)
    from HiMatchADLib.mrml.segments import SegmentEditedError

    node = add_case(scene, lesion_case)
    out = logic.process(node, normals_dir, **settings)
    edited = mrml.segment_to_array(out.segmentation, node)
    edited[0] = 1  # the user paints a whole slice
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, out.segmentation, out.segment_id, node)
    with pytest.raises(SegmentEditedError):
        logic.process(node, normals_dir, **settings)
    assert np.array_equal(mrml.segment_to_array(out.segmentation, node), edited)  # nothing changed
    with pytest.raises(SegmentEditedError):
        logic.setThreshold(out.threshold * 2, out)
    again = logic.process(node, normals_dir, ifEdited="keep", **settings)
    kept = mrml.segment_to_array(again.segmentation, node, "Anomaly (edited)")
    assert np.array_equal(kept, edited)
    assert np.array_equal(mrml.segment_to_array(again.segmentation, node), again.result.labelmap)


def test_example_data_is_written_where_the_user_sees_it_and_loaded_with_its_geometry(HiMatchAD, logic, scene, tmp_path):
    from HiMatchADLib.io.readers import read_image

    folder = tmp_path / "HiMatchAD-example"
    case, lesion, normals = logic.loadExampleData(folder, scene=scene, normals=2, shape=(8, 32, 32))
    assert pathlib.Path(normals) == folder / "normals" and len(os.listdir(normals)) == 2
    assert (folder / "README.txt").read_text(encoding="utf-8").startswith("HiMatch-AD example data")
    assert case.GetScene() is scene and lesion.IsA("vtkMRMLLabelMapVolumeNode")
    assert mrml.is_input_candidate(case) and not mrml.is_input_candidate(lesion)
    image = read_image(folder / "query.nii.gz")
    assert np.array_equal(slicer.util.arrayFromVolume(case), image.array)
    assert mrml.volume_geometry(case).same_as(image.geometry)  # the file's placement
    mask = slicer.util.arrayFromVolume(lesion) > 0
    assert mask.any() and mrml.volume_geometry(lesion).same_as(image.geometry)
    assert case.GetStorageNode().GetFileName() == str(folder / "query.nii.gz")  # Save shows where it came from
    # the lesion is where the phantom put it: brighter than the tissue around it
    values = slicer.util.arrayFromVolume(case)
    assert values[mask].mean() > values[~mask & (values > 0)].mean()
    # a second click writes the same data again (nothing left over from the first)
    case2, _, _ = logic.loadExampleData(folder, scene=scene, normals=2, shape=(8, 32, 32))
    assert np.array_equal(slicer.util.arrayFromVolume(case2), values)
    assert HiMatchAD.HiMatchADLogic.defaultExampleFolder().endswith("HiMatchAD-example")


def test_a_volume_file_mrml_cannot_read_leaves_no_node(scene, tmp_path):
    from HiMatchADLib.mrml.examples import load_volume_file

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a volume")
    before = scene.GetNumberOfNodes()
    with pytest.raises(HiMatchADError, match="could not be read"):
        load_volume_file(scene, bad, "broken")
    with pytest.raises(HiMatchADError, match="not found"):
        load_volume_file(scene, tmp_path / "missing.nii.gz", "missing")
    assert scene.GetNumberOfNodes() == before


def test_the_example_is_registered_with_sample_data(HiMatchAD, monkeypatch):
    """Sample Data lists the example under the module's category; its button runs the module's
    example loader (no download: no URIs)."""
    registered, calls = {}, []

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataCategory(category, title=None):
            registered["category"] = (category, title)

        @staticmethod
        def registerCustomSampleDataSource(**kwargs):
            registered["source"] = kwargs

    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    monkeypatch.setattr(HiMatchAD.HiMatchADLogic, "loadExampleForModule", lambda self: calls.append(self) or ["case", "lesion"])
    HiMatchAD.registerSampleData()
    source = registered["source"]
    assert registered["category"][0] == source["category"] == HiMatchAD.SAMPLE_DATA_CATEGORY
    assert source["uris"] == [] and source["fileNames"] == []
    assert os.path.isfile(source["thumbnailFileName"])
    assert source["customDownloader"](object()) == ["case", "lesion"] and len(calls) == 1


def test_nodes_added_one_by_one_or_by_a_scene_import_are_looked_at_once(HiMatchAD, scene, monkeypatch):
    """The input selector hides the module's outputs; adding N volumes looks at N nodes (not N²/2),
    and a scene import looks at the scene once, when it ends."""
    looked = []
    real = mrml.is_supported_input
    monkeypatch.setattr(mrml, "is_supported_input", lambda node: looked.append(node.GetID()) or real(node))

    class Proxy:
        hiddenNodeIDs = ()

    proxy = Proxy()
    widget = HiMatchAD.HiMatchADWidget()
    widget.ui = types.SimpleNamespace(inputSelector=types.SimpleNamespace(sortFilterProxyModel=lambda: proxy))
    outputs = []
    for i in range(30):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"v{i}")
        if i % 3 == 0:  # an output of the module (its role set before the event, as here)
            node.SetAttribute(mrml.ROLE_ATTRIBUTE, mrml.ROLE_HEATMAP)
            outputs.append(node.GetID())
        widget.onNodeAdded(scene, None, node)
    assert len(looked) == 30
    assert list(proxy.hiddenNodeIDs) == outputs
    widget.onNodeAdded(scene, None, scene.AddNewNodeByClass("vtkMRMLModelNode"))  # not a volume: not looked at
    assert len(looked) == 30

    looked.clear()
    scene.StartState(scene.ImportState)
    for i in range(20):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"imported{i}")
        node.SetAttribute(mrml.ROLE_ATTRIBUTE, mrml.ROLE_HEATMAP)
        widget.onNodeAdded(scene, None, node)
    assert looked == []  # nothing while importing
    scene.EndState(scene.ImportState)
    widget.onSceneImported()
    assert len(looked) == 50 and len(proxy.hiddenNodeIDs) == 10 + 20


def test_every_logic_object_shares_one_worker_and_the_panel_hears_of_background_runs(
        HiMatchAD, logic, settings, normals_dir, lesion_case, tmp_path, monkeypatch):
    """A logic made in the Python console uses the panel's worker (one model loaded, not two), and a
    batch started with ``background=True`` reaches the panel's listener, which follows it."""
    console = HiMatchAD.HiMatchADLogic()
    assert console.runner is logic.runner
    heard = []
    monkeypatch.setattr(HiMatchAD.HiMatchADLogic, "jobListeners", [heard.append])
    cases = tmp_path / "cases"
    cases.mkdir()
    img, _ = lesion_case
    write_image(img.array, img.geometry, cases / "case1.nii.gz")
    job = console.processFolder(cases, normals_dir, tmp_path / "out", background=True, **settings)
    assert heard == [job] and job.kind == "batch" and logic.isRunning
    event = logic.runner.wait(timeout=TIMEOUT)  # what the panel's timer does, without Qt
    assert job.finished and job.event is event and os.path.isfile(event["summary"])


def test_the_self_test_under_ctest_without_requirements_installs_nothing(HiMatchAD, scene, monkeypatch):
    """On a build machine (testing mode, PyTorch absent) the self-test checks the example data and
    skips the detection: nothing is installed, no worker is started."""
    from HiMatchADLib.mrml import install

    monkeypatch.setattr(install, "missing", lambda reqs: ["torch>=2.1"])
    monkeypatch.setattr(install, "ensure_requirements", lambda *a, **k: pytest.fail("the self-test tried to install"))
    monkeypatch.setattr(HiMatchAD.HiMatchADLogic, "_sharedRunner", None)
    test = HiMatchAD.HiMatchADTest("test_HiMatchAD1")
    test.setUp()
    test.test_HiMatchAD1()
    assert HiMatchAD.HiMatchADLogic._sharedRunner is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2  # the example case and its lesion labelmap


class FakeCombo:
    """What the panel asks of a QComboBox."""

    def __init__(self):
        self.items, self.currentIndex = [], -1

    @property
    def count(self):
        return len(self.items)

    def addItem(self, label, data):
        self.items.append((label, data))

    def removeItem(self, i):
        del self.items[i]

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, i):
        return self.items[i][1]

    def blockSignals(self, blocked):
        return False


def test_the_model_selector_lists_the_known_models_with_licence_and_keeps_one_extra_item(HiMatchAD, tmp_path):
    from HiMatchADLib.features.models import KNOWN_MODELS

    choices = HiMatchAD.HiMatchADLogic.modelChoices()
    assert [c[1] for c in choices] == [m.id for m in KNOWN_MODELS]
    for (label, _), m in zip(choices, KNOWN_MODELS):
        assert m.licence in label and (("approval" in label) == m.gated) and (("no login" in label) == (not m.gated))
    gated = HiMatchAD.HiMatchADLogic.modelInfoText(HiMatchAD.DEFAULT_MODEL)
    assert "https://huggingface.co/" + HiMatchAD.DEFAULT_MODEL in gated and "DINOv2 ViT-S/14" in gated
    assert "no login" in HiMatchAD.HiMatchADLogic.modelInfoText("facebook/dinov2-small")

    widget = HiMatchAD.HiMatchADWidget()
    widget.ui = types.SimpleNamespace(modelComboBox=FakeCombo(), modelInfoLabel=types.SimpleNamespace(text=""))
    for label, model_id in choices:
        widget.ui.modelComboBox.addItem(label, model_id)
    widget._showModel("facebook/dinov2-base")
    assert widget.ui.modelComboBox.currentIndex == 3 and widget.ui.modelComboBox.count == 4
    folder = tmp_path / "my-dinov3"
    folder.mkdir()
    widget._showModel(str(folder))
    assert widget.ui.modelComboBox.count == 5 and widget.ui.modelComboBox.currentIndex == 4
    assert widget.ui.modelComboBox.items[4] == ("Local folder: my-dinov3", str(folder))
    assert "folder on this computer" in widget.ui.modelInfoLabel.text
    widget._showModel("someone/dinov2-finetuned")  # another Hub id replaces the extra item
    assert widget.ui.modelComboBox.count == 5 and widget.ui.modelComboBox.items[4][0] == "Other: someone/dinov2-finetuned"
    widget._showModel(HiMatchAD.DEFAULT_MODEL)
    assert widget.ui.modelComboBox.currentIndex == 0


def test_the_token_status_never_shows_the_token(HiMatchAD, monkeypatch, tmp_path):
    from HiMatchADLib.features.models import hub_token_status, save_hub_token

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    text = HiMatchAD.HiMatchADLogic.tokenStatusText
    assert "No token" in text(hub_token_status())
    save_hub_token("hf_" + "x" * 34)
    stored = text(hub_token_status())
    assert "stored" in stored and "hf_x" not in stored
    monkeypatch.setenv("HF_TOKEN", "hf_" + "y" * 34)
    assert "HF_TOKEN" in text(hub_token_status()) and "hf_y" not in text(hub_token_status())


def test_the_worker_watches_slicer_and_lists_its_devices(HiMatchAD, logic):
    """The worker is told Slicer's own process id (not the launcher's) and answers which devices
    torch finds; the panel's Device list offers every device the library accepts."""
    from HiMatchADLib.features.backbone import resolve_device

    assert logic.runner.client.parent_pid == os.getpid()
    devices = logic.workerDevices()
    assert devices and devices[0]["kind"] == "cpu"
    assert "The worker found: " in HiMatchAD.HiMatchADLogic.devicesText(devices)
    for member in HiMatchAD.Device:  # each choice is one resolve_device knows (mps/cuda may be absent here)
        try:
            resolve_device(member.value)
        except HiMatchADError as exc:
            assert "not available" in str(exc) or "no " in str(exc).lower(), str(exc)


def test_the_progress_bar_says_mb_for_a_model_download(HiMatchAD):
    from HiMatchADLib.features.backbone import download_message

    text = HiMatchAD.HiMatchADLogic.progressText
    assert text(download_message("facebook/dinov2-small"), 12, 88) == "Downloading model facebook/dinov2-small 12/88 MB"
    assert text("Building normal bank", 3, 40) == "Building normal bank 3/40"
    assert text("Starting", 0, 0) == "Starting"
