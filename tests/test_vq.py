"""hhtl-vq: exact bit accounting and round trip of every ladder setting, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from hhtld.budget.settings import LADDER, Setting
from hhtld.classify.groups import GroupKey
from hhtld.codecs.base import DictParts
from hhtld.codecs.vq.codec import HhtlVqCodec, stored_bytes
from hhtld.codecs.vq.quantiser import Layout, parse_stages, rotate, rotation_signs
from hhtld.errors import CodecError, OptionsError
from hhtld.gates.rows import row_cosines

N_ROWS, N_COLS, N_TENSORS = 200, 96, 2


def _rows(seed=0):
    rng = np.random.default_rng(seed)
    # heavy-ish tails and per-row scales, like real weights
    return [(rng.standard_t(6, (N_ROWS, N_COLS)) * rng.uniform(0.5, 2, (N_ROWS, 1))).astype(np.float32)
            for _ in range(N_TENSORS)]


def _encode(s: Setting, role="up", rows=None):
    rows = rows if rows is not None else _rows()
    codec = HhtlVqCodec(**s.options())
    key = GroupKey("encoder", role, (N_ROWS, N_COLS))
    return codec, codec.encode_group(key, ["a", "b"], rows), rows


def _stored(eg) -> int:
    return sum(a.nbytes for a in eg.arrays.values()) + sum(
        a.nbytes for t in eg.tensors.values() for a in t.arrays.values())


@pytest.mark.parametrize("s", LADDER, ids=[s.name for s in LADDER])
def test_every_setting_counts_every_byte_and_round_trips(s):
    codec, eg, rows = _encode(s)
    want = s.nbytes(N_TENSORS, N_ROWS, N_COLS, "up")
    assert _stored(eg) == want["total"] == eg.params["bytes"]
    assert eg.params["bpw"] == pytest.approx(8 * want["total"] / (N_TENSORS * N_ROWS * N_COLS), abs=1e-6)
    dec = codec.decode_rows(DictParts.of(eg), DictParts.of(eg.tensors["a"]))
    assert dec.shape == rows[0].shape and dec.dtype == np.float32
    cos = row_cosines(rows[0], dec)
    # the ladder's nominal rate buys at least what a Gaussian source allows at a third of it
    nominal = sum(8.0 / Layout(st, N_COLS).stage.period * len(st.widths) for st in parse_stages(s.stages))
    assert np.median(cos) > 1 - 2.0 ** (-2 * nominal / 3)
    part = codec.decode_rows(DictParts.of(eg), DictParts.of(eg.tensors["b"]), np.array([3, 0, 199]))
    full = codec.decode_rows(DictParts.of(eg), DictParts.of(eg.tensors["b"]))
    np.testing.assert_allclose(part, full[[3, 0, 199]], rtol=0, atol=1e-6)


def test_more_bits_more_fidelity():
    med = []
    for name in ("vq1.0", "vq2.0", "vq2.7", "vq4.0", "vq6.0", "vq8.0"):
        s = next(x for x in LADDER if x.name == name)
        codec, eg, rows = _encode(s)
        med.append(np.median(row_cosines(rows[0], codec.decode_rows(DictParts.of(eg), DictParts.of(eg.tensors["a"])))))
    assert med == sorted(med) and med[-1] > 0.999


def test_leaf_u16_and_options_are_counted():
    for opts, role in ((dict(stages="3", leaf_lanes=8), "embed"), (dict(stages="6:1024", rotate=False, gain=False), "up"),
                       (dict(stages="4,3+8"), "up")):
        codec = HhtlVqCodec(**opts)
        eg = codec.encode_group(GroupKey("other", role, (N_ROWS, N_COLS)), ["a", "b"], _rows(1))
        want = stored_bytes(codec.opts["stages"], N_TENSORS, N_ROWS, N_COLS, gain=codec.opts["gain"],
                            rotate=codec.opts["rotate"], leaf_lanes=codec.opts["leaf_lanes"],
                            index_regime=role == "embed")
        assert _stored(eg) == want["total"]
        if "1024" in opts["stages"]:
            assert eg.tensors["a"].arrays["twig.0"].dtype == np.uint16
        if role == "embed":
            assert eg.tensors["a"].arrays["leaf"].shape == (N_ROWS, 8)


def test_encoding_is_deterministic():
    s = next(x for x in LADDER if x.name == "vq2.3")
    _, a, _ = _encode(s)
    _, b, _ = _encode(s)
    for part in a.arrays:
        assert a.arrays[part].tobytes() == b.arrays[part].tobytes()
    for name in a.tensors:
        for part in a.tensors[name].arrays:
            assert a.tensors[name].arrays[part].tobytes() == b.tensors[name].arrays[part].tobytes()


def test_rotation_is_undone():
    x = np.random.default_rng(3).standard_normal((5, 384)).astype(np.float32)
    s = rotation_signs(384, 7)
    y = rotate(x, s)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(rotate(y, s, inverse=True), x, atol=1e-5)


@pytest.mark.parametrize("c", [384, 576, 1536])
def test_rotation_in_place_gives_the_same_bits_in_either_memory_order(c):
    x = np.random.default_rng(c).standard_normal((c, c)).astype(np.float32)
    s = rotation_signs(c, 7)
    for inverse in (False, True):
        want = rotate(x, s, inverse=inverse)
        for a in (x.copy(), np.asfortranarray(x)):
            got = rotate(a, s, inverse=inverse, out=a)
            assert np.shares_memory(got, a) and got.tobytes() == want.tobytes()


def test_bad_options_are_clear_errors():
    for bad in ("", "1", "4:0", "4:70000", "x", "2+2+2+2+2+2+2+2+2"):
        with pytest.raises(CodecError):
            parse_stages(bad)
    with pytest.raises(OptionsError):
        HhtlVqCodec(k=16)
    with pytest.raises(CodecError):
        HhtlVqCodec(leaf_lanes=-1)


def test_pack_round_trip_and_same_bytes(small_ckpt, tmp_path):
    from hhtld.classify import EncodablePolicy
    from hhtld.pack import encode_checkpoint
    from hhtld.pack.reader import Pack

    pol = EncodablePolicy(encode_all=True)
    go = {"encoder/up/600x64": {"stages": "2+4", "setting": "vq6.0"}}
    a = encode_checkpoint(small_ckpt, tmp_path / "a.hhtld", codec="hhtl-vq", policy=pol, group_options=go)
    b = encode_checkpoint(small_ckpt, tmp_path / "b.hhtld", codec="hhtl-vq", policy=pol, group_options=go)
    assert a.path.read_bytes() == b.path.read_bytes()
    p = Pack(a.path)
    p.verify()
    from safetensors.numpy import load_file

    orig = load_file(str(small_ckpt))
    for name in p.encoded_names():
        t = p.tensor(name)
        assert t.shape == orig[name].shape
        cos = row_cosines(orig[name].reshape(t.shape[0], -1), t.reshape(t.shape[0], -1))
        assert np.median(cos) > (0.999 if "intermediate" in name else 0.97)
    g = [g for g in p.groups if g["key"]["role"] == "up"][0]
    assert g["params"]["setting"] == "vq6.0" and g["codec"] == "hhtl-vq"


def test_palettes_train_on_the_drawn_segments_only():
    """Gathering only the drawn segments gives the palette of the full segment array."""
    from hhtld.codecs.vq.quantiser import _segments, _train_position, train_palette

    x = np.random.default_rng(5).standard_normal((300, 95)).astype(np.float32)  # 95: the last period is padded
    for spec in ("4,3", "2", "8:300"):
        st = parse_stages(spec)[0]
        lay = Layout(st, 95)
        rp = np.zeros((300, lay.n_pad), np.float32)
        rp[:, :95] = x
        for j, k in enumerate(st.ks):
            want = train_palette(_segments(rp, lay, j), k, 7, 4, 8)
            np.testing.assert_array_equal(_train_position(x, lay, j, k, 7, 4, 8), want)
