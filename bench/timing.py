"""The timing helper the benchmarks share."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, after one warm-up call (page cache,
    checksum verification, lazy imports)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
