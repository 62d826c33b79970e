"""Peak resident memory of this process over a stretch of work (Linux).

The kernel keeps the high-water mark of resident memory (VmHWM); writing 5
to /proc/self/clear_refs resets it to the current resident size, so a peak
can be measured for one step of a longer run. Where that is unavailable the
process's lifetime peak (getrusage) is reported instead, which can only be
larger.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Start a new peak measurement; False if only the lifetime peak is available."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak resident memory since the last `reset_peak` (or since the process started)."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    """Resident memory now (0 where /proc is unavailable)."""
    return _status_bytes("VmRSS") or 0


def release_free_memory() -> None:
    """Hand memory the process freed back to the system (glibc's malloc_trim), so that resident size measures
    what is live rather than what a finished step once needed; nothing where glibc is absent."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _status_bytes(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
