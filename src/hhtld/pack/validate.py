"""Check a parsed manifest against the arrays a pack actually stores.

Runs when a pack is opened, after the schema (``pack/manifest.py``) and
before anything is decoded or allocated:

* version 2: the manifest's ``arrays`` table equals the safetensors header
  (names, dtypes, shapes, offsets); version 1: every stored array has a
  CRC32 and every CRC32 an array;
* paths: every decode target is a distinct, safe relative path, none both a
  file and a folder; every tensor's file is one of the source files;
* groups: position = ``index``; codec id known and matching the codec name;
  params valid for the codec; each group lists exactly the encoded tensors
  that name it;
* tensors: an encoded tensor is a float matrix whose row shape follows from
  its shape (``transposed`` included) and equals its group's shape, at most
  MAX_ROW_COLS wide; a passthrough tensor's dtype and shape are its stored
  array's;
* parts: the parts each group and tensor lists are exactly those its codec
  declares for these params, stored with the declared dtype and shape;
* every stored array belongs to exactly one thing in the manifest.

The result maps every stored array to the check of its values (run on first
read) and to its expected hash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..classify.shapes import effective_shape, is_matrix_shape
from ..codecs.base import Codec
from ..codecs.layout import LayoutProblem, PartSpec
from ..codecs.registry import CODECS
from ..format import AUX_PREFIX, DTYPE_BITS, MAX_ROW_COLS, aux_array_name, group_array_name, tensor_array_name
from ..names import path_conflicts
from ..stfile import Header
from .manifest import ManifestProblem, describe_error, format_loc


@dataclass
class Checked:
    """What the reader needs after validation: per stored array, its value check
    (or None) and its hash (``("sha256" | "crc32", hex)``); per group, its codec."""

    specs: dict[str, PartSpec | None] = field(default_factory=dict)
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)
    codecs: list[type[Codec]] = field(default_factory=list)


def _t(name: str) -> str:
    return format_loc(("tensors", name))


def _fail(msg: str):
    raise ManifestProblem(msg)


def _codec_of(gi: int, g) -> type[Codec]:
    for c in CODECS.values():
        if int(c.codec_id) == g.codec_id:
            if c.name != g.codec:
                _fail(f"manifest field groups[{gi}].codec is {g.codec!r}, but codec id {g.codec_id} is {c.name!r}")
            return c
    _fail(f"manifest field groups[{gi}].codec_id: codec id {g.codec_id} is not known to this hhtld")


def _key_str(g) -> str:
    k = g.key
    return f"{k.component}/{k.role}/{k.shape[0]}x{k.shape[1]}"


def check_pack(header: Header, model, version: int) -> Checked:
    """Cross-check a validated manifest ``model`` with the pack's ``header``; raises
    ManifestProblem naming the field or stored array."""
    out = Checked()
    stored = header.tensors
    # -- the array table against the header -------------------------------------------------
    if version >= 2:
        table = model.arrays
        for name in table:
            if name not in stored:
                _fail(f"stored array {name!r} is missing")
        for name, e in stored.items():
            a = table.get(name)
            if a is None:
                _fail(f"stored array {name!r} is not in the manifest")
            offsets = [e.start - header.data_start, e.end - header.data_start]
            for what, have, want in (("dtype", e.dtype, a.dtype), ("shape", list(e.shape), a.shape),
                                     ("data_offsets", offsets, a.data_offsets)):
                if have != want:
                    _fail(f"stored array {name!r}: the header says {what} {have}, the manifest recorded {want}")
            out.hashes[name] = ("sha256", a.sha256)
    else:
        for name in model.checksums:
            if name not in stored:
                _fail(f"stored array {name!r} is missing")
        for name in stored:
            if name not in model.checksums:
                _fail(f"stored array {name!r} has no checksum")
            out.hashes[name] = ("crc32", model.checksums[name])

    # -- paths -----------------------------------------------------------------------------------
    src = model.source
    targets = list(src.files) + ([src.index] if src.index is not None else []) + list(src.aux_files)
    bad = path_conflicts(targets)
    if bad:
        _fail(f"manifest field source: the files decode writes collide: {bad}")
    for f in src.file_metadata:
        if f not in src.files:
            _fail(f"manifest field {format_loc(('source', 'file_metadata', f))} names a file that is not in source.files")

    expected: dict[str, PartSpec | None] = {}

    def claim(name: str, spec: PartSpec | None, owner: str) -> None:
        if name in expected:
            _fail(f"stored array {name!r} is claimed twice (the second time by {owner})")
        expected[name] = spec

    # -- groups and their tensors ----------------------------------------------------------------
    tensors = model.tensors
    for name, t in tensors.items():
        if t.file not in src.files:
            _fail(f"manifest field {_t(name)}.file {t.file!r} is not one of source.files")
        if t.kind == "encoded":
            if t.group >= len(model.groups):
                _fail(f"manifest field {_t(name)}.group is {t.group}, but the pack has "
                      f"{len(model.groups)} group(s)")
            if not is_matrix_shape(t.shape):
                _fail(f"manifest field {_t(name)}.shape {t.shape} is not a matrix (2-D, or 3-D ending in 1)")
            want = effective_shape(t.shape)
            if t.transposed:
                if len(t.shape) != 2:
                    _fail(f"manifest field {_t(name)}.transposed is true, but its shape {t.shape} is not 2-D")
                want = (want[1], want[0])
            if tuple(t.row_shape) != tuple(want):
                _fail(f"manifest field {_t(name)}.row_shape is {t.row_shape}, but shape {t.shape}"
                      f"{' transposed' if t.transposed else ''} gives {list(want)}")
            if t.row_shape[1] > MAX_ROW_COLS:
                _fail(f"manifest field {_t(name)}.row_shape: rows of {t.row_shape[1]} columns are wider "
                      f"than a pack allows ({MAX_ROW_COLS})")
        else:
            e = stored.get(name)
            if e is None:
                _fail(f"stored array {name!r} (a passthrough tensor) is missing")
            if e.dtype != t.dtype or list(e.shape) != t.shape:
                _fail(f"manifest field {_t(name)}: dtype {t.dtype} shape {t.shape}, but its stored array is "
                      f"{e.dtype} {list(e.shape)}")
            claim(name, None, f"passthrough tensor {name!r}")

    declared = sum(math.prod(t.shape) * DTYPE_BITS[t.dtype] // 8 for t in tensors.values())
    if declared != src.bytes:
        _fail(f"manifest field source.bytes is {src.bytes}, but the tensors' shapes and dtypes add up to {declared}")

    members: dict[str, int] = {}
    for gi, g in enumerate(model.groups):
        where = f"group {gi} ({_key_str(g)})"
        if g.index != gi:
            _fail(f"manifest field groups[{gi}].index is {g.index}, but the group is number {gi}")
        codec = _codec_of(gi, g)
        out.codecs.append(codec)
        try:
            params = codec.params_model.model_validate(g.params)
        except ValidationError as e:
            _fail(describe_error(e, ("groups", gi, "params")))
        n_rows, n_cols = g.key.shape
        for name in g.tensors:
            t = tensors.get(name)
            if t is None:
                _fail(f"manifest field groups[{gi}].tensors lists {name!r}, which is not a tensor of the pack")
            if t.kind != "encoded":
                _fail(f"manifest field groups[{gi}].tensors lists {name!r}, which is a passthrough tensor")
            if t.group != gi:
                _fail(f"manifest field groups[{gi}].tensors lists {name!r}, whose group is {t.group}")
            if name in members:
                _fail(f"manifest field groups[{gi}].tensors lists {name!r} twice")
            members[name] = gi
            if t.row_shape != g.key.shape:
                _fail(f"manifest field {_t(name)}.row_shape is {t.row_shape}, but its {where} holds "
                      f"{n_rows}x{n_cols} matrices")
            if (t.role, t.component) != (g.key.role, g.key.component):
                _fail(f"manifest field {_t(name)}: role {t.role!r} and component {t.component!r}, but its "
                      f"{where} is of role {g.key.role!r}, component {g.key.component!r}")
        have = {}
        for p in g.parts:
            e = stored.get(group_array_name(gi, p))
            if e is not None:
                have[p] = (e.dtype, e.shape)
        try:
            layout = codec.stored_layout(params, n_rows, n_cols, have, version)
        except LayoutProblem as e:
            _fail(f"{where}: {e}")
        _parts(f"manifest field groups[{gi}].parts", g.parts, layout.group, codec)
        for p in g.parts:
            claim(group_array_name(gi, p), layout.group[p], f"{where}")
        for name in g.tensors:
            t = tensors[name]
            try:
                codec.tensor_params_model.model_validate(t.params)
            except ValidationError as e:
                _fail(describe_error(e, ("tensors", name, "params")))
            _parts(f"manifest field {_t(name)}.parts", t.parts, layout.tensor, codec)
            for p in t.parts:
                claim(tensor_array_name(name, p), layout.tensor[p], f"tensor {name!r}")
    for name, t in tensors.items():
        if t.kind == "encoded" and name not in members:
            _fail(f"manifest field {_t(name)}.group is {t.group}, but that group does not list it")

    for rel in src.aux_files:
        claim(aux_array_name(rel), None, f"side file {rel!r}")

    # -- every stored array is accounted for, with the declared dtype and shape -----------------
    for name, spec in expected.items():
        e = stored.get(name)
        if e is None:
            _fail(f"stored array {name!r} is missing")
        if spec is not None:
            bad = spec.problem(e.dtype, e.shape)
            if bad:
                _fail(f"stored array {name!r}: {bad}")
        elif name.startswith(AUX_PREFIX) and (e.dtype != "U8" or len(e.shape) != 1):
            _fail(f"stored array {name!r}: a side file is stored as U8 bytes, got {e.dtype} {list(e.shape)}")
    for name in stored:
        if name not in expected:
            _fail(f"stored array {name!r} belongs to nothing in the manifest")
    out.specs = expected
    return out


def _parts(field: str, listed: list[str], declared: dict[str, PartSpec], codec: type[Codec]) -> None:
    if len(set(listed)) != len(listed):
        _fail(f"{field} names a part twice")
    for p in listed:
        if p not in declared:
            _fail(f"{field}: {p!r} is not a part codec {codec.name} stores with these params "
                  f"(it stores {', '.join(declared) or 'none'})")
    for p in declared:
        if p not in listed:
            _fail(f"{field} lacks {p!r}, which codec {codec.name} stores with these params")


__all__ = ["Checked", "check_pack"]
