"""The pack (docs/format.md): round trip, lazy reads, layouts, determinism, refusal of bad packs."""

from __future__ import annotations

import hashlib
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from hhtld import PackError, open_checkpoint
from hhtld.classify import EncodablePolicy
from hhtld.pack import decode_pack, encode_checkpoint, open_pack
from hhtld.format import FORMAT_VERSION, META_MANIFEST, META_VERSION
from hhtld.stfile import SafetensorsWriter, read_header

from .conftest import small_bert_tensors


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def pack_path(small_ckpt, tmp_path):
    out = tmp_path / "m.hhtld"
    encode_checkpoint(small_ckpt, out, codec="hhtl-f32")
    return out


def test_pack_is_a_safetensors_file_with_hhtld_metadata(pack_path):
    with safe_open(str(pack_path), "numpy") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "hhtld"
    assert meta[META_VERSION] == str(FORMAT_VERSION)
    manifest = json.loads(meta[META_MANIFEST])
    assert [g["key"] for g in manifest["groups"]] == [
        {"component": "other", "role": "embed", "shape": [600, 64]},
        {"component": "encoder", "role": "up", "shape": [600, 64]},
    ]
    assert "encoder.layer.0.intermediate.dense.weight::twig" in keys
    assert "__group__.0000::basis" in keys  # the index-regime group has one basis
    assert "__group__.0001::basis" not in keys
    assert set(manifest["arrays"]) == keys
    assert meta["hhtld.digest"] == "sha256:" + hashlib.sha256(meta[META_MANIFEST].encode()).hexdigest()


def test_round_trip_names_shapes_dtypes_and_passthrough_bytes(small_ckpt, pack_path):
    ck = open_checkpoint(small_ckpt)
    p = open_pack(pack_path)
    assert p.names() == list(ck.tensors)
    for name in ck.tensors:
        got, ref = p.tensor(name), ck.read(name)
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        if name in p.passthrough_names():
            assert got.tobytes() == ref.tobytes()
    assert set(p.encoded_names()) == {
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.1.intermediate.dense.weight",
    }


def test_single_row_equals_full_decode(pack_path):
    p = open_pack(pack_path)
    for name in p.encoded_names():
        full = p.rows(name)
        for i in (0, 17, 599, -1):
            np.testing.assert_array_equal(p.row(name, i), full[i])
    with pytest.raises(PackError, match="has 600 rows; row 600 is out of range"):
        p.row(name, 600)


def test_lazy_reader_touches_only_the_parts_it_needs(pack_path):
    p = open_pack(pack_path)
    p.row("encoder.layer.1.intermediate.dense.weight", 3)
    assert p._verified == {"__group__.0001::palette", "encoder.layer.1.intermediate.dense.weight::twig"}


def test_same_input_same_pack_bytes(small_ckpt, tmp_path):
    a, b = tmp_path / "a.hhtld", tmp_path / "b.hhtld"
    encode_checkpoint(small_ckpt, a, codec="hhtl-f32")
    encode_checkpoint(small_ckpt, b, codec="hhtl-f32")
    assert sha(a) == sha(b)


def test_input_is_never_modified(small_folder, tmp_path):
    before = {p: sha(p) for p in small_folder.rglob("*") if p.is_file()}
    encode_checkpoint(small_folder, tmp_path / "x.hhtld", codec="hhtl-f32")
    assert before == {p: sha(p) for p in small_folder.rglob("*") if p.is_file()}


def test_refuses_to_overwrite_its_input(small_ckpt):
    from hhtld import OptionsError
    with pytest.raises(OptionsError) as e:
        encode_checkpoint(small_ckpt, small_ckpt, codec="hhtl-f32")
    assert str(e.value) == f"{small_ckpt}: is an input of this command; refusing to overwrite it with the pack"


def test_folder_round_trip_carries_side_files(small_folder, tmp_path):
    out = tmp_path / "dec"
    encode_checkpoint(small_folder, tmp_path / "f.hhtld", codec="hhtl-f32")
    decode_pack(tmp_path / "f.hhtld", out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "config.json").read_bytes() == (small_folder / "config.json").read_bytes()
    h = read_header(out / "model.safetensors")
    assert h.metadata == {"format": "pt"}
    assert list(h.tensors) == list(read_header(small_folder / "model.safetensors").tensors)


