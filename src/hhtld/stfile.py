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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from .format import DTYPE_BITS, MAX_JSON_DEPTH, MAX_JSON_INT, MAX_JSON_NUMBER_CHARS
from .outputs import check_output_file, make_public, make_temp_file, publish, remove_temp, sweep_stale

HEADER_LEN_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the cap of safetensors/src/tensor.rs
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


# --- untrusted JSON ---------------------------------------------------------------------------
_BRACKET = np.zeros(256, np.int8)
_BRACKET[[ord("["), ord("{")]] = 1
_BRACKET[[ord("]"), ord("}")]] = -1
_NUMBER_CHAR = np.zeros(256, bool)
_NUMBER_CHAR[list(b"0123456789+-.eE")] = True
_SCAN_CHUNK = 1 << 22


def check_json_limits(raw: bytes, what: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH or with a number literal longer
    than MAX_JSON_NUMBER_CHARS, before any parser sees it (parsers recurse per level
    and convert long integers in quadratic time). One linear pass in chunks:
    brackets and digits inside strings do not count (a quote preceded by an odd
    run of backslashes is escaped)."""
    data = np.frombuffer(raw, np.uint8)
    parity = 0  # 1 while inside a string
    bs_run = 0  # backslashes right before the chunk
    depth = 0
    num_run = 0  # number characters right before the chunk
    for off in range(0, data.size, _SCAN_CHUNK):
        a = data[off:off + _SCAN_CHUNK]
        m = a.size
        idx = np.arange(m, dtype=np.int64)
        bs = a == 92
        last = np.maximum.accumulate(np.where(bs, -1 - bs_run, idx))  # last non-backslash at or before i
        before = np.empty(m, np.int64)  # backslashes right before i
        before[0] = bs_run
        before[1:] = idx[:-1] - last[:-1]
        quote = (a == 34) & (before % 2 == 0)
        inside = (parity + np.cumsum(quote)) % 2 == 1
        outside = ~inside & ~quote
        d = depth + np.cumsum(np.where(outside, _BRACKET[a], 0))
        if int(d.max()) > MAX_JSON_DEPTH:
            raise FormatProblem(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
        num = (outside & _NUMBER_CHAR[a]).astype(np.int8)
        edges = np.diff(np.concatenate(([0], num, [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        runs = ends - starts
        if runs.size and starts[0] == 0:
            runs[0] += num_run
        if runs.size and int(runs.max()) > MAX_JSON_NUMBER_CHARS or (not runs.size and num_run > MAX_JSON_NUMBER_CHARS):
            raise FormatProblem(f"{what} has a number longer than {MAX_JSON_NUMBER_CHARS} characters")
        num_run = int(runs[-1]) if runs.size and ends[-1] == m else 0
        parity = int(inside[-1])
        bs_run = int(m - 1 - last[-1])
        depth = int(d[-1])


def _no_surrogates(s: str, what: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatProblem(f"{what} holds the string {s[:40]!r}, which is not valid Unicode (a lone surrogate)") from None
    return s


def _check_strings(v: Any, what: str) -> None:
    if isinstance(v, str):
        _no_surrogates(v, what)
    elif isinstance(v, list):
        for x in v:
            _check_strings(x, what)


def parse_json(raw: bytes | str, what: str) -> Any:
    """Parse untrusted JSON strictly: limits checked first (:func:`check_json_limits`),
    UTF-8 only, no duplicate keys, no lone surrogates, integers within ±MAX_JSON_INT.
    Raises FormatProblem naming ``what``."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    check_json_limits(data, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatProblem(f"{what} is not UTF-8") from None

    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise FormatProblem(f"{what} has the key {k[:80]!r} twice")
            _no_surrogates(k, what)
            _check_strings(v, what)
            out[k] = v
        return out

    def integer(s: str) -> int:
        v = int(s)
        if not -MAX_JSON_INT <= v <= MAX_JSON_INT:
            raise FormatProblem(f"{what} has the integer {s}, outside ±2**53")
        return v

    try:
        obj = json.loads(text, object_pairs_hook=pairs, parse_int=integer)
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise FormatProblem(f"{what} is not valid JSON") from None
    _check_strings(obj, what)
    return obj


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
        obj = parse_json(raw, "the header")
    except FormatProblem as e:
        raise FormatProblem(f"not a safetensors file ({e})") from None
    if not isinstance(obj, dict):
        raise FormatProblem("not a safetensors file (header is not a JSON object)")
    data_start = HEADER_LEN_BYTES + n
    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatProblem("__metadata__ must map strings to strings")
    entries: list[TensorEntry] = []
    for name, info in obj.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatProblem(f"tensor '{name}': malformed header entry (it needs exactly dtype, shape, data_offsets)")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise FormatProblem(f"tensor '{name}': unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or not all(_is_count(d) for d in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(_is_count(o) for o in offs)
        ):
            raise FormatProblem(f"tensor '{name}': malformed shape or data_offsets")
        b, e = offs
        bits = DTYPE_BITS[dtype]
        for d in shape:
            bits *= d
        if e < b or bits % 8 or e - b != bits // 8:
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


def _is_count(v) -> bool:
    """A JSON integer >= 0 (not a boolean)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


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
    Temporary files follow :mod:`hhtld.outputs` (recognisable names, removed
    on any error; leftovers of killed runs are swept when a writer starts).
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = check_output_file(path)
        self.metadata = dict(metadata or {})
        self._dir = self.path.parent if str(self.path.parent) else Path(".")
        self._dir.mkdir(parents=True, exist_ok=True)
        sweep_stale(self._dir)
        fd, self._spill_path = make_temp_file(self.path, ".data")
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
        if not isinstance(name, str):
            raise FormatProblem(f"tensor name {name!r} is not a string")
        _no_surrogates(name, "a tensor name")
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

    def add_region(self, name: str, dtype: str, shape, nbytes: int):
        """Declare a tensor of ``nbytes`` bytes and return ``write_at(offset, data)``,
        which puts bytes at ``offset`` inside it, in any order (a tensor written
        block by block, never held whole; bytes not written stay zero). Nothing
        may be added after it until its bytes are written."""
        if self._spill is None:
            raise FormatProblem("writer is closed")
        if not isinstance(name, str):
            raise FormatProblem(f"tensor name {name!r} is not a string")
        _no_surrogates(name, "a tensor name")
        if name in self._entries or name == "__metadata__":
            raise FormatProblem(f"tensor '{name}' added twice or not a valid name")
        self._spill.flush()
        base = self._offset
        self._entries[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [base, base + nbytes]}
        self._offset += nbytes
        self._spill.truncate(self._offset)
        self._spill.seek(self._offset)
        fd = self._spill.fileno()

        def write_at(offset: int, data) -> None:
            mv = memoryview(data).cast("B")
            if offset < 0 or offset + mv.nbytes > nbytes:
                raise FormatProblem(f"tensor '{name}': bytes {offset}..{offset + mv.nbytes} outside its {nbytes}")
            while mv.nbytes:
                n = os.pwrite(fd, mv, base + offset)
                mv, offset = mv[n:], offset + n

        return write_at

    @property
    def data_bytes(self) -> int:
        return self._offset

    @property
    def entries(self) -> dict[str, dict]:
        """The header entries written so far (name → dtype, shape, data_offsets), in order."""
        return self._entries

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
        try:
            raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise FormatProblem("the header holds a string that is not valid Unicode (a lone surrogate)") from None
        pad = (-(len(raw) + HEADER_LEN_BYTES)) % ALIGN
        return raw + b" " * pad

    def close(self, check=None, overwrite: bool = True) -> Path:
        """Write header + data to a temporary file and rename it over the target.

        ``check(path)``, when given, is called on the complete temporary file
        before the rename; if it raises, the target stays untouched.
        ``overwrite=False``: fail (OptionsError) rather than replace a target
        that exists by then, e.g. one another process wrote meanwhile."""
        if self._spill is None:
            raise FormatProblem("writer is closed")
        self._spill.close()
        self._spill = None
        tmp = None
        try:
            header = self.header_bytes()
            fd, tmp = make_temp_file(self.path, ".tmp")
            with os.fdopen(fd, "wb") as out, open(self._spill_path, "rb") as data:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                shutil.copyfileobj(data, out, 16 * 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            remove_temp(self._spill_path)
            if check is not None:
                check(tmp)
            make_public(tmp)
            publish(tmp, self.path, overwrite)
        finally:
            if tmp is not None:
                remove_temp(tmp)
            remove_temp(self._spill_path)
        return self.path

    def abort(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        remove_temp(self._spill_path)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
