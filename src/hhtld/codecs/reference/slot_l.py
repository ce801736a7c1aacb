"""Slot L: the leaf. Int8 coefficients of the residual on a shared SVD basis.

``residual = row - centroid``; ``c = basis.project(residual)``; one scale per
tensor ``s = max|c| / 127`` (1.0 when all are zero); ``q = clamp(round(c/s))``.
Decode: ``centroid + basis.reconstruct(q * s)``.
"""

from __future__ import annotations

import numpy as np

from ...errors import CodecError
from ...format import SLOT_L_LANES, SLOT_L_SCALE_BYTES
from .svd_basis import SvdBasis, combine_lanes


def encode_slot_l(residual: np.ndarray, basis: SvdBasis) -> tuple[np.ndarray, float]:
    """residual (m, d) float32 → (q (m, n) int8, scale float)."""
    return quantise_leaf(basis.project(residual))


def quantise_leaf(c: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients (m, n) float32 of a whole tensor → (q (m, n) int8, scale float):
    one scale per tensor, ``max|c| / 127`` (1.0 when all are zero). A streaming
    encoder projects block by block and quantises once the tensor is complete."""
    peak = float(np.max(np.abs(c))) if c.size else 0.0
    scale = peak / 127.0 if peak > 0.0 else 1.0
    q = np.clip(np.rint(c / scale), -127, 127).astype(np.int8)
    return q, scale


def decode_slot_l(q: np.ndarray, scale: float, basis: SvdBasis) -> np.ndarray:
    """q (m, n) int8, scale → residual estimate (m, d) float32."""
    return basis.reconstruct(q.astype(np.float32) * np.float32(scale))


def check_leaf_lanes(codec: str, lanes) -> None:
    """A codec's ``leaf_lanes`` option: an integer (not a bool) from 1 to 64, else CodecError."""
    if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= 64:
        raise CodecError(f"codec {codec}: leaf_lanes={lanes} is out of range (1..64)")


def slot_l_byte_size(n_rows: int, lanes: int = SLOT_L_LANES) -> int:
    """Stored bytes of one tensor's leaf: lanes x int8 per row + one f32 scale."""
    return n_rows * lanes + SLOT_L_SCALE_BYTES


# --- stored parts of a leaf (shared by every codec that carries Slot L) ---------

def basis_parts(basis: SvdBasis) -> dict[str, np.ndarray]:
    """Group parts of a shared basis: basis (n, d) bf16, singular (r,) f32."""
    return {"basis": basis.vectors, "singular": basis.singular}


def leaf_parts(q: np.ndarray | None, scale: float) -> dict[str, np.ndarray]:
    """Tensor parts of a leaf: leaf (n, lanes) i8 and leaf_scale (1,) f32; none without a leaf."""
    if q is None:
        return {}
    return {"leaf": q, "leaf_scale": np.array([scale], dtype=np.float32)}


def add_stored_leaf(out: np.ndarray, group, tensor, sel) -> np.ndarray:
    """Add the stored leaf of rows ``sel`` to ``out`` (m, d) in place, when the tensor has one.

    ``group`` / ``tensor`` are the codec's ``Parts``; the sum runs lane by lane
    (``combine_lanes``) so one decoded row has exactly the bits of a full decode.
    """
    if "leaf" in tensor:
        basis = np.asarray(group["basis"], dtype=np.float32)  # (lanes, d)
        q = np.asarray(tensor["leaf"][sel], dtype=np.float32)  # (m, lanes)
        out += combine_lanes(q * np.float32(tensor["leaf_scale"][0]), basis)
    return out
