"""HhtlF32Tensor: the reconstruction-grade codec of one tensor (docs/design.md §2).

One-byte twig into a palette of real rows (stored bf16): 1 B/row; with the
Slot L leaf 9 B/row (+ one f32 scale per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...format import HHTL_F32_ROW_BYTES
from .palette import Palette, assign_nearest
from .slot_l import decode_slot_l, encode_slot_l, slot_l_byte_size
from .svd_basis import SvdBasis


@dataclass
class HhtlF32Tensor:
    """twig: (n,) uint8; leaf: (n, lanes) int8 or None; leaf_scale: f32 scale of the leaf."""

    twig: np.ndarray
    leaf: np.ndarray | None = None
    leaf_scale: float = 1.0

    @classmethod
    def encode(cls, rows: np.ndarray, palette: Palette, basis: SvdBasis | None = None,
               twig: np.ndarray | None = None) -> "HhtlF32Tensor":
        """rows (n, d) float32 → twigs (+ leaf on ``basis``). ``twig`` may be given
        when the assignment is already known (group build)."""
        if twig is None:
            twig, _ = assign_nearest(rows, palette.centroids)
        twig = np.asarray(twig).astype(np.uint8)
        if basis is None:
            return cls(twig)
        residual = rows - palette.centroids[twig]  # (n, d)
        q, scale = encode_slot_l(residual, basis)
        return cls(twig, q, scale)

    @property
    def n_rows(self) -> int:
        return int(self.twig.shape[0])

    def reconstruct_rows(self, palette_rows: np.ndarray, basis: SvdBasis | None = None,
                         idx=None) -> np.ndarray:
        """(m, d) float32 rows; ``idx`` selects rows (all when None)."""
        sel = slice(None) if idx is None else idx
        out = np.asarray(palette_rows, dtype=np.float32)[self.twig[sel].astype(np.int64)]
        if self.leaf is not None and basis is not None:
            out = out + decode_slot_l(self.leaf[sel], self.leaf_scale, basis)
        return out

    def entries_byte_size(self) -> int:
        return self.n_rows * HHTL_F32_ROW_BYTES

    def leaf_byte_size(self) -> int:
        return 0 if self.leaf is None else slot_l_byte_size(self.n_rows, self.leaf.shape[1])

    def byte_size(self) -> int:
        """1 B/row, + the leaf (lanes B/row and one f32 scale) when present."""
        return self.entries_byte_size() + self.leaf_byte_size()
