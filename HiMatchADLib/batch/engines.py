"""Batch engines, by name: where the cases of a batch are computed.

An engine is a function ``run(detector, cases_plan, ...)`` that computes every case and returns the
rows of ``summary.csv``; :func:`~HiMatchADLib.batch.runner.run_batch` prepares the batch (cases,
resume, duplicate names) and hands it to the engine named by ``engine``. ``local`` runs in this
process (:mod:`.local`); ``ray`` on Ray actors (:mod:`.ray`, imported on first use, so that Ray is
needed only when asked for). A new engine is one module plus one :func:`register_engine` call
below; the command line's ``--engine`` choices and the worker read :func:`list_engines`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..core.registry import Registry


@dataclass(frozen=True)
class Engine:
    name: str
    title: str
    module: str  # relative to this package
    function: str
    requirement_check: str = ""  # a function of the module that raises HiMatchADError when a dependency is missing

    def load(self):
        return getattr(importlib.import_module(self.module, __package__), self.function)

    def check(self) -> None:
        """Refuse now, before any work, when the engine's optional dependency is missing."""
        if self.requirement_check:
            getattr(importlib.import_module(self.module, __package__), self.requirement_check)()


_ENGINES = Registry("engine")
register_engine = _ENGINES.register
list_engines = _ENGINES.names
get_engine = _ENGINES.get


register_engine(Engine("local", "this process (reads ahead, writes behind)", ".local", "run_local"))
register_engine(Engine("ray", "Ray actors (pip install \"himatchad[ray]\")", ".ray", "run_batch_ray", "import_ray"))

#: The registered engine names (the choices of ``--engine``).
ENGINES = list_engines()
