"""Streaming encode: bounded reads, bounded training samples, thread-count-independent
bytes, a checked pack before the rename, and no model run unless asked for."""

from __future__ import annotations

import hashlib
import json

import ml_dtypes
import numpy as np
import pytest

from hhtld import PackError
from hhtld.classify import EncodablePolicy
from hhtld.pack import encode_checkpoint, open_pack
from hhtld import encode
from hhtld.checkpoint.rows import ArrayRows, TensorRows, block_rows, evenly_spaced, row_blocks, sample_across
from hhtld.codecs.reference.svd_basis import SvdBasis
from hhtld.errors import CheckpointError, OptionsError
from hhtld.format import BLOCK_ELEMS
from hhtld.stfile import SafetensorsWriter, read_header

ALL = EncodablePolicy(encode_all=True)


def _encode(*args, **kw):
    """hhtld.encode as (the writer's result, the allocation)."""
    rep = encode(*args, **kw)
    return rep.result, rep.allocation


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_layers(path, n_layers: int, rows: int = 96, cols: int = 64, seed: int = 0, bf16: bool = True):
    """A Llama-like checkpoint of ``n_layers`` layers (up/down/q), bf16 or f32."""
    rng = np.random.default_rng(seed)
    dt = ml_dtypes.bfloat16 if bf16 else np.float32
    with SafetensorsWriter(path) as w:
        w.add("model.embed_tokens.weight", (rng.standard_normal((300, cols)) * 0.02).astype(dt))
        for i in range(n_layers):
            p = f"model.layers.{i}."
            w.add(p + "mlp.up_proj.weight", (rng.standard_normal((rows, cols)) * 0.02).astype(dt))
            w.add(p + "mlp.down_proj.weight", (rng.standard_normal((cols, rows)) * 0.02).astype(dt))
            w.add(p + "self_attn.q_proj.weight", (rng.standard_normal((cols, cols)) * 0.02).astype(dt))
            w.add(p + "input_layernorm.weight", np.ones(cols, dtype=dt))
    return path


def test_row_blocks_depend_on_the_shape_only():
    assert block_rows(1000) == BLOCK_ELEMS // 1000
    assert row_blocks(2500, 10, elems=10_000) == [(0, 1000), (1000, 2000), (2000, 2500)]
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9] and evenly_spaced(3, 4).tolist() == [0, 1, 2]


def test_sample_is_bounded_and_drawn_from_every_tensor():
    srcs = [ArrayRows(np.full((100, 8), i, np.float32), f"t{i}") for i in range(7)]
    s = sample_across(srcs, 20)
    assert s.shape == (7 * 3, 8)  # ceil(20 / 7) rows of each tensor
    assert sorted(set(s[:, 0].tolist())) == list(range(7))
    with pytest.raises(CheckpointError, match="a group sample needs at least one tensor"):
        sample_across([], 10)


