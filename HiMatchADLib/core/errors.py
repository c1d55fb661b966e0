"""The one exception type for mistakes a user can make, and the cancellation signal."""

from __future__ import annotations


class HiMatchADError(Exception):
    """A problem the user can fix (bad path, unreadable file, empty folder, model not found...).

    The message says what went wrong and what to do about it; the command line prints it without a
    traceback and exits with status 2.
    """


class Cancelled(HiMatchADError):
    """Raised inside a long step when the caller's cancel event is set."""

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)
