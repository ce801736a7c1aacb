"""Open a safetensors checkpoint and read its tensors one at a time.

Three layouts are accepted:

* a single ``.safetensors`` file;
* a sharded checkpoint: ``*.safetensors.index.json`` (``weight_map``) + shards;
* a Hugging Face model folder holding either of the above, whose other small
  files (config, tokenizer, sentence-transformers modules) travel along.

Tensors are memory-mapped: reading one never loads the others. Float
tensors (F32, F16, BF16) are given back as float32 rows of their effective
2-D shape; every other dtype is only ever copied byte for byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..format import FLOAT_DTYPES
from ..names import path_problem
from ..stfile import FormatProblem, Header, TensorEntry, read_array, read_header, read_raw

# Side files of a model folder that travel in the pack: what transformers and
# sentence-transformers read (configs, tokenizers, custom code, model card).
# Anything else (other weights, packs, archives, stray files) stays behind.
AUX_SUFFIXES = (".json", ".txt", ".model", ".py", ".md", ".tiktoken", ".jinja", ".vocab", ".merges", ".spm",
                ".yaml", ".yml")
MAX_AUX_FILE_BYTES = 64 * 1024 * 1024  # side files larger than this are not carried along


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is: file (relative to the root), dtype, shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass
class Checkpoint:
    """A readable checkpoint. ``kind`` is ``file``, ``sharded`` or ``folder``."""

    path: Path  # what the user named
    root: Path  # the folder holding the weight files
    kind: str
    files: list[str]  # weight files, relative to root, in order
    index_name: str | None
    index_metadata: dict
    file_metadata: dict[str, dict[str, str]]
    tensors: dict[str, TensorInfo]  # in checkpoint order (file, then header order)
    aux_files: list[str] = field(default_factory=list)  # folder only: relative paths
    _headers: dict[str, Header] = field(default_factory=dict, repr=False)

    # -- reading ---------------------------------------------------------
    def _entry(self, name: str) -> tuple[Header, TensorEntry]:
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'") from None
        header = self._headers[info.file]
        return header, header.tensors[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor in its own dtype and shape, memory-mapped (read-only)."""
        header, entry = self._entry(name)
        try:
            return read_array(header, entry)
        except FormatProblem as e:
            raise CheckpointError(f"{header.path}: {e}") from None

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (uint8, memory-mapped), for passthrough."""
        header, entry = self._entry(name)
        return read_raw(header, entry)

    def read_float(self, name: str) -> np.ndarray:
        """A float tensor converted to float32, original shape (a new array)."""
        info = self.tensors.get(name)
        if info is not None and not info.is_float:
            raise CheckpointError(
                f"{self.root / info.file}: tensor '{name}': dtype {info.dtype} is not a float "
                f"dtype ({', '.join(FLOAT_DTYPES)}) and cannot be encoded"
            )
        return np.array(self.read(name), dtype=np.float32)  # a copy, never the memory map

    def weight_path(self, file: str) -> Path:
        return self.root / file

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def aux_path(self, rel: str) -> Path:
        return self.root / rel


def _read_header(path: Path) -> Header:
    try:
        return read_header(path)
    except FormatProblem as e:
        raise CheckpointError(f"{path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def _find_weights(folder: Path) -> Path:
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    singles = sorted(folder.glob("*.safetensors"))
    if len(indexes) == 0 and len(singles) == 1:
        return singles[0]
    if not indexes and not singles:
        raise CheckpointError(f"{folder}: no .safetensors weights in this folder")
    found = ", ".join(p.name for p in (indexes or singles))
    raise CheckpointError(f"{folder}: several candidate weight files ({found}); name one of them")


def _aux_files(folder: Path, weight_files: set[str]) -> list[str]:
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel in weight_files or any(part.startswith(".") for part in Path(rel).parts):
            continue
        if p.name.endswith(".safetensors.index.json") or p.suffix.lower() not in AUX_SUFFIXES:
            continue
        if p.stat().st_size > MAX_AUX_FILE_BYTES:
            continue
        out.append(rel)
    return out


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a ``.safetensors`` file, a ``*.safetensors.index.json`` or a model folder.

    Every header is parsed and validated up front (truncation, bad offsets,
    unknown dtypes), so a broken checkpoint fails before any work is done.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    kind = "file"
    target = path
    if path.is_dir():
        target = _find_weights(path)
        kind = "folder"
    root = target.parent

    if target.name.endswith(".index.json"):
        try:
            index = json.loads(target.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{target}: not a valid safetensors index (bad JSON: {e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{target}: not a valid safetensors index (no 'weight_map')")
        for name, f in weight_map.items():
            bad = path_problem(f)
            if bad:
                raise CheckpointError(f"{target}: tensor '{name}' is mapped to the shard {f!r}, which {bad}; "
                                      "an index names shards inside its own folder")
        files = list(dict.fromkeys(weight_map.values()))
        if kind == "file":
            kind = "sharded"
        index_name = target.name
        index_metadata = index.get("metadata") or {}
    else:
        weight_map = None
        files = [target.name]
        index_name = None
        index_metadata = {}

    headers: dict[str, Header] = {}
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        fp = root / f
        if not fp.is_file():
            raise CheckpointError(f"{fp}: shard listed in {index_name} is missing")
        h = _read_header(fp)
        headers[f] = h
        for name, e in h.tensors.items():
            if weight_map is not None and weight_map.get(name) != f:
                if name not in weight_map:
                    raise CheckpointError(f"{fp}: tensor '{name}' is not listed in {index_name}")
                continue  # listed under another shard; that shard's copy counts
            if name in tensors:
                raise CheckpointError(f"{fp}: tensor '{name}' appears in two shards")
            tensors[name] = TensorInfo(name, f, e.dtype, e.shape, e.nbytes)
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{root / f}: tensor '{name}' listed in {index_name} is missing")
    # checkpoint order: file order, then header order within a file
    ordered = {}
    for f in files:
        for name in headers[f].tensors:
            if name in tensors and tensors[name].file == f:
                ordered[name] = tensors[name]
    aux = _aux_files(root, set(files) | ({index_name} if index_name else set())) if kind == "folder" else []
    return Checkpoint(
        path=path,
        root=root,
        kind=kind,
        files=files,
        index_name=index_name,
        index_metadata=index_metadata,
        file_metadata={f: headers[f].metadata for f in files},
        tensors=ordered,
        aux_files=aux,
        _headers=headers,
    )
