"""How faithful is a Fisher-z table? Measured, never assumed.

For the off-diagonal pairs of the representatives: the Spearman rank
correlation between the int8 table's restored cosines and the exact cosines
of the representative rows, and the absolute restore error between them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .fisher_z import FisherZTable, cosine_matrix


@dataclass(frozen=True)
class FisherZQuality:
    """spearman: rank correlation (None when undefined: fewer than 3 pairs or constant);
    mean_abs_error / max_abs_error: |restored - exact| cosine; pairs: off-diagonal pairs used."""

    spearman: float | None
    mean_abs_error: float
    max_abs_error: float
    pairs: int

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("spearman", "mean_abs_error", "max_abs_error"):
            if d[key] is not None:
                d[key] = round(float(d[key]), 6)
        return d


def fisher_z_quality(table: FisherZTable, representatives: np.ndarray) -> FisherZQuality:
    """table: the group's Fisher-z table (k, k); representatives: (k, d) float32, the rows it was built from."""
    k = table.k
    iu = np.triu_indices(k, 1)
    exact = cosine_matrix(representatives)[iu]  # (k(k-1)/2,)
    restored = table.restore().astype(np.float64)[iu]
    if exact.size == 0:
        return FisherZQuality(None, 0.0, 0.0, 0)
    err = np.abs(restored - exact)
    rho = None
    if exact.size >= 3 and np.ptp(exact) > 0 and np.ptp(restored) > 0:
        from scipy.stats import spearmanr  # imported here: scipy.stats costs ~0.6 s at start-up

        rho = float(spearmanr(restored, exact)[0])
    return FisherZQuality(rho, float(err.mean()), float(err.max()), int(exact.size))


__all__ = ["FisherZQuality", "fisher_z_quality"]
