"""A pack that cannot lie: digest and validation of every field (format version 2).

Each edit is tried twice: as an accident (the digest is left as it is: the
digest check refuses it) and as a crafted file (digest, array table and hashes
recomputed: the schema and the cross-checks against the stored arrays refuse
it). Messages are pinned whole.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hhtld import HhtldError, PackError
from hhtld.pack import decode_pack, encode_checkpoint, open_pack
from hhtld.errors import HhtldNote
from hhtld.format import FORMAT_VERSION, META_DIGEST, META_MANIFEST, META_VERSION, READABLE_VERSIONS

from .conftest import small_bert_tensors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fuzz  # noqa: E402  (pack surgery: split, join, resign, sync_arrays)

DIGEST = "the manifest does not match its digest: the manifest or the pack header was changed"
T = "encoder.layer.0.intermediate.dense.weight"
V1 = Path(__file__).resolve().parent / "data" / "v1"


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    d = tmp_path_factory.mktemp("packs")
    save_file(small_bert_tensors(), str(d / "m.safetensors"))
    folder = d / "folder"
    folder.mkdir()
    save_file(small_bert_tensors(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "bert"}')
    encode_checkpoint(d / "m.safetensors", d / "f32.hhtld", codec="hhtl-f32")
    encode_checkpoint(d / "m.safetensors", d / "vq.hhtld", codec="hhtl-vq", codec_options={"stages": "4"})
    encode_checkpoint(d / "m.safetensors", d / "hd.hhtld", codec="hhtl-d", codec_options={"k": 16})
    encode_checkpoint(folder, d / "folder.hhtld", codec="hhtl-f32")
    return {p.stem: p.read_bytes() for p in d.glob("*.hhtld")}


def edited(tmp_path, blob, manifest=None, header=None, crafted=False, data=None):
    """The pack ``blob`` with ``manifest(m)`` applied to its manifest and ``header(h)`` to its
    safetensors header; ``crafted``: digest (and array table) recomputed afterwards."""
    h, d = fuzz.split(blob)
    if data is not None:
        d = data(bytearray(d), h)
    if manifest is not None:
        m = json.loads(h["__metadata__"][META_MANIFEST])
        manifest(m)
        h["__metadata__"][META_MANIFEST] = m if isinstance(m, str) else json.dumps(m, separators=(",", ":"))
    if header is not None:
        header(h)
    if crafted:
        if header is not None or data is not None:
            fuzz.sync_arrays(h, bytes(d))
        else:
            fuzz.resign(h)
    out = tmp_path / "x.hhtld"
    out.write_bytes(fuzz.join(h, bytes(d)))
    return out


def refusal(path) -> str:
    """The one error of opening, verifying and decoding ``path``, without the path."""
    with pytest.raises(PackError) as e:
        p = open_pack(path)
        p.verify()
        decode_pack(path, Path(path).parent / "dec", force=True)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    return msg[len(str(path)) + 2:]


def both(tmp_path, blob, **kw) -> str:
    """Accident: refused by the digest; crafted: the message returned."""
    assert refusal(edited(tmp_path, blob, **kw)) == f"damaged hhtld pack ({DIGEST})"
    return refusal(edited(tmp_path, blob, crafted=True, **kw))


def setp(*path_value):
    *path, value = path_value

    def fn(m):
        for k in path[:-1]:
            m = m[k]
        m[path[-1]] = value(m[path[-1]]) if callable(value) else value
    return fn


# --- the digest and the array table ----------------------------------------------------------------
def test_digest_layout_is_sha256_of_the_manifest_text(packs, tmp_path):
    h, _ = fuzz.split(packs["f32"])
    md = h["__metadata__"]
    assert set(md) == {"format", META_VERSION, META_MANIFEST, META_DIGEST}
    assert md[META_VERSION] == str(FORMAT_VERSION) == "2" and READABLE_VERSIONS == {1, 2}
    assert md[META_DIGEST] == "sha256:" + hashlib.sha256(md[META_MANIFEST].encode("utf-8")).hexdigest()
    m = json.loads(md[META_MANIFEST])
    assert "checksums" not in m
    for name, e in h.items():
        if name != "__metadata__":
            a = m["arrays"][name]
            assert (a["dtype"], a["shape"], a["data_offsets"]) == (e["dtype"], e["shape"], e["data_offsets"])
    assert list(m["arrays"]) == [k for k in h if k != "__metadata__"]


def test_header_dtype_and_shape_edits_are_found_at_open(packs, tmp_path):
    p = edited(tmp_path, packs["vq"], header=setp("__group__.0000::palette.0.0", "dtype", "F16"))
    assert refusal(p) == ("damaged hhtld pack (stored array '__group__.0000::palette.0.0': the header says dtype F16, "
                          "the manifest recorded BF16)")
    p = edited(tmp_path, packs["vq"], header=setp("__group__.0000::palette.0.0", "dtype", "F16"), crafted=True)
    assert refusal(p) == "damaged hhtld pack (stored array '__group__.0000::palette.0.0': dtype F16, expected BF16)"
    p = edited(tmp_path, packs["f32"], header=setp(f"{T}::twig", "shape", [300, 2]))
    assert refusal(p) == (f"damaged hhtld pack (stored array '{T}::twig': the header says shape [300, 2], the "
                          "manifest recorded [600])")
    p = edited(tmp_path, packs["f32"], header=setp(f"{T}::twig", "shape", [300, 2]), crafted=True)
    assert refusal(p) == f"damaged hhtld pack (stored array '{T}::twig': shape [300, 2], expected [600])"


def test_changed_array_bytes_with_their_hash_updated_are_checked_by_value(packs, tmp_path):
    def nan_palette(d, h):
        a, _ = h["__group__.0001::palette.0.0"]["data_offsets"]
        d[a:a + 2] = b"\xc0\x7f"  # bfloat16 NaN
        return d

    p = edited(tmp_path, packs["vq"], data=nan_palette)
    assert refusal(p) == "damaged hhtld pack (checksum mismatch in '__group__.0001::palette.0.0')"
    p = edited(tmp_path, packs["vq"], data=nan_palette, crafted=True)
    assert refusal(p) == ("damaged hhtld pack (stored array '__group__.0001::palette.0.0' holds non-finite values "
                          "(NaN/inf))")

    def big_twig(d, h):
        a, _ = h[f"{T}::entry"]["data_offsets"]
        d[a:a + 2] = np.array([200 << 2], dtype="<u2").tobytes()  # twig 200 of a palette of 16
        return d

    p = edited(tmp_path, packs["hd"], data=big_twig, crafted=True)
    assert refusal(p) == f"damaged hhtld pack (stored array '{T}::entry' holds twig 200, but its palette has 16 rows)"

    def bad_sign(d, h):
        a, _ = h["__group__.0001::rotation"]["data_offsets"]
        d[a] = 3
        return d

    p = edited(tmp_path, packs["vq"], data=bad_sign, crafted=True)
    assert refusal(p) == ("damaged hhtld pack (stored array '__group__.0001::rotation' holds values other than -1 "
                          "and +1)")


# --- each defect of an unchecked manifest ------------------------------------------------------------
def test_renamed_parts(packs, tmp_path):
    def rename(where, old, new):
        def fn(m):
            parts = m["groups"][0]["parts"] if where == "group" else m["tensors"][T]["parts"]
            parts[parts.index(old)] = new
        return fn

    assert both(tmp_path, packs["vq"], manifest=rename("group", "rotation", "rotatio~")) == (
        "damaged hhtld pack (manifest field groups[0].parts[1]: 'rotatio~' is not a part name (like 'twig', "
        "'palette.0.1'))")
    assert both(tmp_path, packs["vq"], manifest=rename("group", "rotation", "rotatio")) == (
        "damaged hhtld pack (manifest field groups[0].parts: 'rotatio' is not a part codec hhtl-vq stores with these "
        "params (it stores palette.0.0, rotation))")
    assert both(tmp_path, packs["vq"], manifest=rename("tensor", "gain", "gcin")) == (
        f'damaged hhtld pack (manifest field tensors["{T}"].parts: \'gcin\' is not a part codec hhtl-vq stores with '
        "these params (it stores twig.0, gain))")


def test_wrong_types_missing_keys_and_kinds(packs, tmp_path):
    assert both(tmp_path, packs["f32"], manifest=setp("tensors", T, "transposed", "yes")) == (
        f'damaged hhtld pack (manifest field tensors["{T}"].transposed: input should be a valid boolean, got \'yes\')')
    assert both(tmp_path, packs["f32"], manifest=setp("tensors", T, "dtype", "BOOL")) == (
        f"damaged hhtld pack (manifest field tensors[\"{T}\"].dtype: input should be 'F32', 'F16' or 'BF16', "
        "got 'BOOL')")
    assert both(tmp_path, packs["f32"], manifest=setp("tensors", T, "kind", None)) == (
        f"damaged hhtld pack (manifest field tensors[\"{T}\"]: 'kind' must be 'encoded' or 'passthrough')")
    assert both(tmp_path, packs["f32"], manifest=lambda m: m["groups"][0].pop("params")) == (
        "damaged hhtld pack (manifest field groups[0].params is missing)")
    assert both(tmp_path, packs["f32"], manifest=setp("groups", 0, "params", "k", "256")) == (
        "damaged hhtld pack (manifest field groups[0].params.k: input should be a valid integer, got '256')")
    assert both(tmp_path, packs["f32"], manifest=setp("groups", 0, "extra", 1)) == (
        "damaged hhtld pack (manifest field groups[0].extra is not part of the format)")


def test_shapes_that_do_not_follow(packs, tmp_path):
    assert both(tmp_path, packs["f32"], manifest=setp("tensors", T, "shape", [38400, 1])) == (
        f'damaged hhtld pack (manifest field tensors["{T}"].row_shape is [600, 64], but shape [38400, 1] gives '
        "[38400, 1])")
    q = "encoder.layer.0.attention.self.query.weight"  # a passthrough tensor: decode would write a broken file
    assert both(tmp_path, packs["f32"], manifest=setp("tensors", q, "shape", [1, 64, 64])) == (
        f'damaged hhtld pack (manifest field tensors["{q}"]: dtype F32 shape [1, 64, 64], but its stored array is '
        "F32 [64, 64])")
    assert both(tmp_path, packs["hd"], manifest=setp("groups", 1, "params", "cols", 10**6)) == (
        "damaged hhtld pack (group 1 (encoder/up/600x64): params.cols is 1000000, but the group's rows have 64 "
        "columns)")
    assert both(tmp_path, packs["hd"], manifest=setp("groups", 1, "params", "cols", 10**12)) == (
        "damaged hhtld pack (group 1 (encoder/up/600x64): params.cols is 1000000000000, but the group's rows have 64 "
        "columns)")


def test_cross_references(packs, tmp_path):
    e = "embeddings.word_embeddings.weight"
    assert both(tmp_path, packs["f32"], manifest=setp("tensors", e, "group", 1)) == (
        f"damaged hhtld pack (manifest field groups[0].tensors lists '{e}', whose group is 1)")

    def swap(m):
        t = m["tensors"]
        t[e], t[T] = t[T], t[e]

    assert both(tmp_path, packs["f32"], manifest=swap) == (
        f"damaged hhtld pack (manifest field groups[0].tensors lists '{e}', whose group is 1)")
    assert both(tmp_path, packs["f32"], manifest=setp("tensors", T, "file", "other.safetensors")) == (
        f"damaged hhtld pack (manifest field tensors[\"{T}\"].file 'other.safetensors' is not one of source.files)")
    assert both(tmp_path, packs["folder"], manifest=setp("source", "aux_files", 0, "config.jsox")) == (
        "damaged hhtld pack (stored array '__file__::config.jsox' is missing)")


def test_unsafe_and_colliding_paths(packs, tmp_path):
    assert both(tmp_path, packs["folder"], manifest=setp("source", "files", 0, "config.json/")) == (
        "damaged hhtld pack (manifest field source.files[0]: unsafe file path 'config.json/' (has an empty, '.' or "
        "'..' component))")
    assert both(tmp_path, packs["folder"], manifest=setp("source", "files", 0, "config.json")) == (
        "damaged hhtld pack (manifest field source: the files decode writes collide: 'config.json' is named twice)")
    assert both(tmp_path, packs["folder"], manifest=setp("source", "aux_files", 0, "model.safetensors/x")) == (
        "damaged hhtld pack (manifest field source: the files decode writes collide: 'model.safetensors' is both a "
        "file and the folder of 'model.safetensors/x')")
    assert both(tmp_path, packs["f32"], manifest=setp("source", "files", 0, "m.safe\x00tensors")) == (
        "damaged hhtld pack (manifest field source.files[0]: unsafe file path 'm.safe\\x00tensors' (holds a control "
        "character or a backslash))")


def test_json_limits_before_parsing(packs, tmp_path):
    deep = "[" * 5000 + "]" * 5000

    def nest(m):
        return json.dumps(m, separators=(",", ":")).replace('"policy":{', f'"policy":{{"x":{deep},', 1)

    h, d = fuzz.split(packs["f32"])
    h["__metadata__"][META_MANIFEST] = nest(json.loads(h["__metadata__"][META_MANIFEST]))
    fuzz.resign(h)
    p = tmp_path / "x.hhtld"
    p.write_bytes(fuzz.join(h, d))
    assert refusal(p) == "damaged hhtld pack (the manifest is nested deeper than 32 levels)"
    h["__metadata__"][META_MANIFEST] = h["__metadata__"][META_MANIFEST].replace(deep, "1" * 5000)
    fuzz.resign(h)
    p.write_bytes(fuzz.join(h, d))
    assert refusal(p) == "damaged hhtld pack (the manifest has a number longer than 40 characters)"
    h, d = fuzz.split(packs["f32"])
    p.write_bytes(fuzz.join(json.dumps(h, separators=(",", ":"))[:-1] + ',"x":' + deep + "}", d))
    assert refusal(p) == "not an hhtld pack (not a safetensors file (the header is nested deeper than 32 levels))"
    p.write_bytes(fuzz.join(json.dumps(h, separators=(",", ":"))[:-1] + ',"__metadata__":{}}', d))
    assert refusal(p) == ("not an hhtld pack (not a safetensors file (the header has the key '__metadata__' twice))")


def test_versions_come_from_an_explicit_set(packs, tmp_path):
    for v, msg in (("0", "damaged hhtld pack (format version 0 does not exist (versions: 1, 2))"),
                   ("02", "damaged hhtld pack (format version '02' is not a number)"),
                   ("-1", "damaged hhtld pack (format version '-1' is not a number)"),
                   ("1" * 30, f"damaged hhtld pack (format version '{'1' * 20}' is not a number)"),
                   ("1", "damaged hhtld pack (unexpected metadata key 'hhtld.digest' for format version 1)")):
        p = edited(tmp_path, packs["f32"], header=setp("__metadata__", META_VERSION, v))
        assert refusal(p) == msg
    p = edited(tmp_path, packs["f32"], header=setp("__metadata__", META_VERSION, "3"))
    with pytest.raises(PackError) as e:
        open_pack(p)
    assert str(e.value) == f"{p}: pack format version 3 is newer than this hhtld reads (up to 2); upgrade hhtld"


# --- version 1 packs ---------------------------------------------------------------------------------
# sha256 (first 16 hex digits) of every tensor decoded by the version-1 reader. The float32
# tensors of hhtl-vq follow this hhtld's decode arithmetic: applying Hadamard blocks of
# at most 256 as one product instead of two moved two of them by one ulp (max 1.2e-7);
# summing the Hadamard blocks in float64, rounded once (the same bits for any rows, threads
# or CPU), moved 9 of their 2112 values, by at most 2.4e-7 (the tensors reach ±3.3).
V1_PINS = {
    "hhtl-f32": {"embeddings.position_ids": "852c80a269cfde9f", "embeddings.word_embeddings.weight": "3ed7b8fc566584d8",
                 "encoder.layer.0.intermediate.dense.bias": "a254fb68f346f351",
                 "transformer.h.0.mlp.c_fc.weight": "6d546ec144137c2d",
                 "encoder.layer.0.intermediate.dense.weight": "cc823955c917bae2",
                 "encoder.layer.1.intermediate.dense.weight": "f806f7f892d4dcf7"},
    "hhtl-d": {"embeddings.position_ids": "852c80a269cfde9f", "embeddings.word_embeddings.weight": "72efaba2366e7c28",
               "encoder.layer.0.intermediate.dense.bias": "a254fb68f346f351",
               "transformer.h.0.mlp.c_fc.weight": "5e985be431743fc7",
               "encoder.layer.0.intermediate.dense.weight": "4c60e48d0b4593ba",
               "encoder.layer.1.intermediate.dense.weight": "e1617ab116eb0fa2"},
    "hhtl-vq": {"embeddings.position_ids": "852c80a269cfde9f", "embeddings.word_embeddings.weight": "5e1d7a9a6e19c959",
                "encoder.layer.0.intermediate.dense.bias": "a254fb68f346f351",
                "transformer.h.0.mlp.c_fc.weight": "35dae99c2c2c0d3f",
                "encoder.layer.0.intermediate.dense.weight": "af26c5c8825889bd",
                "encoder.layer.1.intermediate.dense.weight": "883ad8d6c2fe57ed"},
}


@pytest.mark.parametrize("codec", sorted(V1_PINS))
def test_version_1_packs_still_open_and_decode_to_pinned_values(codec, tmp_path):
    path = V1 / f"{codec}.hhtld"
    with pytest.warns(HhtldNote) as notes:
        p = open_pack(path)
    assert str(notes[0].message) == (f"{path}: pack format version 1: only each array's CRC32 guards it (no digest "
                                     "over the manifest and header); encode it again for version 2's integrity checks")
    assert p.version == 1
    p.verify()
    got = {n: hashlib.sha256(np.ascontiguousarray(p.tensor(n)).tobytes()).hexdigest()[:16] for n in p.names()}
    assert got == V1_PINS[codec]
    assert p.aux_bytes("config.json") == b'{"model_type": "bert", "hidden_size": 24}\n'
    res = decode_pack(path, tmp_path / "dec")
    assert sorted(f.name for f in res.files) == ["config.json", "model.safetensors"]


def test_version_1_packs_are_validated_too(tmp_path):
    blob = (V1 / "hhtl-f32.hhtld").read_bytes()
    h, d = fuzz.split(blob)
    m = json.loads(h["__metadata__"][META_MANIFEST])
    m["tensors"][T]["transposed"] = "yes"
    h["__metadata__"][META_MANIFEST] = json.dumps(m)
    p = tmp_path / "v1.hhtld"
    p.write_bytes(fuzz.join(h, d))
    with pytest.raises(PackError) as e:
        open_pack(p)
    assert str(e.value) == (f'{p}: damaged hhtld pack (manifest field tensors["{T}"].transposed: input should be a '
                            "valid boolean, got 'yes')")


# --- encode safety -------------------------------------------------------------------------------------
def test_huge_finite_weights_encode_to_finite_rows_or_are_refused(tmp_path):
    t = {k: v * np.float32(1e20) if v.dtype == np.float32 else v for k, v in small_bert_tensors().items()}
    save_file(t, str(tmp_path / "big.safetensors"))
    encode_checkpoint(tmp_path / "big.safetensors", tmp_path / "big.hhtld", codec="hhtl-vq",
                      codec_options={"stages": "2+4"})
    p = open_pack(tmp_path / "big.hhtld")
    rows = p.rows(T)
    assert np.isfinite(rows).all()
    x = t[T].astype(np.float64)
    cos = (x * rows).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(rows.astype(np.float64), axis=1)
    assert np.median(cos) > 0.99
    with pytest.raises(HhtldError) as e:
        encode_checkpoint(tmp_path / "big.safetensors", tmp_path / "f.hhtld", codec="hhtl-f32")
    assert str(e.value) == (f"{tmp_path / 'big.safetensors'}: tensor 'embeddings.word_embeddings.weight': weights up to "
                            "4.73e+20 in magnitude are beyond what codec hhtl-f32 encodes (|w| <= 1.13e+15); scale the "
                            "tensor down or keep it dense")
    assert not (tmp_path / "f.hhtld").exists()


def test_hhtl_d_refuses_rows_its_fold_would_saturate(tmp_path):
    t = small_bert_tensors()
    t[T] = t[T] * np.float32(1000)
    save_file(t, str(tmp_path / "s.safetensors"))
    with pytest.raises(HhtldError) as e:
        encode_checkpoint(tmp_path / "s.safetensors", tmp_path / "s.hhtld", codec="hhtl-d")
    assert str(e.value) == (f"{tmp_path / 's.safetensors'}: tensor '{T}': row means up to 1878 are beyond what the "
                            "Base17 fold stores (|mean| <= 128, int16 in units of 1/256); hhtl-d would saturate them: "
                            "use hhtl-vq or hhtl-f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


@pytest.mark.parametrize("name, why", [
    (f"{T}::twig", "contains '::', which separates a tensor from its stored parts in a pack"),
    ("__group__.0000::palette", "contains '::', which separates a tensor from its stored parts in a pack"),
    ("__file__::config.json", "contains '::', which separates a tensor from its stored parts in a pack"),
    ("__group__.0000", "starts with '__group__.', reserved for the pack's group arrays"),
    ("x\nweight", "holds a control character (NUL, newline, ...)"),
])
def test_names_a_pack_cannot_hold_are_refused_before_encoding(tmp_path, name, why):
    t = small_bert_tensors()
    t[name] = np.zeros(4, np.float32)
    save_file(t, str(tmp_path / "n.safetensors"))
    with pytest.raises(HhtldError) as e:
        encode_checkpoint(tmp_path / "n.safetensors", tmp_path / "n.hhtld", codec="hhtl-f32")
    assert str(e.value) == (f"{tmp_path / 'n.safetensors'}: tensor {name!r} cannot be stored in a pack: its name {why}; "
                            "rename the tensor")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.safetensors"]


def test_lone_surrogate_names_are_refused_when_the_checkpoint_is_read(tmp_path):
    save_file({"w": np.zeros(4, np.float32)}, str(tmp_path / "u.safetensors"))
    h, d = fuzz.split((tmp_path / "u.safetensors").read_bytes())
    raw = json.dumps(h).replace('"w"', '"\\ud800w"')  # an escaped lone surrogate, as JSON allows
    (tmp_path / "u.safetensors").write_bytes(fuzz.join(raw, d))
    with pytest.raises(HhtldError) as e:
        encode_checkpoint(tmp_path / "u.safetensors", tmp_path / "u.hhtld", codec="hhtl-f32")
    assert str(e.value) == (f"{tmp_path / 'u.safetensors'}: not a safetensors file (the header holds the string "
                            "'\\ud800w', which is not valid Unicode (a lone surrogate))")


def test_an_index_that_leaves_its_folder_is_refused(sharded_ckpt, tmp_path):
    idx = json.loads(sharded_ckpt.read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "../other/s2.safetensors"
    sharded_ckpt.write_text(json.dumps(idx))
    with pytest.raises(HhtldError) as e:
        encode_checkpoint(sharded_ckpt, tmp_path / "s.hhtld", codec="hhtl-f32")
    assert str(e.value) == (f"{sharded_ckpt}: tensor '{name}' is mapped to the shard '../other/s2.safetensors', which "
                            "has an empty, '.' or '..' component; an index names shards inside its own folder")
    assert not (tmp_path / "s.hhtld").exists()


def test_the_written_pack_goes_through_the_full_validation_before_the_rename(small_ckpt, tmp_path, monkeypatch):
    from hhtld.codecs.reference.hhtl_f32_codec import HhtlF32Codec

    real = HhtlF32Codec.finish_group

    def wrong(self, fit, stats):
        out = real(self, fit, stats)
        out.params["k"] = out.params["k"] - 1  # a writer bug: params that contradict the stored palette
        return out

    monkeypatch.setattr(HhtlF32Codec, "finish_group", wrong)
    with pytest.raises(PackError) as e:
        encode_checkpoint(small_ckpt, tmp_path / "w.hhtld", codec="hhtl-f32")
    assert str(e.value) == (f"{tmp_path / 'w.hhtld'}: the written pack fails the reader's checks (damaged hhtld pack "
                            "(stored array '__group__.0000::palette': shape [256, 64], expected [255, 64])); the target "
                            "was left as it was")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_every_part_a_codec_declares_has_a_byte_category():
    from hhtld.codecs.registry import CODECS
    from hhtld.format import PART_CATEGORY

    params = {"hhtl-f32": {"k": 4, "leaf": True}, "hhtl-d": {"k": 4, "leaf": True, "cols": 64, "basin": "V"},
              "hhtl-vq": {"stages": "4,3+8:512", "n_cols": 64, "gain": True, "rotate": True, "leaf": True,
                          "rotation_block": 64, "leaf_lanes": 2}}
    assert sorted(params) == sorted(CODECS)
    for name, codec in CODECS.items():
        layout = codec.stored_layout(codec.params_model.model_validate(params[name]), 10, 64, {}, 2)
        for part in [*layout.group, *layout.tensor]:
            assert part.split(".")[0] in PART_CATEGORY, (name, part)


def test_passthrough_of_a_dtype_numpy_lacks_decodes_byte_for_byte(tmp_path):
    from hhtld.stfile import SafetensorsWriter, read_header

    src = tmp_path / "f4.safetensors"
    with SafetensorsWriter(src) as w:
        w.add("w", np.ones((4, 4), np.float32))
        w.add_raw("packed", "F4", [2, 6], bytes(range(6)))  # 12 four-bit values in 6 bytes
    encode_checkpoint(src, tmp_path / "f4.hhtld", codec="hhtl-f32")
    p = open_pack(tmp_path / "f4.hhtld")
    with pytest.raises(PackError) as e:
        p.tensor("packed")
    assert str(e.value) == f"{tmp_path / 'f4.hhtld'}: stored array 'packed': dtype F4 has no numpy equivalent"
    decode_pack(tmp_path / "f4.hhtld", tmp_path / "dec")
    h = read_header(tmp_path / "dec" / "f4.safetensors")
    assert (h.tensors["packed"].dtype, h.tensors["packed"].shape) == ("F4", (2, 6))
    assert (tmp_path / "dec" / "f4.safetensors").read_bytes()[h.tensors["packed"].start:h.tensors["packed"].end] \
        == bytes(range(6))


def test_deleting_any_manifest_field_is_refused_unless_it_is_informational(packs, tmp_path):
    """Every key of the manifest deleted in turn (digest recomputed): a PackError naming the
    file, except for fields no decoded value depends on (statistics, options, metadata)."""
    import re

    for name in ("folder", "vq", "hd"):
        h, d = fuzz.split(packs[name])
        manifest = json.loads(h["__metadata__"][META_MANIFEST])
        accepted = set()
        for path in fuzz._paths(manifest):
            if not path or not isinstance(path[-1], str):
                continue
            m = json.loads(h["__metadata__"][META_MANIFEST])
            del fuzz._get(m, path[:-1])[path[-1]]
            p = edited(tmp_path, packs[name], manifest=lambda x, m=m: (x.clear(), x.update(m)), crafted=True)
            try:
                pk = open_pack(p)
                pk.verify()
                decode_pack(p, tmp_path / "dec", force=True)
            except PackError as e:
                assert str(e).startswith(f"{p}: damaged hhtld pack ("), str(e)
            else:
                accepted.add(re.sub(r"/(tensors|arrays|file_metadata)/[^/]+", r"/\1/*", "/".join(map(str, path))))
        informational = {"created_by", "codec", "codec_options", "policy", "sample_rows", "source/index_metadata/*",
                         "source/file_metadata/*", "groups/*/row_cosine"}
        for a in accepted:
            a = re.sub(r"groups/\d+", "groups/*", a)
            assert (a in informational or re.fullmatch(r"(codec_options|policy|source/index_metadata|groups/\*/options"
                                                       r"|source/file_metadata/\*)/.+", a)
                    or re.fullmatch(r"groups/\*/params/(basis_energy|bytes|bpw|setting|route|fisher_z_quality|"
                                    r"reconstruction|basin)(/.+)?", a)), (name, a)
