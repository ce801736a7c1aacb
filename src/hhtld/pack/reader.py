"""Read a ``.hhtld`` pack lazily: a tensor or a single row decodes only its parts."""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

import numpy as np

from ..checkpoint.rows import row_blocks
from ..codecs.base import Codec
from ..codecs.registry import codec_by_id
from ..errors import PackError
from ..format import (
    CATEGORIES,
    FLOAT_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FORMAT,
    META_MANIFEST,
    META_VERSION,
    aux_array_name,
    group_array_name,
    part_category,
    tensor_array_name,
)
from ..stfile import FormatProblem, NUMPY_DTYPES, read_array, read_header, read_raw


@dataclass
class _LazyParts:
    """``Parts`` backed by the pack: arrays are loaded (and checksummed) on first use."""

    pack: "Pack"
    params: Mapping[str, Any]
    names: dict[str, str]  # part -> stored array name

    def __getitem__(self, part: str) -> np.ndarray:
        return self.pack.array(self.names[part])

    def __contains__(self, part: str) -> bool:
        return part in self.names


def _safe_relpath(rel) -> bool:
    """A manifest path must stay inside the output folder: relative, no '..'."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        return False
    pp = PurePosixPath(rel)
    return not pp.is_absolute() and ".." not in pp.parts


class Pack:
    """An open ``.hhtld`` pack. Construction validates the header, format,
    version and manifest; array bytes are checked against their checksums the
    first time they are read (``verify()`` checks everything at once)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise PackError(f"{self.path}: no such file or directory")
        if self.path.is_dir():
            raise PackError(f"{self.path}: is a directory, not an hhtld pack")
        try:
            self.header = read_header(self.path)
        except FormatProblem as e:
            msg = str(e)
            if msg.startswith("truncated"):
                raise PackError(f"{self.path}: damaged hhtld pack ({msg})") from None
            raise PackError(f"{self.path}: not an hhtld pack ({msg})") from None
        meta = self.header.metadata
        if meta.get(META_FORMAT) != FORMAT_NAME:
            raise PackError(f"{self.path}: not an hhtld pack (a safetensors file without 'format = {FORMAT_NAME}' metadata)")
        try:
            version = int(meta.get(META_VERSION, ""))
        except ValueError:
            raise PackError(f"{self.path}: damaged hhtld pack (format version {meta.get(META_VERSION)!r} is not a number)") from None
        if version > FORMAT_VERSION:
            raise PackError(
                f"{self.path}: pack format version {version} is newer than this hhtld reads "
                f"(up to {FORMAT_VERSION}); upgrade hhtld"
            )
        try:
            self.manifest: dict = json.loads(meta[META_MANIFEST])
        except (KeyError, json.JSONDecodeError):
            raise PackError(f"{self.path}: damaged hhtld pack (manifest missing or not valid JSON)") from None
        self.version = version
        for key in ("source", "groups", "tensors", "checksums"):
            if not isinstance(self.manifest, dict) or key not in self.manifest:
                raise PackError(f"{self.path}: damaged hhtld pack (manifest lacks '{key}')")
        src = self.manifest["source"]
        paths = list(src.get("files", [])) + list(src.get("aux_files", [])) + [src.get("index")]
        paths += [t.get("file") for t in self.manifest["tensors"].values()]
        for rel in paths:
            if rel is not None and not _safe_relpath(rel):
                raise PackError(f"{self.path}: damaged hhtld pack (unsafe file path {rel!r} in the manifest)")
        checks = self.manifest["checksums"]
        missing = [n for n in checks if n not in self.header.tensors]
        if missing:
            raise PackError(f"{self.path}: damaged hhtld pack (stored array '{missing[0]}' is missing)")
        self._checksums: dict[str, str] = checks
        self._verified: set[str] = set()
        self.tensors: dict[str, dict] = self.manifest["tensors"]
        self.groups: list[dict] = self.manifest["groups"]

    # -- raw arrays ------------------------------------------------------------
    def _check(self, name: str, raw: np.ndarray) -> None:
        if name in self._verified:
            return
        want = self._checksums.get(name)
        if want is None:
            raise PackError(f"{self.path}: damaged hhtld pack (no checksum for '{name}')")
        got = f"{zlib.crc32(memoryview(raw)) & 0xFFFFFFFF:08x}"
        if got != want:
            raise PackError(f"{self.path}: damaged hhtld pack (checksum mismatch in '{name}')")
        self._verified.add(name)

    def array(self, name: str) -> np.ndarray:
        """A stored array by its stored name (memory-mapped, checksum-checked)."""
        entry = self.header.tensors.get(name)
        if entry is None:
            raise PackError(f"{self.path}: no stored array '{name}'")
        raw = read_raw(self.header, entry)
        self._check(name, raw)
        try:
            return read_array(self.header, entry)
        except FormatProblem as e:
            raise PackError(f"{self.path}: {e}") from None

    def verify(self) -> None:
        """Check every stored array against its checksum."""
        for name in self._checksums:
            self._check(name, read_raw(self.header, self.header.tensors[name]))

    # -- tensors ----------------------------------------------------------------
    def names(self) -> list[str]:
        """Every tensor of the original checkpoint, in its order."""
        return list(self.tensors)

    def encoded_names(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t["kind"] == "encoded"]

    def passthrough_names(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t["kind"] == "passthrough"]

    def info(self, name: str) -> dict:
        try:
            return self.tensors[name]
        except KeyError:
            raise PackError(f"{self.path}: no tensor named '{name}' in this pack") from None

    def group_of(self, name: str) -> dict:
        return self.groups[self.info(name)["group"]]

    def codec_of(self, name: str) -> type[Codec]:
        return codec_by_id(self.group_of(name)["codec_id"])

    def group_parts(self, index: int) -> _LazyParts:
        g = self.groups[index]
        return _LazyParts(self, g["params"], {p: group_array_name(index, p) for p in g["parts"]})

    def tensor_parts(self, name: str) -> _LazyParts:
        t = self.info(name)
        return _LazyParts(self, t.get("params", {}), {p: tensor_array_name(name, p) for p in t.get("parts", [])})

    def rows(self, name: str, idx=None) -> np.ndarray:
        """float32 rows (m, cols) of the tensor's row matrix (effective shape,
        rows = output features); only the parts of this tensor are read."""
        t = self.info(name)
        if idx is not None:
            n = (t.get("row_shape") or t["shape"])[0]
            idx = np.asarray(idx)
            if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < -n or idx.max() >= n)):
                raise PackError(f"{self.path}: tensor '{name}' has {n} rows; row index out of range or not an integer")
        return self._rows(name, idx)

    def _rows(self, name: str, sel) -> np.ndarray:
        """Decode rows ``sel`` (None, an index array or a slice) of a tensor."""
        t = self.info(name)
        if t["kind"] == "encoded":
            codec = self.codec_of(name)
            return codec.decode_rows(self.group_parts(t["group"]), self.tensor_parts(name), sel)
        a = self.tensor(name)
        if a.ndim != 2 or t["dtype"] not in FLOAT_DTYPES:
            raise PackError(f"{self.path}: tensor '{name}' is a passthrough {t['dtype']} {list(a.shape)}, not a float matrix")
        a = np.asarray(a, dtype=np.float32)
        return a if sel is None else a[sel]

    def row(self, name: str, i: int) -> np.ndarray:
        """One float32 row (cols,) of a tensor's row matrix."""
        t = self.info(name)
        n = (t.get("row_shape") or t["shape"])[0]
        if not -n <= i < n:
            raise PackError(f"{self.path}: tensor '{name}' has {n} rows; row {i} is out of range")
        return self.rows(name, np.array([i % n]))[0]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as the checkpoint stored it: name, shape and dtype (values decoded).

        Encoded tensors are decoded block by block straight into the output
        array, so memory is the tensor in its own dtype plus one float32 block."""
        t = self.info(name)
        if t["kind"] == "passthrough":
            return self.array(name)
        n_rows, n_cols = t["row_shape"]
        out = np.empty(tuple(t["shape"]), dtype=NUMPY_DTYPES[t["dtype"]])
        # the row matrix as a view of ``out``: (rows, cols), or the stored (cols, rows) turned
        view = out.reshape(n_cols, n_rows).T if t.get("transposed") else out.reshape(n_rows, n_cols)
        for s, e in row_blocks(n_rows, n_cols):
            view[s:e] = self._rows(name, slice(s, e))
        return out

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tensors:
            yield name, self.tensor(name)

    # -- side files -------------------------------------------------------------
    def aux_files(self) -> list[str]:
        return list(self.manifest["source"].get("aux_files", []))

    def aux_bytes(self, rel: str) -> bytes:
        return bytes(self.array(aux_array_name(rel)))

    # -- accounting -------------------------------------------------------------
    def byte_breakdown(self) -> dict[str, Any]:
        """Bytes of the pack by category, in total and per group; they add up
        to the file size (the manifest category includes the whole header)."""
        total = {c: 0 for c in CATEGORIES}
        per_group = [{c: 0 for c in CATEGORIES} for _ in self.groups]
        total["manifest"] = self.header.data_start
        owner = {}
        for gi, g in enumerate(self.groups):
            for p in g["parts"]:
                owner[group_array_name(gi, p)] = (gi, part_category(p))
            for n in g["tensors"]:
                for p in self.tensors[n].get("parts", []):
                    owner[tensor_array_name(n, p)] = (gi, part_category(p))
        for name, e in self.header.tensors.items():
            if name in owner:
                gi, cat = owner[name]
                total[cat] += e.nbytes
                per_group[gi][cat] += e.nbytes
            elif name in self.tensors:
                total["passthrough"] += e.nbytes
            else:
                total["aux_files"] += e.nbytes
        return {"file_bytes": self.header.file_size, "total": total, "groups": per_group}

    @property
    def source_bf16_bytes(self) -> int:
        return int(self.manifest["source"]["bf16_bytes"])

    def storage_ratio(self) -> float:
        """Original tensors at bfloat16 against the pack without the side files
        (config/tokenizer files are carried verbatim and are not weights)."""
        b = self.byte_breakdown()
        return self.source_bf16_bytes / max(1, b["file_bytes"] - b["total"]["aux_files"])


def open_pack(path: str | os.PathLike) -> Pack:
    return Pack(path)
