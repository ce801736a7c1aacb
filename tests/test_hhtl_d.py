"""HHTL-D lookup grade: entry layout, palette, HIP, cache, tensor, Fisher-z quality (docs/design.md §2)."""

import numpy as np
import pytest

from hhtld.classify import GroupKey
from hhtld.codecs.reference.base17_fold import fold, l1_distance, unfold
from hhtld.codecs.reference.base17_palette import build_base17_palette, furthest_point_sample_l1, representatives
from hhtld.codecs.reference.fisher_z_quality import fisher_z_quality
from hhtld.codecs.reference.fisher_z import FisherZTable
from hhtld.codecs.reference.route_cache import HhtlCache, action_mix, quantize_distances
from hhtld.codecs.reference.hhtl_d_tensor import (
    HhtlDEntry,
    HhtlDTensor,
    bf16_bits,
    build_hhtl_d_group,
    heel_basin,
    pack_entries,
    unpack_entries,
)
from hhtld.codecs.reference.hip import hip_families
from hhtld.errors import CodecError
from hhtld.format import HHTL_D_ENTRY_BYTES, HHTL_D_LEAF_ROW_BYTES, HeelBasin, RouteAction


def clustered(n=300, d=68, centers=12, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 1, (centers, d))
    rows = c[rng.integers(0, centers, n)] + spread * rng.normal(0, 1, (n, d))
    return rows.astype(np.float32)


# -- HhtlDEntry: the 4-byte layout ---------------------------------------------------------
def test_entry_bits_pinned():
    e = HhtlDEntry(HeelBasin.FFN, 15, 255, True, 1.0)
    assert e.slot_d == 0b11_1111_11111111_1_0 == 0xFFFE
    assert e.slot_v == 0x3F80  # bfloat16 1.0
    assert e.to_bytes() == b"\xfe\xff\x80\x3f"  # little-endian slot_d, then slot_v
    assert HhtlDEntry.from_bytes(e.to_bytes()) == e


def test_entry_each_field_in_its_bits():
    assert HhtlDEntry(HeelBasin.QK, 0, 0).slot_d == 0
    assert HhtlDEntry(HeelBasin.V, 0, 0).slot_d == 1 << 14
    assert HhtlDEntry(HeelBasin.Gate, 0, 0).slot_d == 2 << 14
    assert HhtlDEntry(HeelBasin.QK, 1, 0).slot_d == 1 << 10
    assert HhtlDEntry(HeelBasin.QK, 0, 1).slot_d == 1 << 2
    assert HhtlDEntry(HeelBasin.QK, 0, 0, True).slot_d == 1 << 1
    assert HhtlDEntry(HeelBasin.QK, 0, 1).to_bytes() == b"\x04\x00\x00\x00"
    assert int(bf16_bits(-2.0)) == 0xC000 and int(bf16_bits(0.0)) == 0
    with pytest.raises(CodecError):
        HhtlDEntry(HeelBasin.QK, 0, 256)
    with pytest.raises(CodecError):
        HhtlDEntry(HeelBasin.QK, 16, 0)
    with pytest.raises(CodecError):
        HhtlDEntry.from_bytes(b"\x00\x00\x00")


def test_pack_entries_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    n = 40
    hip, twig = rng.integers(0, 16, n), rng.integers(0, 256, n)
    pol, res = rng.integers(0, 2, n).astype(bool), rng.uniform(0, 3, n).astype(np.float32)
    ent = pack_entries(HeelBasin.Gate, hip, twig, pol, res)
    assert ent.dtype == np.dtype("<u2") and ent.shape == (n, 2)
    raw = ent.tobytes()
    for i in range(n):
        assert raw[4 * i: 4 * i + 4] == HhtlDEntry(HeelBasin.Gate, hip[i], twig[i], pol[i], res[i]).to_bytes()
    f = unpack_entries(ent)
    assert (f["basin"] == 2).all() and (f["hip"] == hip).all() and (f["twig"] == twig).all()
    assert (f["polarity"] == pol).all() and (f["reserved"] == 0).all()
    assert np.allclose(f["residual"], res, rtol=2 ** -8)
    with pytest.raises(CodecError):
        pack_entries(0, [0], [256], [0], [0.0])


def test_heel_basin_from_role():
    assert heel_basin("qko") is HeelBasin.QK and heel_basin("lm_head") is HeelBasin.QK
    assert heel_basin("v") is HeelBasin.V and heel_basin("embed") is HeelBasin.V
    assert heel_basin("gate") is HeelBasin.Gate
    assert {heel_basin(r) for r in ("up", "down", "projection", "other")} == {HeelBasin.FFN}


