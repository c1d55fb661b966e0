"""3D Slicer module for HiMatch-AD: training-free anomaly detection against a folder of normal scans.

The module only connects Slicer to the ``HiMatchADLib`` package: the computation is done by
``HiMatchADLib.HiMatchDetector`` and every conversion between MRML nodes and the library's arrays is
done by ``HiMatchADLib.mrml``. Library imports are deferred until the Python dependencies have been
checked (and installed, with the user's consent) by :meth:`HiMatchADLogic.ensureDependencies`.
"""

import csv
import enum
import importlib
import io
import logging
import os
import pathlib
import queue
import threading
import time
import traceback
from collections import OrderedDict
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLPlotChartNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer without the translation helpers

    def _(text):
        return text


DEFAULT_MODEL = "facebook/dinov3-vits16-pretrain-lvd1689m"
MINIMUM_TORCH_VERSION = "2.1"
NORMALS_FOLDER_SETTING = "HiMatchAD/NormalsFolder"
REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

#
# HiMatchAD
#


class HiMatchAD(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and Help & Acknowledgement section."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("HiMatch-AD Anomaly Detection")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["HiMatch-AD contributors"]
        self.parent.helpText = _(
            "Training-free anomaly detection: the selected volume is compared, slice by slice, with a folder "
            "of normal scans through frozen DINOv3 features. The result is an anomaly heatmap (shown over the "
            "volume), an editable 'Anomaly' segment, and a score per slice with the normal references that "
            "were retrieved. The same detection is available from the Python console through "
            "<code>HiMatchAD.HiMatchADLogic()</code>. See the README of the extension for details."
        )
        self.parent.acknowledgementText = _(
            "HiMatch-AD builds on the HiMatch-AD, AnomalyDINO and AnomalyDINO-DPMM methods and on Meta's "
            "DINOv3 models. It is not a medical device: results are for research use only."
        )


#
# Parameter node
#


class Modality(enum.Enum):
    AUTO = "auto"
    MRI = "mri"
    CT = "ct"
    OCT = "oct"

    def label(self):
        return {"auto": _("Auto"), "mri": "MRI", "ct": "CT", "oct": "OCT"}[self.value]


class Method(enum.Enum):
    HIMATCH = "himatch"
    KNN = "knn"
    DPMM = "dpmm"

    def label(self):
        return {"himatch": "HiMatch", "knn": _("kNN (AnomalyDINO)"), "dpmm": _("DPMM (AnomalyDINO-DPMM)")}[self.value]


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("Auto"), "cpu": "CPU", "cuda": "CUDA"}[self.value]


