"""Pieces of bench/causal.py checked on small arrays with known answers (no model)."""

from __future__ import annotations

import numpy as np
import pytest


pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "causal.py"
    spec = importlib.util.spec_from_file_location("hhtld_bench_causal", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def q4_1_like(rows=24, cols=256, seed=0):
    """Values on a 16-level grid per aligned block of 32 columns, as Q4_1 dequantises them."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(rows, cols // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # every block uses its whole grid
    d = rng.uniform(0.01, 0.05, size=(rows, cols // 32, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, size=(rows, cols // 32, 1)).astype(np.float16).astype(np.float32)
    return (d * q + m).reshape(rows, cols).astype(np.float32)


def test_group_bounds(bench):
    assert bench.group_bounds(256, 64).tolist() == [0, 64, 128, 192, 256]
    assert bench.group_bounds(256, 32, 16).tolist() == [0, 16, 48, 80, 112, 144, 176, 208, 240, 256]
    assert bench.group_bounds(576, 128).tolist() == [0, 128, 256, 384, 512, 576]


def test_aligned_groups_of_32_are_artificially_exact_on_a_q4_1_grid(bench):
    w = q4_1_like()
    aligned = bench.rtn_groups(w, 4, 32)
    assert np.array_equal(aligned.dequant(), w)
    assert aligned.stored_bits == w.size * 4 + 2 * 16 * w.shape[0] * (w.shape[1] // 32)
    for other in (bench.rtn_groups(w, 4, 32, 16), bench.rtn_groups(w, 4, 128)):
        assert np.abs(other.dequant() - w).max() > 1e-3


def test_int8_rows_and_gguf_round_trip(bench):
    w = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    r = bench.int8_rows(w)
    assert np.abs(r.dequant() - w).max() <= np.abs(w).max() / 127 and r.stored_bits == w.size * 8 + 8 * 16
    pytest.importorskip("gguf")
    g = bench.gguf_quant(w, "Q8_0")
    assert g.stored_bits == w.size // 32 * 34 * 8 and np.abs(g.dequant() - w).max() < 0.02


def test_gptq_lowers_the_hessian_weighted_error_of_rtn(bench):
    rng = np.random.default_rng(0)
    cols = 256
    mix = rng.normal(size=(cols, cols)) / np.sqrt(cols)
    x = rng.normal(size=(4096, cols)) @ (mix + np.eye(cols))  # correlated inputs
    h = x.T @ x / len(x)
    w = rng.normal(size=(48, cols)).astype(np.float32)
    rtn = bench.rtn_groups(w, 4, 64).dequant()
    g = bench.gptq_matrix(w, h, 4, 64)
    assert g.codes.max() <= 15 and g.bounds.tolist() == [0, 64, 128, 192, 256]

    def err(q):
        d = (q - w).astype(np.float64)
        return float(np.einsum("ij,jk,ik->", d, h, d))

    assert err(g.dequant()) < 0.8 * err(rtn)
