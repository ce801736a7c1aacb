"""The pack being written: :class:`PackWriter`, streaming, atomically.

Every array goes to the output's spill file as soon as it is made (encoded
tensors and groups in any order, then passthrough tensors and side files);
the executor that runs an encode's units owns one (:mod:`hhtld.pack.executor`).
The manifest (format version 2) records every array's dtype,
shape, offsets and SHA-256 and is itself covered by a digest; it goes through
the declared schema (``pack/manifest.py``) before it is written. The finished
pack is opened and checked exactly as a reader checks it (header, digest,
schema, every field against the stored arrays, every array's hash and
values) before it is renamed over the target.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import ValidationError

from .._version import __version__
from ..checkpoint import Checkpoint
from ..checkpoint.rows import TensorRows
from ..classify import EncodablePolicy, GroupPlan, Plan
from ..codecs.base import Codec
from ..errors import CheckpointError, PackError
from ..format import (
    BF16_BYTES,
    FLOAT_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_ROW_COLS,
    META_DIGEST,
    META_FORMAT,
    META_MANIFEST,
    META_VERSION,
    aux_array_name,
    group_array_name,
    tensor_array_name,
)
from ..names import name_problem, path_conflicts, path_problem
from ..stfile import FormatProblem, SafetensorsWriter
from .manifest import ManifestV2, array_sha256, describe_error, manifest_digest

MIN_SAMPLE_ROWS = 16


def check_storable(ckpt: Checkpoint, plan: Plan | None = None, include_aux: bool = True) -> None:
    """Refuse, before any work, a checkpoint whose tensor names or file names a
    pack cannot hold (CheckpointError naming the file and the tensor): names
    with control characters or lone surrogates, names that would collide with
    the pack's own array names (``::``, ``__group__.``), file names that are not
    safe relative paths; and matrices wider than a pack allows."""
    for name, t in ckpt.tensors.items():
        bad = name_problem(name)
        if bad:
            raise CheckpointError(f"{ckpt.weight_path(t.file)}: tensor {name!r} cannot be stored in a pack: its name "
                                  f"{bad}; rename the tensor")
    files = list(ckpt.files) + ([ckpt.index_name] if ckpt.index_name else [])
    for f in files:
        bad = path_problem(f)
        if bad:
            raise CheckpointError(f"{ckpt.root / f}: the file name {f!r} cannot be stored in a pack: it {bad}")
    for rel in ckpt.aux_files if include_aux else []:
        bad = path_problem(rel)
        if bad:
            raise CheckpointError(f"{ckpt.aux_path(rel)}: the side file name {rel!r} cannot be stored in a pack: it "
                                  f"{bad}; rename it or leave side files out (--no-aux-files)")
    bad = path_conflicts(files + (list(ckpt.aux_files) if include_aux else []))
    if bad:
        raise CheckpointError(f"{ckpt.path}: the files of this checkpoint collide in a pack: {bad}")
    for tp in (plan.tensors.values() if plan is not None else ()):
        if tp.encoded and tp.row_shape[1] > MAX_ROW_COLS:
            raise CheckpointError(f"{ckpt.weight_path(tp.file)}: tensor {tp.name!r}: rows of {tp.row_shape[1]} columns "
                                  f"are wider than a pack holds ({MAX_ROW_COLS})")


def bf16_bytes(ckpt: Checkpoint) -> int:
    """Size of the checkpoint's tensors with every float tensor stored as bfloat16."""
    total = 0
    for t in ckpt.tensors.values():
        n = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
        total += n * BF16_BYTES if t.dtype in FLOAT_DTYPES else t.nbytes
    return total


def row_stats(cos: np.ndarray) -> dict[str, float]:
    """Median, 5th percentile and minimum of row cosines (the gate-1 figures)."""
    if cos.size == 0:
        return {"n": 0}
    return {"n": int(cos.size), "median": float(np.median(cos)), "p5": float(np.percentile(cos, 5)),
            "min": float(cos.min())}


@dataclass
class GroupResult:
    """What encoding one group gave: its options, stored bytes, seconds and,
    when measured, every tensor's row cosines (float32 (rows,) each)."""

    plan: GroupPlan
    codec: str
    options: dict[str, Any]
    params: dict[str, Any]
    nbytes: int
    seconds: float
    cosines: dict[str, np.ndarray] = field(default_factory=dict)
    reused: bool = False

    @property
    def key(self) -> str:
        return str(self.plan.key)

    def all_cosines(self) -> np.ndarray:
        return np.concatenate(list(self.cosines.values())) if self.cosines else np.zeros(0, np.float32)


@dataclass
class EncodeResult:
    path: Path
    source: Path
    seconds: float
    n_weights_encoded: int
    plan: Plan
    groups: list[GroupResult] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


