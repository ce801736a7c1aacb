"""Row matrices read lazily, block by block.

An encoder never needs a whole tensor at once: it needs blocks of rows
(encode), a few scattered rows (the training sample of a group) and the
shape. :class:`TensorRows` reads them straight from the memory-mapped
checkpoint, so peak memory follows the block size, not the tensor size;
:class:`ArrayRows` gives an in-memory array the same interface (tests,
library callers with arrays at hand).

Rows are float32 ``(rows, cols)`` of the tensor's effective 2-D shape, rows
= output features (a transposed tensor, GPT-2 ``Conv1D``, is read by
columns). Every block is checked for NaN/inf before it reaches a codec.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import CheckpointError
from ..format import BLOCK_ELEMS
from .reader import Checkpoint


class RowSource(Protocol):
    """What a codec reads a tensor through."""

    shape: tuple[int, int]  # (rows, cols)
    name: str

    def block(self, start: int, stop: int) -> np.ndarray:
        """float32 (stop - start, cols), a new array."""

    def take(self, idx: np.ndarray) -> np.ndarray:
        """float32 (len(idx), cols), a new array; idx sorted int64."""


def evenly_spaced(n: int, max_rows: int) -> np.ndarray:
    """Deterministic, evenly spaced sample of at most ``max_rows`` of ``n`` row
    indices (all of them when ``n <= max_rows``): (m,) int64, sorted."""
    if n <= max_rows:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, max_rows).round().astype(np.int64)


def sample_across(sources, max_rows: int) -> np.ndarray:
    """float32 (m, cols): rows drawn evenly from every source of a group, each
    contributing ``ceil(max_rows / len(sources))`` (or all of its rows), in
    source order. The training sample of a group's shared parts: bounded by
    ``max_rows`` (plus rounding), whatever the number of layers."""
    sources = list(sources)
    if not sources:
        raise CheckpointError("a group sample needs at least one tensor")
    per = max(1, -(-int(max_rows) // len(sources)))
    return np.concatenate([s.take(evenly_spaced(s.shape[0], per)) for s in sources])


def block_rows(n_cols: int, elems: int | None = None) -> int:
    """Rows per encode block: about ``elems`` (default ``BLOCK_ELEMS``) weights.
    Depends on the column count only, so the blocks (and the bytes they encode
    to) never depend on how many threads run them."""
    return max(1, (BLOCK_ELEMS if elems is None else elems) // max(1, int(n_cols)))


def row_blocks(n_rows: int, n_cols: int, elems: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``n_rows`` rows in blocks of :func:`block_rows`."""
    step = block_rows(n_cols, elems)
    return [(s, min(n_rows, s + step)) for s in range(0, n_rows, step)]


class ArrayRows:
    """An in-memory float32 row matrix with the :class:`RowSource` interface."""

    def __init__(self, rows: np.ndarray, name: str = "rows"):
        a = np.asarray(rows, dtype=np.float32)
        if a.ndim != 2:
            raise CheckpointError(f"tensor '{name}': a row matrix must be 2-D, got shape {list(a.shape)}")
        self.rows = a
        self.shape = (int(a.shape[0]), int(a.shape[1]))
        self.name = name

    def block(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.rows[start:stop], dtype=np.float32)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return np.array(self.rows[np.asarray(idx, dtype=np.int64)], dtype=np.float32)


class TensorRows:
    """The row matrix of one planned checkpoint tensor, read from the memory map.

    ``plan`` is a :class:`hhtld.classify.TensorPlan` (``name``, ``shape``,
    ``row_shape``, ``transposed``). Only the rows asked for are touched.
    """

    def __init__(self, ckpt: Checkpoint, plan):
        self.ckpt = ckpt
        self.plan = plan
        self.name = plan.name
        self.shape = (int(plan.row_shape[0]), int(plan.row_shape[1]))

    def _stored(self) -> np.ndarray:
        """The memory-mapped tensor as a 2-D view: (rows, cols), or (cols, rows) when transposed."""
        a = self.ckpt.read(self.name)
        if self.plan.transposed:
            return a.reshape(self.shape[1], self.shape[0])
        return a.reshape(self.shape)

    def _checked(self, a: np.ndarray) -> np.ndarray:
        if not np.isfinite(a).all():
            self._fail()
        return a

    def _fail(self) -> None:
        bad = 0
        for s, e in row_blocks(*self.shape):
            blk = self._raw_block(s, e)
            bad += int(blk.size - np.count_nonzero(np.isfinite(blk)))
        raise CheckpointError(
            f"{self.ckpt.weight_path(self.plan.file)}: tensor '{self.name}': {bad} non-finite value(s) "
            f"(NaN/inf) cannot be encoded"
        )

    def _raw_block(self, start: int, stop: int) -> np.ndarray:
        a = self._stored()
        if self.plan.transposed:
            return np.ascontiguousarray(a[:, start:stop].T, dtype=np.float32)
        return np.array(a[start:stop], dtype=np.float32)

    def block(self, start: int, stop: int) -> np.ndarray:
        return self._checked(self._raw_block(start, stop))

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        a = self._stored()
        out = np.ascontiguousarray(a[:, idx].T if self.plan.transposed else a[idx], dtype=np.float32)
        return self._checked(out)

    def read(self) -> np.ndarray:
        """The whole row matrix (float32, a new array): small tensors and tests only."""
        return self.block(0, self.shape[0])


__all__ = ["ArrayRows", "RowSource", "TensorRows", "block_rows", "evenly_spaced", "row_blocks", "sample_across"]
