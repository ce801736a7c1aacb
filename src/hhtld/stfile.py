"""Low-level safetensors file access shared by checkpoint reading and the pack.

The ``safetensors`` library loads whole tensors into framework arrays and
writes from one in-memory dict. hhtld needs two things it does not offer:
the raw byte range of a tensor (passthrough is byte for byte, also for
dtypes numpy lacks such as F8) and a writer that streams group by group.
The file format itself is tiny (8-byte header length, JSON header, data), so
this module reads and writes exactly that, strictly validated; tests check
that files written here open with ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np

from .format import DTYPE_BYTES
from .outputs import check_output_file, make_public

HEADER_LEN_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library applies
ALIGN = 8

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F64": np.dtype("<f8"),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}
_NAME_OF = {v: k for k, v in NUMPY_DTYPES.items()}


def as_bytes(arr: np.ndarray) -> np.ndarray:
    """The bytes of a contiguous array as a flat uint8 view (works for bfloat16 too)."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


class FormatProblem(Exception):
    """Raised by this module; callers wrap it into their own HhtldError with the path."""


def st_dtype_name(dtype: np.dtype) -> str:
    try:
        return _NAME_OF[np.dtype(dtype)]
    except KeyError:
        raise FormatProblem(f"numpy dtype {dtype} has no safetensors name") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]  # in file order
    data_start: int
    file_size: int


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a safetensors file.

    Raises FormatProblem with a one-line reason for anything that is not a
    complete, well-formed safetensors file (too short, header out of range,
    bad JSON, unknown dtype, byte ranges that do not match shapes, truncated
    data).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_LEN_BYTES)
        if len(head) < HEADER_LEN_BYTES:
            raise FormatProblem(f"not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES:
            raise FormatProblem("not a safetensors file (header length out of range)")
        if HEADER_LEN_BYTES + n > size:
            raise FormatProblem(
                f"truncated: header needs {HEADER_LEN_BYTES + n} bytes, file has {size}"
            )
        raw = f.read(n)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatProblem("not a safetensors file (header is not JSON)") from None
    if not isinstance(obj, dict):
        raise FormatProblem("not a safetensors file (header is not a JSON object)")
    data_start = HEADER_LEN_BYTES + n
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatProblem("__metadata__ must map strings to strings")
    entries: list[TensorEntry] = []
    for name, info in obj.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise FormatProblem(f"tensor '{name}': malformed header entry")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise FormatProblem(f"tensor '{name}': unknown dtype '{dtype}'")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
        ):
            raise FormatProblem(f"tensor '{name}': malformed shape or data_offsets")
        b, e = offs
        numel = 1
        for d in shape:
            numel *= d
        if e < b or e - b != numel * DTYPE_BYTES[dtype] and dtype not in ("F4", "F6_E2M3", "F6_E3M2"):
            raise FormatProblem(
                f"tensor '{name}': data_offsets {offs} do not match {dtype} shape {shape}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + b, data_start + e))
    entries.sort(key=lambda t: (t.start, t.end))
    expected = data_start
    for t in entries:
        if t.start != expected:
            raise FormatProblem(f"tensor '{t.name}': data_offsets overlap or leave a hole")
        expected = t.end
    if expected > size:
        raise FormatProblem(f"truncated: data needs {expected} bytes, file has {size}")
    if expected < size:
        raise FormatProblem(f"{size - expected} trailing bytes after the last tensor")
    return Header(path, dict(metadata), {t.name: t for t in entries}, data_start, size)


def read_raw(header: Header, entry: TensorEntry) -> np.ndarray:
    """The raw bytes of one tensor, memory-mapped (uint8, read-only)."""
    if entry.nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(header.path, dtype=np.uint8, mode="r", offset=entry.start, shape=(entry.nbytes,))


def read_array(header: Header, entry: TensorEntry) -> np.ndarray:
    """One tensor as a read-only, memory-mapped numpy array of its own dtype and shape."""
    dt = NUMPY_DTYPES.get(entry.dtype)
    if dt is None:
        raise FormatProblem(f"tensor '{entry.name}': dtype {entry.dtype} has no numpy equivalent")
    raw = read_raw(header, entry)
    return raw.view(dt).reshape(entry.shape)


class SafetensorsWriter:
    """Streams tensors into a safetensors file, atomically.

    Tensors are appended one at a time to a spill file next to the target;
    ``close()`` writes the header, copies the data after it and renames the
    temporary file over the target. Until then the target is untouched; on
    error (or ``abort()``) nothing is left behind. Header keys are written in
    the order tensors were added, so the same calls give the same bytes.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = check_output_file(path)
        self.metadata = dict(metadata or {})
        self._dir = self.path.parent if str(self.path.parent) else Path(".")
        self._dir.mkdir(parents=True, exist_ok=True)
        fd, spill = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data", dir=self._dir)
        self._spill_path = Path(spill)
        self._spill: BinaryIO | None = os.fdopen(fd, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> int:
        """Append one numpy array; returns the bytes written."""
        arr = np.ascontiguousarray(array)
        return self.add_raw(name, st_dtype_name(arr.dtype), arr.shape, as_bytes(arr))

    def add_raw(self, name: str, dtype: str, shape, data) -> int:
        """Append raw bytes under a safetensors dtype name (passthrough of any dtype)."""
        if self._spill is None:
            raise FormatProblem("writer is closed")
        if name in self._entries:
            raise FormatProblem(f"tensor '{name}' added twice")
        if name == "__metadata__":
            raise FormatProblem("'__metadata__' is not a valid tensor name")
        mv = memoryview(data if isinstance(data, bytes) else as_bytes(np.asarray(data)))
        n = mv.nbytes
        self._spill.write(mv)
        self._entries[name] = {
            "dtype": dtype,
            "shape": [int(d) for d in shape],
            "data_offsets": [self._offset, self._offset + n],
        }
        self._offset += n
        return n

    @property
    def data_bytes(self) -> int:
        return self._offset

    def mark(self) -> tuple[int, int]:
        """A point to :meth:`rollback` to: (data bytes, tensors) written so far."""
        return self._offset, len(self._entries)

    def rollback(self, mark: tuple[int, int]) -> None:
        """Forget every tensor added after ``mark`` (their bytes are cut from the spill)."""
        if self._spill is None:
            raise FormatProblem("writer is closed")
        offset, n = mark
        for name in list(self._entries)[n:]:
            del self._entries[name]
        self._spill.flush()
        self._spill.truncate(offset)
        self._spill.seek(offset)
        self._offset = offset

    def header_bytes(self) -> bytes:
        obj: dict = {}
        if self.metadata:
            obj["__metadata__"] = self.metadata
        obj.update(self._entries)
        raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        pad = (-(len(raw) + HEADER_LEN_BYTES)) % ALIGN
        return raw + b" " * pad

    def close(self, check=None) -> Path:
        """Write header + data to a temporary file and rename it over the target.

        ``check(path)``, when given, is called on the complete temporary file
        before the rename; if it raises, the target stays untouched."""
        if self._spill is None:
            raise FormatProblem("writer is closed")
        self._spill.close()
        self._spill = None
        header = self.header_bytes()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self._dir)
        try:
            with os.fdopen(fd, "wb") as out, open(self._spill_path, "rb") as data:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                shutil.copyfileobj(data, out, 16 * 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            self._spill_path.unlink(missing_ok=True)
            if check is not None:
                check(Path(tmp))
            make_public(tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._spill_path.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self._spill_path.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