class PackWriter:
    """The manifest being built next to a :class:`SafetensorsWriter`: encoded
    tensors and groups in any order (a group is recorded once its tensors are
    written), then passthrough tensors, side files and the manifest."""

    def __init__(self, out: Path, ckpt: Checkpoint, plan: Plan):
        check_storable(ckpt, plan, include_aux=False)
        self.writer = SafetensorsWriter(out)
        self.ckpt = ckpt
        self.plan = plan
        self.checksums: dict[str, str] = {}  # stored array -> SHA-256
        self.groups: list[dict] = []
        self.tensors: dict[str, dict] = {}
        self._pending: dict[str, tuple[dict, list[str]]] = {}  # written tensors whose group is not yet
        for tp in plan.tensors.values():
            self.tensors[tp.name] = {"file": tp.file, "dtype": tp.dtype, "shape": list(tp.shape), "role": tp.role,
                                     "component": tp.component}

    # -- arrays ---------------------------------------------------------------------------
    def add(self, name: str, arr: np.ndarray) -> int:
        n = self.writer.add(name, arr)
        self.checksums[name] = array_sha256(np.ascontiguousarray(arr))
        return n

    def mark(self):
        return self.writer.mark(), len(self.groups), dict(self.checksums), dict(self._pending)

    def rollback(self, mark) -> None:
        wmark, n_groups, checksums, pending = mark
        self.writer.rollback(wmark)
        del self.groups[n_groups:]
        self.checksums = checksums
        self._pending = pending

    # -- groups -------------------------------------------------------------------------------
    def _record(self, g: GroupPlan, genc: Codec, params: dict, parts: list[str],
                tensor_parts: dict[str, tuple[dict, list[str]]], extra: dict | None = None) -> None:
        entry = {
            "index": g.index,
            "key": g.key.to_json(),
            "regime": g.regime,
            "codec": genc.name,
            "codec_id": int(genc.codec_id),
            "options": genc.options(),
            "params": params,
            "parts": parts,
            "tensors": [t.name for t in g.tensors],
        }
        entry.update(extra or {})
        self.groups.append(entry)
        for t in g.tensors:
            tparams, tparts = tensor_parts[t.name]
            self.tensors[t.name].update({
                "kind": "encoded",
                "group": g.index,
                "transposed": t.transposed,
                "row_shape": list(t.row_shape),
                "params": tparams,
                "parts": tparts,
            })

    def write_tensor(self, t, et) -> int:
        """Write one encoded tensor's arrays now; its manifest entry comes with its group."""
        n = 0
        for part, arr in et.arrays.items():
            n += self.add(tensor_array_name(t.name, part), arr)
        self._pending[t.name] = (et.params, list(et.arrays))
        return n

    def write_group(self, g: GroupPlan, genc: Codec, eg, extra: dict | None = None) -> int:
        """Write a group's arrays and record it with its (already written) tensors.
        ``g.index`` must be the group's position in the manifest."""
        if g.index != len(self.groups):
            raise PackError(f"group {g.key} written as group {g.index}, but {len(self.groups)} groups are written")
        n = 0
        for part, arr in eg.arrays.items():
            n += self.add(group_array_name(g.index, part), arr)
        tensor_parts = {t.name: self._pending.pop(t.name) for t in g.tensors}
        self._record(g, genc, eg.params, list(eg.arrays), tensor_parts, extra)
        return n

    def copy_group(self, reuse, g: GroupPlan, genc: Codec) -> GroupResult | None:
        """Copy group ``g`` from the earlier pack ``reuse`` if it was encoded there
        with the same codec, options and tensors; None otherwise."""
        t0 = time.perf_counter()
        old = next((x for x in reuse.groups if x["key"] == g.key.to_json()), None)
        if (old is None or old["codec"] != genc.name or old["options"] != genc.options()
                or old["tensors"] != [t.name for t in g.tensors]):
            return None
        nbytes = 0
        tensor_parts = {}
        for t in g.tensors:
            info = reuse.info(t.name)
            for part in info["parts"]:
                nbytes += self.add(tensor_array_name(t.name, part), reuse.array(tensor_array_name(t.name, part)))
            tensor_parts[t.name] = (info.get("params", {}), list(info["parts"]))
        for part in old["parts"]:
            nbytes += self.add(group_array_name(g.index, part), reuse.array(group_array_name(old["index"], part)))
        self._record(g, genc, old["params"], list(old["parts"]), tensor_parts)
        return GroupResult(g, genc.name, genc.options(), old["params"], nbytes, time.perf_counter() - t0, reused=True)

    def copy_encoded(self, reuse, replace: dict[str, np.ndarray] | None = None) -> None:
        """Every encoded group of the earlier pack ``reuse`` (written from the same
        checkpoint and plan), array by array in its order, with its manifest entries;
        ``replace`` (stored array name → array): arrays written instead of the earlier
        pack's, of the same stored dtype and shape."""
        replace = replace or {}
        unknown = set(replace) - set(reuse.manifest["arrays"])
        if unknown:
            raise PackError(f"{reuse.path}: no stored array '{sorted(unknown)[0]}' to replace")
        for old in reuse.groups:
            for name in old["tensors"]:
                info = reuse.info(name)
                for part in info["parts"]:
                    stored = tensor_array_name(name, part)
                    arr = reuse.array(stored)
                    new = replace.get(stored)
                    if new is not None:
                        if new.dtype != arr.dtype or new.shape != arr.shape:
                            raise PackError(f"{reuse.path}: array '{stored}' replaced by {new.dtype} "
                                            f"{list(new.shape)}, but it is stored as {arr.dtype} {list(arr.shape)}")
                        arr = new
                    self.add(stored, arr)
                self.tensors[name].update({k: info[k] for k in ("kind", "group", "transposed", "row_shape",
                                                                "params", "parts") if k in info})
            for part in old["parts"]:
                self.add(group_array_name(old["index"], part), reuse.array(group_array_name(old["index"], part)))
            self.groups.append(json.loads(json.dumps(old)))

    # -- passthrough and side files ------------------------------------------------------------
    def add_passthrough(self, ckpt: Checkpoint, tp) -> None:
        raw = ckpt.read_raw(tp.name)
        self.writer.add_raw(tp.name, tp.dtype, tp.shape, raw)
        self.checksums[tp.name] = array_sha256(raw)
        self.tensors[tp.name].update({"kind": "passthrough", "reason": tp.reason})

    def add_aux(self, ckpt: Checkpoint, rel: str) -> str:
        bad = path_problem(rel)
        if bad:
            raise CheckpointError(f"{ckpt.aux_path(rel)}: the side file name {rel!r} cannot be stored in a pack: it "
                                  f"{bad}; rename it or leave side files out (--no-aux-files)")
        self.add(aux_array_name(rel), np.frombuffer(ckpt.aux_path(rel).read_bytes(), dtype=np.uint8))
        return rel

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, codec: Codec, policy: EncodablePolicy, sample_rows: int, include_aux: bool,
               on_tensor: Callable[[], None] | None = None, extra: dict | None = None) -> Path:
        """Passthrough tensors, side files, the manifest; then the checked rename."""
        ckpt = self.ckpt
        for tp in self.plan.passthrough:
            self.add_passthrough(ckpt, tp)
            if on_tensor:
                on_tensor()
        aux = [self.add_aux(ckpt, rel) for rel in ckpt.aux_files] if include_aux else []
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created_by": f"hhtld {__version__}",
            "codec": codec.name,
            "codec_options": codec.options(),
            "policy": policy.to_json(),
            "sample_rows": sample_rows,
            **(extra or {}),
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
            "groups": self.groups,
            "tensors": self.tensors,
            "arrays": {name: {**e, "sha256": self.checksums[name]} for name, e in self.writer.entries.items()},
        }
        missing = [n for n, t in self.tensors.items() if "kind" not in t]
        if missing or self._pending:
            raise PackError(f"{self.writer.path}: tensor '{(missing or list(self._pending))[0]}' was not written")
        try:
            text = json.dumps(manifest, separators=(",", ":"), sort_keys=False)
            ManifestV2.model_validate(json.loads(text))  # the declared schema, as a reader will see it
        except ValidationError as e:
            raise PackError(f"{self.writer.path}: the pack's manifest does not follow the format "
                            f"({describe_error(e)}); nothing was written") from None
        self.writer.metadata = {
            META_FORMAT: FORMAT_NAME,
            META_VERSION: str(FORMAT_VERSION),
            META_MANIFEST: text,
            META_DIGEST: manifest_digest(text),
        }
        expect = len(self.tensors)
        try:
            return self.writer.close(check=lambda tmp: _check_written(tmp, expect, self.writer.path))
        except FormatProblem as e:
            raise PackError(f"{self.writer.path}: {e}") from None

    def abort(self) -> None:
        self.writer.abort()


def _check_written(path: Path, expect: int, target: Path) -> None:
    """Open the finished temporary pack as a reader would (header, digest, schema,
    every field against the stored arrays) and check every array's hash and values;
    a failure names the target (which is left as it was)."""
    from .reader import Pack

    try:
        p = Pack(path)
        p.verify()
    except PackError as e:
        msg = str(e).removeprefix(f"{path}: ")
        raise PackError(f"{target}: the written pack fails the reader's checks ({msg}); the target was left as it "
                        "was") from None
    if len(p.tensors) != expect:
        raise PackError(f"{target}: the written pack holds {len(p.tensors)} tensors, expected {expect}")


def read_rows(ckpt: Checkpoint, t) -> np.ndarray:
    """float32 (rows, cols) of one planned tensor: effective shape, transposed if needed
    (the whole tensor; encoders read blocks through ``TensorRows``)."""
    return TensorRows(ckpt, t).read()
