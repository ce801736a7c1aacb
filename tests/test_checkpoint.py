"""Checkpoint reading: single file, shards + index, model folder; bad input."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from hhtld import CheckpointError, open_checkpoint
from hhtld.stfile import SafetensorsWriter

from .conftest import small_bert_tensors


def test_single_file_lists_tensors_in_file_order(small_ckpt):
    ck = open_checkpoint(small_ckpt)
    assert ck.kind == "file"
    assert ck.files == ["model.safetensors"]
    ref = small_bert_tensors()
    assert set(ck.tensors) == set(ref)
    for name, arr in ref.items():
        got = ck.read(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
    assert ck.file_metadata["model.safetensors"] == {"format": "pt"}


def test_sharded_reads_bf16_and_f16_as_float32(sharded_ckpt):
    ck = open_checkpoint(sharded_ckpt)
    assert ck.kind == "sharded" and len(ck.files) == 2
    ref = small_bert_tensors(seed=1)
    name = "encoder.layer.1.intermediate.dense.weight"
    assert ck.tensors[name].dtype == "BF16"
    got = ck.read_float(name)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref[name].astype(ml_dtypes.bfloat16).astype(np.float32))
    name = "encoder.layer.0.intermediate.dense.weight"
    assert ck.tensors[name].dtype == "F16"
    np.testing.assert_array_equal(ck.read_float(name), ref[name].astype(np.float16).astype(np.float32))


def test_folder_finds_weights_and_side_files(small_folder):
    ck = open_checkpoint(small_folder)
    assert ck.kind == "folder"
    assert ck.files == ["model.safetensors"]
    assert ck.aux_files == ["1_Pooling/config.json", "config.json", "tokenizer.json"]  # hidden files skipped


def test_tensors_are_memory_mapped(small_ckpt):
    ck = open_checkpoint(small_ckpt)
    a = ck.read("embeddings.word_embeddings.weight")
    assert isinstance(a.base, np.memmap) or isinstance(a, np.memmap)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file or directory$"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_text("hello, this is plain text and not a checkpoint at all")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert str(e.value) == f"{p}: not a safetensors file (header length out of range)"


def test_too_short_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert str(e.value) == f"{p}: not a safetensors file (3 bytes, too short for a header)"


def test_truncated_checkpoint(small_ckpt):
    data = small_ckpt.read_bytes()
    small_ckpt.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(small_ckpt)
    assert str(e.value) == f"{small_ckpt}: truncated: data needs {len(data)} bytes, file has {len(data) - 100}"


def _write_raw_header(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_unknown_dtype_named(tmp_path):
    p = tmp_path / "bad.safetensors"
    _write_raw_header(p, {"w": {"dtype": "Q4", "shape": [600, 64], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert str(e.value) == f"{p}: tensor 'w': unknown dtype 'Q4'"


def test_offsets_that_do_not_match_shape(tmp_path):
    p = tmp_path / "bad.safetensors"
    _write_raw_header(p, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"tensor 'w': data_offsets \[0, 12\] do not match F32 shape \[2, 2\]"):
        open_checkpoint(p)


def test_missing_shard(sharded_ckpt):
    shard = sharded_ckpt.parent / "model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(sharded_ckpt)
    assert str(e.value) == f"{shard}: shard listed in model.safetensors.index.json is missing"


def test_index_without_weight_map(tmp_path):
    p = tmp_path / "model.safetensors.index.json"
    p.write_text("{}")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert str(e.value) == f"{p}: not a valid safetensors index (no 'weight_map')"


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path)
    assert str(e.value) == f"{tmp_path}: no .safetensors weights in this folder"


def test_reading_a_non_float_tensor_as_float_is_refused(small_ckpt):
    ck = open_checkpoint(small_ckpt)
    with pytest.raises(CheckpointError, match=r"tensor 'embeddings.position_ids': dtype I64 is not a float dtype"):
        ck.read_float("embeddings.position_ids")


# --- the streaming writer -------------------------------------------------------

def test_writer_output_opens_with_safetensors_library(tmp_path):
    p = tmp_path / "w.safetensors"
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b": np.ones(3, dtype=ml_dtypes.bfloat16),
              "c": np.arange(5, dtype=np.int64)}
    with SafetensorsWriter(p, {"k": "v"}) as w:
        for n, a in arrays.items():
            w.add(n, a)
    with safe_open(str(p), "numpy") as f:
        assert f.metadata() == {"k": "v"}
        for n, a in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(n), a)
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert (8 + n) % 8 == 0  # data starts 8-byte aligned


def test_writer_is_atomic(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"old": np.zeros(2, np.float32)}, str(p))
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(p) as w:
            w.add("new", np.ones(2, np.float32))
            raise RuntimeError("boom")
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary files left
