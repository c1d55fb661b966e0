"""Registries: named entries of one kind (methods, batch engines, output writers), in the order
they were registered, each found by name or refused with the choices."""

from __future__ import annotations

from .errors import HiMatchADError


class Registry:
    """Entries with a ``name`` attribute. ``what`` names the kind in messages ("method", "engine").
    Registering a name twice with another entry is a programming error (:class:`ValueError`); an
    unknown name is the user's (:class:`HiMatchADError` listing the choices)."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict = {}

    def register(self, entry):
        """Add ``entry`` (its name must be new, or it must be the entry registered under it); returns it."""
        known = self._entries.get(entry.name)
        if known is not None and known != entry:
            raise ValueError(f"{self.what} {entry.name!r} is registered already")
        self._entries[entry.name] = entry
        return entry

    def names(self) -> tuple:
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name) -> bool:
        return name in self._entries

    def get(self, name: str):
        entry = self._entries.get(name)
        if entry is None:
            raise HiMatchADError(f"unknown {self.what} '{name}'; choose one of {', '.join(self._entries)}")
        return entry
