"""f32 palettes: furthest-point sampling (CLAM cover) and nearest-centroid assignment.

Pure numpy; every distance is computed with BLAS as ``|x|^2 - 2 x.c + |c|^2``
over chunks of rows, never with per-row Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from threadpoolctl import threadpool_limits

from ...errors import CodecError
from ...format import MAX_PALETTE_K

_CHUNK_ELEMS = 1 << 24  # rows x centroids per distance block (64 MiB of f32)


def check_k(k: int, max_k: int = MAX_PALETTE_K) -> int:
    """``0 < k <= max_k`` or a clear error (never a silent wrap of the twig)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise CodecError(f"palette size k must be an integer, got {k!r}")
    if k <= 0 or k > max_k:
        raise CodecError(f"palette size k={k} is out of range: it must satisfy 0 < k <= {max_k}")
    return int(k)


def furthest_point_sample(rows: np.ndarray, k: int, start: int | None = None) -> np.ndarray:
    """Greedy cover in squared L2: indices of ``k`` rows (k clipped to the row count).

    rows: (n, d) float32. Start: the row of largest L2 norm (or ``start``);
    then repeatedly the row farthest from everything chosen. Stops early when
    every row coincides with a chosen one (fewer distinct rows than k).
    Returns (k',) int64, k' <= k.
    """
    n = rows.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(int(k), n)
    # k small matrix-vector products in a row: memory-bound, and threaded BLAS
    # stalls on every call when another process holds a core (measured: 40x).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fps(rows, k, start)


_ROUNDING = 8 * float(np.finfo(np.float32).eps)  # |x|^2 - 2x.c + |c|^2 cancels to within this x (|x|^2 + |c|^2)


def _fps(rows: np.ndarray, k: int, start: int | None) -> np.ndarray:
    sq = np.einsum("ij,ij->i", rows, rows)  # (n,)

    def dist_to(c: int) -> np.ndarray:  # squared L2 to row c; rounding noise of equal rows is 0
        d = sq - 2.0 * (rows @ rows[c]) + sq[c]
        d[d <= _ROUNDING * (sq + sq[c])] = 0.0
        return d

    first = int(np.argmax(sq)) if start is None else int(start)
    chosen = [first]
    mind = dist_to(first)  # (n,)
    mind[first] = 0.0
    for _ in range(k - 1):
        nxt = int(np.argmax(mind))
        if mind[nxt] <= 0.0:
            break
        chosen.append(nxt)
        np.minimum(mind, dist_to(nxt), out=mind)
        mind[nxt] = 0.0
    return np.asarray(chosen, dtype=np.int64)


def assign_nearest(rows: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) of every row.

    rows: (n, d) float32; centroids: (k, d) float32.
    Returns (idx (n,) int64, sqdist (n,) float32). Ties go to the lower index.
    """
    n, k = rows.shape[0], centroids.shape[0]
    idx = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    if n == 0:
        return idx, dist
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    csq = np.einsum("ij,ij->i", c, c)  # (k,)
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for s in range(0, n, step):
        x = rows[s : s + step]
        d = csq[None, :] - 2.0 * (x @ c.T)  # (m, k), |x|^2 added after the argmin
        j = np.argmin(d, axis=1)
        idx[s : s + step] = j
        xsq = np.einsum("ij,ij->i", x, x)
        dist[s : s + step] = np.maximum(d[np.arange(len(j)), j] + xsq, 0.0)
    return idx, dist


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 (round to nearest even), the storage type of palettes and bases."""
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16)


@dataclass
class Palette:
    """A palette of centroid rows with each centroid's radius and count.

    centroids: (k, d) float32 (exactly representable in bfloat16, as stored);
    radius: (k,) float32, largest squared-L2 distance of a row assigned to it;
    count: (k,) uint32, rows assigned to it.
    """

    centroids: np.ndarray
    radius: np.ndarray
    count: np.ndarray

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def byte_size(self) -> int:
        k, d = self.centroids.shape
        return k * d * 2 + k * 4 + k * 4  # bf16 rows + f32 radius + u32 count


def assignment_stats(twig: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(radius (k,) of dist's dtype: largest distance assigned to each centroid,
    count (k,) uint32: rows assigned to it) of an assignment twig (n,), dist (n,)."""
    count = np.bincount(twig, minlength=k).astype(np.uint32)
    radius = np.zeros(k, dtype=dist.dtype)
    np.maximum.at(radius, twig, dist)
    return radius, count


def build_f32_palette(rows: np.ndarray, k: int) -> tuple[Palette, np.ndarray, np.ndarray]:
    """Furthest-point palette of real rows (stored bf16) and the assignment.

    rows: (n, d) float32. Returns (palette, twig (n,) int64, sqdist (n,) float32).
    """
    k = check_k(k)
    picks = furthest_point_sample(rows, k)
    centroids = to_bf16(rows[picks]).astype(np.float32)  # (k', d)
    twig, dist = assign_nearest(rows, centroids)
    radius, count = assignment_stats(twig, dist, centroids.shape[0])
    return Palette(centroids, radius, count), twig, dist