def test_sharded_round_trip_keeps_layout_and_dtypes(sharded_ckpt, tmp_path):
    encode_checkpoint(sharded_ckpt, tmp_path / "s.hhtld", codec="hhtl-f32")
    out = tmp_path / "dec"
    res = decode_pack(tmp_path / "s.hhtld", out)
    names = sorted(p.name for p in res.files)
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    src = open_checkpoint(sharded_ckpt)
    dec = open_checkpoint(out / "model.safetensors.index.json")
    assert {n: (t.file, t.dtype, t.shape) for n, t in dec.tensors.items()} == \
           {n: (t.file, t.dtype, t.shape) for n, t in src.tensors.items()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in dec.tensors.values())
    assert dec.read("embeddings.position_ids").tobytes() == src.read("embeddings.position_ids").tobytes()


def test_gpt2_conv1d_round_trip_restores_stored_orientation(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 600)).astype(np.float32)  # Conv1D: [in, out]
    save_file({"transformer.h.0.mlp.c_fc.weight": w}, str(tmp_path / "g.safetensors"))
    encode_checkpoint(tmp_path / "g.safetensors", tmp_path / "g.hhtld", policy=EncodablePolicy(encode_all=True), codec="hhtl-f32")
    p = open_pack(tmp_path / "g.hhtld")
    info = p.info("transformer.h.0.mlp.c_fc.weight")
    assert info["transposed"] and info["row_shape"] == [600, 64]
    rows = p.rows("transformer.h.0.mlp.c_fc.weight")
    assert rows.shape == (600, 64)
    t = p.tensor("transformer.h.0.mlp.c_fc.weight")
    assert t.shape == (64, 600)
    np.testing.assert_array_equal(t, rows.T)
    # every row of the encoded matrix is a palette row (real column of w, bf16)
    col_of = {tuple(c): i for i, c in enumerate(w.T.astype(ml_dtypes.bfloat16).astype(np.float32))}
    assert all(tuple(r) in col_of for r in rows)


def test_bf16_source_decodes_to_bf16(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((600, 64)).astype(ml_dtypes.bfloat16)
    save_file({"model.embed_tokens.weight": w}, str(tmp_path / "b.safetensors"))
    encode_checkpoint(tmp_path / "b.safetensors", tmp_path / "b.hhtld", codec="hhtl-f32")
    t = open_pack(tmp_path / "b.hhtld").tensor("model.embed_tokens.weight")
    assert t.dtype == ml_dtypes.bfloat16 and t.shape == (600, 64)


def test_byte_breakdown_adds_up_to_the_file_size(pack_path):
    p = open_pack(pack_path)
    b = p.byte_breakdown()
    assert sum(b["total"].values()) == b["file_bytes"] == pack_path.stat().st_size
    assert b["total"]["leaf"] == 600 * 8 + 4
    assert b["total"]["entries"] == 3 * 600
    assert p.storage_ratio() > 1


# --- refusals -------------------------------------------------------------------

def test_refuses_a_plain_safetensors_file(small_ckpt):
    with pytest.raises(PackError) as e:
        open_pack(small_ckpt)
    assert str(e.value) == f"{small_ckpt}: not an hhtld pack (a safetensors file without 'format = hhtld' metadata)"


def test_refuses_a_non_safetensors_file(tmp_path):
    p = tmp_path / "x.hhtld"
    p.write_bytes(b"\x00" * 7)
    with pytest.raises(PackError) as e:
        open_pack(p)
    assert str(e.value) == f"{p}: not an hhtld pack (not a safetensors file (7 bytes, too short for a header))"


def test_refuses_a_newer_version(tmp_path):
    p = tmp_path / "new.hhtld"
    with SafetensorsWriter(p, {"format": "hhtld", META_VERSION: str(FORMAT_VERSION + 1), META_MANIFEST: "{}"}) as w:
        w.add("x", np.zeros(1, np.float32))
    with pytest.raises(PackError) as e:
        open_pack(p)
    assert str(e.value) == (f"{p}: pack format version {FORMAT_VERSION + 1} is newer than this hhtld reads "
                            f"(up to {FORMAT_VERSION}); upgrade hhtld")


def test_refuses_a_manifest_without_its_parts(tmp_path):
    p = tmp_path / "empty.hhtld"
    with SafetensorsWriter(p, {"format": "hhtld", META_VERSION: "1",
                               META_MANIFEST: '{"format": "hhtld", "version": 1}'}) as w:
        w.add("x", np.zeros(1, np.float32))
    with pytest.raises(PackError) as e:
        open_pack(p)
    assert str(e.value) == f"{p}: damaged hhtld pack (manifest field source is missing)"


def test_refuses_a_truncated_pack(pack_path):
    data = pack_path.read_bytes()
    pack_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackError) as e:
        open_pack(pack_path)
    assert str(e.value) == (f"{pack_path}: damaged hhtld pack (truncated: data needs {len(data)} bytes, "
                            f"file has {len(data) // 2})")


