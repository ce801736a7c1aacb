"""A shared SVD basis: top-n right singular vectors, stored as bfloat16."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..format import BF16_BYTES, F32_BYTES, SLOT_L_LANES, SVD_MAX_SAMPLE_ROWS
from .palette import to_bf16


def sample_rows(n: int, max_rows: int = SVD_MAX_SAMPLE_ROWS) -> np.ndarray:
    """Deterministic, evenly spaced sample of at most ``max_rows`` row indices."""
    if n <= max_rows:
        return np.arange(n)
    return np.linspace(0, n - 1, max_rows).round().astype(np.int64)


def combine_lanes(coeffs: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """coeffs (m, n) @ vectors (n, d) → (m, d) float32, summed lane by lane.

    A fixed summation order per element (unlike a BLAS product, whose blocking
    depends on m), so decoding one row gives exactly the bits of decoding all.
    """
    coeffs = np.asarray(coeffs, dtype=np.float32)
    vectors = np.asarray(vectors, dtype=np.float32)
    out = np.zeros((coeffs.shape[0], vectors.shape[1]), dtype=np.float32)
    for lane in range(vectors.shape[0]):
        out += coeffs[:, lane : lane + 1] * vectors[lane]
    return out


@dataclass
class SvdBasis:
    """vectors: (n, d) bfloat16, rows orthonormal up to bf16 rounding;
    singular: (r,) float32, all singular values of the sample (for the energy report)."""

    vectors: np.ndarray
    singular: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray, n: int = SLOT_L_LANES, max_rows: int = SVD_MAX_SAMPLE_ROWS) -> "SvdBasis":
        """rows: (m, d) float32. Uses at most ``max_rows`` evenly spaced rows.
        Fewer than n singular directions (tiny inputs) are padded with zero rows."""
        d = rows.shape[1]
        sample = np.asarray(rows[sample_rows(rows.shape[0], max_rows)], dtype=np.float64)
        if sample.shape[0] == 0:
            return cls(to_bf16(np.zeros((n, d))), np.zeros(0, dtype=np.float32))
        _, s, vt = np.linalg.svd(sample, full_matrices=False)
        vt = vt[:n]
        # sign convention: the largest-magnitude component of each vector is positive
        signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
        vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
        vec = np.zeros((n, d), dtype=np.float32)
        vec[: vt.shape[0]] = vt
        return cls(to_bf16(vec), s.astype(np.float32))

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    def _v(self) -> np.ndarray:
        return self.vectors.astype(np.float32)  # (n, d)

    def project(self, rows: np.ndarray) -> np.ndarray:
        """rows (m, d) → coefficients (m, n) float32."""
        return np.asarray(rows, dtype=np.float32) @ self._v().T

    def reconstruct(self, coeffs: np.ndarray) -> np.ndarray:
        """coefficients (m, n) → rows (m, d) float32 (see ``combine_lanes``)."""
        return combine_lanes(coeffs, self._v())

    def energy(self) -> float:
        """Share of the sample's energy (sum of squared singular values) the basis keeps."""
        s2 = self.singular.astype(np.float64) ** 2
        total = s2.sum()
        return float(s2[: self.n].sum() / total) if total > 0 else 1.0

    def byte_size(self) -> int:
        n, d = self.vectors.shape
        return n * d * BF16_BYTES + self.singular.size * F32_BYTES


def svd_basis_byte_size(n: int, d: int, n_singular: int) -> int:
    """Bytes of a stored basis: bf16 vectors + f32 singular values."""
    return n * d * BF16_BYTES + n_singular * F32_BYTES
