"""Spend bits where they buy the most: the greedy rung choice every allocation uses.

Each item (a group, or a tensor) has, for every rung of the ladder, its
stored bits and its loss (predicted output change, or weighted row
distortion). Starting from a rung per item, the next step is always the
upgrade — up to a few rungs ahead, since rates are not convex — that
removes the most loss per extra bit, until the total loss meets the goal or
the next step would pass the budget.
"""

from __future__ import annotations

import heapq
from typing import Mapping, Sequence

LOOKAHEAD = 3


def spend(bits: Mapping[str, Sequence[int]], loss: Mapping[str, Sequence[float]], start: Mapping[str, int] | None = None,
          goal: float | None = None, budget_bits: float | None = None, lookahead: int = LOOKAHEAD) -> dict[str, int]:
    """{item: rung index}. ``bits[item][r]`` / ``loss[item][r]``: stored bits and loss at
    rung r; ``start``: the lowest rung per item (default 0); stop when the total
    loss is at most ``goal`` or when no step fits in ``budget_bits``."""
    idx = {n: (start or {}).get(n, 0) for n in bits}
    used = sum(bits[n][i] for n, i in idx.items())
    total = sum(loss[n][i] for n, i in idx.items())

    def best_step(n: str):
        i = idx[n]
        best = None
        for j in range(i + 1, min(len(bits[n]), i + 1 + lookahead)):
            db = bits[n][j] - bits[n][i]
            de = loss[n][i] - loss[n][j]
            if db > 0 and de > 0 and (best is None or de / db > best[0]):
                best = (de / db, j)
        return best

    heap = []
    for n in idx:
        b = best_step(n)
        if b is not None:
            heapq.heappush(heap, (-b[0], n, b[1], idx[n]))
    while heap and (goal is None or total > goal):
        _, n, j, at = heapq.heappop(heap)
        if idx[n] != at:  # stale: the item moved since this step was queued
            continue
        db = bits[n][j] - bits[n][at]
        if budget_bits is not None and used + db > budget_bits:
            continue
        total -= loss[n][at] - loss[n][j]
        used += db
        idx[n] = j
        b = best_step(n)
        if b is not None:
            heapq.heappush(heap, (-b[0], n, b[1], j))
    return idx


__all__ = ["spend"]
