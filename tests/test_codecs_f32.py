"""Reference reconstruction codec (docs/design.md §2): palette, SVD basis, Slot L, Fisher-z, groups."""

from __future__ import annotations

import numpy as np
import pytest

from hhtld import CodecError
from hhtld.classify import GroupKey
from hhtld.codecs import build_group_with_fisher_z, build_group_with_leaf
from hhtld.codecs import make_codec
from hhtld.codecs.reference import (
    FisherZTable,
    HhtlF32Tensor,
    SvdBasis,
    assign_nearest,
    build_f32_palette,
    check_k,
    decode_slot_l,
    encode_slot_l,
    furthest_point_sample,
    slot_l_byte_size,
)

EMBED = GroupKey("other", "embed", (300, 32))
UP = GroupKey("encoder", "up", (300, 32))


def rank8_rows(n=300, d=32, seed=0):
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((8, d))
    return (rng.standard_normal((n, 8)) @ atoms).astype(np.float32)


def cos_rows(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_k_range_is_checked():
    assert check_k(256) == 256
    assert check_k(1) == 1
    for bad in (0, -1, 257, 1000):
        with pytest.raises(CodecError) as e:
            check_k(bad)
        assert str(e.value) == f"palette size k={bad} is out of range: it must satisfy 0 < k <= 256"
    with pytest.raises(CodecError):
        make_codec("hhtl-f32", k=257)
    make_codec("hhtl-f32", k=256)


def test_k_257_refused_and_256_accepted_by_group_builders():
    rows = [rank8_rows()]
    with pytest.raises(CodecError, match="k=257"):
        build_group_with_leaf(EMBED, ["t"], rows, k=257)
    g = build_group_with_leaf(EMBED, ["t"], rows, k=256)
    assert g.palette.k == 256
    assert g.tensors["t"].twig.dtype == np.uint8
    assert int(g.tensors["t"].twig.max()) <= 255


def test_furthest_point_sampling_starts_at_largest_norm_and_covers():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((200, 16)).astype(np.float32)
    rows[37] *= 10
    picks = furthest_point_sample(rows, 20)
    assert picks[0] == 37
    assert len(set(picks.tolist())) == 20
    # greedy property: each new pick is the row farthest from the ones before it
    for j in range(1, 20):
        d = ((rows[:, None, :] - rows[None, picks[:j], :]) ** 2).sum(-1).min(1)
        assert d[picks[j]] == pytest.approx(d.max(), rel=1e-4)


def test_fps_stops_at_the_number_of_distinct_rows():
    rows = np.repeat(np.eye(4, dtype=np.float32), 10, axis=0)
    assert len(furthest_point_sample(rows, 256)) == 4
    # rows whose squared distances cancel with rounding noise (not exact zeros)
    rng = np.random.default_rng(5)
    distinct = rng.standard_normal((4, 96)).astype(np.float32) * 3
    rows = distinct[np.arange(40) % 4]
    assert len(furthest_point_sample(rows, 256)) == 4


def test_assignment_matches_brute_force():
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((500, 24)).astype(np.float32)
    cents = rng.standard_normal((37, 24)).astype(np.float32)
    idx, dist = assign_nearest(rows, cents)
    full = ((rows[:, None] - cents[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-4, atol=1e-4)


def test_palette_radius_and_count():
    rows = rank8_rows()
    pal, twig, dist = build_f32_palette(rows, 16)
    assert pal.count.sum() == len(rows)
    np.testing.assert_array_equal(pal.count, np.bincount(twig, minlength=16))
    for c in range(16):
        assert pal.radius[c] == pytest.approx(dist[twig == c].max())


def test_zero_residual_encodes_to_zero_lanes():
    basis = SvdBasis.fit(rank8_rows())
    q, scale = encode_slot_l(np.zeros((5, 32), np.float32), basis)
    assert q.dtype == np.int8 and q.shape == (5, 8)
    assert not q.any() and scale == 1.0
    np.testing.assert_array_equal(decode_slot_l(q, scale, basis), 0.0)


def test_rank8_rows_reconstruct_through_the_leaf():
    rows = rank8_rows()
    g = build_group_with_leaf(EMBED, ["t"], [rows], k=16)
    rec = g.reconstruct("t")
    c = cos_rows(rows, rec)
    assert c.mean() >= 0.98
    assert c.min() >= 0.95
    # without the leaf, 16 palette rows cannot carry 300 rank-8 rows
    assert cos_rows(rows, g.palette.centroids[g.tensors["t"].twig]).mean() < 0.9


def test_basis_is_shared_and_leaf_bytes_grow_linearly():
    sizes = []
    for n_tensors in (1, 2, 4):
        rows = [rank8_rows(seed=s) for s in range(n_tensors)]
        g = build_group_with_leaf(EMBED, [f"t{s}" for s in range(n_tensors)], rows, k=16)
        sizes.append((g.svd_basis_byte_size(), g.slot_l_byte_size()))
        assert g.slot_l_for("t0") == slot_l_byte_size(300) == 300 * 8 + 4
    assert sizes[0][0] == sizes[1][0] == sizes[2][0] > 0
    assert sizes[1][1] == 2 * sizes[0][1] and sizes[2][1] == 4 * sizes[0][1]


def test_argmax_roles_fall_back_to_fisher_z_only():
    g = build_group_with_leaf(UP, ["a", "b"], [rank8_rows(), rank8_rows(seed=1)], k=8)
    assert g.basis is None and g.svd_basis_byte_size() == 0 and g.slot_l_byte_size() == 0
    assert g.tensors["a"].leaf is None
    assert g.entries_byte_size() == 600  # 1 B/row
    assert g.fisher_z.table.shape == (8, 8)


def test_empty_group_is_an_empty_result():
    for build in (build_group_with_fisher_z, build_group_with_leaf):
        g = build(EMBED, [], [], k=256)
        assert g.is_empty and g.byte_size() == 0 and g.tensors == {}


def test_fisher_z_table_roundtrip():
    rng = np.random.default_rng(3)
    reps = rng.standard_normal((12, 40)).astype(np.float32)
    fz = FisherZTable.build(reps)
    exact = reps @ reps.T / np.outer(np.linalg.norm(reps, axis=1), np.linalg.norm(reps, axis=1))
    restored = fz.restore()
    off = ~np.eye(12, dtype=bool)
    # int8 over the off-diagonal z range: error bounded by half a quantisation step in z
    step = fz.gamma.z_range / 254
    assert np.abs(np.arctanh(restored[off]) - np.arctanh(exact[off])).max() <= step / 2 + 1e-5
    assert fz.table[off].min() == -127 and fz.table[off].max() == 127
    assert fz.lookup(3, 3) == 1.0
    assert fz.lookup(2, 5) == pytest.approx(exact[2, 5], abs=0.02)
    assert fz.byte_size() == 144 + 8


def test_hhtl_f32_tensor_byte_sizes():
    rows = rank8_rows()
    pal, twig, _ = build_f32_palette(rows, 32)
    t = HhtlF32Tensor.encode(rows, pal)
    assert t.byte_size() == 300  # 1 B/row
    t = HhtlF32Tensor.encode(rows, pal, SvdBasis.fit(rows))
    assert t.byte_size() == 300 * 9 + 4  # 9 B/row + one f32 scale