def test_detects_a_damaged_array(pack_path):
    p = open_pack(pack_path)
    e = p.header.tensors["encoder.layer.0.intermediate.dense.weight::twig"]
    data = bytearray(pack_path.read_bytes())
    data[e.start + 5] ^= 0xFF
    pack_path.write_bytes(bytes(data))
    p = open_pack(pack_path)  # the header is intact
    p.row("encoder.layer.1.intermediate.dense.weight", 0)  # other parts still read
    with pytest.raises(PackError) as err:
        p.tensor("encoder.layer.0.intermediate.dense.weight")
    assert str(err.value) == (f"{pack_path}: damaged hhtld pack (checksum mismatch in "
                              f"'encoder.layer.0.intermediate.dense.weight::twig')")
    with pytest.raises(PackError, match="checksum mismatch"):
        open_pack(pack_path).verify()


def rewrite_manifest(pack_path, edit, resign: bool = False) -> None:
    """Replace the pack's manifest text by ``edit(text)``, keeping the data bytes;
    ``resign``: also replace its digest (a crafted file rather than an accident)."""
    data = pack_path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"][META_MANIFEST] = edit(header["__metadata__"][META_MANIFEST])
    if resign:
        header["__metadata__"]["hhtld.digest"] = "sha256:" + hashlib.sha256(
            header["__metadata__"][META_MANIFEST].encode()).hexdigest()
    raw = json.dumps(header).encode()
    raw += b" " * ((-(len(raw) + 8)) % 8)
    pack_path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_detects_a_damaged_manifest(pack_path):
    rewrite_manifest(pack_path, lambda text: text[:-10])
    with pytest.raises(PackError) as e:
        open_pack(pack_path)
    assert str(e.value) == (f"{pack_path}: damaged hhtld pack (the manifest does not match its digest: the manifest "
                            "or the pack header was changed)")
    rewrite_manifest(pack_path, lambda text: text, resign=True)
    with pytest.raises(PackError) as e:
        open_pack(pack_path)
    assert str(e.value) == f"{pack_path}: damaged hhtld pack (the manifest is not valid JSON)"


def test_unknown_tensor_name(pack_path):
    with pytest.raises(PackError) as e:
        open_pack(pack_path).tensor("nope")
    assert str(e.value) == f"{pack_path}: no tensor named 'nope' in this pack"


def test_nan_weights_are_refused_with_the_tensor_named(tmp_path):
    w = small_bert_tensors()
    w["encoder.layer.0.intermediate.dense.weight"][3, 4] = np.nan
    save_file(w, str(tmp_path / "n.safetensors"))
    from hhtld import HhtldError
    with pytest.raises(HhtldError) as e:
        encode_checkpoint(tmp_path / "n.safetensors", tmp_path / "n.hhtld", codec="hhtl-f32")
    assert str(e.value) == (f"{tmp_path / 'n.safetensors'}: tensor 'encoder.layer.0.intermediate.dense.weight': "
                            "1 non-finite value(s) (NaN/inf) cannot be encoded")
    assert not (tmp_path / "n.hhtld").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["n.safetensors"]  # no temporary file left


# --- output safety ----------------------------------------------------------------

def test_decode_refuses_to_overwrite_unless_forced(small_folder, tmp_path):
    pack = small_folder / "m.hhtld"
    encode_checkpoint(small_folder, pack, codec="hhtl-f32")
    before = sha(small_folder / "model.safetensors")
    from hhtld import OptionsError
    with pytest.raises(OptionsError) as e:
        decode_pack(pack, small_folder)
    assert str(e.value) == (f"{small_folder / 'model.safetensors'}: exists; decode into a new folder or pass "
                            "--force to overwrite")
    assert sha(small_folder / "model.safetensors") == before
    res = decode_pack(pack, small_folder, force=True)
    assert small_folder / "model.safetensors" in res.files
    assert pack.is_file()  # the pack was not part of the output


def test_decode_never_overwrites_the_pack_itself(small_ckpt, tmp_path):
    pack = tmp_path / "model.safetensors.hhtld"
    encode_checkpoint(small_ckpt, pack, codec="hhtl-f32")
    from hhtld.outputs import check_output_file
    from hhtld import OptionsError
    with pytest.raises(OptionsError, match="is an input of this command"):
        check_output_file(pack, [pack])


