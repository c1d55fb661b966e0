"""Layer 8, ``worker``: the JSON-lines worker process and its Qt-free client.

- :mod:`.protocol`: the protocol version and the settings it reserves;
- :mod:`.server`: ``python -m HiMatchADLib worker`` (keeps detectors loaded between requests);
- :mod:`.client`: :class:`WorkerClient` (start, send, poll without blocking, cancel, restart).
"""

from .client import WorkerClient, WorkerError
from .protocol import PROTOCOL

__all__ = ["PROTOCOL", "WorkerClient", "WorkerError"]
