"""Effective 2-D shapes and the encodable rule (docs/design.md §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..format import DEFAULT_MIN_BYTES, DEFAULT_MIN_ROWS


def effective_shape(shape) -> tuple[int, int] | tuple[int, ...]:
    """2-D as is; 3-D with last dim 1 as its first two dims; 1-D as is;
    otherwise ``(shape[0], prod(shape[1:]))``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 2:
        return shape
    if len(shape) == 3 and shape[2] == 1:
        return shape[:2]
    return (shape[0], math.prod(shape[1:]))


def to_row_matrix(a: np.ndarray, shape, row_shape, transposed: bool) -> np.ndarray:
    """A tensor in its stored ``shape`` → its row matrix ``row_shape`` (rows =
    output features; a transposed tensor, GPT-2 ``Conv1D``, is turned first)."""
    if transposed:
        a = np.ascontiguousarray(np.reshape(a, tuple(shape)).T)
    return np.reshape(a, tuple(row_shape))


def from_row_matrix(rows: np.ndarray, shape, transposed: bool) -> np.ndarray:
    """The inverse of ``to_row_matrix``: a row matrix back to the stored ``shape`` (contiguous)."""
    if transposed:
        rows = rows.T
    return np.ascontiguousarray(rows).reshape(tuple(shape))


def is_matrix_shape(shape) -> bool:
    """2-D, or 3-D with last dim 1 (kernel-size-1 conv)."""
    shape = tuple(shape)
    return len(shape) == 2 or (len(shape) == 3 and shape[2] == 1)


@dataclass(frozen=True)
class EncodablePolicy:
    """Thresholds of ``is_encodable``. ``encode_all`` encodes every 2-D float matrix."""

    min_rows: int = DEFAULT_MIN_ROWS
    min_bytes: int = DEFAULT_MIN_BYTES
    encode_all: bool = False

    def to_json(self) -> dict:
        return {"min_rows": self.min_rows, "min_bytes": self.min_bytes, "encode_all": self.encode_all}


def is_encodable(shape, nbytes: int, policy: EncodablePolicy = EncodablePolicy()) -> bool:
    """Reference rule: 2-D (or 3-D with last dim 1), at least ``min_rows`` rows
    and more than ``min_bytes`` bytes. Shape is the stored shape; rows are
    counted on the effective shape."""
    if not is_matrix_shape(shape):
        return False
    rows, cols = effective_shape(shape)
    if rows < 1 or cols < 1:
        return False
    if policy.encode_all:
        return True
    return rows >= policy.min_rows and nbytes > policy.min_bytes