# -- Base17 palette ------------------------------------------------------------------------
def test_palette_start_is_nearest_to_mean_and_stats():
    rows17 = fold(clustered())
    picks = furthest_point_sample_l1(rows17, 8)
    mean = rows17.astype(np.float64).mean(0)
    assert picks[0] == np.argmin(np.abs(rows17 - mean).sum(1))
    # the second pick is the row farthest from the first
    assert picks[1] == np.argmax(l1_distance(rows17, rows17[picks[0]]))
    pal, twig, dist = build_base17_palette(rows17, 8)
    assert pal.centroids.dtype == np.int16 and pal.k == 8
    assert np.array_equal(pal.centroids, rows17[picks])
    assert pal.count.sum() == len(rows17) and pal.count.dtype == np.uint32
    for c in range(8):
        assert pal.radius[c] == dist[twig == c].max()
    assert np.array_equal(dist, l1_distance(rows17, pal.centroids[twig]))


def test_palette_k_checks_and_duplicates():
    rows17 = fold(clustered())
    for bad in (0, -1, 257, 1.5, True):
        with pytest.raises(CodecError):
            build_base17_palette(rows17, bad)
    dup = np.repeat(rows17[:3], 10, axis=0)
    pal, twig, _ = build_base17_palette(dup, 256)
    assert pal.k == len(np.unique(rows17[:3], axis=0))  # stops at the distinct folds
    rep = representatives(twig, np.zeros(len(twig), dtype=np.int64), pal.k)
    assert (rep >= 0).all() and (twig[rep] == np.arange(pal.k)).all()


# -- HIP families ----------------------------------------------------------------------------
def test_hip_line_of_16_points_gives_their_index():
    pts = np.zeros((16, 17), dtype=np.int16)
    pts[:, 0] = np.arange(16) * 10
    d = np.abs(pts[:, None, 0].astype(int) - pts[None, :, 0])
    assert hip_families(d).tolist() == list(range(16))
    # shuffled order: the same splits (which pole is "a" depends on the order)
    perm = np.random.default_rng(0).permutation(16)
    fam = np.empty(16, dtype=int)
    fam[perm] = hip_families(d[np.ix_(perm, perm)])
    assert sorted(fam.tolist()) == list(range(16))
    for level in range(4):
        block = 16 >> (level + 1)  # points 0..7 vs 8..15, then quarters, ...
        bits = (fam >> (3 - level)) & 1
        for s in range(0, 16, block):
            assert len(set(bits[s:s + block].tolist())) == 1


def test_hip_degenerate_sets():
    assert hip_families(np.zeros((5, 5))).tolist() == [0] * 5
    assert hip_families(np.array([[0, 3], [3, 0]])).tolist() == [0, 8]
    fam = hip_families(build_base17_palette(fold(clustered()), 64)[0].distances())
    assert fam.dtype == np.uint8 and fam.max() <= 15 and len(set(fam.tolist())) > 4


# -- HHTL cache --------------------------------------------------------------------------------
def test_cache_distance_and_routes():
    pal, _, _ = build_base17_palette(fold(clustered()), 48)
    dm = pal.distances()
    hip = hip_families(dm)
    cache = HhtlCache.build(dm, hip)
    assert cache.distance.dtype == np.uint16 and np.array_equal(cache.distance, dm)  # exact: ints < 65536
    off = ~np.eye(48, dtype=bool)
    assert cache.attend_max == np.percentile(dm[off], 25) and cache.skip_min == np.percentile(dm[off], 75)
    r = cache.route
    assert r.dtype == np.uint8 and np.array_equal(r, r.T) and (np.diag(r) == RouteAction.Attend).all()
    d = cache.distance.astype(float)
    assert (r[off & (d <= cache.attend_max)] == RouteAction.Attend).all()
    assert (r[off & (d >= cache.skip_min)] == RouteAction.Skip).all()
    mid = off & (d > cache.attend_max) & (d < cache.skip_min)
    same = hip[:, None] == hip[None, :]
    assert (r[mid & same] == RouteAction.Compose).all() and (r[mid & ~same] == RouteAction.Escalate).all()
    mix = cache.table_mix()
    assert abs(sum(mix.values()) - 1) < 1e-9 and mix["Attend"] >= 0.25 and mix["Skip"] >= 0.25
    assert [a.value for a in RouteAction] == [0, 1, 2, 3]


def test_cache_scaling_and_errors():
    q, scale = quantize_distances(np.array([[0.0, 2.5], [2.5, 0.0]]))
    assert q.tolist() == [[0, 65535], [65535, 0]] and scale == pytest.approx(65535 / 2.5)
    q, scale = quantize_distances(np.array([[0, 70000], [70000, 0]]))
    assert q.max() == 65535 and scale < 1
    with pytest.raises(CodecError):
        HhtlCache.build(np.zeros((2, 2)), np.zeros(2, np.uint8), 80, 20)
    assert action_mix(np.array([0, 1, 1, 3])) == {"Skip": 0.25, "Attend": 0.5, "Compose": 0.0, "Escalate": 0.25}


