"""Peak resident memory of this process on the host (CPU RAM), per phase of a run; and what is available.

On Linux the kernel keeps the high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``) and resets it when ``5`` is written to ``/proc/self/clear_refs``, so each
phase gets its own peak. Elsewhere (or where that file cannot be written) only the peak since the
process started is known (``getrusage``): ``per_phase`` is then False, and each figure is the
process's peak up to the end of that phase.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")


def reset_peak() -> bool:
    """Start a new high-water mark; True if the platform allows it (then peaks are per phase)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float | None:
    """The resident-set high-water mark in MiB (since the last reset, where one was possible)."""
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def available_bytes() -> int | None:
    """Host memory available to new allocations without swapping (Linux ``MemAvailable``), None where
    it cannot be read."""
    try:
        found = re.search(r"MemAvailable:\s+(\d+)\s+kB", _MEMINFO.read_text())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None
