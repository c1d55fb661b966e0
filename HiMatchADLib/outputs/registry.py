"""Optional output writers, by name: what ``outputs={"dicom_seg", "dicom_heatmap"}`` asks for.

Every result is written as a heatmap, a labelmap and a scores JSON (and an overlay PNG for 2D
inputs) by :func:`~HiMatchADLib.outputs.files.save_result`. Writers registered here add outputs on
request: each has a name (the key in ``outputs`` and in the scores JSON's ``"outputs"``), a file
suffix (``<name><suffix>``), a title for messages, the kind of input it needs (``"dicom"``: the
source DICOM series it references; ``"volume"``: a 3D input, the output is left out for a 2D
one), a check of its requirements (e.g. highdicom installed) run
before any work, and the function that writes it, imported on first use so that an optional
dependency loads only when its output is asked for.

A new output format is one module with a ``write(result, source_files, path)`` function plus one
:func:`register_writer` call below; the command line, the batch runner (resume included), Ray, the
worker and the Slicer module read the registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..core.errors import HiMatchADError
from ..core.registry import Registry

DICOM_INSTALL_HINT = 'DICOM SEG and parametric map outputs need highdicom: pip install "himatchad[dicom]"'


@dataclass(frozen=True)
class OutputWriter:
    name: str
    title: str
    suffix: str
    module: str  # module of the write function, relative to this package
    function: str
    needs: str = "dicom"  # the input it needs: "dicom" (the source series it references) or "volume" (a 3D input)
    requires: Optional[Callable[[], None]] = None
    install_hint: str = ""

    def load(self) -> Callable:
        """The write function, or :class:`HiMatchADError` with the install hint."""
        try:
            mod = importlib.import_module(self.module, __package__)
        except ImportError as exc:
            raise HiMatchADError(f"{self.install_hint} ({exc})") from None
        if hasattr(mod, "require"):
            mod.require()
        return getattr(mod, self.function)

    def check(self) -> None:
        """Refuse now, before any work, when the writer's requirements are missing."""
        self.load()


OUTPUT_WRITERS = Registry("output")
register_writer = OUTPUT_WRITERS.register
#: Names of the optional outputs, in registration order.
list_writers = OUTPUT_WRITERS.names
get_writer = OUTPUT_WRITERS.get


def check_outputs(outputs: Optional[Iterable[str]], load: bool = False) -> tuple:
    """``outputs`` as a tuple of registered names in registration order (duplicates dropped);
    unknown names are refused, and with ``load`` so are writers whose requirements are missing."""
    if outputs is None:
        return ()
    if isinstance(outputs, str):
        outputs = [outputs]
    wanted = set()
    for name in outputs:
        if not isinstance(name, str):
            raise HiMatchADError(f"outputs must be names of outputs ({', '.join(list_writers())}), not {name!r}")
        wanted.add(get_writer(name).name)
    names = tuple(n for n in list_writers() if n in wanted)
    if load:
        for n in names:
            get_writer(n).check()
    return names


def outputs_for(outputs: Optional[Iterable[str]], is_2d: bool) -> tuple:
    """:func:`check_outputs` of ``outputs`` without those an input of this kind does not get: a
    ``"volume"`` output (the overview picture) for a 2D input, whose picture is its overlay."""
    return tuple(k for k in check_outputs(outputs) if not (is_2d and get_writer(k).needs == "volume"))


register_writer(OutputWriter(
    "overview", "overview picture", "_overview.png", ".overview", "write_overview_output", needs="volume",
    install_hint="the overview picture needs matplotlib: pip install matplotlib",
))
register_writer(OutputWriter("dicom_seg", "DICOM SEG", "_seg.dcm", ".dicom_seg", "write_dicom_seg", install_hint=DICOM_INSTALL_HINT))
register_writer(OutputWriter("dicom_heatmap", "DICOM parametric map", "_heatmap_pm.dcm", ".dicom_seg", "write_dicom_heatmap", install_hint=DICOM_INSTALL_HINT))
