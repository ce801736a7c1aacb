"""Encode a checkpoint into one ``.hhtld`` pack, group by group, atomically."""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..checkpoint import Checkpoint, open_checkpoint
from ..classify import DEFAULT_RULES, EncodablePolicy, Plan, RuleTable, plan_checkpoint, to_row_matrix
from ..codecs.registry import make_codec
from ..errors import HhtldError
from ..format import (
    BF16_BYTES,
    FLOAT_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FORMAT,
    META_MANIFEST,
    META_VERSION,
    aux_array_name,
    group_array_name,
    tensor_array_name,
)
from ..outputs import check_output_file
from ..stfile import SafetensorsWriter, as_bytes

# One fixed codec setting for every group; the product default (hhtl-vq with a
# rate allocation) is hhtld.budget.encode_budget, which calls this per round.
REFERENCE_CODEC = "hhtl-f32"


def crc32_hex(data) -> str:
    return f"{zlib.crc32(as_bytes(np.asarray(data))) & 0xFFFFFFFF:08x}"


def bf16_bytes(ckpt: Checkpoint) -> int:
    """Size of the checkpoint's tensors with every float tensor stored as bfloat16."""
    total = 0
    for t in ckpt.tensors.values():
        n = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
        total += n * BF16_BYTES if t.dtype in FLOAT_DTYPES else t.nbytes
    return total


@dataclass
class EncodeResult:
    path: Path
    source: Path
    seconds: float
    n_weights_encoded: int
    plan: Plan
    stats: dict[str, Any] = field(default_factory=dict)


def encode_checkpoint(
    model: str | os.PathLike,
    out: str | os.PathLike,
    codec: str = REFERENCE_CODEC,
    codec_options: dict[str, Any] | None = None,
    policy: EncodablePolicy = EncodablePolicy(),
    rules: RuleTable = DEFAULT_RULES,
    include_aux: bool = True,
    progress: bool = False,
    group_options: Mapping[str, dict[str, Any]] | None = None,
    cache: dict | None = None,
) -> EncodeResult:
    """Read ``model`` (file, index or folder), encode every group, write ``out``.

    ``group_options`` maps a group key string (``str(GroupKey)``, e.g.
    ``"encoder/qko/384x384"``) to codec options that override
    ``codec_options`` for that group (rate allocation chooses them).
    ``cache``: a dict kept by the caller across calls on the same model;
    a group encoded before with the same codec options is taken from it
    (codecs are deterministic, so the bytes are the same).

    The pack is written to a temporary file next to ``out`` and renamed over
    it only when complete; the input is only ever read.
    """
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model)
    out = Path(out)
    check_output_file(out, [ckpt.weight_path(f) for f in ckpt.files] + [ckpt.aux_path(a) for a in ckpt.aux_files],
                      what="pack")
    enc = make_codec(codec, **(codec_options or {}))
    group_options = dict(group_options or {})
    plan = plan_checkpoint(ckpt, policy, rules)

    checksums: dict[str, str] = {}
    groups_json: list[dict] = []
    tensors_json: dict[str, dict] = {}
    for tp in plan.tensors.values():
        tensors_json[tp.name] = {
            "file": tp.file,
            "dtype": tp.dtype,
            "shape": list(tp.shape),
            "role": tp.role,
            "component": tp.component,
        }

    writer = SafetensorsWriter(out)
    n_encoded = 0
    try:
        bar = tqdm(total=len(plan.tensors), unit="tensor", desc="encode", disable=not progress,
                   dynamic_ncols=True, leave=True)
        for g in plan.groups:
            bar.set_postfix_str(str(g.key), refresh=True)
            names = [t.name for t in g.tensors]
            genc = enc
            if str(g.key) in group_options:
                genc = make_codec(codec, **{**(codec_options or {}), **group_options[str(g.key)]})
            ckey = (str(g.key), genc.name, json.dumps(genc.options(), sort_keys=True))
            eg = None if cache is None else cache.get(ckey)
            if eg is None:
                eg = genc.encode_group(g.key, names, [read_rows(ckpt, t) for t in g.tensors])
                if cache is not None:
                    cache[ckey] = eg
            part_names = []
            for part, arr in eg.arrays.items():
                nm = group_array_name(g.index, part)
                writer.add(nm, arr)
                checksums[nm] = crc32_hex(arr)
                part_names.append(part)
            groups_json.append({
                "index": g.index,
                "key": g.key.to_json(),
                "regime": g.regime,
                "codec": genc.name,
                "codec_id": int(genc.codec_id),
                "options": genc.options(),
                "params": eg.params,
                "parts": part_names,
                "tensors": names,
            })
            for t in g.tensors:
                et = eg.tensors[t.name]
                tparts = []
                for part, arr in et.arrays.items():
                    nm = tensor_array_name(t.name, part)
                    writer.add(nm, arr)
                    checksums[nm] = crc32_hex(arr)
                    tparts.append(part)
                tensors_json[t.name].update({
                    "kind": "encoded",
                    "group": g.index,
                    "transposed": t.transposed,
                    "row_shape": list(t.row_shape),
                    "params": et.params,
                    "parts": tparts,
                })
                n_encoded += t.row_shape[0] * t.row_shape[1]
            bar.update(len(g.tensors))
        bar.set_postfix_str("passthrough", refresh=True)
        for tp in plan.passthrough:
            raw = ckpt.read_raw(tp.name)
            writer.add_raw(tp.name, tp.dtype, tp.shape, raw)
            checksums[tp.name] = crc32_hex(raw)
            tensors_json[tp.name].update({"kind": "passthrough", "reason": tp.reason})
            bar.update(1)
        bar.close()
        aux = []
        if include_aux:
            for rel in ckpt.aux_files:
                data = np.frombuffer(ckpt.aux_path(rel).read_bytes(), dtype=np.uint8)
                nm = aux_array_name(rel)
                writer.add(nm, data)
                checksums[nm] = crc32_hex(data)
                aux.append(rel)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created_by": f"hhtld {__version__}",
            "codec": enc.name,
            "codec_options": enc.options(),
            "policy": policy.to_json(),
            "source": {
                "kind": ckpt.kind,
                "name": ckpt.path.name,
                "files": ckpt.files,
                "index": ckpt.index_name,
                "index_metadata": ckpt.index_metadata,
                "file_metadata": ckpt.file_metadata,
                "aux_files": aux,
                "bytes": ckpt.total_bytes,
                "bf16_bytes": bf16_bytes(ckpt),
            },
            "groups": groups_json,
            "tensors": tensors_json,
            "checksums": checksums,
        }
        writer.metadata = {
            META_FORMAT: FORMAT_NAME,
            META_VERSION: str(FORMAT_VERSION),
            META_MANIFEST: json.dumps(manifest, separators=(",", ":"), sort_keys=False),
        }
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return EncodeResult(out, ckpt.path, time.perf_counter() - t0, n_encoded, plan)


def read_rows(ckpt: Checkpoint, t) -> np.ndarray:
    """float32 (rows, cols) of one planned tensor: effective shape, transposed if needed."""
    a = to_row_matrix(ckpt.read_float(t.name), t.shape, t.row_shape, t.transposed)
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise HhtldError(
            f"{ckpt.weight_path(t.file)}: tensor '{t.name}': {bad} non-finite value(s) (NaN/inf) cannot be encoded"
        )
    return a
