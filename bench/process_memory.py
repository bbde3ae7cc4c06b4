"""This process's memory as Linux reports it (/proc/self/status), with a resettable peak (VmHWM).

Used by the memory tests and benchmarks: ``reset_peak_rss()`` before a step, then ``peak_rss_bytes()`` after it
measures the step alone, without start-up transients.
"""
from __future__ import annotations

import resource


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset_worked: bool) -> int:
    """Peak RSS since the last reset (VmHWM), or the lifetime peak (ru_maxrss) where resetting is impossible."""
    if reset_worked:
        return status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
