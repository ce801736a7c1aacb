"""A shared SVD basis: top-n right singular vectors, stored as bfloat16.

Only the top ``n`` (8 by default) directions are kept, so the basis is a
truncated SVD: ARPACK (``scipy.sparse.linalg.svds``, fixed start vector,
float32) on up to 4096 evenly spaced rows, instead of a full float64 SVD
that would cost minutes on a 4096-wide embedding. Small inputs take the
full SVD (exact and cheap there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from ...checkpoint.rows import evenly_spaced
from ...format import BF16_BYTES, F32_BYTES, SLOT_L_LANES, SVD_MAX_SAMPLE_ROWS
from .palette import to_bf16

FULL_SVD_MAX_ELEMS = 1 << 20  # samples up to this size take the full (float64) SVD
SAFE_SVD_PEAK = 2.0**32  # larger samples are scaled down first (float32 ARPACK squares them)


def sample_rows(n: int, max_rows: int = SVD_MAX_SAMPLE_ROWS) -> np.ndarray:
    """Deterministic, evenly spaced sample of at most ``max_rows`` row indices."""
    return evenly_spaced(n, max_rows)


def top_singular(sample: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``min(n, rank bound)`` singular values (descending, float64) and right
    singular vectors (rows, float64) of ``sample`` (m, d)."""
    m, d = sample.shape
    r = min(m, d)
    peak = float(np.max(np.abs(sample))) if sample.size else 0.0
    if peak > SAFE_SVD_PEAK:  # float32 products would overflow: the same directions on the scaled sample
        s, vt = top_singular(np.asarray(sample, dtype=np.float64) / peak, n)
        return s * peak, vt
    # one BLAS thread: the same bits whatever the machine's thread count
    with threadpool_limits(limits=1, user_api="blas"):
        if m * d <= FULL_SVD_MAX_ELEMS or n + 1 >= r:
            _, s, vt = np.linalg.svd(np.asarray(sample, dtype=np.float64), full_matrices=False)
            return s[:n], vt[:n]
        from scipy.sparse.linalg import ArpackError, svds

        a = np.ascontiguousarray(sample, dtype=np.float32)
        v0 = np.full(r, 1.0 / np.sqrt(r), dtype=np.float32)
        try:
            _, s, vt = svds(a, k=n, v0=v0, solver="arpack")
        except ArpackError:  # no convergence (e.g. rank below n): the full SVD is exact
            _, s, vt = np.linalg.svd(a, full_matrices=False)
            s, vt = s[:n], vt[:n]
    order = np.argsort(-s, kind="stable")
    return s[order].astype(np.float64), vt[order].astype(np.float64)


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
    """vectors: (n, d) bfloat16, rows orthonormal up to bf16 rounding (zero rows
    when the sample has fewer than n directions); singular: (n,) float32, the
    top-n singular values of the sample (zeros where there are none);
    total_energy: the sample's squared Frobenius norm (for the energy report)."""

    vectors: np.ndarray
    singular: np.ndarray
    total_energy: float = 0.0

    @classmethod
    def fit(cls, rows: np.ndarray, n: int = SLOT_L_LANES, max_rows: int = SVD_MAX_SAMPLE_ROWS) -> "SvdBasis":
        """rows: (m, d) float32. Uses at most ``max_rows`` evenly spaced rows."""
        d = rows.shape[1]
        sample = np.asarray(rows[sample_rows(rows.shape[0], max_rows)], dtype=np.float32)
        vec = np.zeros((n, d), dtype=np.float32)
        sing = np.zeros(n, dtype=np.float32)
        if sample.shape[0] == 0:
            return cls(to_bf16(vec), sing, 0.0)
        s, vt = top_singular(sample, n)
        # sign convention: the largest-magnitude component of each vector is positive
        signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
        vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
        vec[: vt.shape[0]] = vt
        sing[: s.shape[0]] = s
        total = float(np.einsum("ij,ij->", sample, sample, dtype=np.float64))
        return cls(to_bf16(vec), sing, total)

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
        """Share of the sample's energy (its squared Frobenius norm) the basis keeps."""
        kept = float(np.sum(self.singular.astype(np.float64) ** 2))
        return min(1.0, kept / self.total_energy) if self.total_energy > 0 else 1.0

    def byte_size(self) -> int:
        n, d = self.vectors.shape
        return n * d * BF16_BYTES + self.singular.size * F32_BYTES


def svd_basis_byte_size(n: int, d: int, n_singular: int) -> int:
    """Bytes of a stored basis: bf16 vectors + f32 singular values."""
    return n * d * BF16_BYTES + n_singular * F32_BYTES
