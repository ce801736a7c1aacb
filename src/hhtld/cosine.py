"""Row cosines: the one fidelity measure shared by codecs, allocation and gates."""

from __future__ import annotations

import numpy as np


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 ``(m,)`` cosine between rows of ``a`` and ``b`` (both ``(m, n)``).

    Accumulated in float64 and clipped to [-1, 1]. Two zero rows count as 1
    (identical); a zero row against a non-zero one counts as 0.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"row_cosines needs two matrices of one shape, got {a.shape} and {b.shape}")
    dot = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    na = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))
    nb = np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))
    den = na * nb
    cos = np.divide(dot, den, out=np.zeros_like(dot), where=den > 0)
    cos[(na == 0) & (nb == 0)] = 1.0
    return np.clip(cos, -1.0, 1.0)


__all__ = ["row_cosines"]