def test_failed_decode_leaves_no_files(pack_path, tmp_path):
    p = open_pack(pack_path)
    e = p.header.tensors["encoder.layer.1.intermediate.dense.weight::twig"]
    data = bytearray(pack_path.read_bytes())
    data[e.start] ^= 0xFF
    pack_path.write_bytes(bytes(data))
    out = tmp_path / "dec"
    with pytest.raises(PackError, match="checksum mismatch"):
        decode_pack(pack_path, out)
    assert list(out.iterdir()) == []


def test_folder_carries_only_model_side_files(small_folder, tmp_path):
    (small_folder / "old.hhtld").write_bytes(b"x" * 100)
    (small_folder / "pytorch_model.bin").write_bytes(b"x" * 100)
    (small_folder / "notes.zip").write_bytes(b"x" * 100)
    (small_folder / "vocab.txt").write_text("[PAD]\n")
    assert open_checkpoint(small_folder).aux_files == ["1_Pooling/config.json", "config.json", "tokenizer.json",
                                                       "vocab.txt"]
    # encoding into the model folder twice gives the same pack: the pack does not swallow itself
    encode_checkpoint(small_folder, small_folder / "m.hhtld", codec="hhtl-f32")
    first = sha(small_folder / "m.hhtld")
    encode_checkpoint(small_folder, small_folder / "m.hhtld", codec="hhtl-f32")
    assert sha(small_folder / "m.hhtld") == first


def test_unsafe_paths_in_a_manifest_are_refused(pack_path):
    def evil(text):
        manifest = json.loads(text)
        manifest["source"]["files"] = ["../../evil.safetensors"]
        return json.dumps(manifest)

    rewrite_manifest(pack_path, evil, resign=True)
    with pytest.raises(PackError) as e:
        open_pack(pack_path)
    assert str(e.value) == (f"{pack_path}: damaged hhtld pack (manifest field source.files[0]: unsafe file path "
                            "'../../evil.safetensors' (has an empty, '.' or '..' component))")


def test_output_that_is_not_a_regular_file_is_refused(small_ckpt, tmp_path):
    from hhtld import OptionsError
    target = tmp_path / "elsewhere.hhtld"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.hhtld"
    link.symlink_to(target)
    with pytest.raises(OptionsError) as e:
        encode_checkpoint(small_ckpt, link, codec="hhtl-f32")
    assert str(e.value) == f"{link}: exists and is not a regular file; refusing to replace it"
    assert target.read_bytes() == b"keep me" and link.is_symlink()


def test_row_index_out_of_range_is_a_pack_error(pack_path):
    p = open_pack(pack_path)
    with pytest.raises(PackError, match="has 600 rows; row index out of range or not an integer"):
        p.rows("encoder.layer.0.intermediate.dense.weight", [0, 600])
    with pytest.raises(PackError, match="row index out of range or not an integer"):
        p.rows("encoder.layer.0.intermediate.dense.weight", np.array([0.5]))


def test_reuse_copies_groups_of_an_earlier_pack_with_identical_bytes(small_ckpt, tmp_path, monkeypatch):
    from hhtld.codecs.reference.hhtl_f32_codec import HhtlF32Codec

    calls = []
    real = HhtlF32Codec.fit_group
    monkeypatch.setattr(HhtlF32Codec, "fit_group", lambda self, key, *a: calls.append(key) or real(self, key, *a))
    a = encode_checkpoint(small_ckpt, tmp_path / "a.hhtld", codec="hhtl-f32")
    assert len(calls) == 2 and not any(g.reused for g in a.groups)
    b = encode_checkpoint(small_ckpt, tmp_path / "b.hhtld", reuse=tmp_path / "a.hhtld", codec="hhtl-f32")
    assert len(calls) == 2 and all(g.reused for g in b.groups)  # both groups copied from a
    assert sha(tmp_path / "a.hhtld") == sha(tmp_path / "b.hhtld")
    encode_checkpoint(small_ckpt, tmp_path / "c.hhtld", reuse=tmp_path / "a.hhtld",
                      group_options={"encoder/up/600x64": {"k": 16}}, codec="hhtl-f32")
    assert len(calls) == 3  # only the group whose options changed is encoded again
    assert open_pack(tmp_path / "c.hhtld").rows("encoder.layer.0.intermediate.dense.weight").shape == (600, 64)
