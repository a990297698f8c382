"""The one timer of the benchmark scripts (``scripts/bench*.py``): warm-up, then the median; and the
CPU model they print with their numbers."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["cpu_model", "median_ms"]


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 1) -> tuple[float, Any]:
    """Call ``fn`` ``warmup`` times untimed (lazy loads, allocator), then ``runs`` times.

    Returns:
        (median wall time in **milliseconds**, the last call's result).
    """
    out = None
    for _ in range(max(0, warmup)):
        out = fn()
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
