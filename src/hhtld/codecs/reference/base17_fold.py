"""Base17: fold a row of any length to 17 int16 values, unfold it back, L1 distance (docs/design.md §2).

``GOLDEN_POS[i] = (i * 11) % 17``. Dimension ``i`` of the fold is the mean of
``row[o*17 + GOLDEN_POS[i]]`` over every octave ``o`` that exists (the last
octave may be partial), stored as ``round(mean * 256)`` (round half to even)
clamped to int16. Unfold replicates each mean (``value / 256``) back to every
position that fed it; a position class with no octave at all (rows shorter
than 17) folds to 0.

Without the int16 rounding, ``unfold(fold(row))`` is the orthogonal projection
of the row onto the 17-dimensional subspace of vectors that are constant on
each position class ``p % 17``: the least-squares estimate of the row inside
that subspace. That is why decoding uses the unfolded centroid unscaled.

Everything is vectorised over rows; loops run over the 17 dimensions or over
row chunks, never over single rows.
"""

from __future__ import annotations

import numpy as np

from ...format import BASE17_DIMS, BASE17_GOLDEN_STEP, BASE17_SCALE, BASE17_VALUE_BYTES

GOLDEN_POS = (np.arange(BASE17_DIMS) * BASE17_GOLDEN_STEP) % BASE17_DIMS  # (17,) dim -> position class
DIM_OF_POS = np.argsort(GOLDEN_POS)  # (17,) position class -> dim (inverse permutation)

_I16_MIN, _I16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max
_CHUNK_ELEMS = 1 << 22  # rows x centroids per L1 block


def octave_counts(d: int) -> np.ndarray:
    """(17,) int64: how many octaves feed each position class ``p`` of a ``d``-long row."""
    p = np.arange(BASE17_DIMS)
    return np.where(p < d, (d - p + BASE17_DIMS - 1) // BASE17_DIMS, 0)


def fold_means(rows: np.ndarray) -> np.ndarray:
    """rows (n, d) float → (n, 17) float64 octave means in Base17 dimension order (not rounded)."""
    rows = np.asarray(rows)
    if rows.ndim == 1:
        rows = rows[None, :]
    n, d = rows.shape
    full = d // BASE17_DIMS
    sums = np.zeros((n, BASE17_DIMS), dtype=np.float64)  # per position class
    if full:
        sums += rows[:, : full * BASE17_DIMS].reshape(n, full, BASE17_DIMS).sum(axis=1, dtype=np.float64)
    rem = d - full * BASE17_DIMS
    if rem:
        sums[:, :rem] += rows[:, full * BASE17_DIMS :]
    cnt = octave_counts(d)
    means = sums / np.maximum(cnt, 1)[None, :]  # (n, 17) by position class
    return means[:, GOLDEN_POS]  # dim i <- position class GOLDEN_POS[i]


# largest |octave mean| the fold stores without clamping (rounds to at most 32767 / 256)
MAX_FOLD_MEAN = (_I16_MAX + 0.5) / BASE17_SCALE


def fold_from_means(means: np.ndarray) -> np.ndarray:
    """(n, 17) octave means (``fold_means``) → (n, 17) int16: ``round(mean * 256)`` clamped."""
    return np.clip(np.rint(means * BASE17_SCALE), _I16_MIN, _I16_MAX).astype(np.int16)


def fold(rows: np.ndarray) -> np.ndarray:
    """rows (n, d) float (or one row (d,)) → (n, 17) int16 (or (17,)): ``round(mean * 256)`` clamped."""
    one = np.asarray(rows).ndim == 1
    q = fold_from_means(fold_means(rows))
    return q[0] if one else q


def unfold(v17: np.ndarray, d: int) -> np.ndarray:
    """(n, 17) int16 (or (17,)) → (n, d) float32 (or (d,)): each mean replicated to its positions."""
    v = np.asarray(v17)
    one = v.ndim == 1
    cols = DIM_OF_POS[np.arange(d) % BASE17_DIMS]  # (d,) which dim feeds position p
    out = v.reshape(-1, BASE17_DIMS)[:, cols].astype(np.float32) / np.float32(BASE17_SCALE)
    return out[0] if one else out


def l1_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """L1 between Base17 vectors, broadcasting over leading dims: (..., 17) x (..., 17) → (...) int64."""
    return np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)).sum(axis=-1)


def l1_cdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise L1: a (m, 17), b (k, 17) → (m, k) int64 (blocked over rows of ``a``)."""
    a = np.asarray(a, dtype=np.int32)
    b = np.asarray(b, dtype=np.int32)
    m, k = a.shape[0], b.shape[0]
    out = np.zeros((m, k), dtype=np.int64)
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for s in range(0, m, step):
        blk = np.zeros((min(step, m - s), k), dtype=np.int32)  # (chunk, k)
        for j in range(BASE17_DIMS):  # loop over the 17 dims, not over rows
            blk += np.abs(a[s : s + step, j, None] - b[None, :, j])
        out[s : s + step] = blk
    return out


def nearest_l1(a: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid in L1: a (m, 17), centroids (k, 17) → (idx (m,) int64, dist (m,) int64).
    Ties go to the lower centroid index."""
    a = np.asarray(a)
    m = a.shape[0]
    idx = np.empty(m, dtype=np.int64)
    dist = np.empty(m, dtype=np.int64)
    if m == 0:
        return idx, dist
    k = centroids.shape[0]
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for s in range(0, m, step):
        dm = l1_cdist(a[s : s + step], centroids)  # (chunk, k)
        j = np.argmin(dm, axis=1)
        idx[s : s + step] = j
        dist[s : s + step] = dm[np.arange(len(j)), j]
    return idx, dist


def base17_byte_size(n_rows: int) -> int:
    """Bytes of ``n_rows`` Base17 vectors (17 x int16)."""
    return n_rows * BASE17_DIMS * BASE17_VALUE_BYTES


__all__ = ["DIM_OF_POS", "GOLDEN_POS", "base17_byte_size", "fold", "fold_means", "l1_cdist", "l1_distance",
           "nearest_l1", "octave_counts", "unfold"]
