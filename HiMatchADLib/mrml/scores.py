"""The score table and plot of a result, and the supports of a slice."""

from __future__ import annotations

from typing import Optional

import numpy as np
import slicer
import vtk

from ..core.result import DetectionResult
from .nodes import (
    ROLE_CHART,
    ROLE_PLOT_SERIES,
    ROLE_TABLE,
    base_name,
    output_node,
    scene_of,
)
from .segments import SEGMENT_COLOR

TABLE_COLUMNS = ("Slice", "Score", "Foreground", "Top reference", "Top similarity")


# --------------------------------------------------------------------------- scores table and plot
def _slice_rows(result: DetectionResult):
    scores = np.asarray(result.slice_scores, dtype=float)
    for i, s in enumerate(scores):
        sups = result.supports[i] if i < len(result.supports) and result.supports[i] else []
        top = max(sups, key=lambda x: x.similarity) if sups else None
        yield i, (float(s) if np.isfinite(s) else 0.0), int(np.isfinite(s)), top


def scores_to_table(result: DetectionResult, table_node=None, reference_node=None, scene=None, name: Optional[str] = None):
    """Per-slice scores in a table node: slice index, score (0 where the slice had no foreground),
    foreground flag (1 = scored), and the best-matching normal reference with its similarity."""
    scene = scene_of(scene, table_node, reference_node)
    label = name or f"{base_name(result, reference_node)} anomaly scores"
    table_node = output_node(scene, "vtkMRMLTableNode", ROLE_TABLE, reference_node, table_node, label)
    rows = list(_slice_rows(result))
    idx = vtk.vtkIntArray()
    idx.SetName(TABLE_COLUMNS[0])
    score = vtk.vtkDoubleArray()
    score.SetName(TABLE_COLUMNS[1])
    fg = vtk.vtkIntArray()
    fg.SetName(TABLE_COLUMNS[2])
    ref = vtk.vtkStringArray()
    ref.SetName(TABLE_COLUMNS[3])
    sim = vtk.vtkDoubleArray()
    sim.SetName(TABLE_COLUMNS[4])
    for i, s, f, top in rows:
        idx.InsertNextValue(i)
        score.InsertNextValue(s)
        fg.InsertNextValue(f)
        ref.InsertNextValue(f"{top.source} [{top.slice_index}]" if top is not None else "")
        sim.InsertNextValue(float(top.similarity) if top is not None else 0.0)
    table = vtk.vtkTable()
    for column in (idx, score, fg, ref, sim):
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)
    table_node.SetAttribute("HiMatchAD.SliceAxis", str(int(result.slice_axis)))
    table_node.SetAttribute("HiMatchAD.VolumeScore", repr(float(result.volume_score)))
    return table_node


def scores_to_plot(table_node, chart_node=None, series_node=None, reference_node=None, scene=None, name: Optional[str] = None):
    """A plot chart of the table's score per slice (line). Returns ``(chart_node, series_node)``."""
    scene = scene_of(scene, chart_node, table_node)
    base = name or (f"{reference_node.GetName()} anomaly" if reference_node is not None else table_node.GetName())
    series_node = output_node(scene, "vtkMRMLPlotSeriesNode", ROLE_PLOT_SERIES, reference_node, series_node, f"{base} score")
    with slicer.util.NodeModify(series_node):
        series_node.SetAndObserveTableNodeID(table_node.GetID())
        series_node.SetXColumnName(TABLE_COLUMNS[0])
        series_node.SetYColumnName(TABLE_COLUMNS[1])
        series_node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series_node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
        series_node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series_node.SetMarkerSize(4)
        series_node.SetColor(*SEGMENT_COLOR)
    chart_node = output_node(scene, "vtkMRMLPlotChartNode", ROLE_CHART, reference_node, chart_node, f"{base} score per slice")
    with slicer.util.NodeModify(chart_node):
        if not chart_node.HasPlotSeriesNodeID(series_node.GetID()):
            chart_node.AddAndObservePlotSeriesNodeID(series_node.GetID())
        chart_node.SetTitle("Anomaly score per slice")
        chart_node.SetXAxisTitle("Slice index")
        chart_node.SetYAxisTitle("Score")
        chart_node.SetLegendVisibility(False)
    return chart_node, series_node


def supports_for_slice(result: DetectionResult, index: int) -> list:
    """The normal references retrieved for slice ``index``: ``[(file name, slice index, similarity)]``,
    most similar first."""
    if index < 0 or index >= len(result.supports) or not result.supports[index]:
        return []
    rows = [(s.source, int(s.slice_index), float(s.similarity)) for s in result.supports[index]]
    return sorted(rows, key=lambda r: -r[2])
