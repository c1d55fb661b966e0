"""Progress reporting and cancellation shared by every long step.

A progress callback has the signature ``callback(message: str, done: int, total: int)``; it is
called with ``done == 0`` when a step starts and with ``done == total`` when it ends. A cancel
event is any object with an ``is_set()`` method (``threading.Event``); when it is set, the next
check raises :class:`~HiMatchADLib.errors.Cancelled`.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from .errors import Cancelled

ProgressCallback = Callable[[str, int, int], None]


class CancelEvent(Protocol):
    def is_set(self) -> bool: ...


class Reporter:
    """Bundles a progress callback and a cancel event; both optional."""

    def __init__(self, callback: Optional[ProgressCallback] = None, cancel: Optional[CancelEvent] = None):
        self.callback = callback
        self.cancel = cancel

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()

    def __call__(self, message: str, done: int, total: int) -> None:
        self.check()
        if self.callback is not None:
            self.callback(message, int(done), int(total))


def tqdm_callback(disable: bool = False) -> ProgressCallback:
    """A callback that draws one tqdm bar per step message (for the command line)."""
    from tqdm.auto import tqdm

    state: dict = {"bar": None, "message": None}

    def callback(message: str, done: int, total: int) -> None:
        if disable:
            return
        if state["message"] != message:
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=max(total, 1), desc=message, unit="", leave=False, dynamic_ncols=True)
            state["message"] = message
        bar = state["bar"]
        bar.total = max(total, 1)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
            state["bar"] = None
            state["message"] = None

    return callback