# -- HhtlDTensor --------------------------------------------------------------------------------
def test_tensor_encode_reconstruct_lookup():
    rows = clustered()
    t = HhtlDTensor.encode(rows, k=32, basin="gate")
    n, d = rows.shape
    assert t.entries.shape == (n, 2) and t.byte_size() == n * HHTL_D_ENTRY_BYTES
    f = t.fields()
    assert (f["basin"] == HeelBasin.Gate).all() and (f["reserved"] == 0).all()
    assert np.array_equal(f["hip"], t.shared.hip[f["twig"]])
    cent = t.shared.palette.centroids
    assert np.array_equal(t.reconstruct_rows(), unfold(cent, d)[f["twig"]])
    assert np.array_equal(t.reconstruct_row(7), t.reconstruct_rows()[7])
    assert np.array_equal(t.reconstruct_rows(np.array([3, 1])), t.reconstruct_rows()[[3, 1]])
    assert t.cosine_lookup(3, 5) == t.shared.fisher_z.lookup(f["twig"][3], f["twig"][5])
    assert t.cosine_lookup(4, 4) == 1.0
    # slot_v and polarity from the Base17 residual
    r17 = fold(rows)
    res = r17.astype(int) - cent[f["twig"]].astype(int)
    mass = np.maximum(np.abs(cent[f["twig"]].astype(int)).sum(1), 1)
    assert np.allclose(f["residual"], np.abs(res).sum(1) / mass, rtol=2 ** -8)
    j = np.abs(res).argmax(1)
    assert np.array_equal(f["polarity"], res[np.arange(n), j] > 0)
    # the rows that became centroids have a zero residual
    rep = t.shared.rep_index
    assert (f["residual"][rep] == 0).all() and not f["polarity"][rep].any()


def test_tensor_with_leaf_is_closer_and_12_bytes():
    rows = clustered(n=200, d=51, spread=0.3, seed=4)
    plain = HhtlDTensor.encode(rows, k=16)
    leaf = HhtlDTensor.encode_with_leaf(rows, k=16)
    n = rows.shape[0]
    assert leaf.leaf.shape == (n, 8) and leaf.leaf.dtype == np.int8
    assert leaf.byte_size() == n * HHTL_D_LEAF_ROW_BYTES + 4  # + one f32 scale
    err_plain = np.linalg.norm(plain.reconstruct_rows() - rows)
    err_leaf = np.linalg.norm(leaf.reconstruct_rows() - rows)
    assert err_leaf < err_plain


def test_group_regimes_and_empty():
    a, b = clustered(seed=1), clustered(seed=2)
    g = build_hhtl_d_group(GroupKey("other", "embed", a.shape), ["x", "y"], [a, b], k=64)
    assert g.shared.basis is not None and g.basin is HeelBasin.V
    assert all(t.shared is g.shared for t in g.tensors.values())
    assert g.slot_l_for("x") == a.shape[0] * 8 + 4
    assert g.byte_size() == g.shared.byte_size() + g.entries_byte_size() + g.slot_l_byte_size()
    assert g.tensors["x"].cosine_lookup(0, 1, g.tensors["y"]) <= 1.0
    g2 = build_hhtl_d_group(GroupKey("encoder", "qko", a.shape), ["x"], [a], k=64)
    assert g2.shared.basis is None and g2.tensors["x"].leaf is None
    assert (g2.tensors["x"].fields()["basin"] == HeelBasin.QK).all()
    empty = build_hhtl_d_group(GroupKey("encoder", "qko", (4, 4)), [], [], k=64)
    assert empty.is_empty and empty.byte_size() == 0
    with pytest.raises(CodecError):
        build_hhtl_d_group(GroupKey("encoder", "qko", a.shape), ["x"], [a], k=300)


# -- Fisher-z quality --------------------------------------------------------------------------------
def test_fisher_z_quality_measured():
    reps = clustered(n=64, d=40, centers=64, spread=0.0, seed=5)
    fz = FisherZTable.build(reps)
    q = fisher_z_quality(fz, reps)
    assert q.pairs == 64 * 63 // 2
    assert 0.99 < q.spearman <= 1.0
    assert 0 < q.mean_abs_error <= q.max_abs_error < 0.02
    one = fisher_z_quality(FisherZTable.build(reps[:1]), reps[:1])
    assert one.spearman is None and one.pairs == 0
    j = q.to_json()
    assert set(j) == {"spearman", "mean_abs_error", "max_abs_error", "pairs"}
