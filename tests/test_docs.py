"""docs/format.md against the code: the tables it gives (codec ids, metadata keys,
constants, the parts of every codec) are what the code does, and a reader written
from the page alone decodes a pack's rows as hhtld does."""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import re
from pathlib import Path

import ml_dtypes  # also lets safetensors' numpy backend return BF16 arrays
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from hhtld.classify import EncodablePolicy
from hhtld.pack import decode_pack, encode_checkpoint, open_pack
from hhtld.codecs.registry import CODECS, codec_by_id
from hhtld.codecs.vq.quantiser import Layout, parse_stages
from hhtld.errors import PackError
from hhtld.format import FORMAT_VERSION, META_KEYS, READABLE_VERSIONS, CodecId

from .format_reader import DocReader

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "format.md").read_text(encoding="utf-8")
# where a constant the page names may live (the first module that has it is compared)
CONSTANT_MODULES = ("hhtld.format", "hhtld.stfile", "hhtld.codecs.vq.quantiser", "hhtld.codecs.reference.fisher_z",
                    "hhtld.codecs.reference.base17_fold")


# --- reading the page -------------------------------------------------------------------------------
def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _plain(cell: str) -> str:
    return cell.replace("`", "").strip()


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of ``text``: (header cells without backticks, rows of raw cells)."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| ]+\|$", lines[i + 1]):
            head = [_plain(c) for c in _cells(lines[i])]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append((head, rows))
        else:
            i += 1
    return out


def table(head: list[str], text: str = DOC) -> list[list[str]]:
    found = [rows for h, rows in tables(text) if h == head]
    assert len(found) == 1, f"docs/format.md should have one table headed {head}, found {len(found)}"
    return found[0]


def section(title: str) -> str:
    """The text under the heading ``title`` (any level) up to the next heading."""
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", DOC, flags=re.S | re.M)
    assert m, f"docs/format.md has no section {title!r}"
    return m.group(1)


