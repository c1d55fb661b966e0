"""The panel's parameter-node bindings, checked against what Slicer's ``parameterNodeWrapper`` accepts.

``connectGui`` connects every widget of the ``.ui`` file that has a ``SlicerParameterName``
property to the parameter of that name, through the first GUI connector whose ``canRepresent``
accepts the pair (widget class, parameter type); a name without a parameter, or a pair no
connector represents, raises when the panel opens. The wrapper is Qt code that neither the
``slicer-core`` wheel nor pytest has, so the connectors' rules are transcribed here from Slicer's
``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py`` (commit 583e9b37d50e, 2026-08-21)
and the declarations of ``HiMatchADParameterNode`` and ``Resources/UI/HiMatchAD.ui`` are checked
against them.
"""

from __future__ import annotations

import enum
import pathlib
import typing
import xml.etree.ElementTree as ET

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")

from test_slicer_logic import HiMatchAD  # noqa: E402,F401  (fixture: the module with Qt stand-ins)

UI_FILE = pathlib.Path(__file__).resolve().parents[2] / "Resources" / "UI" / "HiMatchAD.ui"

PATHS = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath)


def _node_classes(t) -> tuple:
    """The MRML node classes of a node type or a Union of node types (else empty)."""
    members = typing.get_args(t) if typing.get_origin(t) is typing.Union else (t,)
    if all(isinstance(m, type) and issubclass(m, slicer.vtkMRMLNode) for m in members):
        return members
    return ()


def _is_node(t) -> bool:
    return bool(_node_classes(t))


def _is_enum(t) -> bool:
    return isinstance(t, type) and issubclass(t, enum.Enum)


#: widget class -> what its connectors represent (guiConnectors.py: each ``canRepresent``).
CONNECTORS = {
    "QCheckBox": lambda t: t is bool,
    "ctkCheckBox": lambda t: t is bool,
    "QPushButton": lambda t: t is bool,  # checkable push button
    "ctkCheckablePushButton": lambda t: t is bool,
    "QSlider": lambda t: t is int,
    "QSpinBox": lambda t: t is int,
    "QDoubleSpinBox": lambda t: t in (float, int),
    "ctkSliderWidget": lambda t: t in (float, int),
    "qMRMLSliderWidget": lambda t: t in (float, int),
    "ctkDoubleSlider": lambda t: t in (float, int),
    "ctkDoubleSpinBox": lambda t: t in (float, int),
    "qMRMLSpinBox": lambda t: t in (float, int),
    "QComboBox": _is_enum,  # (or a str/int with a Choice annotation, not used here)
    "ctkComboBox": _is_enum,
    "QLineEdit": lambda t: t is str,
    "QLabel": lambda t: t is str,
    "QTextEdit": lambda t: t is str,
    "ctkPathLineEdit": lambda t: t in PATHS,  # a str is NOT represented: connect it by hand
    "ctkDirectoryButton": lambda t: t in PATHS,
    "qMRMLNodeComboBox": _is_node,
}


def _bindings() -> list:
    root = ET.parse(UI_FILE).getroot()
    out = []
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out.append((widget.get("class"), widget.get("name"), prop.findtext("string"), widget))
    return out


def _hints(module):
    return typing.get_type_hints(module.HiMatchADParameterNode, include_extras=True)


def _unannotated(t):
    return typing.get_args(t)[0] if typing.get_origin(t) is typing.Annotated else t


def test_every_bound_widget_has_a_parameter_a_connector_can_represent(HiMatchAD):  # noqa: F811
    hints = _hints(HiMatchAD)
    bindings = _bindings()
    assert len(bindings) >= 8  # the panel binds its settings through the wrapper
    names = [name for _, _, name, _ in bindings]
    assert len(names) == len(set(names)), "a parameter bound to two widgets"
    for widget_class, widget_name, parameter, _ in bindings:
        assert parameter in hints, f"{widget_name}: no parameter {parameter!r} in HiMatchADParameterNode"
        assert widget_class in CONNECTORS, f"{widget_name}: Slicer has no GUI connector for {widget_class}"
        t = _unannotated(hints[parameter])
        assert CONNECTORS[widget_class](t), f"{widget_name} ({widget_class}) cannot represent {parameter}: {t}"


def test_node_selectors_list_the_parameters_node_class(HiMatchAD):  # noqa: F811
    """The node connector sets the combo box's node types from the annotation; the .ui's own
    nodeTypes must agree, and child classes (labelmaps, vector volumes) stay hidden."""
    hints = _hints(HiMatchAD)
    for widget_class, widget_name, parameter, widget in _bindings():
        if widget_class != "qMRMLNodeComboBox":
            continue
        props = {p.get("name"): p for p in widget.findall("property")}
        types = [s.text for s in props["nodeTypes"].iter("string")]
        assert types == [c.__name__ for c in _node_classes(_unannotated(hints[parameter]))], widget_name
        assert props["showChildNodeTypes"].findtext("bool") == "false", widget_name


def test_the_input_selector_lists_what_the_adapter_accepts(HiMatchAD):  # noqa: F811
    """One rule: the input parameter's node classes are the adapter's INPUT_NODE_CLASSES."""
    from HiMatchADLib import mrml

    t = _unannotated(_hints(HiMatchAD)["inputVolume"])
    assert tuple(c.__name__ for c in _node_classes(t)) == tuple(mrml.INPUT_NODE_CLASSES)


def test_parameter_types_and_defaults_are_serialisable(HiMatchAD):  # noqa: F811
    """Every parameter has a type the wrapper serialises (serializers.py: numbers, str, bool, enum,
    MRML node, path) and a default inside its WithinRange."""
    hints = _hints(HiMatchAD)
    cls = HiMatchAD.HiMatchADParameterNode
    for name, annotated in hints.items():
        t = _unannotated(annotated)
        assert t in (int, float, str, bool) or _is_enum(t) or _is_node(t) or t in PATHS, f"{name}: {t}"
        default = getattr(cls, name, None)
        if _is_enum(t):
            assert isinstance(default, t), f"{name}: default {default!r} is not a {t.__name__}"
            assert all(isinstance(t.label(member), str) for member in t)  # the combo box's labels
        for meta in typing.get_args(annotated)[1:]:
            if isinstance(meta, tuple) and meta[0] == "WithinRange":
                assert meta[1] <= default <= meta[2], f"{name}: default {default} outside {meta[1:]}"
        if t in (int, float):
            assert isinstance(default, t), f"{name}: default {default!r}"
