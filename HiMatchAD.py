"""3D Slicer module for HiMatch-AD: training-free anomaly detection against a folder of normal scans.

The module only connects Slicer to the ``HiMatchADLib`` package and never computes:

- the detection runs in a worker process (``PythonSlicer -m HiMatchADLib worker``) that keeps the
  model and the normal bank loaded between runs; :class:`HiMatchADLib.mrml.jobs.DetectionRunner`
  sends it the volume and follows it without blocking (a ``QTimer`` polls it);
- every conversion between MRML nodes and the library's arrays is done by ``HiMatchADLib.mrml``.

Python dependencies are checked (and installed, with the user's consent) by
:meth:`HiMatchADLogic.ensureDependencies` before the first run.
"""

import csv
import enum
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLPlotChartNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLVectorVolumeNode,
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


# The library (numpy only at import: torch and transformers stay out of Slicer's process).
from HiMatchADLib.features.models import DEFAULT_MODEL, KNOWN_MODELS  # noqa: E402
from HiMatchADLib.methods import list_methods  # noqa: E402

NORMALS_FOLDER_SETTING = "HiMatchAD/NormalsFolder"
BANK_FILE_SETTING = "HiMatchAD/BankFile"
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS_FILE = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
PLOT_VIEW_SINGLETON_TAG = "HiMatchAD"
EXAMPLE_FOLDER_NAME = "HiMatchAD-example"
EXAMPLE_CASE_NAME = "HiMatchAD example case"
EXAMPLE_README = """HiMatch-AD example data (generated phantoms, not patient data)

normals/                  normal volumes: point "Normal scans folder" here
query.nii.gz              a case with a synthetic lesion: the input volume
query_lesion_mask.nii.gz  where the lesion is (to compare with the Anomaly segment)

The same data as the command `himatchad demo`. The lesion is large and bright on purpose, so that a
first run shows the whole path even with untrained model weights.
"""

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
        # The example data in the Sample Data module, once the application has started.
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Example data in the Sample Data module
#

SAMPLE_DATA_CATEGORY = "HiMatch-AD"


