"""HIP families: the palette split 16 ways by four levels of farthest-pair splits (docs/design.md §2).

At each level every current set is split at its farthest pair ``(a, b)``
(``a < b``; the first such pair in row-major order of the set's distance
matrix); every member goes to the nearer pole, ties to ``a``. Going to ``b``
sets the level's branch bit: 8 at the first split, then 4, 2, 1. A set with
fewer than two members, or whose members all coincide, is not split (its
members take bit 0). Works on any (k, k) distance matrix, so the same code
serves Base17 (L1) and f32 (squared L2) palettes.
"""

from __future__ import annotations

import numpy as np

from ...format import HIP_FAMILIES, HIP_LEVELS


def hip_families(dist: np.ndarray) -> np.ndarray:
    """dist: (k, k) symmetric, non-negative → (k,) uint8 family numbers in 0..15."""
    dist = np.asarray(dist)
    k = dist.shape[0]
    fam = np.zeros(k, dtype=np.uint8)
    sets = [np.arange(k)]
    for level in range(HIP_LEVELS):  # 4 levels x at most 8 sets: loops over sets, never rows
        bit = np.uint8((HIP_FAMILIES >> 1) >> level)
        nxt = []
        for members in sets:
            if members.size < 2:
                nxt += [members, members[:0]]
                continue
            sub = dist[np.ix_(members, members)]  # (m, m)
            flat = int(np.argmax(sub))
            a, b = divmod(flat, members.size)
            if sub[a, b] <= 0:
                nxt += [members, members[:0]]
                continue
            to_b = sub[:, b] < sub[:, a]  # nearer pole b (ties stay with a)
            fam[members[to_b]] |= bit
            nxt += [members[~to_b], members[to_b]]
        sets = nxt
    return fam


__all__ = ["hip_families"]
