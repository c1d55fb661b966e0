"""Progress reporting and cancellation (one callback for every long step), warnings, tqdm bars."""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Protocol

from .errors import Cancelled


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=2)


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


_open_bars: list = []


def close_bars() -> None:
    """Take every progress bar of :func:`tqdm_callback` off the terminal, so that a message printed
    next starts on a line of its own."""
    while _open_bars:
        bar = _open_bars.pop()
        try:
            bar.close()
        except Exception:  # pragma: no cover - a broken terminal must not hide the message
            pass


def print_line(text: str, stream=None) -> None:
    """Print ``text`` on a line of its own while progress bars may be drawn (they are cleared,
    then drawn again below it). ``stream`` defaults to ``sys.stderr``."""
    import sys

    stream = stream if stream is not None else sys.stderr
    if _open_bars:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=stream):
            print(text, file=stream, flush=True)
    else:
        print(text, file=stream, flush=True)


def tqdm_callback(disable: bool = False, stream=None) -> ProgressCallback:
    """A callback for the command line: one tqdm bar per step message on a terminal; where the
    stream is not a terminal (a log file, a pipe, a batch system), one line per step instead.

    ``stream`` defaults to ``sys.stderr`` at the time of each call.
    """
    import sys

    state: dict = {"bar": None, "message": None}

    def out():
        return stream if stream is not None else sys.stderr

    def interactive() -> bool:
        try:
            return bool(out().isatty())
        except (AttributeError, ValueError):
            return False

    def callback(message: str, done: int, total: int) -> None:
        if disable:
            return
        if not interactive():
            if state["message"] != message:
                state["message"] = message
                print(message, file=out(), flush=True)
            if done >= total:
                state["message"] = None
            return
        from tqdm.auto import tqdm

        if state["message"] != message:
            if state["bar"] is not None:
                state["bar"].close()
                with contextlib.suppress(ValueError):
                    _open_bars.remove(state["bar"])
            state["bar"] = tqdm(total=max(total, 1), desc=message, unit="", leave=False, dynamic_ncols=True, file=out())
            _open_bars.append(state["bar"])
            state["message"] = message
        bar = state["bar"]
        bar.total = max(total, 1)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
            with contextlib.suppress(ValueError):
                _open_bars.remove(bar)
            state["bar"] = None
            state["message"] = None

    return callback