def registerSampleData():
    """The example data (generated, nothing downloaded) as a Sample Data entry: clicking it writes
    the phantoms to :meth:`HiMatchADLogic.defaultExampleFolder`, loads the case and sets the
    module's normal scans folder, as the panel's "Load example data" button does."""
    import SampleData

    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer 5.8 and later
        SampleData.SampleDataLogic.registerCustomSampleDataCategory(SAMPLE_DATA_CATEGORY, title=_("HiMatch-AD"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_DATA_CATEGORY,
        sampleName="HiMatchADExample",
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", "HiMatchAD.png"),
        uris=[],
        fileNames=[],
        customDownloader=lambda source=None: HiMatchADLogic().loadExampleForModule(),
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


class _MethodChoice(enum.Enum):
    def label(self):
        return {"himatch": "HiMatch", "knn": _("kNN (AnomalyDINO)"), "dpmm": _("DPMM (AnomalyDINO-DPMM)")}.get(self.value, self.value)


#: The detection methods of the library's registry.
Method = _MethodChoice("Method", {name.upper(): name for name in list_methods()})


class NormalsSource(enum.Enum):
    """What the input is compared with: a folder of normal scans, or a bank file made from one."""

    FOLDER = "folder"
    BANK = "bank"

    def label(self):
        return {"folder": _("Folder of normal scans"), "bank": _("Normal bank file")}[self.value]


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"

    def label(self):
        return {"auto": _("Auto"), "cpu": "CPU", "cuda": _("NVIDIA GPU (CUDA)"), "mps": _("Apple GPU (MPS)")}[self.value]


@parameterNodeWrapper
class HiMatchADParameterNode:
    """State of the module, saved with the scene.

    inputVolume - volume to examine.
    normalsSource - what the volume is compared with: the folder of normal scans or a bank file.
    normalsFolder - folder of normal scans (the reference "bank").
    bankFile - a normal bank file (``himatchad bank export``): it fixes the model and method settings.
    modality, model, method, k, device - detector settings (see HiMatchADLib.HiMatchDetector).
    resolution, targetFpr, batchSize - advanced detector settings.
    useFeedback - whether detections use the reader feedback ("mark as normal") of the normal bank.
    heatmapOpacity - foreground opacity of the heatmap in slice views.
    threshold - current threshold of the anomaly segment (heatmap units).
    resultVolume, heatmapVolume, labelmapVolume, segmentation, scoreTable, scoreChart - outputs of the last run.
    """

    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]  # as HiMatchADLib.mrml.INPUT_NODE_CLASSES
    normalsSource: NormalsSource = NormalsSource.FOLDER
    normalsFolder: str = ""
    bankFile: str = ""
    modality: Modality = Modality.AUTO
    model: str = DEFAULT_MODEL
    method: Method = Method.HIMATCH
    k: Annotated[int, WithinRange(1, 64)] = 8
    device: Device = Device.AUTO
    resolution: Annotated[int, WithinRange(64, 2048)] = 448
    targetFpr: Annotated[float, WithinRange(0.0001, 0.5)] = 0.01
    batchSize: Annotated[int, WithinRange(1, 256)] = 8
    useFeedback: bool = True
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
        self._pollTimer = None
        self._thresholdTimer = None
        self._reproduceTimer = None
        self._sliceNode = None
        self.plotWidget = None

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
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneImported)

        self.ui.normalsPathLineEdit.connect("currentPathChanged(QString)", self.onNormalsFolderChanged)
        self.ui.bankPathLineEdit.connect("currentPathChanged(QString)", self.onBankFileChanged)
        self.ui.reproduceButton.connect("clicked(bool)", self.onCheckReproducibility)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        for label, modelId in HiMatchADLogic.modelChoices():
            self.ui.modelComboBox.addItem(label, modelId)
        self.ui.modelComboBox.connect("activated(int)", self.onModelChosen)
        self.ui.saveTokenButton.connect("clicked(bool)", self.onSaveToken)
        self.ui.hubTokenLineEdit.connect("returnPressed()", self.onSaveToken)
        self.ui.findDevicesButton.connect("clicked(bool)", self.onFindDevices)
        self._updateTokenStatus()
        self.ui.exampleDataButton.connect("clicked(bool)", self.onLoadExampleData)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.jumpButton.connect("clicked(bool)", self.onJumpToMostAnomalousSlice)
        self.ui.showPlotButton.connect("toggled(bool)", self.onShowPlot)
        self.ui.editSegmentationButton.connect("clicked(bool)", self.onEditSegmentation)
        self.ui.markNormalButton.connect("clicked(bool)", self.onMarkNormal)
        self.ui.undoMarkButton.connect("clicked(bool)", self.onUndoMarkNormal)

        self.ui.supportsTableWidget.setColumnCount(3)
        self.ui.supportsTableWidget.setHorizontalHeaderLabels([_("Normal scan"), _("Slice"), _("Similarity")])
        self.ui.supportsTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)

        # The score plot lives in this panel, so the user's view layout (3D view included) stays as it is.
        self.plotWidget = slicer.qMRMLPlotWidget()
        self.plotWidget.setMRMLScene(slicer.mrmlScene)
        self.plotWidget.minimumHeight = 180
        self.plotWidget.setVisible(False)  # until there is a result
        self.ui.resultsFormLayout.addRow(self.plotWidget)

        # The worker's events are polled from the main thread; the computation runs in the worker process.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPollJob)
        # Threshold changes are applied when the slider rests for a moment (the segment is rebuilt).
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(150)
        self._thresholdTimer.connect("timeout()", self.applyThreshold)
        # The reproducibility check runs in a child process; its end is polled from here.
        self._reproduceTimer = qt.QTimer()
        self._reproduceTimer.setInterval(200)
        self._reproduceTimer.connect("timeout()", self.onPollReproduceCheck)

        # Runs started anywhere (this panel, the Python console) are shown here.
        HiMatchADLogic.jobListeners.append(self.onJobStarted)

        self._setRunning(False)
        self.initializeParameterNode()
        self._observeSliceView()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed (or reloaded):
        the worker (and any run in it) is stopped, so a reload never leaves a model loaded twice."""
        for timer in (self._pollTimer, self._thresholdTimer, self._reproduceTimer):
            if timer is not None:
                timer.stop()
        if self.onJobStarted in HiMatchADLogic.jobListeners:
            HiMatchADLogic.jobListeners.remove(self.onJobStarted)
        if self.logic is not None:
            self.logic.shutdown()
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
        if self.logic.discardJob():
            self._endJob()
            self.ui.statusLabel.text = _("The detection was cancelled because the scene was closed.")
        self.logic.forgetResult()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, callData=None) -> None:
        """Only the added node is looked at; while a scene is imported, nothing is (the whole scene is
        looked at once when the import ends), so loading a large scene stays linear."""
        if callData is None or slicer.mrmlScene.IsImporting():
            return
        if callData.IsA("vtkMRMLScalarVolumeNode"):
            self._hideOutputsFromInputSelector(added=callData)

    def onSceneImported(self, caller=None, event=None) -> None:
        """A scene was loaded: hide its outputs from the input list, and follow the edits of its
        Anomaly segments again (the segment's DICOM algorithm type and the labelmap mirror it)."""
        from HiMatchADLib import mrml

        self._hideOutputsFromInputSelector()
        mrml.watch_result_segmentations(slicer.mrmlScene)

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        from HiMatchADLib import mrml

        self.setParameterNode(self.logic.getParameterNode())
        self._hideOutputsFromInputSelector()
        if not self._parameterNode.inputVolume:
            candidates = mrml.input_candidates(slicer.mrmlScene)  # what is_supported_input accepts
            if candidates:
                self._parameterNode.inputVolume = candidates[0]
        if not self._parameterNode.normalsFolder:
            # The folder of normal scans is remembered across sessions.
            self._parameterNode.normalsFolder = str(qt.QSettings().value(NORMALS_FOLDER_SETTING, "") or "")
        if not self._parameterNode.bankFile:
            self._parameterNode.bankFile = str(qt.QSettings().value(BANK_FILE_SETTING, "") or "")

    def _hideOutputsFromInputSelector(self, added=None) -> None:
        """Heatmaps and other outputs of this module are scalar volumes too: keep them out of the input list
        (labelmaps are excluded by the selector's node types). With ``added``, only that node is
        looked at; else every scalar volume of the scene."""
        from HiMatchADLib import mrml

        proxy = self.ui.inputSelector.sortFilterProxyModel()
        current = list(proxy.hiddenNodeIDs)
        if added is not None:
            if not mrml.is_supported_input(added) and added.GetID() not in current:
                proxy.hiddenNodeIDs = current + [added.GetID()]
            return
        hidden = [node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if not mrml.is_supported_input(node)]
        if current != hidden:
            proxy.hiddenNodeIDs = hidden

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
        if pn is not None and self.ui.bankPathLineEdit.currentPath != pn.bankFile:
            wasBlocked = self.ui.bankPathLineEdit.blockSignals(True)
            self.ui.bankPathLineEdit.currentPath = pn.bankFile
            self.ui.bankPathLineEdit.blockSignals(wasBlocked)
        if pn is not None:
            self._showModel(pn.model)
        self._updateReferenceWidgets()
        self._checkCanApply()
        self._updateResultWidgets()

    # ------------------------------------------------------------------ model, token, devices
    def _showModel(self, model: str) -> None:
        """The Model selector shows ``model`` (a known model, or an extra item for a folder or another
        id) and the line under it its licence and what it needs."""
        combo = self.ui.modelComboBox
        model = (model or "").strip()
        index = combo.findData(model)
        if index < 0:
            known = len(KNOWN_MODELS)
            while combo.count > known:  # one extra item at most: the current folder or id
                combo.removeItem(known)
            combo.addItem(HiMatchADLogic.modelChoiceLabel(model), model)
            index = combo.count - 1
        if combo.currentIndex != index:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)
        self.ui.modelInfoLabel.text = HiMatchADLogic.modelInfoText(model)

    def onModelChosen(self, index) -> None:
        model = self.ui.modelComboBox.itemData(index)
        if model and self._parameterNode is not None and self._parameterNode.model != model:
            self._parameterNode.model = model

    def _updateTokenStatus(self) -> None:
        from HiMatchADLib.features.models import hub_token_status

        self.ui.hubTokenStatusLabel.text = HiMatchADLogic.tokenStatusText(hub_token_status())

    def onSaveToken(self) -> None:
        from HiMatchADLib.features.models import save_hub_token

        token = self.ui.hubTokenLineEdit.text
        with slicer.util.tryWithErrorDisplay(_("The Hugging Face token could not be stored.")):
            try:
                save_hub_token(token)
            finally:
                self.ui.hubTokenLineEdit.text = ""  # never kept in the panel
            self._updateTokenStatus()
            self.ui.statusLabel.text = _("Token stored; the next run uses it.")

    def onFindDevices(self) -> None:
        if self.logic.isRunning:
            self.ui.deviceFoundLabel.text = _("A detection is running; try again when it ends.")
            return
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("The worker process could not list the devices."), waitCursor=True):
            devices = self.logic.workerDevices()
            self.ui.deviceFoundLabel.text = HiMatchADLogic.devicesText(devices)
            found = {d.get("kind") for d in devices}
            model = self.ui.deviceComboBox.model()
            for row, member in enumerate(Device):
                item = model.item(row) if hasattr(model, "item") else None
                if item is not None:
                    item.setEnabled(member.value in ("auto", "cpu") or member.value in found)

    def _showModelAccessError(self, error) -> None:
        """A model that could not be loaded: what happened, what to do, the model page, and the
        model that needs no approval one click away."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Warning)
        box.setWindowTitle(_("Model not available"))
        box.setText(error.message("panel"))
        if error.url:
            box.setInformativeText(_("Model page: {url}").format(url=error.url))
        alternative = page = None
        if error.alternative:
            alternative = box.addButton(
                _("Use {label} ({licence}, no approval)").format(label=error.alternative_label or error.alternative, licence=error.alternative_licence or ""),
                qt.QMessageBox.AcceptRole,
            )
        if error.url:
            page = box.addButton(_("Open the model page"), qt.QMessageBox.HelpRole)
        box.addButton(qt.QMessageBox.Close)
        box.exec_()
        clicked = box.clickedButton()
        if alternative is not None and clicked == alternative and self._parameterNode is not None:
            self._parameterNode.model = error.alternative
            self.ui.statusLabel.text = _("Model set to {model}: click Detect anomalies again.").format(model=error.alternative)
        elif page is not None and clicked == page:
            qt.QDesktopServices.openUrl(qt.QUrl(error.url))

    def onBankFileChanged(self, path) -> None:
        if self._parameterNode is not None and self._parameterNode.bankFile != path:
            self._parameterNode.bankFile = path

    #: Widgets of settings a bank file fixes: disabled while one is used.
    BANK_FIXED_WIDGETS = ("modalityComboBox", "methodComboBox", "kSpinBox", "resolutionSpinBox", "targetFprSpinBox")

    def _updateReferenceWidgets(self) -> None:
        """The folder or the bank-file row, what the bank file holds, and the settings it fixes."""
        pn = self._parameterNode
        useBank = pn is not None and pn.normalsSource == NormalsSource.BANK
        for name in ("normalsPathLineEdit", "exampleDataButton"):
            getattr(self.ui, name).setVisible(not useBank)
        for name in ("bankPathLineEdit", "bankInfoLabel"):
            getattr(self.ui, name).setVisible(useBank)
        for name in self.BANK_FIXED_WIDGETS:
            widget = getattr(self.ui, name)
            widget.enabled = not useBank
        self.ui.bankInfoLabel.text = self.logic.bankPanelText(pn.bankFile) if useBank and pn.bankFile else ""

    def onNormalsFolderChanged(self, path) -> None:
        if self._parameterNode is not None and self._parameterNode.normalsFolder != path:
            self._parameterNode.normalsFolder = path

    def onLoadExampleData(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to write the example data."), waitCursor=True):
            nodes = self.logic.loadExampleForModule()
            self.ui.statusLabel.text = _("Example data in {folder}: click Detect anomalies.").format(
                folder=os.path.dirname(self._parameterNode.normalsFolder) if self._parameterNode else ""
            )
            self._hideOutputsFromInputSelector()
            return nodes

    def onBrowseModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Folder of a DINOv3 or DINOv2 model (config.json and model.safetensors)"))
        if folder and self._parameterNode is not None:
            self._parameterNode.model = folder

    def _checkCanApply(self) -> None:
        reason = self._cannotApplyReason()
        running = self.logic is not None and self.logic.isRunning
        self.ui.applyButton.enabled = reason is None and not running
        if running:
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
        if pn.normalsSource == NormalsSource.BANK:
            if not pn.bankFile:
                return _("Select a normal bank file")
            return HiMatchADLogic.bankFileProblem(pn.bankFile)
        if not pn.normalsFolder:
            return _("Select the folder of normal scans")
        if not os.path.isdir(pn.normalsFolder):
            return _("The folder of normal scans does not exist: {path}").format(path=pn.normalsFolder)
        if not pn.model.strip():
            return _("Enter a model (Hugging Face id or local folder)")
        return None

    # ------------------------------------------------------------------ running
    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            return
        pn = self._parameterNode
        # Dependencies first, with a normal cursor: this may ask the user (one dialog for all packages).
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the anomaly detection."), waitCursor=True):
            if pn.normalsSource == NormalsSource.BANK:
                self.ui.bankPathLineEdit.addCurrentPathToHistory()
                qt.QSettings().setValue(BANK_FILE_SETTING, pn.bankFile)
            else:
                self.ui.normalsPathLineEdit.addCurrentPathToHistory()
                qt.QSettings().setValue(NORMALS_FOLDER_SETTING, pn.normalsFolder)
            self.logic.startProcessing(pn.inputVolume, **self.logic.referenceFromParameterNode(pn), **self.logic.runOptionsFromParameterNode(pn),
                                       **self.logic.settingsFromParameterNode(pn))

    def _ensureDependencies(self) -> bool:
        """Install what is missing (asking first; progress in the status line); False if not ready."""
        from HiMatchADLib.mrml import install

        def showInstallProgress(message):
            self.ui.statusLabel.text = message
            slicer.app.processEvents()

        try:
            with slicer.util.tryWithErrorDisplay(_("The Python packages HiMatch-AD needs are not available.")):
                try:
                    self.logic.ensureDependencies(interactive=True, progress=showInstallProgress)
                except install.MissingRequirements as exc:
                    if not exc.restart_required:
                        raise
                    self.ui.statusLabel.text = str(exc)  # the restart was offered already: no second dialog
        except Exception:
            pass  # shown by tryWithErrorDisplay
        return self.logic.dependenciesReady

    def onJobStarted(self, job) -> None:
        """A run started (here or from the Python console): show its progress until it ends."""
        if self._pollTimer is None or self._pollTimer.isActive():
            return
        self._setRunning(True)
        self.ui.statusLabel.text = {"detect": _("Starting..."), "mark_normal": _("Marking as normal...")}.get(job.kind, _("Starting a batch..."))
        self._pollTimer.start()

    def onCancelButton(self) -> None:
        if self.logic.cancel():
            self._endJob()
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")

    def _setRunning(self, running: bool) -> None:
        self.ui.progressBar.setVisible(running)
        self.ui.cancelButton.setVisible(running)
        self.ui.cancelButton.enabled = running
        if running:
            self.ui.progressBar.setRange(0, 0)  # busy until the first progress report
            self.ui.progressBar.format = _("Starting...")
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        self.ui.markNormalButton.enabled = not running and self._currentNodes() is not None
        self.ui.undoMarkButton.enabled = not running and bool(HiMatchADLogic.markUndoStack)
        self._checkCanApply()

    def onPollJob(self) -> None:
        for kind, job, payload in self.logic.pollJob():
            if kind == "progress":
                message, done, total = payload
                self.ui.progressBar.setRange(0, max(int(total), 1))
                self.ui.progressBar.setValue(min(int(done), max(int(total), 1)))
                text = HiMatchADLogic.progressText(message, done, total)
                self.ui.progressBar.format = text
                self.ui.statusLabel.text = text
            elif kind == "done" and job.kind == "mark_normal":
                self._endJob()
                self.ui.statusLabel.text = self.logic.markNormalDone(job, payload)
                self._updateResultWidgets()
            elif kind == "done" and job.kind == "batch":
                self._endJob()
                counts = ", ".join(f"{n} {status}" for status, n in sorted(payload.get("counts", {}).items()))
                self.ui.statusLabel.text = _("Batch done ({counts}); summary: {summary}").format(counts=counts, summary=payload.get("summary", ""))
            elif kind == "done":
                self._endJob()
                self._showResult(job, payload)
            elif kind == "dropped":
                self._endJob()
                self.ui.statusLabel.text = str(payload)
            elif kind == "error":
                from HiMatchADLib.core.errors import ModelAccessError

                self._endJob()
                error = getattr(job, "error", None)
                message = error.message("panel") if isinstance(error, ModelAccessError) else str(payload)
                self.ui.statusLabel.text = _("Failed: {message}").format(message=message.splitlines()[0])
                if isinstance(error, ModelAccessError):
                    self._showModelAccessError(error)
                elif job.kind == "mark_normal":
                    slicer.util.errorDisplay(_("The region could not be marked as normal:\n{message}").format(message=message))
                else:
                    slicer.util.errorDisplay(_("Anomaly detection failed:\n{message}").format(message=message))
        if not self.logic.isRunning and self._pollTimer.isActive():
            self._endJob()

    def _endJob(self) -> None:
        self._pollTimer.stop()
        self._setRunning(False)

    def _showResult(self, job, result) -> None:
        pn = self._parameterNode
        volumeNode = job.volume_node
        with slicer.util.tryWithErrorDisplay(_("Failed to show the results.")):
            nodes = self._withEditsResolved(
                lambda ifEdited: self.logic.importResult(result, volumeNode, heatmapOpacity=pn.heatmapOpacity if pn else 0.5, ifEdited=ifEdited)
            )
            if nodes is None:
                self.ui.statusLabel.text = _("The new result was not shown: the edited Anomaly segment was left as it is.")
                return
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
            self.ui.reproduceLabel.text = ""  # the verdict was of the previous result
            self._hideOutputsFromInputSelector()
            self._showPlot(nodes.chart)
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s ({reuse}).").format(
                seconds=job.seconds,
                reuse=_("model and normal bank reused") if job.reused else _("model and normal bank loaded"),
            )
            for warning in result.warnings:
                logging.warning(f"HiMatch-AD: {warning}")
            self._updateResultWidgets()
            self.onSliceViewModified()

    def _withEditsResolved(self, update):
        """Run ``update(ifEdited)``; if the Anomaly segment was edited by hand, ask the user first.

        Returns what ``update`` returns, or None when the user chose to leave the segment as it is.
        No wait cursor is shown here, so the question appears with a normal cursor.
        """
        from HiMatchADLib.mrml.segments import SegmentEditedError

        try:
            return update("raise")
        except SegmentEditedError:
            choice = self._askAboutEdits()
            return None if choice is None else update(choice)

    # ------------------------------------------------------------------ results
    def _currentNodes(self):
        nodes = self.logic.lastNodes
        pn = self._parameterNode
        if nodes is None or pn is None or pn.resultVolume is None:
            return None
        if nodes.input_volume is None or nodes.input_volume is not pn.resultVolume:
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
        checking = self.logic.reproduceCheck is not None and self.logic.reproduceCheck.running
        self.ui.reproduceButton.enabled = hasResult and bool(nodes.result.provenance) and not checking
        running = self.logic.isRunning
        self._updateMarkTargets(nodes)
        self.ui.markNormalButton.enabled = hasResult and not running and self.ui.markTargetComboBox.count > 0
        self.ui.undoMarkButton.enabled = bool(HiMatchADLogic.markUndoStack) and not running
        self.ui.feedbackLabel.text = self.logic.feedbackText(nodes) if hasResult else ""
        if hasResult:
            self.ui.volumeScoreLabel.text = self.logic.scoreText(nodes)
            self.ui.anomalousVolumeLabel.text = self.logic.anomalousSizeText(nodes)
            self.ui.provenanceLabel.text = self.logic.provenanceText(nodes.result)
        else:
            self.ui.volumeScoreLabel.text = ""
            self.ui.anomalousVolumeLabel.text = ""
            self.ui.provenanceLabel.text = ""
            self.ui.reproduceLabel.text = ""

    def _updateMarkTargets(self, nodes) -> None:
        """The choices of what to mark: each segment of the result's segmentation, each slice view."""
        combo = self.ui.markTargetComboBox
        choices = []
        segmentation = getattr(nodes, "segmentation", None) if nodes is not None else None
        if segmentation is not None and segmentation.GetScene() is not None:
            seg = segmentation.GetSegmentation()
            for i in range(seg.GetNumberOfSegments()):
                name = seg.GetNthSegment(i).GetName()
                choices.append((_("Segment {name}").format(name=name), f"segment:{name}"))
        for view in HiMatchADLogic.SLICE_VIEWS:
            choices.append((_("Slice in the {view} view").format(view=view), f"slice:{view}"))
        if [combo.itemData(i) for i in range(combo.count)] == [data for _label, data in choices]:
            return
        current = combo.currentData if combo.count else None
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for label, data in choices:
            combo.addItem(label, data)
        index = combo.findData(current) if current else -1
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(wasBlocked)

    def onMarkNormal(self) -> None:
        nodes = self._currentNodes()
        if nodes is None or self.logic.isRunning:
            return
        target, _sep, name = str(self.ui.markTargetComboBox.currentData or "segment:").partition(":")
        options = {"segmentName": name or None} if target == "segment" else {"sliceView": name}
        pn = self._parameterNode
        if self.logic.runner.request_of(nodes.result) is None and pn is not None:  # a result not computed here: the panel's bank
            options.update(self.logic.referenceFromParameterNode(pn), **self.logic.settingsFromParameterNode(pn))
        with slicer.util.tryWithErrorDisplay(_("The region could not be marked as normal."), waitCursor=True):
            self.logic.startMarkNormal(nodes, target, note=self.ui.markNoteLineEdit.text, **options)
            self.ui.markNoteLineEdit.text = ""

    def onUndoMarkNormal(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The last mark could not be undone.")):
            self.ui.statusLabel.text = self.logic.undoMarkNormal()
        self._updateResultWidgets()

    def onCheckReproducibility(self) -> None:
        nodes = self._currentNodes()
        if nodes is None:
            return
        with slicer.util.tryWithErrorDisplay(_("The reproducibility check could not be started.")):
            self.logic.startReproduceCheck(nodes)
            self.ui.reproduceLabel.text = _("Checking in a separate process...")
            self.ui.reproduceButton.enabled = False
            self._reproduceTimer.start()

    def onPollReproduceCheck(self) -> None:
        check = self.logic.reproduceCheck
        report = check.poll() if check is not None else {"error": _("cancelled")}
        if report is None:
            return
        self._reproduceTimer.stop()
        self.ui.reproduceLabel.text = self.logic.reproduceText(report)
        self._updateResultWidgets()  # the button again; the verdict is cleared if the result is no longer shown

    def onThresholdChanged(self, value) -> None:
        if self._currentNodes() is None:
            return
        self._thresholdTimer.start()  # restarts while the slider moves

    def applyThreshold(self) -> None:
        nodes = self._currentNodes()
        if nodes is None:
            return
        value = float(self.ui.thresholdSliderWidget.value)
        with slicer.util.tryWithErrorDisplay(_("Failed to update the segmentation.")):
            if self._withEditsResolved(lambda ifEdited: self.logic.setThreshold(value, nodes, ifEdited=ifEdited)) is None:
                self._setSliderSilently(nodes.threshold)  # the user kept the segment as it is
                return
            if self._parameterNode is not None:
                self._parameterNode.threshold = value
            self._updateResultWidgets()

    def _askAboutEdits(self) -> Optional[str]:
        """The Anomaly segment was edited by hand: keep the edits (as a separate segment), overwrite them, or cancel."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Question)
        box.setWindowTitle(_("Edited segment"))
        box.setText(_("The Anomaly segment was edited since it was computed. The new result replaces its content."))
        box.setInformativeText(_("Keep your edits as a separate segment, overwrite them, or leave the segment as it is?"))
        keep = box.addButton(_("Keep edits as a new segment"), qt.QMessageBox.AcceptRole)
        overwrite = box.addButton(_("Overwrite"), qt.QMessageBox.DestructiveRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(keep)
        box.exec_()
        clicked = box.clickedButton()
        return "keep" if clicked == keep else "overwrite" if clicked == overwrite else None

    def _setSliderSilently(self, value: float) -> None:
        slider = self.ui.thresholdSliderWidget
        wasBlocked = slider.blockSignals(True)
        slider.value = float(value)
        slider.blockSignals(wasBlocked)

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

    def _plotViewNode(self):
        node = slicer.mrmlScene.GetSingletonNode(PLOT_VIEW_SINGLETON_TAG, "vtkMRMLPlotViewNode")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            node.SetSingletonTag(PLOT_VIEW_SINGLETON_TAG)
            node.SetName("HiMatch-AD score plot view")
        return node

    def _showPlot(self, chartNode) -> None:
        if chartNode is None:
            return
        viewNode = self._plotViewNode()
        viewNode.SetPlotChartNodeID(chartNode.GetID())
        self.plotWidget.setMRMLPlotViewNode(viewNode)
        self.plotWidget.setVisible(self.ui.showPlotButton.checked)

    def onShowPlot(self, show) -> None:
        pn = self._parameterNode
        if show and pn is not None and pn.scoreChart is not None:
            self._showPlot(pn.scoreChart)
        self.plotWidget.setVisible(bool(show) and pn is not None and pn.scoreChart is not None)

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


class HiMatchADLogic(ScriptedLoadableModuleLogic):
    """Runs the detection in the worker process and shows its results as MRML nodes. Usable without
    the module's GUI, from Slicer's Python console::

        logic = HiMatchAD.HiMatchADLogic()
        out = logic.process(volumeNode, "/data/normals", method="himatch", k=8)      # blocks until done
        out.volume_score, out.slice_scores, out.heatmap, out.segmentation
        rows = logic.processFolder("/data/incoming", "/data/normals", "/data/results")

    The worker keeps the model and the normal bank of the last settings loaded, so a second run on
    the same folder takes seconds. Nothing is computed in Slicer's own process.
    """

    #: The one worker of this Slicer process, shared by every logic object (the panel's and those
    #: made in the Python console), so that one model and one normal bank are loaded, not one per
    #: object, and the panel can follow a run started from the console.
    _sharedRunner = None

    #: Callables ``f(job)`` told of every job started through any logic object (the panel listens,
    #: to show the progress of runs it did not start).
    jobListeners = []

    #: The "mark as normal" entries made in this Slicer session, last on top: ``{"folder", "id",
    #: "entry"}`` (shared by every logic object, as the worker is). :meth:`undoMarkNormal` removes the top one.
    markUndoStack = []

    #: The slice views a slice can be marked in.
    SLICE_VIEWS = ("Red", "Yellow", "Green")

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.dependenciesReady = False
        self.lastNodes = None
        self.lastRunInfo = {}
        self.reproduceCheck = None

    def getParameterNode(self):
        return HiMatchADParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies
    def ensureDependencies(self, interactive: bool = True, progress=None, optional=()) -> None:
        """Install missing or too old Python packages into Slicer's Python: PyTorch through the PyTorch
        extension, ``Resources/requirements.txt`` and the packages of the ``optional`` features (e.g.
        ``("dicom",)``); ``progress(message)`` reports each step. See
        :func:`HiMatchADLib.mrml.install.ensure_requirements`. Raises
        ``HiMatchADLib.mrml.install.MissingRequirements`` (a ``RuntimeError``) when packages are missing
        and not installed (testing mode, declined, no PyTorch extension, restart needed, failure)."""
        from HiMatchADLib.mrml import install

        self.dependenciesReady = False
        install.ensure_requirements(REQUIREMENTS_FILE, interactive=interactive, progress=progress, optional=optional)
        self.dependenciesReady = True

    # ------------------------------------------------------------------ model, token, devices
    @staticmethod
    def modelChoices() -> list:
        """``(label, model id)`` of the Model selector: the known models with their licence and
        whether the Hub asks for approval."""
        out = []
        for m in KNOWN_MODELS:
            needs = _("approval + token") if m.gated else _("no login")
            out.append((f"{m.label} ({m.licence}, {needs})", m.id))
        return out

    @staticmethod
    def modelChoiceLabel(model: str) -> str:
        """The selector's label for a model that is not a known one: a folder, or another Hub id."""
        if os.path.isdir(os.path.expanduser(model)):
            return _("Local folder: {name}").format(name=os.path.basename(os.path.normpath(model)) or model)
        return _("Other: {model}").format(model=model)

    @staticmethod
    def modelInfoText(model: str) -> str:
        """The line under the Model selector (rich text): licence, approval, model page."""
        from HiMatchADLib.features.models import model_info, ungated_alternative

        info = model_info(model)
        if info is None:
            if os.path.isdir(os.path.expanduser(model)):
                return _("A model folder on this computer; its licence is the one it was published under.")
            return _("A Hugging Face model id: downloaded once, then used from the cache.")
        page = f'<a href="{info.url}">{_("model page")}</a>'
        if not info.gated:
            return _("{licence}; no login needed. Downloaded once ({page}).").format(licence=info.licence, page=page)
        alternative = ungated_alternative(model)
        text = _("{licence}. Request access on the {page} (approval can take a while), then save a Hugging Face token below.").format(
            licence=info.licence, page=page)
        if alternative is not None:
            text += " " + _("No approval yet? Choose {label} ({licence}, no login).").format(label=alternative.label, licence=alternative.licence)
        return text

    @staticmethod
    def tokenStatusText(status: dict) -> str:
        """What the panel says about the Hugging Face token (never the token)."""
        if not status.get("available"):
            return _("No token stored: needed for the DINOv3 models only.")
        if status.get("source") == "environment":
            return _("A token is set in the HF_TOKEN environment variable (it takes precedence over a stored one).")
        return _("A token is stored ({path}).").format(path=status.get("path", ""))

    @staticmethod
    def progressText(message: str, done: int, total: int) -> str:
        """The progress bar's text: ``message done/total``, in MB for a model download."""
        from HiMatchADLib.features.backbone import download_message

        if not total:
            return str(message)
        unit = " MB" if str(message).startswith(download_message("")) else ""
        return f"{message} {done}/{total}{unit}"

    @staticmethod
    def devicesText(devices: list) -> str:
        labels = [d.get("label") or d.get("device", "?") for d in devices]
        return _("The worker found: {devices}").format(devices=", ".join(labels) if labels else _("no device"))

    def workerDevices(self) -> list:
        """The devices PyTorch finds in the worker process (its ``ping`` answer; starts the worker)."""
        if self.isRunning:
            raise RuntimeError("A detection is running")
        return list(self.runner.client.request({"cmd": "ping"}, timeout=300).get("devices", []))

    # ------------------------------------------------------------------ example data
    @staticmethod
    def defaultExampleFolder() -> str:
        """Where the example data go: ``HiMatchAD-example`` in Slicer's default scene folder (the
        user's Documents unless changed in the application settings), a folder the user can find."""
        base = getattr(slicer.app, "defaultScenePath", None) or os.path.expanduser("~")
        return os.path.join(base, EXAMPLE_FOLDER_NAME)

    @staticmethod
    def writeExampleData(folder=None, normals: int = 6, shape=(24, 96, 96), seed: int = 0) -> dict:
        """Write generated example data for a first run (the same phantoms as ``himatchad demo``):
        ``normals`` normal volumes in ``folder/normals``, a case with a synthetic lesion
        (``query.nii.gz``) and its lesion mask. Nothing is downloaded and no model is involved.
        Returns the paths (``folder``, ``normals``, ``query``, ``mask``)."""
        from HiMatchADLib.evaluation.phantom import write_demo_dataset

        folder = os.fspath(folder or HiMatchADLogic.defaultExampleFolder())
        paths = write_demo_dataset(folder, n_normals=normals, shape=tuple(shape), seed=seed)
        with open(os.path.join(folder, "README.txt"), "w", encoding="utf-8") as f:
            f.write(EXAMPLE_README)
        return {"folder": folder, **{k: os.fspath(v) for k, v in paths.items()}}

    def loadExampleData(self, folder=None, scene=None, **options):
        """Write the example data (:meth:`writeExampleData`) and load the case and its lesion mask
        into ``scene`` (default: Slicer's scene). Returns ``(caseVolumeNode, lesionLabelmapNode,
        normalsFolder)``: detect anomalies in the case against the normals folder."""
        from HiMatchADLib.mrml.examples import load_volume_file

        scene = scene or slicer.mrmlScene
        paths = self.writeExampleData(folder, **options)
        case = load_volume_file(scene, paths["query"], EXAMPLE_CASE_NAME)
        lesion = load_volume_file(scene, paths["mask"], EXAMPLE_CASE_NAME + " lesion (truth)", labelmap=True)
        return case, lesion, paths["normals"]

    def loadExampleForModule(self, folder=None):
        """:meth:`loadExampleData` into Slicer's scene, the case shown in the slice views and set as
        the module's input, its normals folder as the module's normal scans folder. Returns the
        case and lesion nodes."""
        from HiMatchADLib import mrml

        case, lesion, normals = self.loadExampleData(folder)
        pn = self.getParameterNode()
        pn.inputVolume = case
        pn.normalsFolder = normals
        mrml.show_in_slice_views(case.GetScene(), background_node=case)
        if hasattr(slicer.app, "layoutManager"):  # the application (not the MRML libraries alone)
            slicer.util.resetSliceViews()
        logging.info(f"HiMatch-AD: example data written to {os.path.dirname(normals)}")
        return [case, lesion]

    # ------------------------------------------------------------------ the worker
    @staticmethod
    def pythonSlicerExecutable() -> str:
        """``PythonSlicer``: Slicer's Python interpreter with Slicer's environment, run as a separate process."""
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            path = shutil.which(name)
            if path:
                return path
        folder = os.path.dirname(sys.executable)
        for candidate in (os.path.join(folder, "PythonSlicer"), os.path.join(folder, "PythonSlicer.exe")):
            if os.path.isfile(candidate):
                return candidate
        raise RuntimeError("PythonSlicer (Slicer's Python interpreter) was not found next to Slicer; reinstall Slicer")

    @property
    def runner(self):
        """The :class:`HiMatchADLib.mrml.jobs.DetectionRunner` of this Slicer process (shared by every
        logic object; its worker starts on the first run)."""
        cls = HiMatchADLogic
        if cls._sharedRunner is None:
            from HiMatchADLib.mrml.jobs import DetectionRunner
            from HiMatchADLib.worker.client import WorkerClient

            client = WorkerClient(
                python=self.pythonSlicerExecutable(),
                base_env=slicer.util.startupEnvironment(),
                log=lambda line: logging.info(f"HiMatch-AD worker: {line}"),
                parent_pid=os.getpid(),  # Slicer itself: the worker ends when Slicer does, crashed or not
            )
            cls._sharedRunner = DetectionRunner(client)
        return cls._sharedRunner

    @property
    def _runner(self):
        return HiMatchADLogic._sharedRunner

    @property
    def isRunning(self) -> bool:
        return self._runner is not None and self._runner.busy

    def shutdown(self) -> None:
        """Stop any run and end the worker (module reload, application exit)."""
        if self.reproduceCheck is not None:
            self.reproduceCheck.cancel()
        if self._runner is not None:
            self._runner.shutdown()

    @staticmethod
    def _jobStarted(job):
        for listener in list(HiMatchADLogic.jobListeners):
            try:
                listener(job)
            except Exception:  # a listener's failure never stops the run
                logging.exception("HiMatch-AD: a job listener failed")
        return job

    # ------------------------------------------------------------------ settings
    #: Detector settings the module's parameter node holds that a bank file leaves free.
    BANK_PANEL_SETTINGS = ("device", "batch_size")

    @staticmethod
    def referenceFromParameterNode(pn) -> dict:
        """What the volume is compared with: ``{"normalsFolder": FOLDER}`` or ``{"bank": FILE}``."""
        if pn.normalsSource == NormalsSource.BANK:
            return {"bank": pn.bankFile}
        return {"normalsFolder": pn.normalsFolder}

    @staticmethod
    def settingsFromParameterNode(pn) -> dict:
        """Detector keyword settings from the module's parameter node.

        With a bank file only the settings it leaves free are given (device, batch size), and the
        model only when the user chose one that is neither the panel's default nor the bank's own
        (e.g. the same weights in a local folder: the worker checks they are the bank's)."""
        if pn.normalsSource == NormalsSource.BANK:
            from HiMatchADLib.mrml.jobs import bank_request_settings

            model = pn.model.strip()
            if model in ("", DEFAULT_MODEL):
                model = None
            else:
                try:
                    if model == HiMatchADLogic.bankFileInfo(pn.bankFile).get("model"):
                        model = None  # the bank's own model: nothing to ask
                except Exception:
                    pass  # not a bank file: refused when the run starts
            free = {"device": pn.device.value, "batch_size": int(pn.batchSize)}
            return bank_request_settings(free, model=model)
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

    # ------------------------------------------------------------------ bank files
    _bankInfoCache = {}

    @staticmethod
    def bankFileInfo(path) -> dict:
        """What the bank file ``path`` holds (``HiMatchADLib.mrml.jobs.bank_file_info``: model,
        method, slices, subjects, anonymised...), read from its manifest (a small member of the
        file; no torch). Raises ``HiMatchADLib.HiMatchADError`` for a file that is not a bank file."""
        from HiMatchADLib.core.errors import HiMatchADError
        from HiMatchADLib.mrml.jobs import bank_file_info

        path = os.path.expanduser(os.fspath(path or ""))
        if not path:
            raise HiMatchADError("no bank file chosen")
        try:
            st = os.stat(path)
            key = (path, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        cache = HiMatchADLogic._bankInfoCache
        if key is not None and key in cache:
            return dict(cache[key])
        info = bank_file_info(path)
        if key is not None:
            cache.clear()  # one file at a time
            cache[key] = info
        return dict(info)

    @staticmethod
    def bankFileProblem(path) -> Optional[str]:
        """Why ``path`` cannot be used as a bank file (one message), or None."""
        from HiMatchADLib.core.errors import HiMatchADError

        try:
            HiMatchADLogic.bankFileInfo(path)
        except HiMatchADError as exc:
            return str(exc)
        return None

    @staticmethod
    def bankPanelText(path) -> str:
        """The line under the bank file: what it holds, or why it cannot be used (one message)."""
        from HiMatchADLib.core.errors import HiMatchADError

        try:
            return HiMatchADLogic.bankInfoText(HiMatchADLogic.bankFileInfo(path))
        except HiMatchADError as exc:
            return str(exc)

    @staticmethod
    def bankInfoText(info: dict) -> str:
        """What the panel says of a bank file: model, method, normal slices, names."""
        model = info.get("model") or _("unknown")
        digest = info.get("weights_digest")
        lines = [
            _("Model: {model}").format(model=model) + (f" ({digest[:19]}…)" if digest else ""),
            _("Method: {method}; {slices} normal slices of {subjects} subjects").format(
                method=info.get("method") or "?", slices=info.get("slices", "?"), subjects=info.get("subjects", "?")),
            _("Names anonymised") if info.get("anonymised") else _("Names of the normal scans kept"),
        ]
        if info.get("tool_version"):
            lines.append(_("Made by HiMatch-AD {version}").format(version=info["tool_version"]) + (f", {info['created']}" if info.get("created") else ""))
        lines.append(_("The file fixes the model and method settings; device and batch size are yours."))
        return "\n".join(lines)

    # ------------------------------------------------------------------ one volume
    def startProcessing(self, volumeNode, normalsFolder=None, bank=None, useFeedback: bool = True, feedbackFolder=None, **settings):
        """Send ``volumeNode`` to the worker and return its job at once (follow it with :meth:`pollJob`).

        The volume is compared with the folder ``normalsFolder`` or with the bank file ``bank``
        (exactly one). The voxels are written to a temporary file here, on the main thread; the
        scene is not touched until :meth:`importResult`. The job keeps the node object itself: if
        the scene is closed or the volume removed or changed meanwhile, the result is dropped
        instead of imported. ``useFeedback=False``: the reader feedback ("mark as normal") of the
        bank is not used; ``feedbackFolder``: where it is kept (default: beside the bank).
        """
        if volumeNode is None:
            raise ValueError("No input volume")
        if bank is None and (not normalsFolder or not os.path.isdir(os.fspath(normalsFolder))):
            raise ValueError(f"The folder of normal scans does not exist: {normalsFolder}")
        normals = os.fspath(normalsFolder) if normalsFolder else None
        return self._jobStarted(self.runner.start_detection(
            volumeNode, normals, settings, bank=os.fspath(bank) if bank else None,
            feedback_dir=os.fspath(feedbackFolder) if feedbackFolder else None, use_feedback=bool(useFeedback)))

    @staticmethod
    def runOptionsFromParameterNode(pn) -> dict:
        """:meth:`startProcessing`'s options from the panel besides reference and settings."""
        return {"useFeedback": bool(pn.useFeedback)}

    def pollJob(self) -> list:
        """``(kind, job, payload)`` events since the last call; never blocks (see ``DetectionRunner.poll``)."""
        return self._runner.poll() if self._runner is not None else []

    def cancel(self) -> bool:
        """Stop the running job at once (the worker is killed; the next run starts a new one)."""
        return self._runner is not None and self._runner.cancel()

    def discardJob(self) -> bool:
        """The scene is closing: cancel a running job so that its result is never imported."""
        running = self.isRunning
        if self._runner is not None:
            self._runner.discard()
        return running

    @staticmethod
    def _settings(bank, method, k, model, modality, device, detectorOptions) -> dict:
        """The request's settings: with a folder, the defaults fill what is not given; with a bank
        file, only what is given goes (everything else is the file's; a given setting must agree
        with it)."""
        given = {"model": model, "method": method, "k": k, "modality": modality, "device": device, **detectorOptions}
        if bank is not None:
            return {name: value for name, value in given.items() if value is not None}
        defaults = {"model": DEFAULT_MODEL, "method": "himatch", "k": 8, "modality": "auto", "device": "auto"}
        return {**given, **{name: defaults[name] for name in defaults if given[name] is None}}

    def process(
        self,
        volumeNode,
        normalsFolder=None,
        method: Optional[str] = None,
        k: Optional[int] = None,
        model: Optional[str] = None,
        modality: Optional[str] = None,
        device: Optional[str] = None,
        progress=None,
        cancelEvent=None,
        show: bool = True,
        heatmapOpacity: float = 0.5,
        timeout: Optional[float] = None,
        ifEdited: str = "raise",
        bank=None,
        useFeedback: bool = True,
        feedbackFolder=None,
        **detectorOptions,
    ):
        """Detect anomalies in ``volumeNode`` against the normal scans in ``normalsFolder`` and wait.

        ``bank``: a bank file (``himatchad bank export``) instead of ``normalsFolder`` (exactly one).
        It fixes the model and method settings: give only those you choose (device, batch_size,
        threshold...); one that disagrees with the file is refused. With a folder, ``method``,
        ``k``, ``model``, ``modality`` and ``device`` default to ``"himatch"``, 8, the default model,
        ``"auto"`` and ``"auto"``.

        The computation runs in the worker process; this call blocks (keeping the application drawn)
        until it ends. Extra keyword arguments go to ``HiMatchDetector`` (e.g. ``resolution=448``,
        ``target_fpr=0.01``, ``threshold=2.5``, ``cache_dir=...``). ``progress(message, done, total)``
        is called during the run; setting ``cancelEvent`` (anything with ``is_set()``) cancels it.

        Returns a ``HiMatchADLib.mrml.ResultNodes``: heatmap, labelmap, segmentation (segment
        "Anomaly"), score table and chart nodes, the ``DetectionResult`` (``.result``) and shortcuts
        ``.volume_score``, ``.slice_scores``, ``.most_anomalous_slice``. ``useFeedback=False``: the
        regions marked as normal (:meth:`markNormal`) are not used; ``feedbackFolder``: where they
        are kept (default: beside the normal bank). Errors raise
        ``HiMatchADLib.HiMatchADError`` with the worker's message. If the Anomaly segment of an earlier
        run was edited by hand, ``ifEdited`` decides (``"raise"``, ``"keep"`` or ``"overwrite"``).
        """
        self.ensureDependencies()
        settings = self._settings(bank, method, k, model, modality, device, detectorOptions)
        messages = []

        def report(message, done, total):
            if not messages or messages[-1] != message:
                messages.append(message)
            (progress or self._logProgress)(message, done, total)

        job = self.startProcessing(volumeNode, normalsFolder, bank=bank, useFeedback=useFeedback, feedbackFolder=feedbackFolder, **settings)
        result = self.runner.wait(progress=report, cancel_event=cancelEvent, timeout=timeout, idle=slicer.app.processEvents)
        self.lastRunInfo = {
            "detectorReused": bool(job.reused),
            "totalSeconds": job.seconds,
            "messages": messages,
            "normalsFolder": os.fspath(normalsFolder) if normalsFolder else None,
            "bank": os.fspath(bank) if bank else None,
            "workerPid": self.runner.client.pid,
        }
        return self.importResult(result, volumeNode, show=show, heatmapOpacity=heatmapOpacity, ifEdited=ifEdited)

    @staticmethod
    def _logProgress(message: str, done: int, total: int) -> None:
        if done == 0 or done >= total:
            logging.info(f"HiMatch-AD: {message} {done}/{total}")

    def importResult(self, result, volumeNode, show: bool = True, heatmapOpacity: float = 0.5, ifEdited: str = "raise"):
        """Create or update the output nodes of ``result`` (main thread).

        If an earlier Anomaly segment of this volume was edited by hand, ``ifEdited`` says what to do
        (see :meth:`setThreshold`); with ``"raise"`` nothing is changed.
        """
        from HiMatchADLib import mrml

        previous = self.lastNodes
        nodes = mrml.result_to_nodes(
            result, volumeNode, previous=previous, scene=volumeNode.GetScene(), show=show, heatmap_opacity=heatmapOpacity,
            if_edited=ifEdited,
        )
        self.lastNodes = nodes
        return nodes

    def forgetResult(self) -> None:
        self.lastNodes = None
        if self.reproduceCheck is not None:
            self.reproduceCheck.cancel()
            self.reproduceCheck = None

    def setThreshold(self, threshold: float, nodes=None, ifEdited: str = "raise") -> int:
        """Re-threshold the last (or given) result: the segment and labelmap change, the maps do not.

        If the Anomaly segment was edited since it was computed, ``ifEdited`` says what to do:
        ``"raise"`` (``HiMatchADLib.mrml.SegmentEditedError``, nothing changed), ``"keep"`` (the edited
        segment is kept as a separate segment) or ``"overwrite"``. Returns the number of anomalous voxels.
        """
        nodes = nodes or self.lastNodes
        if nodes is None:
            raise ValueError("No detection result to re-threshold; run the detection first")
        return nodes.set_threshold(float(threshold), if_edited=ifEdited)

    @staticmethod
    def scoreText(nodes) -> str:
        """The volume score, and how many slices were scored when some were not (too little
        foreground for one model patch): a partly scored volume is not read as wholly normal."""
        scored, slices = nodes.slices_scored
        text = f"{nodes.volume_score:.4g}"
        if scored < slices:
            text += " " + _("({scored} of {slices} slices scored)").format(scored=scored, slices=slices)
        return text

    @staticmethod
    def anomalousSizeText(nodes) -> str:
        """Voxel count and physical size of the anomalous region: mL for volumes, cm² for a 2D image."""
        result = nodes.result
        voxels = nodes.anomalous_voxels
        if result.geometry.is_2d:
            return _("{voxels} pixels ({area:.2f} cm²)").format(voxels=voxels, area=voxels * result.voxel_measure / 100.0)
        return _("{voxels} voxels ({ml:.2f} mL)").format(voxels=voxels, ml=voxels * result.voxel_measure / 1000.0)

    @staticmethod
    def provenanceText(result) -> str:
        """What made ``result`` (its scores JSON's ``"provenance"``): tool version and method, model
        and whether its weights are a random stand-in, device and precision, normal bank."""
        prov = getattr(result, "provenance", None) or {}
        if not prov:
            return _("Not recorded (a result made before HiMatch-AD recorded provenance).")
        model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
        bank = prov.get("bank") if isinstance(prov.get("bank"), dict) else {}
        lines = [_("HiMatch-AD {version}, method {method} (revision {revision})").format(
            version=prov.get("version", "?"), method=prov.get("method", "?"), revision=prov.get("method_revision", "?"))]
        digest = model.get("weights_digest")
        line = _("Model: {model}").format(model=model.get("id") or "?")
        line += " " + (_("(weights {digest}…)").format(digest=digest[:19]) if digest else _("(no weights digest)"))
        if model.get("random_weights"):
            line += "; " + _("random stand-in weights: this result says nothing about the method")
        lines.append(line)
        device = str(prov.get("device") or "?") + (f" ({prov['device_name']})" if prov.get("device_name") else "")
        lines.append(_("Device: {device}, precision {precision}").format(device=device, precision=prov.get("precision", "?")))
        if bank.get("bank_file_digest"):
            lines.append(_("Normal bank: the bank file {file} ({digest}…)").format(
                file=bank.get("bank_file") or _("(not named)"), digest=str(bank["bank_file_digest"])[:19]))
        elif bank.get("folder") or bank.get("digest"):
            lines.append(_("Normal bank: {folder}, {files} scans, {slices} slices (digest {digest}…)").format(
                folder=bank.get("folder") or "?", files=bank.get("files", "?"), slices=bank.get("slices", "?"), digest=str(bank.get("digest"))[:12]))
        return "\n".join(lines)

    @staticmethod
    def reproduceText(report: dict) -> str:
        """The verdict of ``himatchad reproduce --json`` (a :class:`HiMatchADLib.mrml.jobs.ReproduceCheck`
        report): one head line, then what differs or could not be checked."""
        if "error" in report:
            return _("The reproducibility check failed: {message}").format(message=report["error"])
        verdict = report.get("reproducible")
        head = {
            "yes": _("Reproducible here: yes (everything that decides the numbers is the same)"),
            "no": _("Reproducible here: no (something that decides the numbers differs)"),
            "not confirmed": _("Reproducible here: not confirmed (nothing differs, but some items could not be checked)"),
        }.get(verdict, _("Reproducible here: {verdict}").format(verdict=verdict))

        def show(value):
            import json

            return _("(none)") if value is None else value if isinstance(value, str) else json.dumps(value, default=str)

        lines = [head]
        items = [i for i in report.get("items", []) if isinstance(i, dict)]
        for item in sorted(items, key=lambda i: not i.get("decides", True)):  # what decides first
            status, why = item.get("status"), item.get("why") or ""
            if status == "cannot check" and item.get("decides", True):
                lines.append(_("{item}: cannot check: {why}").format(item=item.get("item"), why=why))
            elif status == "differs":
                if item.get("before") is None and item.get("now") is None:
                    text = f"{item.get('item')}: " + _("differs: {why}").format(why=why)
                else:
                    text = f"{item.get('item')}: " + _("differs: {before} -> {now}").format(before=show(item.get("before")), now=show(item.get("now")))
                    text += f" ({why})" if why else ""
                lines.append(text + ("" if item.get("decides", True) else " " + _("(informational)")))
        return "\n".join(lines)

    def startReproduceCheck(self, nodes=None):
        """Ask, in a child process (``himatchad reproduce --json``, Slicer's Python), whether this
        installation gives the same result as the last (or given) one; returns at once a
        ``HiMatchADLib.mrml.jobs.ReproduceCheck`` (``poll()``: None while it runs, then its report,
        shown by :meth:`reproduceText`). The input volume is written again for its content to be
        compared."""
        nodes = nodes or self.lastNodes
        if nodes is None:
            raise ValueError("No detection result to check; run the detection first")
        if self.reproduceCheck is not None and self.reproduceCheck.running:
            raise RuntimeError("A reproducibility check is running")
        self.reproduceCheck = self.runner.check_reproduction(nodes.result, nodes.input_volume)
        return self.reproduceCheck

    def checkReproducibility(self, nodes=None, timeout: Optional[float] = 600) -> dict:
        """:meth:`startReproduceCheck` and wait for its report (Python console)."""
        return self.startReproduceCheck(nodes).wait(timeout=timeout)

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

    # ------------------------------------------------------------------ mark as normal (reader feedback)
    @staticmethod
    def sliceNodeByName(scene, name: str = "Red"):
        """The slice node of the view ``name`` ("Red", "Yellow", "Green") in ``scene``, or None."""
        nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
        nodes.UnRegister(scene)  # as slicer.util.getNodesByClass does (the collection is a new reference)
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetLayoutName() == name:
                return node
        return None

    #: Largest sine of the angle between a slice view's plane and the input's slice planes for the
    #: view to show one input slice (0.06 degrees).
    SLICE_PLANE_TOLERANCE = 1e-3

    @staticmethod
    def sliceIndexInView(nodes, sliceNode) -> int:
        """The input slice (index along ``nodes.result.slice_axis``, an axis of the input array as the
        worker reads it) that the slice view ``sliceNode`` shows through the input volume.

        The view's plane must be one of the input's slice planes: parallel to them (within
        :data:`SLICE_PLANE_TOLERANCE`), in world coordinates, the input volume's IJK-to-RAS and its
        parent transform included, and inside the volume. Raises ``HiMatchADError`` (one message)
        otherwise."""
        import numpy as np
        from HiMatchADLib import mrml
        from HiMatchADLib.core.errors import HiMatchADError

        if sliceNode is None:
            raise HiMatchADError("no slice view to take the slice from")
        result, volume = nodes.result, nodes.input_volume
        view = sliceNode.GetLayoutName() or sliceNode.GetName()
        sliceToRas = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
        normal, center = sliceToRas[:3, 2], sliceToRas[:3, 3]
        # The input's slice axis in world coordinates: from the centre of a slice to the next one.
        axis = 2 - int(result.slice_axis)  # IJK axis of the numpy axis
        ijkToRas = mrml.ijk_to_ras_matrix(volume)
        centerIjk = (np.asarray(mrml.volume_size(volume), dtype=float) - 1.0) / 2.0
        step = np.zeros(3)
        step[axis] = 1.0
        points = [ijkToRas @ np.append(centerIjk, 1.0), ijkToRas @ np.append(centerIjk + step, 1.0)]
        points = [p[:3] for p in points]
        transformNode = volume.GetParentTransformNode()
        if transformNode is not None:
            toWorld = vtk.vtkGeneralTransform()
            transformNode.GetTransformToWorld(toWorld)
            points = [np.asarray(toWorld.TransformPoint(p)) for p in points]
        direction = points[1] - points[0]
        sine = float(np.linalg.norm(np.cross(normal / np.linalg.norm(normal), direction / np.linalg.norm(direction))))
        if sine > HiMatchADLogic.SLICE_PLANE_TOLERANCE:
            raise HiMatchADError(
                f"the {view} view does not show a slice of '{volume.GetName()}' along the axis the detector sliced it "
                f"(its plane is {np.degrees(np.arcsin(min(sine, 1.0))):.1f} degrees off); rotate the view to the volume plane "
                "or show the slice in another view, or mark a segment instead")
        index = mrml.slice_index_at_ras(result, volume, center)
        if index < 0:
            raise HiMatchADError(f"the {view} view is outside '{volume.GetName()}': move it to the slice to mark")
        return int(index)

    def _markRequest(self, result, normalsFolder, bank, settings) -> dict:
        """The reference and settings of a mark: those given, else those of the detection that
        computed ``result`` (so the mark goes to that bank's feedback)."""
        from HiMatchADLib.core.errors import HiMatchADError

        if normalsFolder or bank:
            return {**({"bank": os.fspath(bank)} if bank else {"normals": os.fspath(normalsFolder)}), "settings": dict(settings)}
        request = self.runner.request_of(result)
        if request is None:
            raise HiMatchADError(
                "this result was not computed in this session, so its normal bank is not known: give the folder of "
                "normal scans or the bank file it was computed with (and its settings)")
        if settings:
            request["settings"] = dict(settings)
        return request

    def startMarkNormal(self, nodes=None, target: str = "segment", segmentName: Optional[str] = None, sliceView: str = "Red",
                        sliceNode=None, note: str = "", normalsFolder=None, bank=None, **settings):
        """Mark a region of the last (or given) result's input as normal, in the worker; returns
        its job at once (follow it with :meth:`pollJob`, then give its ``done`` event to
        :meth:`markNormalDone`). :meth:`markNormal` does all of it and waits.

        ``target="segment"``: the segment ``segmentName`` (default "Anomaly") of the result's
        segmentation, as it is now (edits included), exported on the input volume's voxel grid;
        ``target="slice"``: the input slice the slice view ``sliceView`` (or ``sliceNode``) shows
        (:meth:`sliceIndexInView`). ``note`` is kept with the entry. The reference and settings are
        those of the detection that computed the result, unless given. Nothing is sent when the
        region cannot be marked (one ``HiMatchADError`` message)."""
        from HiMatchADLib import mrml
        from HiMatchADLib.core.errors import HiMatchADError

        nodes = nodes or self.lastNodes
        if nodes is None:
            raise HiMatchADError("there is no detection result to mark: run the detection first")
        if self.isRunning:
            raise HiMatchADError("a detection is running; wait for it to end before marking a region as normal")
        volume = nodes.input_volume
        if not mrml.node_in_scene(volume):
            raise HiMatchADError("the input volume of the result is no longer in the scene; run the detection again")
        mrml.check_result_matches(nodes.result, volume)
        region = slices = None
        if target == "segment":
            name = segmentName or mrml.SEGMENT_NAME
            segmentation = nodes.segmentation
            if not mrml.node_in_scene(segmentation, volume.GetScene()):
                raise HiMatchADError("the result's segmentation is no longer in the scene; run the detection again")
            if not segmentation.GetSegmentation().GetSegmentIdBySegmentName(name):
                raise HiMatchADError(f"there is no segment '{name}' in '{segmentation.GetName()}'")
            region = mrml.segment_to_array(segmentation, volume, name)
            if not region.any():
                raise HiMatchADError(f"the segment '{name}' is empty: nothing to mark as normal")
        elif target == "slice":
            if sliceNode is None:
                sliceNode = self.sliceNodeByName(volume.GetScene(), sliceView)
                if sliceNode is None:
                    raise HiMatchADError(f"there is no {sliceView} slice view")
            slices = [self.sliceIndexInView(nodes, sliceNode)]
        else:
            raise HiMatchADError(f"mark a 'segment' or a 'slice', not {target!r}")
        request = self._markRequest(nodes.result, normalsFolder, bank, settings)
        job = self.runner.start_mark_normal(
            volume, request.get("normals"), request["settings"], bank=request.get("bank"), region=region, slices=slices,
            note=note, feedback_dir=request.get("feedback_dir"))
        return self._jobStarted(job)

    def markNormal(self, nodes=None, target: str = "segment", timeout: Optional[float] = None, progress=None, **options) -> str:
        """:meth:`startMarkNormal` and wait for the worker's entry (Python console); returns what the
        panel says (:meth:`markNormalDone`)."""
        job = self.startMarkNormal(nodes, target, **options)
        event = self.runner.wait(progress=progress or self._logProgress, timeout=timeout, idle=slicer.app.processEvents)
        return self.markNormalDone(job, event)

    @staticmethod
    def _regionText(entry: dict) -> str:
        region = entry.get("region") if isinstance(entry.get("region"), dict) else {}
        slices = sorted(int(i) for i in region.get("slices") or [])
        where = "" if not slices else (_("on slice {a}").format(a=slices[0]) if slices[0] == slices[-1]
                                       else _("on slices {a}–{b}").format(a=slices[0], b=slices[-1]))
        return f"{region.get('patches', '?')} " + _("patches") + (f" {where}" if where else "")

    def markNormalDone(self, job, event: dict) -> str:
        """The worker made the entry: keep it on the undo stack; returns what the panel says."""
        entry = dict(event.get("entry") or {})
        folder = event.get("feedback_folder")
        HiMatchADLogic.markUndoStack.append({"folder": folder, "id": entry.get("id"), "entry": entry})
        HiMatchADLogic.lastFeedbackFolder = folder
        return _("Marked as normal: {region}; takes effect on the next run").format(region=self._regionText(entry))

    #: The feedback folder of the last mark (or undo) of this session.
    lastFeedbackFolder = None

    def undoMarkNormal(self) -> str:
        """Remove the last entry :meth:`markNormal` made in this session
        (``HiMatchADLib.bank.feedback.remove_entry``: files only, no model); the next run is as
        before that mark. Returns what the panel says."""
        from HiMatchADLib.bank.feedback import remove_entry
        from HiMatchADLib.core.errors import HiMatchADError

        if not HiMatchADLogic.markUndoStack:
            raise HiMatchADError("there is no mark as normal of this session to undo")
        if self.isRunning:
            raise HiMatchADError("a detection is running; wait for it to end before undoing a mark")
        mark = HiMatchADLogic.markUndoStack.pop()
        HiMatchADLogic.lastFeedbackFolder = mark["folder"]
        remove_entry(mark["folder"], mark["id"])
        return _("Removed the last mark ({region}); the next run is as before it").format(region=self._regionText(mark["entry"]))

    @staticmethod
    def feedbackFolderOf(nodes=None) -> Optional[str]:
        """Where the reader feedback of the result's bank is kept: its provenance's
        ``feedback_folder``, else that of the last mark of this session."""
        prov = getattr(getattr(nodes, "result", None), "provenance", None) or {}
        return prov.get("feedback_folder") or HiMatchADLogic.lastFeedbackFolder

    @staticmethod
    def feedbackText(nodes=None) -> str:
        """How many feedback entries the result's bank has now, and how many the result used."""
        from HiMatchADLib.bank.feedback import entry_files

        folder = HiMatchADLogic.feedbackFolderOf(nodes)
        if not folder:
            return _("Reader feedback: not recorded for this result")
        count = len(entry_files(folder))
        text = _("Reader feedback of this normal bank: {n} entries").format(n=count) if count != 1 else _(
            "Reader feedback of this normal bank: 1 entry")
        result = getattr(nodes, "result", None)
        if result is not None:
            used = len((getattr(result, "settings", None) or {}).get("feedback", []) or [])
            text += "; " + _("this result used {n}").format(n=used)
        return text

    # ------------------------------------------------------------------ a folder
    def processFolder(
        self,
        inputFolder,
        normalsFolder,
        outputFolder,
        method: Optional[str] = None,
        k: Optional[int] = None,
        model: Optional[str] = None,
        modality: Optional[str] = None,
        device: Optional[str] = None,
        overwrite: bool = False,
        background: bool = False,
        progress=None,
        cancelEvent=None,
        engine: str = "local",
        engineOptions: Optional[dict] = None,
        seriesFilter=None,
        dicomSeg: bool = False,
        dicomHeatmap: bool = False,
        bank=None,
        useFeedback: bool = True,
        **detectorOptions,
    ):
        """Detect anomalies in every image of ``inputFolder`` (sub-folders and DICOM series included).

        ``bank``: a bank file instead of ``normalsFolder`` (pass None for it), as in :meth:`process`;
        ``useFeedback=False``: the reader feedback of the bank is not used.

        This is the library's batch runner (the same as ``himatchad batch``), run in the worker: for
        each case ``<name>_heatmap.nii.gz``, ``<name>_labelmap.nii.gz`` and ``<name>_scores.json`` go
        to the matching sub-folder of ``outputFolder``, and ``summary.csv`` lists every case. The run is
        resumable (cases done earlier with the same settings are not recomputed, unless
        ``overwrite``); a case that fails is recorded and the batch goes on.

        ``engine="ray"`` spreads the cases over a Ray cluster (``engineOptions``: ``address``,
        ``workers``, ``gpus_per_worker``...; Ray must be installed in Slicer's Python).

        Every DICOM series is a case; ``seriesFilter`` (a ``--series-filter`` string or a list of them,
        e.g. ``"modality=MR,description~flair"``) keeps the series it selects. ``dicomSeg`` /
        ``dicomHeatmap`` also write a DICOM SEG / parametric map for DICOM cases.

        By default this call blocks until the batch ends and returns the summary rows (dicts). With
        ``background=True`` it returns the running job at once and Slicer stays usable: when the
        module's panel has been opened, it shows the job's progress and its end (and follows it:
        read ``job.state``, ``job.progress`` and, once done, ``job.event["summary"]``); without the
        panel, follow it with :meth:`pollJob`. :meth:`cancel` stops it.
        """
        self.ensureDependencies(optional=("dicom",) if (dicomSeg or dicomHeatmap) else ())
        settings = self._settings(bank, method, k, model, modality, device, detectorOptions)
        job = self.runner.start_batch(
            os.fspath(inputFolder), os.fspath(normalsFolder) if normalsFolder else None, os.fspath(outputFolder), settings,
            overwrite=overwrite, engine=engine, engine_options=engineOptions, bank=os.fspath(bank) if bank else None,
            batch_options={
                "series_filter": [seriesFilter] if isinstance(seriesFilter, str) else list(seriesFilter or []),
                "outputs": [name for name, wanted in (("dicom_seg", dicomSeg), ("dicom_heatmap", dicomHeatmap)) if wanted],
                **({} if useFeedback else {"use_feedback": False}),
            },
        )
        if background:
            return self._jobStarted(job)
        event = self.runner.wait(progress=progress or self._logProgress, cancel_event=cancelEvent, idle=slicer.app.processEvents)
        with open(event["summary"], newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        counts = event.get("counts", {})
        logging.info(f"HiMatch-AD: {len(rows)} cases ({counts}), summary in {event['summary']}")
        return rows


#
# HiMatchADTest
#


class HiMatchADTest(ScriptedLoadableModuleTest):
    """Self-test on the module's example data (generated phantoms) with a tiny random DINOv3 model.

    Nothing heavy runs in Slicer's process: the model is built and the detection computed in
    separate processes, and torch is never imported here. Run by CTest on a build machine (testing
    mode) where the Python requirements are not installed, the test checks the example data and
    skips the detection instead of installing PyTorch; from "Reload and Test" it offers to install
    them.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_HiMatchAD1()

    def test_HiMatchAD1(self):
        import subprocess

        import numpy as np

        from HiMatchADLib import mrml
        from HiMatchADLib.io.readers import read_image
        from HiMatchADLib.io.writers import write_image
        from HiMatchADLib.mrml import install

        torchWasLoaded = "torch" in sys.modules
        logic = HiMatchADLogic()
        with tempfile.TemporaryDirectory(prefix="HiMatchADTest") as tmp:
            self.delayDisplay("Example data, as the panel's Example data button writes it")
            volumeNode, lesionNode, normalsFolder = logic.loadExampleData(os.path.join(tmp, "example"), normals=3, shape=(12, 40, 40))
            self.assertEqual(len(os.listdir(normalsFolder)), 3)
            lesion = slicer.util.arrayFromVolume(lesionNode) > 0
            case = slicer.util.arrayFromVolume(volumeNode)
            self.assertEqual(lesion.shape, case.shape)
            self.assertTrue(lesion.any())
            self.assertTrue(np.array_equal(case, read_image(os.path.join(tmp, "example", "query.nii.gz")).array))
            self.assertTrue(mrml.is_supported_input(volumeNode))
            self.assertFalse(mrml.is_supported_input(lesionNode))

            missing = install.missing([install.TORCH_REQUIREMENT] + install.load_requirements(REQUIREMENTS_FILE))
            if missing and slicer.app.testingEnabled():
                logging.warning(
                    "HiMatch-AD self-test: detection skipped, the Python requirements are not installed "
                    f"({', '.join(missing)}) and nothing is installed in testing mode"
                )
                self.delayDisplay("Test passed (detection skipped: requirements not installed)")
                return
            self.delayDisplay("Checking Python dependencies")
            logic.ensureDependencies(interactive=True)  # asks first, from "Reload and Test"
            self.assertTrue(logic.dependenciesReady)

            # An oblique, anisotropic placement: outputs must overlay the input exactly.
            angle = np.radians(20.0)
            ijkToRas = np.eye(4)
            ijkToRas[:3, :3] = np.array([
                [-np.cos(angle), np.sin(angle), 0.0],
                [-np.sin(angle), -np.cos(angle), 0.0],
                [0.0, 0.0, 1.0],
            ]) @ np.diag([1.0, 1.0, 3.0])
            ijkToRas[:3, 3] = (12.0, -30.0, 5.0)
            volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))

            self.delayDisplay("A tiny random model, built in a separate process")
            modelFolder = os.path.join(tmp, "model")
            client = logic.runner.client
            subprocess.run(
                [client.python, "-c", "import sys; from HiMatchADLib.features.backbone import build_random_model; "
                 "build_random_model(sys.argv[1], 'selftest')", modelFolder],
                env=client.environment(), check=True, timeout=600, capture_output=True,
            )

            settings = {
                "method": "himatch", "k": 2, "model": modelFolder, "device": "cpu", "resolution": 64,
                "batch_size": 4, "calibration_slices": 8, "cache_dir": os.path.join(tmp, "cache"),
            }
            self.delayDisplay("First run, in the worker process (loads the model, builds the normal bank)")
            out = logic.process(volumeNode, normalsFolder, **settings)
            self.assertFalse(logic.lastRunInfo["detectorReused"])
            self.assertTrue(any("bank" in m.lower() for m in logic.lastRunInfo["messages"]))
            workerPid = logic.lastRunInfo["workerPid"]
            self.assertNotEqual(workerPid, os.getpid())  # computed in another process

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

            self.delayDisplay("Second run (the worker reuses the model and the normal bank)")
            again = logic.process(volumeNode, normalsFolder, **settings)
            self.assertTrue(logic.lastRunInfo["detectorReused"])
            self.assertEqual(logic.lastRunInfo["workerPid"], workerPid)
            self.assertFalse(any("bank" in m.lower() for m in logic.lastRunInfo["messages"]))
            self.assertEqual(again.heatmap.GetID(), out.heatmap.GetID())
            self.assertEqual(again.segmentation.GetID(), out.segmentation.GetID())
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)

            self.delayDisplay("Cancel while the worker computes: it stops at once and the scene is unchanged")
            nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
            logic.startProcessing(volumeNode, normalsFolder, **dict(settings, cache_dir=os.path.join(tmp, "cache2")))
            computing, deadline = False, time.monotonic() + 300
            while not computing and logic.isRunning and time.monotonic() < deadline:
                for kind, _job, payload in logic.pollJob():
                    computing = computing or (kind == "progress" and "bank" in str(payload[0]).lower())
                slicer.app.processEvents()
                time.sleep(0.02)
            self.assertTrue(computing and logic.isRunning, "the run should be building the normal bank when cancelled")
            cancelledPid = logic.runner.client.pid
            self.assertTrue(logic.cancel())
            self.assertFalse(logic.isRunning)
            self.assertEqual(logic.pollJob(), [])
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
            self.assertFalse(_processAlive(cancelledPid))

            self.delayDisplay("A folder, with the library's batch runner in the worker")
            casesFolder = os.path.join(tmp, "cases")
            os.makedirs(casesFolder)
            image = mrml.image_from_volume_node(volumeNode)
            write_image(image.array, image.geometry, os.path.join(casesFolder, "case1.nrrd"))
            rows = logic.processFolder(casesFolder, normalsFolder, os.path.join(tmp, "results"), **settings)
            self.assertEqual([r["status"] for r in rows], ["ok"])
            rows = logic.processFolder(casesFolder, normalsFolder, os.path.join(tmp, "results"), **settings)
            self.assertEqual([r["status"] for r in rows], ["done earlier"])

            logic.shutdown()
        if not torchWasLoaded:
            self.assertNotIn("torch", sys.modules)  # everything heavy ran in other processes
        self.delayDisplay("Test passed")


def _processAlive(pid) -> bool:
    """Whether process ``pid`` still runs (POSIX and Windows; a killed, uncollected child is gone)."""
    from HiMatchADLib.worker.server import process_alive

    return pid is not None and process_alive(pid)
