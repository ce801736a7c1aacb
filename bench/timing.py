"""The timing helpers the benchmarks share."""

from __future__ import annotations

import statistics
import time


def take_turns(forms: dict, repeats: int) -> dict:
    """Median seconds of each of ``forms`` (name -> callable) over ``repeats`` rounds in
    which the forms take turns (a machine whose speed drifts affects each alike), after
    one warm-up call of each (page cache, checksum verification, lazy imports)."""
    for fn in forms.values():
        fn()
    times: dict = {k: [] for k in forms}
    for _ in range(repeats):
        for k, fn in forms.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, after one warm-up call."""
    return take_turns({"fn": fn}, repeats)["fn"]
