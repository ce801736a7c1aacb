"""The Fisher-z table: k x k pairwise cosines of a palette, int8, O(1) lookup."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...format import FAMILY_GAMMA_BYTES

COS_CLAMP = 0.9999


@dataclass(frozen=True)
class FamilyGamma:
    """z_min and z_range over the off-diagonal pairs (8 bytes: two f32)."""

    z_min: float
    z_range: float

    def to_array(self) -> np.ndarray:
        return np.array([self.z_min, self.z_range], dtype=np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "FamilyGamma":
        return cls(float(a[0]), float(a[1]))


def cosine_matrix(rows: np.ndarray) -> np.ndarray:
    """rows (k, d) → (k, k) float64 cosines (zero rows have cosine 0 with all)."""
    r = np.asarray(rows, dtype=np.float64)
    norm = np.linalg.norm(r, axis=1)
    unit = r / np.where(norm > 0, norm, 1.0)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


@dataclass
class FisherZTable:
    """table: (k, k) int8; gamma: FamilyGamma. ``lookup(i, i)`` is 1.0 by definition."""

    table: np.ndarray
    gamma: FamilyGamma

    @classmethod
    def build(cls, representatives: np.ndarray) -> "FisherZTable":
        """representatives: (k, d) float32, one real row per centroid."""
        k = representatives.shape[0]
        z = np.arctanh(np.clip(cosine_matrix(representatives), -COS_CLAMP, COS_CLAMP))
        off = ~np.eye(k, dtype=bool)
        if k > 1:
            z_min = float(z[off].min())
            z_range = float(z[off].max()) - z_min
        else:
            z_min, z_range = 0.0, 0.0
        if z_range <= 0.0:
            z_range = 1.0
        gamma = FamilyGamma(float(np.float32(z_min)), float(np.float32(z_range)))
        q = np.clip(np.rint((z - gamma.z_min) / gamma.z_range * 254.0 - 127.0), -127, 127)
        return cls(q.astype(np.int8), gamma)

    @property
    def k(self) -> int:
        return int(self.table.shape[0])

    def decode(self, q: np.ndarray) -> np.ndarray:
        """int8 codes → cosines (float32)."""
        z = (q.astype(np.float32) + 127.0) / 254.0 * np.float32(self.gamma.z_range) + np.float32(self.gamma.z_min)
        return np.tanh(z)

    def lookup(self, i, j):
        """Cosine between the rows of twigs ``i`` and ``j`` (scalars or arrays)."""
        i = np.asarray(i)
        j = np.asarray(j)
        out = self.decode(self.table[i, j])
        out = np.where(i == j, np.float32(1.0), out)
        return float(out) if out.ndim == 0 else out

    def restore(self) -> np.ndarray:
        """(k, k) float32 cosines, diagonal 1."""
        out = self.decode(self.table)
        np.fill_diagonal(out, 1.0)
        return out

    def byte_size(self) -> int:
        return self.table.size + FAMILY_GAMMA_BYTES
