"""All output nodes of one result: made (:func:`result_to_nodes`), found (:class:`ResultNodes`), removed.

See the package notes (:mod:`HiMatchADLib.mrml`) for the geometry conventions and safety rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..core.errors import HiMatchADError
from ..core.result import DetectionResult
from .geometry import check_result_matches
from .heatmap import heatmap_to_volume_node
from .nodes import node_in_scene, place_in_same_study, require_in_scene, scene_of
from .scores import scores_to_plot, scores_to_table
from .segments import (
    SEGMENT_NAME,
    is_edited,
    labelmap_to_segmentation,
    segment_algorithm_type,
    update_segmentation_threshold,
)
from .views import show_in_slice_views


# --------------------------------------------------------------------------- everything at once
@dataclass
class ResultNodes:
    """The MRML nodes showing one :class:`DetectionResult`, and the result itself.

    ``labelmap`` mirrors the Anomaly segment of ``segmentation`` (edits included, see
    :func:`~HiMatchADLib.mrml.segments.sync_labelmap`); ``result.labelmap`` is the detector's
    labelmap at ``result.threshold``, without the edits.
    """

    result: DetectionResult
    input_volume: Any
    heatmap: Any = None
    labelmap: Any = None
    segmentation: Any = None
    segment_id: str = ""
    table: Any = None
    chart: Any = None
    plot_series: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def volume_score(self) -> float:
        return float(self.result.volume_score)

    @property
    def slices_scored(self) -> tuple:
        """``(scored, slices)``: how many slices have a score, of how many."""
        s = self.slice_scores
        return int(np.isfinite(s).sum()), int(s.size)

    @property
    def slice_scores(self) -> np.ndarray:
        return np.asarray(self.result.slice_scores, dtype=float)

    @property
    def most_anomalous_slice(self) -> int:
        return self.result.most_anomalous_slice

    @property
    def threshold(self) -> float:
        return float(self.result.threshold)

    @property
    def anomalous_voxels(self) -> int:
        return int(self.result.labelmap.sum())

    @property
    def algorithm_type(self) -> Optional[str]:
        """The segment's DICOM SegmentAlgorithmType now: AUTOMATIC or SEMIAUTOMATIC (None without it)."""
        if not node_in_scene(self.segmentation):
            return None
        return segment_algorithm_type(self.segmentation)

    def set_threshold(self, threshold: float, if_edited: str = "raise") -> int:
        """Re-threshold the result and update labelmap and segmentation; returns anomalous voxels.

        ``if_edited`` says what happens to edits of the segment: see :func:`update_segmentation_threshold`.
        """
        require_in_scene(self.input_volume, "input volume")
        require_in_scene(self.segmentation, "segmentation")
        labelmap = self.labelmap if node_in_scene(self.labelmap, self.segmentation.GetScene()) else None
        return update_segmentation_threshold(
            self.result, self.segmentation, threshold, labelmap_node=labelmap, reference_node=self.input_volume,
            if_edited=if_edited,
        )


def segment_was_edited(nodes: ResultNodes, segment_name: str = SEGMENT_NAME) -> bool:
    """True when segment ``segment_name`` no longer holds what the last import of a result put there
    (Segment Editor, ``slicer.util.updateSegmentBinaryLabelmapFromArray``, or a direct change of its
    binary labelmap). False when there is no such segment, or no segmentation left in the scene:
    then an update loses nothing."""
    if not node_in_scene(nodes.segmentation):
        return False
    return is_edited(nodes.segmentation, nodes.segmentation.GetSegmentation().GetSegmentIdBySegmentName(segment_name))


def result_to_nodes(
    result: DetectionResult,
    reference_node,
    previous: Optional[ResultNodes] = None,
    scene=None,
    show: bool = True,
    heatmap_opacity: float = 0.5,
    if_edited: str = "raise",
) -> ResultNodes:
    """Create (or update, on a second run) every output node of ``result`` for ``reference_node``.

    With ``show``, the input goes to the background and the heatmap to the foreground of every slice
    view. Nodes of ``previous`` are reused when it belongs to the same input volume node (the same
    object, still in the scene). ``result`` must have been computed on ``reference_node``
    (:func:`check_result_matches`), and an edited segment of an earlier run is handled by
    ``if_edited`` (see :func:`update_segmentation_threshold`), both before any node changes.
    """
    if reference_node is None:
        raise HiMatchADError("no input volume node to attach the results to")
    require_in_scene(reference_node, "input volume")
    scene = scene_of(scene, reference_node)
    if reference_node.GetScene() is not scene:
        raise HiMatchADError(f"the input volume '{reference_node.GetName()}' belongs to another scene")
    check_result_matches(result, reference_node)
    same = previous is not None and previous.input_volume is reference_node

    def reuse(attr):
        node = getattr(previous, attr) if same else None
        return node if node_in_scene(node, scene) else None

    segmentation, segment_id, labelmap = labelmap_to_segmentation(
        result, reference_node, segmentation_node=reuse("segmentation"), labelmap_node=reuse("labelmap"), scene=scene,
        if_edited=if_edited,
    )
    heatmap = heatmap_to_volume_node(result, reference_node, node=reuse("heatmap"), scene=scene)
    table = scores_to_table(result, table_node=reuse("table"), reference_node=reference_node, scene=scene)
    chart, series = scores_to_plot(table, chart_node=reuse("chart"), series_node=reuse("plot_series"), reference_node=reference_node, scene=scene)
    for node in (heatmap, labelmap, segmentation, table, chart):
        place_in_same_study(node, reference_node)
    if show:
        show_in_slice_views(scene, background_node=reference_node, foreground_node=heatmap, foreground_opacity=heatmap_opacity)
    return ResultNodes(result, reference_node, heatmap, labelmap, segmentation, segment_id, table, chart, series)


def remove_result_nodes(nodes: ResultNodes) -> None:
    """Remove a result's output nodes (and their display/storage nodes) from their scene."""
    for node in (nodes.chart, nodes.plot_series, nodes.table, nodes.segmentation, nodes.labelmap, nodes.heatmap):
        if node is None or node.GetScene() is None:
            continue
        scene = node.GetScene()
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for i in reversed(range(node.GetNumberOfDisplayNodes())):
                display = node.GetNthDisplayNode(i)
                if display is not None:
                    scene.RemoveNode(display)
        if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
            scene.RemoveNode(node.GetStorageNode())
        scene.RemoveNode(node)
