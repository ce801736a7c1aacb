"""The kernels of hhtld.kernels against decode-then-matmul, on random parts encoded by the
real codec: every layout the rate ladder writes, the codec's other switches, odd shapes,
1 and 2 threads, the tiled twig layout, and the paths taken without the compiled parts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hhtld.budget import LADDER
from hhtld.classify.groups import GroupKey
from hhtld.codecs.base import DictParts
from hhtld.codecs.vq.codec import HhtlVqCodec
from hhtld.kernels import TiledTwig, backend, int16_tables, tile_twigs, vq_kernel
from hhtld.kernels import runtime as backend_mod
from hhtld.kernels import native

# float32 tables: the decoded product summed in another order. int16 tables (12-bit entries, one scale per
# 16 segments): measured at most 1.7e-3 of the largest output over these layouts.
F32_BOUND = 2e-5
I16_BOUND = 6e-3


def _encode(n: int, c: int, role: str = "up", seed: int = 0, **opts):
    rng = np.random.default_rng(seed)
    rows = [(rng.standard_t(5, (n, c)) * rng.uniform(0.2, 3, (n, 1))).astype(np.float32) for _ in range(2)]
    eg = HhtlVqCodec(**opts).encode_group(GroupKey("decoder", role, (n, c)), ["a", "b"], rows)
    g, t = DictParts.of(eg), DictParts.of(eg.tensors["b"])
    return eg.params, g, t, HhtlVqCodec.decode_rows(g, t)


def _check(params, g, t, want, rows=(1, 3, 40)):
    kern = vq_kernel(params, g, t)
    rng = np.random.default_rng(7)
    for r in rows:
        x = rng.standard_normal((r, want.shape[1])).astype(np.float32)
        ref = x.astype(np.float64) @ want.T.astype(np.float64)
        scale = float(np.abs(ref).max())
        got = kern.matmul_t(x, "float32")
        assert got.shape == (r, want.shape[0]) and got.dtype == np.float32
        assert np.abs(got - ref).max() <= F32_BOUND * scale, ("float32", r)
        got16 = kern.matmul_t(x, "int16")
        assert np.abs(got16 - ref).max() <= I16_BOUND * scale, ("int16", r)
    return kern


needs_numba = pytest.mark.skipif(backend() != "numba", reason="numba is not available")


@needs_numba
@pytest.mark.parametrize("setting", LADDER, ids=lambda s: f"{s.name}({s.stages})")
def test_every_ladder_layout_equals_decode_then_matmul(setting):
    # 130 rows: three 64-row tiles, the last one partly filled; 192 columns: widths 3, 5, 16 and 4,3 pad the row
    params, g, t, want = _encode(130, 192, **{k: v for k, v in setting.options().items() if k != "setting"})
    assert int16_tables()  # the C extension is built by the README's install
    _check(params, g, t, want)


@needs_numba
@pytest.mark.parametrize("opts", [
    {"stages": "2+4", "gain": False}, {"stages": "4,3", "rotate": False}, {"stages": "3+8:512"},
    {"stages": "8:4096"}, {"stages": "2", "leaf_lanes": 4}, {"stages": "2+2+4"}, {"stages": "5,3+2", "gain": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_other_layouts_and_switches(opts):
    role = "embed" if opts.get("leaf_lanes") else "up"
    params, g, t, want = _encode(70, 160, role=role, **opts)  # 160 = 5 * 32: a Hadamard block of 32
    if opts.get("leaf_lanes"):
        assert "leaf" in t
    _check(params, g, t, want)


@needs_numba
def test_one_and_two_threads_give_the_same_bits():
    import numba

    params, g, t, want = _encode(200, 128, stages="2+4")
    kern = vq_kernel(params, g, t)
    x = np.random.default_rng(3).standard_normal((2, 128)).astype(np.float32)
    out = {}
    before = numba.get_num_threads()
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            out[n] = [kern.matmul_t(x, tables) for tables in ("int16", "float32")]
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*out.values()):
        assert np.array_equal(a, b)


def _group_of_two(n_a: int, n_b: int, c: int, **opts):
    """Two weights (n_a, c) and (n_b, c) of one hhtl-vq group: their kernels share its palettes."""
    from hhtld.kernels import stage_palettes

    rng = np.random.default_rng(5)
    rows = [(rng.standard_t(5, (n, c)) * rng.uniform(0.2, 3, (n, 1))).astype(np.float32) for n in (n_a, n_b)]
    eg = HhtlVqCodec(**opts).encode_group(GroupKey("decoder", "up", (n_a, c)), ["a", "b"], rows)
    g = DictParts.of(eg)
    pal = stage_palettes(eg.params, g)
    return [vq_kernel(eg.params, g, DictParts.of(eg.tensors[n]), pal) for n in ("a", "b")]


@needs_numba
@pytest.mark.parametrize("stages", ["2+4", "4", "2+3"])
def test_a_pair_of_one_input_builds_one_table_and_gives_the_same_bits(stages):
    from hhtld.kernels import KernelPair

    a, b = _group_of_two(200, 70, 192, stages=stages)  # 70 rows: a partly filled tile
    pair = KernelPair(a, b)
    assert pair.shared
    rng = np.random.default_rng(9)
    for r in (1, 3):
        x = rng.standard_normal((r, 192)).astype(np.float32)
        for tables in ("int16", "float32"):
            ya, yb = pair.matmul_t(x, tables)
            assert np.array_equal(ya, a.matmul_t(x, tables)) and np.array_equal(yb, b.matmul_t(x, tables))


@needs_numba
def test_weights_of_other_palettes_rotation_or_layout_are_not_paired():
    from hhtld.kernels import KernelPair

    a, b = _group_of_two(64, 64, 128, stages="2+4")
    c, _ = _group_of_two(64, 64, 128, stages="2+4", seed=1)  # other palettes and signs
    d, _ = _group_of_two(64, 64, 128, stages="2+2+4")  # three stages: no one-row fast path
    e, _ = _group_of_two(64, 64, 128, stages="2+4", gain=False)
    assert KernelPair.shares(a, b)
    assert not any(KernelPair.shares(a, o) for o in (c, d, e))
    x = np.ones((1, 128), dtype=np.float32)
    ya, yc = KernelPair(a, c).matmul_t(x)  # not shared: the two products one after the other
    assert np.array_equal(ya, a.matmul_t(x)) and np.array_equal(yc, c.matmul_t(x))


def test_tiled_twigs_read_back_as_rows():
    rng = np.random.default_rng(0)
    for n, s, dt in ((1, 3, np.uint8), (64, 5, np.uint8), (130, 7, np.uint16)):
        tw = rng.integers(0, 200, (n, s)).astype(dt)
        tiled = tile_twigs(tw)
        assert tiled.shape == (-(-n // 64), s, 64) and tiled.dtype == dt
        rows = TiledTwig(tiled, n)
        assert rows.shape == (n, s)
        assert np.array_equal(rows[:], tw) and np.array_equal(np.asarray(rows), tw)
        idx = np.array([n - 1, 0, -1])
        assert np.array_equal(rows[idx], tw[idx])
        assert np.array_equal(rows[1:], tw[1:])
        with pytest.raises(IndexError, match=f"row index out of range for {n} rows"):
            rows[np.array([n])]


def test_without_the_extension_float_tables_run_and_say_so_once(monkeypatch, capsys):
    params, g, t, want = _encode(80, 64, stages="2+4")
    kern = vq_kernel(params, g, t)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    exact = kern.matmul_t(x, "float32")
    monkeypatch.setattr(native, "library", lambda: "the extension hhtld.kernels._lut was not built")
    backend_mod.reset()
    backend_mod._said.clear()
    try:
        if backend() != "numba":
            pytest.skip("numba is not available")
        assert not int16_tables()
        assert np.array_equal(kern.matmul_t(x, "int16"), exact)  # the float32 tables instead
        kern.matmul_t(x, "int16")
        err = capsys.readouterr().err
        assert err.count("hhtld: note: the table-sum extension is unavailable") == 1
        assert "float32 tables run instead" in err
    finally:
        backend_mod.reset()


def test_without_numba_the_numpy_path_runs_and_says_so_once():
    """In a child process where numba cannot be imported: the same product on numpy, one note."""
    code = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None  # import numba raises ImportError
        import numpy as np
        from hhtld.classify.groups import GroupKey
        from hhtld.codecs.base import DictParts
        from hhtld.codecs.vq.codec import HhtlVqCodec
        from hhtld.kernels import backend, vq_kernel
        rng = np.random.default_rng(0)
        rows = [rng.standard_normal((90, 96)).astype(np.float32) for _ in range(2)]
        eg = HhtlVqCodec(stages="2+4").encode_group(GroupKey("decoder", "up", (90, 96)), ["a", "b"], rows)
        g, t = DictParts.of(eg), DictParts.of(eg.tensors["b"])
        want = HhtlVqCodec.decode_rows(g, t)
        kern = vq_kernel(eg.params, g, t)
        for r in (1, 20):
            x = rng.standard_normal((r, 96)).astype(np.float32)
            ref = x.astype(np.float64) @ want.T.astype(np.float64)
            assert np.abs(kern.matmul_t(x) - ref).max() <= 2e-5 * np.abs(ref).max()
        print(backend())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "numpy"
    notes = [line for line in res.stderr.splitlines() if line.startswith("hhtld: note:")]
    assert len(notes) == 1 and "compiled kernels are unavailable" in notes[0] and "numpy path" in notes[0]


def test_kernels_env_selects_numpy(monkeypatch):
    monkeypatch.setenv("HHTLD_KERNELS", "numpy")
    backend_mod.reset()
    try:
        assert backend() == "numpy"
        params, g, t, want = _encode(40, 64, stages="4")
        x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
        ref = x.astype(np.float64) @ want.T.astype(np.float64)
        assert np.abs(vq_kernel(params, g, t).matmul_t(x) - ref).max() <= F32_BOUND * np.abs(ref).max()
    finally:
        monkeypatch.delenv("HHTLD_KERNELS")
        backend_mod.reset()