def test_encoders_read_blocks_and_samples_never_whole_groups(tmp_path, monkeypatch):
    """Peak memory follows the largest block, not the number of layers: every read
    an encoder makes is one block (or a sample) of one tensor."""
    ck = write_layers(tmp_path / "m.safetensors", n_layers=12)
    reads = []
    real_block, real_take = TensorRows.block, TensorRows.take
    monkeypatch.setattr(TensorRows, "block", lambda self, s, e: reads.append(("block", self.shape, e - s))
                        or real_block(self, s, e))
    monkeypatch.setattr(TensorRows, "take", lambda self, idx: reads.append(("take", self.shape, len(idx)))
                        or real_take(self, idx))
    for codec, opts in (("hhtl-vq", {"stages": "2"}), ("hhtl-f32", {}), ("hhtl-d", {})):
        reads.clear()
        encode_checkpoint(ck, tmp_path / f"{codec}.hhtld", codec=codec, codec_options=opts, policy=ALL,
                          sample_rows=64)
        assert reads
        for kind, (rows, cols), n in reads:
            if kind == "block":
                assert n <= block_rows(cols)
            else:  # a group's sample: at most ceil(64 / 12) rows of each of its tensors
                assert n <= max(-(-64 // 12), 64 if rows == 300 else 0)


@pytest.mark.parametrize("codec,opts", [("hhtl-vq", {"stages": "4,3+8"}), ("hhtl-vq", {"stages": "3", "leaf_lanes": 4}),
                                        ("hhtl-f32", {}), ("hhtl-d", {})])
def test_same_bytes_for_any_thread_count(tmp_path, monkeypatch, codec, opts):
    import hhtld.checkpoint.rows as rows

    monkeypatch.setattr(rows, "BLOCK_ELEMS", 64 * 700)  # several blocks per tensor
    ck = write_layers(tmp_path / "m.safetensors", n_layers=3, rows=2100)
    packs = []
    for threads in (1, 2, 3):
        out = tmp_path / f"t{threads}.hhtld"
        encode_checkpoint(ck, out, codec=codec, codec_options=opts, policy=ALL, threads=threads)
        packs.append(sha(out))
    assert len(set(packs)) == 1


def test_block_decode_into_the_output_equals_the_row_decode(tmp_path, monkeypatch):
    import hhtld.checkpoint.rows as rows

    monkeypatch.setattr(rows, "BLOCK_ELEMS", 64 * 700)
    ck = write_layers(tmp_path / "m.safetensors", n_layers=2, rows=2100)
    out = tmp_path / "m.hhtld"
    encode_checkpoint(ck, out, codec="hhtl-vq", codec_options={"stages": "2"}, policy=ALL)
    p = open_pack(out)
    for name in p.encoded_names():
        t = p.tensor(name)
        assert t.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(t.astype(np.float32), p.rows(name).astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("codec,opts", [("hhtl-vq", {"stages": "4,3+8", "leaf_lanes": 4}), ("hhtl-d", {})])
def test_decode_threads_give_the_same_values(tmp_path, monkeypatch, codec, opts):
    """Whole tensors decode block by block on several threads: the same bits as one
    thread and as the rows read one block at a time."""
    import hhtld.checkpoint.rows as rows

    monkeypatch.setattr(rows, "BLOCK_ELEMS", 64 * 700)
    ck = write_layers(tmp_path / "m.safetensors", n_layers=2, rows=2100)
    out = tmp_path / "m.hhtld"
    encode_checkpoint(ck, out, codec=codec, codec_options=opts, policy=ALL)
    got = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("HHTLD_DECODE_THREADS", threads)
        p = open_pack(out)
        got[threads] = {n: (p.rows(n), p.tensor(n)) for n in p.encoded_names()}
    p = open_pack(out)
    assert max(len(rows.row_blocks(*r.shape)) for r, _ in got["1"].values()) > 1
    for name, (r, t) in got["1"].items():
        np.testing.assert_array_equal(r, got["3"][name][0])
        np.testing.assert_array_equal(t, got["3"][name][1])
        np.testing.assert_array_equal(r, np.concatenate([p.rows(name, np.arange(s, e)) for s, e in rows.row_blocks(*r.shape)]))


def test_the_written_pack_is_checked_before_the_rename(tmp_path, monkeypatch):
    import hhtld.pack.writer as writer  # the reader's check of the written pack

    ck = write_layers(tmp_path / "m.safetensors", n_layers=1)
    out = tmp_path / "out" / "m.hhtld"
    out.parent.mkdir()
    out.write_bytes(b"previous pack")
    checked = []

    def broken(path, expect, target):
        checked.append(path)
        raise PackError(f"{path}: damaged hhtld pack (checksum mismatch in 'x')")

    monkeypatch.setattr(writer, "_check_written", broken)
    with pytest.raises(PackError, match="checksum mismatch"):
        encode_checkpoint(ck, out, policy=ALL, codec="hhtl-f32")
    assert checked and checked[0] != out
    assert out.read_bytes() == b"previous pack"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.hhtld"]


def test_writer_rollback_forgets_what_came_after_the_mark(tmp_path):
    out = tmp_path / "x.safetensors"
    with SafetensorsWriter(out) as w:
        w.add("a", np.arange(4, dtype=np.float32))
        mark = w.mark()
        w.add("b", np.arange(100, dtype=np.float32))
        w.rollback(mark)
        w.add("c", np.arange(3, dtype=np.int8))
    h = read_header(out)
    assert list(h.tensors) == ["a", "c"]
    assert h.file_size == h.data_start + 16 + 3


def test_truncated_svd_matches_the_full_svd_directions():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 600)) * np.linspace(3, 0.1, 600)).astype(np.float32)
    b = SvdBasis.fit(x, 8)
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    v = b.vectors.astype(np.float32)
    np.testing.assert_allclose(np.abs(np.sum(v * vt[:8], axis=1)), 1.0, atol=2e-2)  # bf16-stored vectors
    np.testing.assert_allclose(b.singular, s[:8], rtol=1e-4)
    assert b.energy() == pytest.approx(float(np.sum(s[:8] ** 2) / np.sum(s ** 2)), rel=1e-4)


def test_sample_rows_option_is_checked(tmp_path):
    ck = write_layers(tmp_path / "m.safetensors", n_layers=1)
    with pytest.raises(OptionsError) as e:
        encode_checkpoint(ck, tmp_path / "m.hhtld", sample_rows=3, codec="hhtl-f32")
    assert str(e.value) == "sample_rows must be an integer >= 16, got 3"
    with pytest.raises(OptionsError) as e:
        encode_checkpoint(ck, tmp_path / "m.hhtld", threads=0, codec="hhtl-f32")
    assert str(e.value) == "threads must be a positive integer, got 0"


def test_bpw_alone_never_runs_the_model(small_folder, tmp_path, monkeypatch):
    import hhtld.gates.runner as runner

    def no_model(*a, **k):
        raise AssertionError("the model was run")

    monkeypatch.setattr(runner.ModelRunner, "from_model", no_model)
    res, al = _encode(small_folder, tmp_path / "m.hhtld", bpw=4.0, policy=ALL)
    assert al.target == "rows" and al.notes == [] and al.bpw <= 4.0
    manifest = json.loads(read_header(tmp_path / "m.hhtld").metadata["hhtld.manifest"])
    assert manifest["sample_rows"] == 4096
