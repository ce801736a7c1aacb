"""Warm the kernels up: compile (or load from numba's cache) and run each once on a tiny
weight, so that the first real product does not pay for it."""

from __future__ import annotations

import numpy as np

from .runtime import backend, decode_ops, int16_tables
from .vq import KernelPair, StageArrays, VqKernel, tile_twigs

_done: set[tuple[str, str]] = set()  # (what, backend) warmed in this process


def _tiny_kernel() -> VqKernel:
    """A 3 × 4 weight of two one-byte stages (the one-row fast path and the one-byte gather)."""
    st = StageArrays(np.zeros((1, 2, 4), dtype=np.float32), np.zeros(1, dtype=np.int64), np.full(1, 2, dtype=np.int64),
                     tile_twigs(np.zeros((3, 2), dtype=np.uint8)))
    return VqKernel(3, 4, [st, st], np.ones(3, dtype=np.float32), np.ones(4, dtype=np.int8), 4, None, None, 0.0)


def warm_up() -> None:
    """Import the compiled kernels and run each once on a tiny weight, so that numba's
    compilation (or its cache load) happens now, not in the first product."""
    if ("kernels", backend()) in _done or backend() != "numba":
        return
    k = _tiny_kernel()
    x = np.ones((1, 4), dtype=np.float32)
    for tables in ("int16", "float32"):
        k.matmul_t(x, tables)
    k.matmul_t(np.ones((9, 4), dtype=np.float32))
    ops = decode_ops()
    v = np.ones(4, dtype=np.float32)
    ops.rms_norm(v, v, np.float32(1e-6), v.copy())
    ops.add_rms_norm(v.copy(), v, v, np.float32(1e-6), v.copy())
    ops.silu_mul(v, v, v.copy())
    cache = np.zeros((1, 2, 4), dtype=np.float32)
    ops.attend(v, v, v, v, v, cache, cache.copy(), 0, np.float32(0.5), np.zeros(2, dtype=np.float32), v.copy())
    _done.add(("kernels", backend()))


def warm_up_pairs() -> None:
    """Compile the two-weight product of :class:`hhtld.kernels.KernelPair` now (a loop that
    pairs weights calls it first; others never compile it)."""
    if ("pairs", backend()) in _done or not int16_tables():
        return
    k = _tiny_kernel()
    KernelPair(k, k).matmul_t(np.ones((1, 4), dtype=np.float32))
    _done.add(("pairs", backend()))


__all__ = ["warm_up", "warm_up_pairs"]
