"""Base17 fold/unfold/L1 (docs/design.md §2), pinned with hand-computed rows."""

import numpy as np
import pytest

from hhtld.codecs.reference.base17_fold import (
    DIM_OF_POS,
    GOLDEN_POS,
    fold,
    fold_means,
    l1_cdist,
    l1_distance,
    nearest_l1,
    octave_counts,
    unfold,
)


def test_golden_positions():
    assert GOLDEN_POS.tolist() == [0, 11, 5, 16, 10, 4, 15, 9, 3, 14, 8, 2, 13, 7, 1, 12, 6]
    assert sorted(GOLDEN_POS.tolist()) == list(range(17))
    assert (GOLDEN_POS[DIM_OF_POS] == np.arange(17)).all()


def test_fold_two_full_octaves_by_hand():
    row = np.arange(34, dtype=np.float32) / 128  # mean of p and p+17, x256 = 2p + 17
    expect = [17, 39, 27, 49, 37, 25, 47, 35, 23, 45, 33, 21, 43, 31, 19, 41, 29]
    got = fold(row)
    assert got.dtype == np.int16 and got.shape == (17,)
    assert got.tolist() == expect


def test_fold_partial_octave_and_half_even_rounding():
    # d = 20: positions 0..2 have two octaves (mean p + 8.5), positions 3..16 one (mean p)
    row = np.arange(20, dtype=np.float32) / 256
    assert octave_counts(20).tolist() == [2, 2, 2] + [1] * 14
    # 8.5 -> 8, 9.5 -> 10, 10.5 -> 10 (round half to even)
    expect = [8, 11, 5, 16, 10, 4, 15, 9, 3, 14, 8, 10, 13, 7, 10, 12, 6]
    assert fold(row).tolist() == expect


def test_fold_clamps_to_int16():
    rows = np.stack([np.full(40, 200.0), np.full(40, -200.0), np.full(40, 127.99)]).astype(np.float32)
    got = fold(rows)
    assert got[0].tolist() == [32767] * 17
    assert got[1].tolist() == [-32768] * 17
    assert got[2].tolist() == [32765] * 17  # 127.99 * 256 = 32765.44


def test_short_row_missing_positions_fold_to_zero():
    row = np.array([1, 2, 3, 4, 5], dtype=np.float32) / 256
    got = fold(row)
    for i in range(17):
        p = GOLDEN_POS[i]
        assert got[i] == (p + 1 if p < 5 else 0)


def test_unfold_replicates_means():
    v = np.arange(-8, 9, dtype=np.int16)  # one Base17 vector
    out = unfold(v, 40)
    assert out.shape == (40,) and out.dtype == np.float32
    for pos in range(40):
        assert out[pos] == v[DIM_OF_POS[pos % 17]] / 256
    # a 17-periodic row on the 1/256 grid folds and unfolds exactly
    pattern = np.random.default_rng(0).integers(-50, 50, 17).astype(np.float32) / 256
    row = np.tile(pattern, 4)[:60]
    assert np.array_equal(unfold(fold(row), 60), row)


def test_fold_vectorised_matches_naive_reference():
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 0.3, (50, 100)).astype(np.float32)
    got = fold(rows)
    for r in range(50):  # per-row reference, test only
        for i in range(17):
            vals = [rows[r, o * 17 + GOLDEN_POS[i]] for o in range(6) if o * 17 + GOLDEN_POS[i] < 100]
            want = np.clip(np.rint(np.mean(np.asarray(vals, dtype=np.float64)) * 256), -32768, 32767)
            assert got[r, i] == want
    assert np.allclose(fold_means(rows) * 256, got, atol=0.5)


def test_unfold_is_projection_without_rounding():
    rng = np.random.default_rng(2)
    rows = rng.normal(0, 1, (8, 50))
    means = fold_means(rows)  # (8, 17) exact means
    proj = means[:, DIM_OF_POS[np.arange(50) % 17]]
    # residual is orthogonal to the periodic subspace: projecting it again gives zero
    assert np.allclose(fold_means(rows - proj), 0, atol=1e-12)


def test_l1_distance_and_cdist():
    a = np.zeros(17, dtype=np.int16)
    b = np.arange(17, dtype=np.int16)
    assert l1_distance(a, b) == 136
    assert l1_distance(np.full(17, -32768, np.int16), np.full(17, 32767, np.int16)) == 17 * 65535
    rng = np.random.default_rng(3)
    x = rng.integers(-100, 100, (30, 17)).astype(np.int16)
    c = rng.integers(-100, 100, (7, 17)).astype(np.int16)
    brute = np.abs(x[:, None, :].astype(int) - c[None, :, :].astype(int)).sum(-1)
    assert np.array_equal(l1_cdist(x, c), brute)
    idx, dist = nearest_l1(x, c)
    assert np.array_equal(idx, brute.argmin(1)) and np.array_equal(dist, brute.min(1))


def test_nearest_l1_ties_go_to_lower_index():
    c = np.array([[1] + [0] * 16, [-1] + [0] * 16], dtype=np.int16)
    idx, dist = nearest_l1(np.zeros((1, 17), dtype=np.int16), c)
    assert idx.tolist() == [0] and dist.tolist() == [1]


@pytest.mark.parametrize("d", [1, 16, 17, 18, 384])
def test_fold_shapes(d):
    rows = np.ones((3, d), dtype=np.float32)
    assert fold(rows).shape == (3, 17)
    assert unfold(fold(rows), d).shape == (3, d)
