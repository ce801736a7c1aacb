"""Slot L: the leaf. Int8 coefficients of the residual on a shared SVD basis.

``residual = row - centroid``; ``c = basis.project(residual)``; one scale per
tensor ``s = max|c| / 127`` (1.0 when all are zero); ``q = clamp(round(c/s))``.
Decode: ``centroid + basis.reconstruct(q * s)``.
"""

from __future__ import annotations

import numpy as np

from ..format import SLOT_L_LANES, SLOT_L_SCALE_BYTES
from .svd_basis import SvdBasis


def encode_slot_l(residual: np.ndarray, basis: SvdBasis) -> tuple[np.ndarray, float]:
    """residual (m, d) float32 → (q (m, n) int8, scale float)."""
    c = basis.project(residual)  # (m, n)
    peak = float(np.max(np.abs(c))) if c.size else 0.0
    scale = peak / 127.0 if peak > 0.0 else 1.0
    q = np.clip(np.rint(c / scale), -127, 127).astype(np.int8)
    return q, scale


def decode_slot_l(q: np.ndarray, scale: float, basis: SvdBasis) -> np.ndarray:
    """q (m, n) int8, scale → residual estimate (m, d) float32."""
    return basis.reconstruct(q.astype(np.float32) * np.float32(scale))


def slot_l_byte_size(n_rows: int, lanes: int = SLOT_L_LANES) -> int:
    """Stored bytes of one tensor's leaf: lanes x int8 per row + one f32 scale."""
    return n_rows * lanes + SLOT_L_SCALE_BYTES
