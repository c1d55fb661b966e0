"""Peak resident memory of the process (and peak GPU memory) while one method runs."""

from __future__ import annotations

import gc
import sys
from typing import Optional


def _status_mb(key: str) -> Optional[float]:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def rss_mib() -> float:
    """Resident memory of this process now, MiB (NaN where ``/proc`` is absent)."""
    now = _status_mb("VmRSS")
    return float("nan") if now is None else now


def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB: ``VmHWM`` (reset by :meth:`MemoryProbe.reset`
    on Linux), else the lifetime peak from ``getrusage``."""
    peak = _status_mb("VmHWM")
    if peak is None:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = ru / (1024.0 * 1024.0) if sys.platform == "darwin" else ru / 1024.0
    return peak


class MemoryProbe:
    """Peak resident memory of this process between ``reset()`` and ``read()`` (and peak GPU memory)."""

    def __init__(self) -> None:
        self.resettable = False
        self.start_mb = 0.0

    def reset(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start_mb = _status_mb("VmRSS") or 0.0
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict:
        peak = peak_rss_mib()
        out = {
            "peak_rss_mb": round(peak, 1),
            "rss_at_start_mb": round(self.start_mb, 1),
            "peak_rss_increase_mb": round(max(peak - self.start_mb, 0.0), 1),
            "peak_is_per_method": self.resettable,
        }
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out
