"""Base17 palettes: CLAM furthest-point sampling in L1 over folded rows (docs/design.md §2).

The start is the row nearest (L1) to the mean of all folded rows; then the row
farthest from everything chosen is added until ``k`` rows are chosen (fewer
when the rows have fewer distinct folds). Every row is assigned to its nearest
centroid (ties to the lower index); each centroid keeps its radius (largest L1
of a row assigned to it) and count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...format import BASE17_DIMS, BASE17_VALUE_BYTES, F32_BYTES
from .base17_fold import l1_cdist, l1_distance, nearest_l1, unfold
from .palette import Palette, assignment_stats, check_k


def furthest_point_sample_l1(rows17: np.ndarray, k: int) -> np.ndarray:
    """rows17 (n, 17) int16 → (k',) int64 indices of the chosen rows, k' <= min(k, n).

    Start: the row nearest (L1, lower index on ties) to the float mean of the rows.
    """
    n = rows17.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(int(k), n)
    r = np.asarray(rows17, dtype=np.int32)  # (n, 17)
    mean = r.mean(axis=0, dtype=np.float64)  # (17,)
    first = int(np.argmin(np.abs(r - mean[None, :]).sum(axis=1)))
    chosen = [first]
    mind = l1_distance(r, r[first])  # (n,) int64
    for _ in range(k - 1):  # k greedy steps, each vectorised over all rows
        nxt = int(np.argmax(mind))
        if mind[nxt] <= 0:
            break
        chosen.append(nxt)
        np.minimum(mind, l1_distance(r, r[nxt]), out=mind)
    return np.asarray(chosen, dtype=np.int64)


@dataclass
class Base17Palette(Palette):
    """centroids: (k, 17) int16 (folded rows); radius: (k,) uint32 largest L1 of an
    assigned row; count: (k,) uint32 rows assigned."""

    def distances(self) -> np.ndarray:
        """(k, k) int64 pairwise L1 between centroids."""
        return l1_cdist(self.centroids, self.centroids)

    def assign(self, rows17: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rows17 (n, 17) → (twig (n,) int64, L1 dist (n,) int64)."""
        return nearest_l1(rows17, self.centroids)

    def unfolded(self, d: int) -> np.ndarray:
        """(k, d) float32: every centroid unfolded to a ``d``-long row."""
        return unfold(self.centroids, d)

    def byte_size(self) -> int:
        return self.k * (BASE17_DIMS * BASE17_VALUE_BYTES + F32_BYTES + F32_BYTES)  # centroids + radius + count


def palette_stats(twig: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(radius (k,) uint32, count (k,) uint32) of an assignment (L1 distances)."""
    radius, count = assignment_stats(twig, np.asarray(dist, dtype=np.int64), k)
    return radius.astype(np.uint32), count


def build_base17_palette(rows17: np.ndarray, k: int) -> tuple[Base17Palette, np.ndarray, np.ndarray]:
    """Furthest-point palette of folded rows and the assignment.

    rows17: (n, 17) int16. Returns (palette, twig (n,) int64, L1 dist (n,) int64).
    ``k`` must satisfy ``0 < k <= 256`` (CodecError otherwise).
    """
    k = check_k(k)
    rows17 = np.asarray(rows17, dtype=np.int16)
    picks = furthest_point_sample_l1(rows17, k)
    centroids = rows17[picks].copy()  # (k', 17)
    twig, dist = nearest_l1(rows17, centroids)
    radius, count = palette_stats(twig, dist, centroids.shape[0])
    return Base17Palette(centroids, radius, count), twig, dist


def representatives(twig: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """(k,) int64: for each centroid, the index of the real row nearest to it (among the
    rows assigned to it, lower index on ties); -1 for a centroid with no row."""
    n = twig.shape[0]
    rep = np.full(k, -1, dtype=np.int64)
    if n == 0:
        return rep
    order = np.lexsort((np.arange(n), dist, twig))  # by twig, then distance, then index
    t = twig[order]
    first = np.ones(n, dtype=bool)
    first[1:] = t[1:] != t[:-1]
    rep[t[first]] = order[first]
    return rep


__all__ = ["Base17Palette", "build_base17_palette", "furthest_point_sample_l1", "palette_stats", "representatives"]