def _value(src: str):
    """A constant's value as the page writes it: numbers, ``2**17``, ``1 << 17``, ``0xFF``, ``{1, 2}``."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Set):
            return {ev(e) for e in node.elts}
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            ops = {ast.Pow: lambda a, b: a**b, ast.LShift: lambda a, b: a << b, ast.Mult: lambda a, b: a * b,
                   ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b}
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not a constant value: {src!r}")

    return ev(ast.parse(src, mode="eval").body)


# --- a small checkpoint and its packs -----------------------------------------------------------------
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A sharded model folder with side files: an embedding (index regime), two 'up'
    matrices (F32 and F16) sharing a group, a GPT-2 Conv1D (BF16, stored transposed),
    a 1024-wide matrix (Hadamard block 1024), a 3-D kernel-size-1 conv, passthroughs."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("docs") / "model"
    d.mkdir()
    a = {
        "embeddings.word_embeddings.weight": rng.standard_normal((64, 48)).astype(np.float32),
        "embeddings.position_ids": np.arange(64, dtype=np.int64).reshape(1, 64),
        "encoder.layer.0.intermediate.dense.weight": rng.standard_normal((64, 48)).astype(np.float32),
        "h.0.mlp.c_fc.weight": rng.standard_normal((24, 40)).astype(ml_dtypes.bfloat16),
    }
    b = {
        "encoder.layer.1.intermediate.dense.weight": rng.standard_normal((64, 48)).astype(np.float16),
        "encoder.layer.0.intermediate.dense.bias": rng.standard_normal(64).astype(np.float32),
        "encoder.layer.0.attention.self.query.weight": rng.standard_normal((8, 1024)).astype(np.float32),
        "h.0.conv.weight": rng.standard_normal((20, 24, 1)).astype(np.float16),
    }
    save_file(a, str(d / SHARDS[0]), metadata={"format": "pt", "note": "first"})
    save_file(b, str(d / SHARDS[1]))
    wm = {n: SHARDS[0] for n in a} | {n: SHARDS[1] for n in b}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1, "x": "y"},
                                                                "weight_map": wm}))
    (d / "config.json").write_text('{"model_type": "bert"}')
    (d / "sub").mkdir()
    (d / "sub" / "vocab.txt").write_text("a\nb\n")
    return d


CODEC_SETUPS = {
    "hhtl-f32": ({}, {}),
    "hhtl-d": ({}, {}),
    # two stages (U8 and U16 twigs, a 2-position pattern), a leaf on the embedding;
    # one group without gain and rotation
    "hhtl-vq": ({"stages": "4,3+2:300", "leaf_lanes": 4}, {"encoder/up/64x48": {"gain": False, "rotate": False}}),
}


@pytest.fixture(scope="module")
def packs(folder, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("packs")
    out = {}
    for codec, (opts, group_opts) in CODEC_SETUPS.items():
        out[codec] = encode_checkpoint(folder, d / f"{codec}.hhtld", codec=codec, codec_options=opts,
                                       group_options=group_opts, policy=EncodablePolicy(encode_all=True)).path
    return out


# --- (a) codec ids ----------------------------------------------------------------------------------
def test_codec_id_table_is_codec_id():
    rows = table(["id", "CodecId", "codec", "what it is"])
    assert {_plain(r[1]): int(r[0]) for r in rows} == {m.name: int(m) for m in CodecId}
    assert len(rows) == len(CodecId)
    for r in rows:
        cid, codec = int(r[0]), _plain(r[2])
        if cid == int(CodecId.PASSTHROUGH):
            assert codec == "—"
            with pytest.raises(PackError):
                codec_by_id(cid)
        else:
            assert codec_by_id(cid).name == codec
    assert {_plain(r[2]) for r in rows} - {"—"} == set(CODECS)
    for codec in CODECS.values():  # every codec has its own section, which names its id
        assert f"### {codec.name} (codec id {int(codec.codec_id)})" in DOC


# --- (b) __metadata__ keys -----------------------------------------------------------------------------
def test_metadata_keys_are_those_the_writer_writes_and_the_reader_accepts(packs):
    rows = table(["key", "versions", "value"])
    documented = {v: {_plain(r[0]) for r in rows if v in {int(x) for x in r[1].split(",")}}
                  for v in READABLE_VERSIONS}
    assert documented == {v: set(META_KEYS[v]) for v in READABLE_VERSIONS}
    assert set(META_KEYS) == set(READABLE_VERSIONS)
    for path in packs.values():
        with safe_open(str(path), "numpy") as f:
            assert set(f.metadata()) == documented[FORMAT_VERSION]


# --- (c) constants -------------------------------------------------------------------------------------------
CONSTANT = re.compile(r"`([A-Z][A-Z0-9_]+)` = (\{[^}]*\}|(?:0x[0-9A-Fa-f]+|[0-9][0-9_]*(?:\.[0-9]+)?)"
                      r"(?:(?:\*\*|<<|\*)[0-9]+)?)")


def test_every_constant_the_page_gives_a_value_has_that_value():
    found = CONSTANT.findall(DOC)
    assert len({name for name, _ in found}) >= 30
    modules = [importlib.import_module(m) for m in CONSTANT_MODULES]
    for name, text in found:
        mod = next((m for m in modules if hasattr(m, name)), None)
        assert mod is not None, f"docs/format.md names {name}, which none of {CONSTANT_MODULES} defines"
        have = getattr(mod, name)
        want = _value(text)
        assert (set(have) if isinstance(have, frozenset) else have) == want, \
            f"docs/format.md: {name} = {text}, but {mod.__name__}.{name} is {have!r}"


def test_base17_positions_are_as_written():
    from hhtld.codecs.reference.base17_fold import DIM_OF_POS, GOLDEN_POS

    assert GOLDEN_POS.tolist() == [(i * 11) % 17 for i in range(17)]
    assert DIM_OF_POS.tolist() == [(p * 14) % 17 for p in range(17)]  # position p takes dimension (p * 14) % 17


# --- (d) the parts of every codec ----------------------------------------------------------------------
def _doc_parts(codec_name: str, kind: str) -> list[list[str]]:
    text = section(f"{codec_name} (codec id {int(CODECS[codec_name].codec_id)})")
    return table([f"{kind} part", "dtype", "shape", "when", "meaning"], text)


def _applies(when: str, params: dict) -> bool:
    when = _plain(when)
    if when == "always":
        return True
    m = re.fullmatch(r"params\.([a-z_]+)", when)
    assert m, f"unknown condition {when!r} in docs/format.md"
    return bool(params[m.group(1)])


def _expand(pattern: str, params: dict) -> list[tuple[str, dict]]:
    """A documented part name → the concrete names with their symbols (``<s>``: stage,
    ``<j>``: position of the stage's pattern)."""
    if "<" not in pattern:
        return [(pattern, {})]
    out = []
    for si, st in enumerate(parse_stages(params["stages"])):
        if "<j>" in pattern:
            for j, (w, k) in enumerate(zip(st.widths, st.ks)):
                out.append((pattern.replace("<s>", str(si)).replace("<j>", str(j)), {"w": w, "K": k}))
        else:
            out.append((pattern.replace("<s>", str(si)), {"stage": st}))
    return out


def _documented(rows: list[list[str]], params: dict) -> dict[str, tuple[str, set[str], str, dict]]:
    """Concrete part name → (documented name, dtypes, shape, symbols) of the parts that apply."""
    out = {}
    for part, dtype, shape, when, _ in rows:
        if _applies(when, params):
            for name, sym in _expand(_plain(part), params):
                out[name] = (_plain(part), {d.strip() for d in dtype.split(" or ")}, _plain(shape), sym)
    return out


@pytest.mark.parametrize("codec_name", list(CODEC_SETUPS))
def test_documented_parts_are_the_declared_layout(packs, codec_name):
    """Per group of a real pack: the parts the page lists for its params are exactly
    those the codec declares (``stored_layout``), with the dtypes and shapes stored."""
    p = open_pack(packs[codec_name])
    hdr = p.header.tensors
    seen = {"group": set(), "tensor": set()}
    for gi, g in enumerate(p.groups):
        codec = codec_by_id(g["codec_id"])
        assert codec.name == codec_name
        n_rows, n_cols = g["key"]["shape"]
        params = codec.params_model.model_validate(g["params"])
        group_array = lambda part: f"__group__.{gi:04d}::{part}"  # noqa: E731
        stored = {part: (hdr[group_array(part)].dtype, hdr[group_array(part)].shape) for part in g["parts"]}
        layout = codec.stored_layout(params, n_rows, n_cols, stored, FORMAT_VERSION)
        lanes = stored["basis"][1][0] if "basis" in stored else None
        owners = [("group", layout.group, group_array)]
        owners += [("tensor", layout.tensor, lambda part, t=t: f"{t}::{part}") for t in g["tensors"]]
        for kind, declared, array_name in owners:
            doc = _documented(_doc_parts(codec_name, kind), g["params"])
            assert set(doc) == set(declared), f"group {gi}: {kind} parts"
            for part, (documented, dtypes, shape, sym) in doc.items():
                seen[kind].add(documented)
                e = hdr[array_name(part)]
                assert set(declared[part].dtype) <= dtypes and e.dtype in dtypes, (gi, part)
                ns = {"n": n_rows, "cols": n_cols, "k": g["params"].get("k"), "L": lanes}
                if "stage" in sym:  # twig.<s>: S segments; U8 unless a K of the stage is over 256
                    st = sym["stage"]
                    ns["S"] = Layout(st, n_cols).n_segments
                    assert e.dtype == ("U8" if max(st.ks) <= 256 else "U16"), (gi, part)
                if "K" in sym:  # palette.<s>.<j>: k' rows, 1 <= k' <= K, w columns
                    ns.update(kp=e.shape[0], w=sym["w"])
                    assert 1 <= e.shape[0] <= sym["K"], (gi, part)
                assert tuple(e.shape) == eval(shape.replace("k'", "kp"), {"__builtins__": {}}, ns), (gi, part, shape)
    for kind in seen:  # the pack exercises every part the page lists
        assert seen[kind] == {_plain(r[0]) for r in _doc_parts(codec_name, kind)}, kind


# --- (e) no references outside the repository ---------------------------------------------------------------
def test_no_reference_to_files_outside_the_repository():
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*")) + sorted((ROOT / "src").rglob("*"))
    # the repository's own files: not byte code, not what pip builds from them (egg-info)
    bad = [str(f.relative_to(ROOT)) for f in files
           if f.is_file() and f.suffix != ".pyc" and not any(p.endswith(".egg-info") for p in f.parts)
           and b"shared/SPEC" in f.read_bytes()]
    assert bad == []


# --- (f) a reader written from the page --------------------------------------------------------------------
@pytest.mark.parametrize("codec_name", list(CODEC_SETUPS))
def test_a_reader_written_from_the_page_decodes_the_rows_hhtld_decodes(packs, codec_name):
    p = open_pack(packs[codec_name])
    doc = DocReader(packs[codec_name])
    blocks = set()
    for name in p.encoded_names():
        n = p.info(name)["row_shape"][0]
        for r in sorted({0, 1, n // 2, n - 1}):
            mine, theirs = doc.row(name, r), p.row(name, r)
            assert mine.dtype == np.float32 and mine.shape == theirs.shape
            if codec_name == "hhtl-vq":  # the Hadamard product's sums may run in another order
                assert np.abs(mine - theirs).max() <= 1e-5 * np.abs(theirs).max(), (name, r)
                blocks.add(p.group_of(name)["params"].get("rotation_block"))
            else:
                np.testing.assert_array_equal(mine, theirs, err_msg=f"{name} row {r}")
    if codec_name == "hhtl-vq":
        assert {None, 8, 16, 1024} <= blocks  # no rotation, small blocks, and H_p ⊗ H_q at 1024
    if codec_name != "hhtl-vq":  # whole tensors, bit for bit: transposed, 3-D, F16/BF16 casts, passthrough
        for name in p.names():
            mine, theirs = doc.tensor(name), p.tensor(name)
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
            assert mine.tobytes() == theirs.tobytes(), name


def test_decode_rebuilds_the_files_as_written(packs, folder, tmp_path):
    path = packs["hhtl-d"]
    p = open_pack(path)
    src = p.manifest["source"]
    assert src["kind"] == "folder" and src["files"] == list(SHARDS)
    assert src["aux_files"] == ["config.json", "sub/vocab.txt"]
    out = tmp_path / "out"
    decode_pack(path, out)
    assert sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) == sorted(
        list(SHARDS) + ["model.safetensors.index.json", "config.json", "sub/vocab.txt"])
    for rel in src["aux_files"]:
        assert (out / rel).read_bytes() == (folder / rel).read_bytes()
    data = 0
    for f in SHARDS:
        raw = (out / f).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % 8 == 0
        header = json.loads(raw[8 : 8 + n])
        assert header.pop("__metadata__", {}) == src["file_metadata"][f]
        assert list(header) == [name for name, t in p.tensors.items() if t["file"] == f]
        ends = [e["data_offsets"] for e in header.values()]
        assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == len(raw) - 8 - n
        data += ends[-1][1]
        for name, e in header.items():
            if p.tensors[name]["kind"] == "passthrough":
                assert raw[8 + n + e["data_offsets"][0] : 8 + n + e["data_offsets"][1]] == bytes(p.raw(name))
    index = (out / "model.safetensors.index.json").read_text()
    assert index.endswith("}\n")
    weight_map = {name: t["file"] for f in SHARDS for name, t in p.tensors.items() if t["file"] == f}
    assert json.loads(index) == {"metadata": {**src["index_metadata"], "total_size": data}, "weight_map": weight_map}
    assert list(json.loads(index)["weight_map"]) == list(weight_map)
    assert data == src["bytes"]