@parameterNodeWrapper
class HiMatchADParameterNode:
    """State of the module, saved with the scene.

    inputVolume - volume to examine.
    normalsFolder - folder of normal scans (the reference "bank").
    modality, model, method, k, device - detector settings (see HiMatchADLib.HiMatchDetector).
    resolution, targetFpr, batchSize - advanced detector settings.
    heatmapOpacity - foreground opacity of the heatmap in slice views.
    threshold - current threshold of the anomaly segment (heatmap units).
    resultVolume, heatmapVolume, labelmapVolume, segmentation, scoreTable, scoreChart - outputs of the last run.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    normalsFolder: str = ""
    modality: Modality = Modality.AUTO
    model: str = DEFAULT_MODEL
    method: Method = Method.HIMATCH
    k: Annotated[int, WithinRange(1, 64)] = 8
    device: Device = Device.AUTO
    resolution: Annotated[int, WithinRange(64, 2048)] = 448
    targetFpr: Annotated[float, WithinRange(0.0001, 0.5)] = 0.01
    batchSize: Annotated[int, WithinRange(1, 256)] = 8
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: float = 0.0
    resultVolume: vtkMRMLScalarVolumeNode
    heatmapVolume: vtkMRMLScalarVolumeNode
    labelmapVolume: vtkMRMLLabelMapVolumeNode
    segmentation: vtkMRMLSegmentationNode
    scoreTable: vtkMRMLTableNode
    scoreChart: vtkMRMLPlotChartNode


#
# HiMatchADWidget
#


class HiMatchADWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: inputs, "Detect anomalies" with progress and cancel, result display controls."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._pollTimer = None
        self._thresholdTimer = None
        self._sliceNode = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HiMatchAD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = HiMatchADLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.normalsPathLineEdit.connect("currentPathChanged(QString)", self.onNormalsFolderChanged)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.jumpButton.connect("clicked(bool)", self.onJumpToMostAnomalousSlice)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.editSegmentationButton.connect("clicked(bool)", self.onEditSegmentation)

        self.ui.supportsTableWidget.setColumnCount(3)
        self.ui.supportsTableWidget.setHorizontalHeaderLabels([_("Normal scan"), _("Slice"), _("Similarity")])
        self.ui.supportsTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)

        # Progress of the background computation is polled from the main thread.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPollJob)
        # Threshold changes are applied when the slider rests for a moment (the segment is rebuilt).
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(150)
        self._thresholdTimer.connect("timeout()", self.applyThreshold)

        self._setRunning(False)
        self.initializeParameterNode()
        self._observeSliceView()

    def cleanup(self) -> None:
        if self._job is not None:
            self.logic.cancel()
        for timer in (self._pollTimer, self._thresholdTimer):
            if timer is not None:
                timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._observeSliceView()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self.logic.cancel()
        self.logic.forgetResult()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.GetAttribute("HiMatchAD.Role"):
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.normalsFolder:
            # The folder of normal scans is remembered across sessions.
            self._parameterNode.normalsFolder = str(qt.QSettings().value(NORMALS_FOLDER_SETTING, "") or "")

    def setParameterNode(self, inputParameterNode: Optional[HiMatchADParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are connected here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            # The MRML node is observed, not the wrapper, so that no reference to old wrappers is kept.
            self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        if pn is not None and self.ui.normalsPathLineEdit.currentPath != pn.normalsFolder:
            wasBlocked = self.ui.normalsPathLineEdit.blockSignals(True)
            self.ui.normalsPathLineEdit.currentPath = pn.normalsFolder
            self.ui.normalsPathLineEdit.blockSignals(wasBlocked)
        self._checkCanApply()
        self._updateResultWidgets()

    def onNormalsFolderChanged(self, path) -> None:
        if self._parameterNode is not None and self._parameterNode.normalsFolder != path:
            self._parameterNode.normalsFolder = path

    def onBrowseModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Folder of a DINOv3 model (config.json and weights)"))
        if folder and self._parameterNode is not None:
            self._parameterNode.model = folder

    def _checkCanApply(self) -> None:
        reason = self._cannotApplyReason()
        self.ui.applyButton.enabled = reason is None and self._job is None
        if self._job is not None:
            self.ui.applyButton.toolTip = _("A detection is running")
        elif reason:
            self.ui.applyButton.toolTip = reason
        else:
            self.ui.applyButton.toolTip = _("Compare the volume with the normal scans and show where it differs")

    def _cannotApplyReason(self) -> Optional[str]:
        pn = self._parameterNode
        if pn is None:
            return _("No parameter node")
        if not pn.inputVolume or pn.inputVolume.GetImageData() is None:
            return _("Select an input volume")
        if not pn.normalsFolder:
            return _("Select the folder of normal scans")
        if not os.path.isdir(pn.normalsFolder):
            return _("The folder of normal scans does not exist: {path}").format(path=pn.normalsFolder)
        if not pn.model.strip():
            return _("Enter a model (Hugging Face id or local folder)")
        return None

    # ------------------------------------------------------------------ running
    def onApplyButton(self) -> None:
        if self._job is not None:
            return
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the anomaly detection."), waitCursor=True):
            self.ui.normalsPathLineEdit.addCurrentPathToHistory()
            qt.QSettings().setValue(NORMALS_FOLDER_SETTING, pn.normalsFolder)
            self._job = self.logic.startProcessing(pn.inputVolume, pn.normalsFolder, **self.logic.settingsFromParameterNode(pn))
            self._setRunning(True)
            self.ui.statusLabel.text = _("Starting...")
            self._pollTimer.start()

    def onCancelButton(self) -> None:
        if self._job is None:
            return
        self.logic.cancel()
        self.ui.cancelButton.enabled = False
        self.ui.cancelButton.text = _("Cancelling...")

    def _setRunning(self, running: bool) -> None:
        self.ui.progressBar.setVisible(running)
        self.ui.cancelButton.setVisible(running)
        self.ui.cancelButton.enabled = running
        self.ui.cancelButton.text = _("Cancel")
        if running:
            self.ui.progressBar.setRange(0, 0)  # busy until the first progress report
            self.ui.progressBar.format = _("Starting...")
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self._checkCanApply()

    def onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        for kind, payload in self.logic.pollJob(job):
            if kind == "progress":
                message, done, total = payload
                self.ui.progressBar.setRange(0, max(int(total), 1))
                self.ui.progressBar.setValue(min(int(done), max(int(total), 1)))
                text = f"{message} {done}/{total}"
                self.ui.progressBar.format = text.replace("%", "%%")
                self.ui.statusLabel.text = text
            elif kind == "done":
                self._endJob()
                self._showResult(job, payload)
            elif kind == "cancelled":
                self._endJob()
                self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
            elif kind == "error":
                self._endJob()
                error, details = payload
                self.ui.statusLabel.text = _("Failed: {message}").format(message=str(error))
                slicer.util.errorDisplay(_("Anomaly detection failed:\n{message}").format(message=str(error)), detailedText=details)

    def _endJob(self) -> None:
        self._pollTimer.stop()
        self._job = None
        self._setRunning(False)

    def _showResult(self, job, result) -> None:
        pn = self._parameterNode
        volumeNode = slicer.mrmlScene.GetNodeByID(job.volumeNodeID)
        if volumeNode is None:
            self.ui.statusLabel.text = _("The input volume was removed while the detection ran; the result was discarded.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to show the results."), waitCursor=True):
            nodes = self.logic.importResult(result, volumeNode, heatmapOpacity=pn.heatmapOpacity if pn else 0.5)
            if pn is not None:
                with slicer.util.NodeModify(pn.parameterNode):
                    pn.resultVolume = volumeNode
                    pn.heatmapVolume = nodes.heatmap
                    pn.labelmapVolume = nodes.labelmap
                    pn.segmentation = nodes.segmentation
                    pn.scoreTable = nodes.table
                    pn.scoreChart = nodes.chart
                    pn.threshold = float(result.threshold)
            self._configureThresholdSlider(result)
            slicer.modules.plots.logic().ShowChartInLayout(nodes.chart)
            info = self.logic.lastRunInfo
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s ({reuse}).").format(
                seconds=info.get("totalSeconds", 0.0),
                reuse=_("model and normal bank reused") if info.get("detectorReused") else _("model loaded"),
            )
            for warning in result.warnings:
                logging.warning(f"HiMatch-AD: {warning}")
            self._updateResultWidgets()
            self.onSliceViewModified()

    # ------------------------------------------------------------------ results
    def _currentNodes(self):
        nodes = self.logic.lastNodes
        pn = self._parameterNode
        if nodes is None or pn is None or pn.resultVolume is None:
            return None
        if nodes.input_volume is None or nodes.input_volume.GetID() != pn.resultVolume.GetID():
            return None
        return nodes

    def _configureThresholdSlider(self, result) -> None:
        import numpy as np

        values = result.heatmap[result.foreground] if result.foreground.any() else result.heatmap.ravel()
        top = float(np.nanmax(values)) if values.size else 1.0
        top = max(top, float(result.threshold), 1e-6) * 1.05
        slider = self.ui.thresholdSliderWidget
        wasBlocked = slider.blockSignals(True)
        slider.minimum = 0.0
        slider.maximum = top
        slider.singleStep = top / 500.0
        slider.pageStep = top / 20.0
        slider.decimals = 3 if top < 10 else 2
        slider.value = float(result.threshold)
        slider.blockSignals(wasBlocked)

    def _updateResultWidgets(self) -> None:
        pn = self._parameterNode
        nodes = self._currentNodes()
        hasResult = nodes is not None
        hasOutputs = pn is not None and pn.heatmapVolume is not None
        self.ui.resultsCollapsibleButton.enabled = hasOutputs
        self.ui.thresholdSliderWidget.enabled = hasResult
        self.ui.thresholdSliderWidget.toolTip = (
            _("Heatmap value above which voxels belong to the Anomaly segment (updates the segment, not the maps)")
            if hasResult
            else _("Run the detection again to change the threshold (the maps of a saved scene cannot be re-thresholded)")
        )
        self.ui.jumpButton.enabled = hasResult
        self.ui.showPlotButton.enabled = pn is not None and pn.scoreChart is not None
        self.ui.editSegmentationButton.enabled = pn is not None and pn.segmentation is not None
        if hasResult:
            result = nodes.result
            spacing = result.geometry.spacing if not result.geometry.is_2d else result.geometry.spacing[:2] + (1.0,)
            volumeMl = nodes.anomalous_voxels * float(spacing[0] * spacing[1] * spacing[2]) / 1000.0
            self.ui.volumeScoreLabel.text = f"{nodes.volume_score:.4g}"
            self.ui.anomalousVolumeLabel.text = _("{voxels} voxels ({ml:.2f} mL)").format(voxels=nodes.anomalous_voxels, ml=volumeMl)
        else:
            self.ui.volumeScoreLabel.text = ""
            self.ui.anomalousVolumeLabel.text = ""

    def onThresholdChanged(self, value) -> None:
        if self._currentNodes() is None:
            return
        self._thresholdTimer.start()  # restarts while the slider moves

    def applyThreshold(self) -> None:
        nodes = self._currentNodes()
        if nodes is None:
            return
        value = float(self.ui.thresholdSliderWidget.value)
        with slicer.util.tryWithErrorDisplay(_("Failed to update the segmentation."), waitCursor=True):
            self.logic.setThreshold(value, nodes)
            if self._parameterNode is not None:
                self._parameterNode.threshold = value
            self._updateResultWidgets()

    def onOpacityChanged(self, value) -> None:
        pn = self._parameterNode
        if pn is not None and pn.heatmapVolume is not None:
            from HiMatchADLib import mrml

            mrml.set_heatmap_opacity(slicer.mrmlScene, pn.heatmapVolume, value)

    def onJumpToMostAnomalousSlice(self) -> None:
        nodes = self._currentNodes()
        if nodes is None:
            return
        if not self.logic.jumpToSlice(nodes, nodes.most_anomalous_slice):
            slicer.util.warningDisplay(_("No slice had enough foreground to be scored."))

    def onShowPlot(self) -> None:
        pn = self._parameterNode
        if pn is not None and pn.scoreChart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(pn.scoreChart)

    def onEditSegmentation(self) -> None:
        pn = self._parameterNode
        if pn is None or pn.segmentation is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(pn.segmentation)
        sourceVolume = pn.resultVolume or pn.inputVolume
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(sourceVolume)
        else:  # Slicer before 5.2
            editor.setMasterVolumeNode(sourceVolume)

    # ------------------------------------------------------------------ references of the current slice
    def _observeSliceView(self) -> None:
        layoutManager = slicer.app.layoutManager()
        sliceWidget = layoutManager.sliceWidget("Red") if layoutManager else None
        sliceNode = sliceWidget.mrmlSliceNode() if sliceWidget else None
        if sliceNode is self._sliceNode:
            return
        if self._sliceNode is not None:
            self.removeObserver(self._sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified)
        self._sliceNode = sliceNode
        if sliceNode is not None:
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified)

    def onSliceViewModified(self, caller=None, event=None) -> None:
        nodes = self._currentNodes()
        table = self.ui.supportsTableWidget
        if nodes is None or self._sliceNode is None:
            table.setRowCount(0)
            self.ui.currentSliceLabel.text = ""
            return
        rows, index, score = self.logic.referencesAtSliceView(nodes, self._sliceNode)
        if index < 0:
            self.ui.currentSliceLabel.text = _("The red view is outside the volume")
        elif score is None:
            self.ui.currentSliceLabel.text = _("Slice {index}: no foreground").format(index=index)
        else:
            self.ui.currentSliceLabel.text = _("Slice {index}: score {score:.4g}").format(index=index, score=score)
        table.setRowCount(len(rows))
        for row, (source, sliceIndex, similarity) in enumerate(rows):
            for column, text in enumerate((source, str(sliceIndex), f"{similarity:.3f}")):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(row, column, item)


#
# HiMatchADLogic
#


class HiMatchADJob:
    """A detection running in a background thread; its events are read with ``HiMatchADLogic.pollJob``.

    Events are ``("progress", (message, done, total))``, then one of ``("done", DetectionResult)``,
    ``("cancelled", None)`` or ``("error", (exception, traceback text))``.
    """

    def __init__(self, volumeNodeID: str, normalsFolder: str, settings: dict):
        self.volumeNodeID = volumeNodeID
        self.normalsFolder = normalsFolder
        self.settings = settings
        self.events = queue.Queue()
        self.thread = None
        self.finished = False


class HiMatchADLogic(ScriptedLoadableModuleLogic):
    """Runs the detection and shows its results as MRML nodes. Usable without the module's GUI::

        logic = HiMatchAD.HiMatchADLogic()
        out = logic.process(volumeNode, "/data/normals", method="himatch", k=8)
        out.volume_score, out.slice_scores, out.heatmap, out.segmentation
        logic.processFolder("/data/incoming", "/data/normals", "/data/results")

    Detectors (model + normal bank) are kept between calls, one per settings combination (the most
    recently used :attr:`maxDetectors`), so a second run on the same folder takes seconds.
    """

    #: Number of detectors (each holding a model and a normal bank) kept in memory.
    maxDetectors = 2

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: Callable building a detector from keyword settings; default ``HiMatchADLib.HiMatchDetector``.
        self.detectorFactory = None
        self._detectors = OrderedDict()
        self._detectorsLock = threading.Lock()
        self._runLock = threading.Lock()
        self._cancelEvent = threading.Event()
        self._progressCallback = None
        self._externalCancelEvent = None
        self.lastNodes = None
        self.lastRunInfo = {}

    def getParameterNode(self):
        return HiMatchADParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies
    def ensureDependencies(self, interactive: bool = True, installInTesting: bool = False) -> None:
        """Install missing Python packages (PyTorch, then ``Resources/requirements.txt``).

        PyTorch comes from the PyTorch extension's installer when that extension is present (it picks
        the build that matches the GPU driver). The user is asked before anything is installed when
        ``interactive``. Must be called on the main thread. Raises ``RuntimeError`` when the user
        declines or the installation fails.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Python packages can only be installed from the main thread")
        if self._missingRequirements(["torch>=" + MINIMUM_TORCH_VERSION]):
            self._installTorch(interactive)
        missing = self._missingRequirements(self._loadRequirements())
        if missing:
            self._installRequirements(missing, interactive, installInTesting)
        importlib.invalidate_caches()
        still = self._missingRequirements(["torch"] + self._loadRequirements())
        if still:
            raise RuntimeError(
                "These Python packages are required but not installed: " + ", ".join(still)
                + ". Install them (for example with slicer.util.pip_install) and restart Slicer."
            )

    @staticmethod
    def _loadRequirements() -> list:
        with open(REQUIREMENTS_FILE, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
        return [line for line in lines if line and not line.startswith("-")]

    @staticmethod
    def _missingRequirements(requirements: list) -> list:
        """The requirement strings that are not satisfied by the installed distributions."""
        import importlib.metadata

        try:
            from packaging.requirements import Requirement
        except ImportError:
            Requirement = None
        missing = []
        for text in requirements:
            if Requirement is not None:
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate():
                    continue
                name, specifier = req.name, req.specifier
            else:
                name, specifier = text.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("[")[0].strip(), None
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(text)
                continue
            if specifier is not None and not specifier.contains(version, prereleases=True):
                missing.append(text)
        return missing

    @staticmethod
    def _slicerPackaging():
        """``slicer.packaging`` when it offers ``pip_ensure`` (Slicer 5.12 and later), else None."""
        try:
            module = importlib.import_module("slicer.packaging")
        except ImportError:
            return None
        return module if hasattr(module, "pip_ensure") else None

    def _installTorch(self, interactive: bool) -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                logging.info("HiMatch-AD: installing PyTorch with the PyTorch extension (this can take several minutes)")
                torch = torchLogic.installTorch(askConfirmation=interactive, torchVersionRequirement=">=" + MINIMUM_TORCH_VERSION)
                if torch is None:
                    raise RuntimeError("PyTorch is required. Install it with the PyTorch Utils module and try again.")
            return
        self._installRequirements(["torch>=" + MINIMUM_TORCH_VERSION], interactive, installInTesting=False)

    def _installRequirements(self, requirements: list, interactive: bool, installInTesting: bool) -> None:
        packaging = self._slicerPackaging()
        if packaging is not None:
            packaging.pip_ensure(
                requirements, prompt_install=interactive, requester="HiMatch-AD", skip_in_testing=not installInTesting
            )
            return
        if interactive and not slicer.util.confirmOkCancelDisplay(
            _("HiMatch-AD needs these Python packages, which will be downloaded and installed:\n\n{packages}").format(
                packages="\n".join(requirements)
            ),
            _("Install Python packages"),
        ):
            raise RuntimeError("Installation of the required Python packages was declined")
        slicer.util.pip_install(requirements)

    # ------------------------------------------------------------------ settings and detectors
    @staticmethod
    def settingsFromParameterNode(pn) -> dict:
        """Detector keyword settings from the module's parameter node."""
        return {
            "model": pn.model.strip() or DEFAULT_MODEL,
            "method": pn.method.value,
            "k": int(pn.k),
            "modality": pn.modality.value,
            "device": pn.device.value,
            "resolution": int(pn.resolution),
            "target_fpr": float(pn.targetFpr),
            "batch_size": int(pn.batchSize),
        }

    @staticmethod
    def _settingsKey(settings: dict) -> tuple:
        return tuple(sorted((key, repr(value)) for key, value in settings.items()))

    def _createDetector(self, settings: dict):
        factory = self.detectorFactory
        if factory is None:
            from HiMatchADLib import HiMatchDetector as factory
        return factory(progress=self._dispatchProgress, cancel_event=self._cancelEvent, **settings)

    def getDetector(self, settings: dict):
        """``(detector, reused)``: the cached detector for these settings, or a new one."""
        key = self._settingsKey(settings)
        with self._detectorsLock:
            detector = self._detectors.get(key)
            if detector is not None:
                self._detectors.move_to_end(key)
                return detector, True
        detector = self._createDetector(settings)
        with self._detectorsLock:
            self._detectors[key] = detector
            while len(self._detectors) > max(1, int(self.maxDetectors)):
                self._detectors.popitem(last=False)
        return detector, False

    def clearDetectors(self) -> None:
        """Release the models and normal banks kept in memory."""
        with self._detectorsLock:
            self._detectors.clear()

    def _dispatchProgress(self, message: str, done: int, total: int) -> None:
        external = self._externalCancelEvent
        if external is not None and external.is_set():
            self._cancelEvent.set()
            from HiMatchADLib import Cancelled

            raise Cancelled()
        callback = self._progressCallback
        if callback is not None:
            callback(message, done, total)

    @staticmethod
    def _logProgress(message: str, done: int, total: int) -> None:
        if done == 0 or done >= total:
            logging.info(f"HiMatch-AD: {message} {done}/{total}")

    def cancel(self) -> None:
        """Ask the running detection to stop (it raises ``Cancelled`` at its next progress check)."""
        self._cancelEvent.set()

    @property
    def isRunning(self) -> bool:
        return self._runLock.locked()

    # ------------------------------------------------------------------ computing
    def _prepare(self, volumeNode, normalsFolder, settings: dict):
        """Main-thread part of a run: dependencies, input checks and a copy of the voxels."""
        if volumeNode is None:
            raise ValueError("No input volume")
        if not normalsFolder or not os.path.isdir(os.fspath(normalsFolder)):
            raise ValueError(f"The folder of normal scans does not exist: {normalsFolder}")
        self.ensureDependencies()
        from HiMatchADLib import mrml

        image = mrml.image_from_volume_node(volumeNode)
        return image, os.fspath(normalsFolder), dict(settings)

    def _compute(self, image, normalsFolder: str, settings: dict, progress=None, cancelEvent=None):
        """Fit (or reuse) the detector on the normal folder and predict ``image``. Thread-safe."""
        self._progressCallback = progress
        self._externalCancelEvent = cancelEvent
        messages = []
        try:
            if progress is not None:
                original = progress

                def recording(message, done, total):
                    if not messages or messages[-1] != message:
                        messages.append(message)
                    original(message, done, total)

                self._progressCallback = recording
            start = time.perf_counter()
            detector, reused = self.getDetector(settings)
            detector.fit(normalsFolder)
            fitted = time.perf_counter()
            result = detector.predict(image)
            end = time.perf_counter()
        finally:
            self._progressCallback = None
            self._externalCancelEvent = None
        self.lastRunInfo = {
            "detectorReused": reused,
            "fitSeconds": fitted - start,
            "predictSeconds": end - fitted,
            "totalSeconds": end - start,
            "messages": messages,
            "normalsFolder": normalsFolder,
        }
        return result

    def startProcessing(self, volumeNode, normalsFolder, **settings) -> HiMatchADJob:
        """Start a detection in a background thread and return its job (poll it with :meth:`pollJob`).

        The input's voxels are copied first, so the scene is not touched until the results are
        imported by :meth:`importResult` on the main thread; a cancelled run leaves the scene as it was.
        """
        image, folder, settings = self._prepare(volumeNode, normalsFolder, settings)
        if not self._runLock.acquire(blocking=False):
            raise RuntimeError("A detection is already running")
        self._cancelEvent.clear()
        job = HiMatchADJob(volumeNode.GetID(), folder, settings)

        def post(message, done, total):
            job.events.put(("progress", (message, done, total)))

        def run():
            from HiMatchADLib import Cancelled

            try:
                result = self._compute(image, folder, settings, progress=post)
                event = ("done", result)
            except Cancelled:
                event = ("cancelled", None)
            except Exception as exc:  # reported to the user on the main thread
                event = ("error", (exc, traceback.format_exc()))
            finally:
                job.finished = True
                self._runLock.release()
            job.events.put(event)

        job.thread = threading.Thread(target=run, name="HiMatchAD detection", daemon=True)
        try:
            job.thread.start()
        except BaseException:
            self._runLock.release()
            raise
        return job

    @staticmethod
    def pollJob(job: HiMatchADJob) -> list:
        """Events posted by the job since the last poll (only the latest progress event is kept)."""
        events = []
        while True:
            try:
                event = job.events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "progress" and events and events[-1][0] == "progress":
                events[-1] = event
            else:
                events.append(event)
        return events

    def process(
        self,
        volumeNode,
        normalsFolder,
        method: str = "himatch",
        k: int = 8,
        model: str = DEFAULT_MODEL,
        modality: str = "auto",
        device: str = "auto",
        progress=None,
        cancelEvent=None,
        show: bool = True,
        heatmapOpacity: float = 0.5,
        **detectorOptions,
    ):
        """Detect anomalies in ``volumeNode`` against the normal scans in ``normalsFolder``.

        Runs in the calling thread (use :meth:`startProcessing` to keep a GUI responsive). Extra
        keyword arguments go to ``HiMatchDetector`` (e.g. ``resolution=448``, ``target_fpr=0.01``,
        ``threshold=2.5``, ``cache_dir=...``). ``progress(message, done, total)`` is called during
        the run; setting ``cancelEvent`` (a ``threading.Event``) stops it with ``Cancelled``.

        Returns a ``HiMatchADLib.mrml.ResultNodes``: the heatmap, labelmap, segmentation (segment
        "Anomaly"), score table and plot chart nodes, the ``DetectionResult`` (``.result``) and
        shortcuts ``.volume_score``, ``.slice_scores``, ``.most_anomalous_slice``. Errors the user
        can fix raise ``HiMatchADLib.HiMatchADError``.
        """
        settings = {"model": model, "method": method, "k": k, "modality": modality, "device": device, **detectorOptions}
        image, folder, settings = self._prepare(volumeNode, normalsFolder, settings)
        if not self._runLock.acquire(blocking=False):
            raise RuntimeError("A detection is already running")
        self._cancelEvent.clear()
        try:
            result = self._compute(image, folder, settings, progress=progress or self._logProgress, cancelEvent=cancelEvent)
        finally:
            self._runLock.release()
        return self.importResult(result, volumeNode, show=show, heatmapOpacity=heatmapOpacity)

    def importResult(self, result, volumeNode, show: bool = True, heatmapOpacity: float = 0.5):
        """Create or update the output nodes of ``result`` (main thread)."""
        from HiMatchADLib import mrml

        previous = self.lastNodes
        nodes = mrml.result_to_nodes(
            result, volumeNode, previous=previous, scene=volumeNode.GetScene(), show=show, heatmap_opacity=heatmapOpacity
        )
        self.lastNodes = nodes
        return nodes

    def forgetResult(self) -> None:
        self.lastNodes = None

    def setThreshold(self, threshold: float, nodes=None) -> int:
        """Re-threshold the last (or given) result: the segment and labelmap change, the maps do not.
        Returns the number of anomalous voxels."""
        nodes = nodes or self.lastNodes
        if nodes is None:
            raise ValueError("No detection result to re-threshold; run the detection first")
        return nodes.set_threshold(float(threshold))

    def jumpToSlice(self, nodes, index: int) -> bool:
        """Centre the slice views on slice ``index`` (along the detector's slicing axis)."""
        from HiMatchADLib import mrml

        if index is None or index < 0:
            return False
        mrml.jump_slices_to(nodes.input_volume.GetScene(), mrml.slice_center_ras(nodes.result, index), reference_node=nodes.input_volume)
        return True

    @staticmethod
    def referencesAtSliceView(nodes, sliceNode):
        """``(references, slice index, score)`` for the slice through the centre of a slice view."""
        import numpy as np
        from HiMatchADLib import mrml

        sliceToRas = sliceNode.GetSliceToRAS()
        center = [sliceToRas.GetElement(i, 3) for i in range(3)]
        index = mrml.slice_index_at_ras(nodes.result, nodes.input_volume, center)
        if index < 0:
            return [], index, None
        score = float(nodes.result.slice_scores[index])
        return mrml.supports_for_slice(nodes.result, index), index, (score if np.isfinite(score) else None)

    # ------------------------------------------------------------------ batch
    SUMMARY_COLUMNS = (
        "case", "input", "status", "volume_score", "threshold", "anomalous_voxels", "anomalous_volume_mm3",
        "most_anomalous_slice", "heatmap", "labelmap", "scores", "seconds", "message",
    )

    def processFolder(
        self,
        inputFolder,
        normalsFolder,
        outputFolder,
        method: str = "himatch",
        k: int = 8,
        model: str = DEFAULT_MODEL,
        modality: str = "auto",
        device: str = "auto",
        overwrite: bool = False,
        progress=None,
        cancelEvent=None,
        **detectorOptions,
    ) -> list:
        """Detect anomalies in every image of ``inputFolder`` (sub-folders and DICOM series included).

        For each case, ``<name>_heatmap.nii.gz``, ``<name>_labelmap.nii.gz`` and ``<name>_scores.json``
        are written to the matching sub-folder of ``outputFolder``. The run is resumable: a case whose
        outputs are complete is not computed again (unless ``overwrite``). ``summary.csv`` in
        ``outputFolder`` lists every case and is rewritten after each one. A case that cannot be read
        is recorded as an error and the batch goes on. Returns the summary rows (dicts).
        """
        import json

        import numpy as np

        self.ensureDependencies()
        from HiMatchADLib import Cancelled, HiMatchADError
        from HiMatchADLib.imageio import list_images, strip_suffix, write_text_atomic
        from HiMatchADLib.output import is_complete, output_paths

        inputRoot = pathlib.Path(inputFolder).expanduser().resolve()
        normalsRoot = pathlib.Path(normalsFolder).expanduser().resolve()
        outputRoot = pathlib.Path(outputFolder).expanduser().resolve()
        if not normalsRoot.is_dir():
            raise HiMatchADError(f"folder of normal scans not found: {normalsRoot}")
        outputRoot.mkdir(parents=True, exist_ok=True)

        def inside(path, root):
            return path == root or root in path.parents

        cases = [p for p in list_images(inputRoot) if not inside(p.resolve(), outputRoot) and not inside(p.resolve(), normalsRoot)]
        if not cases:
            raise HiMatchADError(f"no images found in {inputRoot}")

        settings = {"model": model, "method": method, "k": k, "modality": modality, "device": device, **detectorOptions}
        report = progress or self._logProgress
        summaryPath = outputRoot / "summary.csv"
        rows = []

        def writeSummary():
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.SUMMARY_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            write_text_atomic(summaryPath, text.getvalue())

        def rowFromScores(case, path, outDir, name, status, seconds, message=""):
            paths = output_paths(outDir, name, False)
            data = json.loads(paths["scores"].read_text(encoding="utf-8"))
            return {
                "case": case,
                "input": str(path),
                "status": status,
                "volume_score": data.get("volume_score"),
                "threshold": data.get("threshold"),
                "anomalous_voxels": data.get("anomalous_voxels"),
                "anomalous_volume_mm3": data.get("anomalous_volume_mm3"),
                "most_anomalous_slice": data.get("most_anomalous_slice"),
                "heatmap": str(paths["heatmap"]),
                "labelmap": str(paths["labelmap"]),
                "scores": str(paths["scores"]),
                "seconds": round(seconds, 3),
                "message": message,
            }

        if not self._runLock.acquire(blocking=False):
            raise RuntimeError("A detection is already running")
        self._progressCallback = report
        self._externalCancelEvent = cancelEvent
        self._cancelEvent.clear()
        try:
            detector, _reused = self.getDetector(settings)
            detector.fit(normalsRoot)
            for n, path in enumerate(cases):
                if self._cancelEvent.is_set() or (cancelEvent is not None and cancelEvent.is_set()):
                    raise Cancelled()
                relative = path.relative_to(inputRoot)
                outDir = outputRoot / relative.parent
                name = path.name if path.is_dir() else strip_suffix(path)
                case = relative.as_posix()
                report(f"Case {n + 1}/{len(cases)}: {case}", n, len(cases))
                start = time.perf_counter()
                if not overwrite and is_complete(outDir, name):
                    rows.append(rowFromScores(case, path, outDir, name, "done earlier", 0.0))
                    writeSummary()
                    continue
                try:
                    result = detector.predict(path)
                    detector.save(result, outDir)
                    rows.append(rowFromScores(case, path, outDir, result.name, "ok", time.perf_counter() - start,
                                              "; ".join(result.warnings)))
                except Cancelled:
                    raise
                except (HiMatchADError, OSError, ValueError) as exc:
                    logging.error(f"HiMatch-AD: {case}: {exc}")
                    row = {column: "" for column in self.SUMMARY_COLUMNS}
                    row.update(case=case, input=str(path), status="error", seconds=round(time.perf_counter() - start, 3), message=str(exc))
                    rows.append(row)
                writeSummary()
            report(f"Case {len(cases)}/{len(cases)}", len(cases), len(cases))
        finally:
            self._progressCallback = None
            self._externalCancelEvent = None
            self._runLock.release()
            if rows:
                writeSummary()
        failed = sum(1 for r in rows if r["status"] == "error")
        scores = [float(r["volume_score"]) for r in rows if r["volume_score"] not in ("", None)]
        logging.info(
            f"HiMatch-AD: {len(rows)} cases, {failed} failed, summary in {summaryPath}"
            + (f", highest volume score {np.max(scores):.4g}" if scores else "")
        )
        return rows


#
# HiMatchADTest
#


def makeSyntheticTestData(folder, shape=(12, 40, 40), normals=3, seed=0):
    """Synthetic data for the self-test: normal phantoms, a case with a bright lesion, a tiny model.

    Returns ``(normalsFolder, caseArray, lesionMask, modelFolder)``. The model is a randomly
    initialised DINOv3 ViT saved to a local folder, so nothing is downloaded.
    """
    import numpy as np
    import SimpleITK as sitk

    folder = pathlib.Path(folder)
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    zz, yy, xx = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)

    def phantom(noise_seed):
        r = np.random.default_rng(noise_seed)
        body = ((yy - ny / 2) / (0.42 * ny)) ** 2 + ((xx - nx / 2) / (0.38 * nx)) ** 2 <= 1.0
        inner = ((yy - ny / 2) / (0.25 * ny)) ** 2 + ((xx - nx / 2) / (0.22 * nx)) ** 2 <= 1.0
        arr = np.where(body, 300.0, 0.0) + np.where(inner, 150.0, 0.0)
        arr += body * r.normal(0, 12, shape)
        return arr.astype(np.float32)

    normalsFolder = folder / "normals"
    normalsFolder.mkdir(parents=True, exist_ok=True)
    for i in range(normals):
        image = sitk.GetImageFromArray(phantom(int(rng.integers(1 << 30))))
        image.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(image, str(normalsFolder / f"normal_{i}.nii.gz"))

    case = phantom(int(rng.integers(1 << 30)))
    # A heterogeneous lesion: its texture, not only its brightness, differs from any normal patch.
    lesion = ((zz - nz / 2) / 2.5) ** 2 + ((yy - ny * 0.45) / 6.0) ** 2 + ((xx - nx * 0.55) / 6.0) ** 2 <= 1.0
    checker = ((yy // 2 + xx // 2) % 2).astype(np.float32)
    case[lesion] = (250.0 + 600.0 * checker + rng.normal(0, 60, shape).astype(np.float32))[lesion]

    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
        patch_size=8, image_size=64, num_register_tokens=2,
    )
    modelFolder = folder / "model"
    DINOv3ViTModel(config).save_pretrained(str(modelFolder))
    return normalsFolder, case, lesion, modelFolder


class HiMatchADTest(ScriptedLoadableModuleTest):
    """Self-test: synthetic volume with a lesion, synthetic normal folder, tiny random DINOv3 model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_HiMatchAD1()

    def test_HiMatchAD1(self):
        import tempfile

        import numpy as np

        self.delayDisplay("Checking Python dependencies")
        logic = HiMatchADLogic()
        logic.ensureDependencies(interactive=False, installInTesting=True)
        from HiMatchADLib import mrml

        with tempfile.TemporaryDirectory(prefix="HiMatchADTest") as tmp:
            self.delayDisplay("Creating synthetic data")
            normalsFolder, case, lesion, modelFolder = makeSyntheticTestData(tmp)
            # An oblique, anisotropic placement: outputs must overlay the input exactly.
            angle = np.radians(20.0)
            ijkToRas = np.eye(4)
            ijkToRas[:3, :3] = np.array([
                [-np.cos(angle), np.sin(angle), 0.0],
                [-np.sin(angle), -np.cos(angle), 0.0],
                [0.0, 0.0, 1.0],
            ]) @ np.diag([1.0, 1.0, 3.0])
            ijkToRas[:3, 3] = (12.0, -30.0, 5.0)
            volumeNode = slicer.util.addVolumeFromArray(case, ijkToRAS=ijkToRas, name="syntheticCase")

            settings = {
                "method": "himatch", "k": 2, "model": str(modelFolder), "device": "cpu", "resolution": 64,
                "batch_size": 4, "calibration_slices": 8, "cache_dir": os.path.join(tmp, "cache"),
            }
            self.delayDisplay("First run (builds the normal bank)")
            out = logic.process(volumeNode, normalsFolder, **settings)
            self.assertFalse(logic.lastRunInfo["detectorReused"])
            self.assertTrue(any("bank" in m.lower() for m in logic.lastRunInfo["messages"]))

            # Geometry: heatmap, labelmap and segmentation on the input's grid.
            inputMatrix = vtk.vtkMatrix4x4()
            volumeNode.GetIJKToRASMatrix(inputMatrix)
            for node in (out.heatmap, out.labelmap):
                matrix = vtk.vtkMatrix4x4()
                node.GetIJKToRASMatrix(matrix)
                self.assertTrue(np.array_equal(slicer.util.arrayFromVTKMatrix(matrix), slicer.util.arrayFromVTKMatrix(inputMatrix)))
                self.assertEqual(node.GetImageData().GetDimensions(), volumeNode.GetImageData().GetDimensions())
            heatmap = slicer.util.arrayFromVolume(out.heatmap)
            self.assertGreater(float(heatmap[lesion].mean()), float(heatmap[~lesion & out.result.foreground].mean()))

            # A non-empty "Anomaly" segment over the lesion, at the calibrated threshold...
            segment = mrml.segment_to_array(out.segmentation, volumeNode)
            self.assertEqual(int(segment.sum()), out.anomalous_voxels)
            self.assertGreater(float(segment[lesion].mean()), 0.5)
            # ... and the hottest voxels are in the lesion.
            hottest = float(np.percentile(heatmap[out.result.foreground], 99.0))
            voxels = logic.setThreshold(hottest, out)
            segment = mrml.segment_to_array(out.segmentation, volumeNode)
            self.assertGreater(voxels, 0)
            self.assertEqual(int(segment.sum()), voxels)
            self.assertGreater(float(segment[lesion].sum()) / voxels, 0.5)
            self.assertEqual(out.segmentation.GetSegmentation().GetSegment(out.segment_id).GetName(), "Anomaly")

            # The threshold changes the segment, not the maps.
            fewer = logic.setThreshold(hottest * 1.2, out)
            self.assertLess(fewer, voxels)
            self.assertEqual(int(mrml.segment_to_array(out.segmentation, volumeNode).sum()), fewer)
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(out.heatmap), heatmap))

            self.delayDisplay("Second run (reuses the model and the normal bank)")
            again = logic.process(volumeNode, normalsFolder, **settings)
            self.assertTrue(logic.lastRunInfo["detectorReused"])
            self.assertFalse(any("building normal bank" in m.lower() for m in logic.lastRunInfo["messages"]))
            self.assertEqual(again.heatmap.GetID(), out.heatmap.GetID())
            self.assertEqual(again.segmentation.GetID(), out.segmentation.GetID())
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)

            logic.clearDetectors()
        self.delayDisplay("Test passed")
