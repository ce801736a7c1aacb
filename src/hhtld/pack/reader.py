"""Read a ``.hhtld`` pack lazily: a tensor or a single row decodes only its parts.

Opening a pack checks, before anything is decoded: the safetensors header
(strictly, JSON limits first), the format name and version (an explicit
set), for version 2 the manifest digest, the manifest schema, and every
field against the arrays actually stored (``pack/validate.py``). Each
array's hash and value checks run the first time it is read (``verify()``
runs them all). Every failure is one :class:`PackError` naming the file and
the field.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..checkpoint.rows import block_rows, row_blocks
from ..codecs.base import Codec, ordered_map
from ..codecs.parallel import available_cpus
from ..errors import HhtldNote, PackError
from ..format import (
    CATEGORIES,
    FLOAT_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_VERSION_CHARS,
    META_DIGEST,
    META_FORMAT,
    META_KEYS,
    META_MANIFEST,
    META_VERSION,
    READABLE_VERSIONS,
    aux_array_name,
    group_array_name,
    part_category,
    tensor_array_name,
)
from ..memory import format_bytes, memory_room, parse_size, threads_that_fit
from ..stfile import FormatProblem, NUMPY_DTYPES, read_header, read_raw
from .manifest import ManifestProblem, manifest_digest, parse_manifest
from .validate import check_pack

# what a 16-bit float output can hold: decoded values just past it are clamped, not turned into inf
_FINITE_MAX = {"F16": float(np.finfo(np.float16).max)}
# float32 copies of a block that decoding it holds at its peak (the block and the codec's temporaries;
# measured with tracemalloc: at most 4.0 for every codec), for the memory a decode asks for beforehand
DECODE_WORK = 5
_TOO_BIG = ("decode it to disk with `hhtld decode` (it writes block by block), read it in row blocks with "
            "Pack.rows(name, idx), or raise the limit (--memory-limit, HHTLD_MEMORY_LIMIT) where the memory is there")


@dataclass
class _LazyParts:
    """``Parts`` backed by the pack: arrays are loaded (and checked) on first use."""

    pack: "Pack"
    params: Mapping[str, Any]
    names: dict[str, str]  # part -> stored array name

    def __getitem__(self, part: str) -> np.ndarray:
        return self.pack.array(self.names[part])

    def __contains__(self, part: str) -> bool:
        return part in self.names


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def decode_threads() -> int:
    """Threads that decode the blocks of a whole tensor: the usable cores, or
    ``HHTLD_DECODE_THREADS`` (1: decode on the calling thread only)."""
    env = os.environ.get("HHTLD_DECODE_THREADS", "")
    return max(1, int(env)) if env.isdigit() else available_cpus()


def _forget_pool_in_child() -> None:
    """A forked child has none of the parent's threads: it makes its own pool."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


class _DecodePool(ThreadPoolExecutor):
    """A thread pool whose threads are all started when it is made, so that no
    thread has to start in the middle of a decode (where memory may be short)."""

    def __init__(self, width: int):
        super().__init__(max_workers=width, thread_name_prefix="hhtld-decode")
        self.width = width
        barrier = threading.Barrier(width + 1)
        try:
            for _ in range(width):  # each task waits for all the others: every thread is running
                self.submit(barrier.wait, 30)
            barrier.wait(30)
        except (RuntimeError, MemoryError, threading.BrokenBarrierError):
            barrier.abort()  # the threads that did start finish their task at once, and are joined
            self.shutdown(wait=True)
            raise


def _decode_pool(keep: int = 0, per_thread: int = 0) -> ThreadPoolExecutor | None:
    """One pool for every pack of the process (numpy's gathers and BLAS release the
    GIL); None when decoding stays on the calling thread: one thread asked for,
    no room in the address space for more (``keep`` bytes of output, ``per_thread``
    bytes of work a thread: :func:`hhtld.memory.threads_that_fit`), or threads that
    cannot start (a note says so)."""
    global _POOL
    n = threads_that_fit(decode_threads(), keep, per_thread)
    if n == 1:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL.width != n:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
                _POOL = None
            try:
                _POOL = _DecodePool(n)
            except (RuntimeError, MemoryError, threading.BrokenBarrierError) as e:
                warnings.warn(HhtldNote(f"cannot start {n} decode threads ({type(e).__name__}: {e}); "
                                        "decoding on one thread"), stacklevel=3)
                return None
        return _POOL


class Pack:
    """An open ``.hhtld`` pack. Construction validates the header, format,
    version, digest (version 2) and manifest; array bytes are checked against
    their hashes, and their values against their codec's declaration, the
    first time they are read (``verify()`` checks everything at once)."""

    def __init__(self, path: str | os.PathLike, memory_limit: int | str | None = None):
        self.path = Path(path)
        # bytes one decode call may allocate (None: what the process may really use, hhtld.memory)
        self.memory_limit = None if memory_limit is None else parse_size(memory_limit)
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
        except OSError as e:
            raise PackError(f"{self.path}: cannot read: {e.strerror or e}") from None
        meta = self.header.metadata
        if meta.get(META_FORMAT) != FORMAT_NAME:
            raise PackError(f"{self.path}: not an hhtld pack (a safetensors file without 'format = {FORMAT_NAME}' metadata)")
        raw_version = meta.get(META_VERSION, "")
        if not re.fullmatch(r"0|[1-9][0-9]{0,%d}" % (MAX_VERSION_CHARS - 1), raw_version):
            raise self._damaged(f"format version {raw_version[:20]!r} is not a number")
        version = int(raw_version)
        if version not in READABLE_VERSIONS:
            if version > max(READABLE_VERSIONS):
                raise PackError(
                    f"{self.path}: pack format version {version} is newer than this hhtld reads "
                    f"(up to {FORMAT_VERSION}); upgrade hhtld"
                )
            raise self._damaged(f"format version {version} does not exist (versions: "
                                f"{', '.join(map(str, sorted(READABLE_VERSIONS)))})")
        self.version = version
        unknown = sorted(set(meta) - set(META_KEYS[version]))
        if unknown:
            raise self._damaged(f"unexpected metadata key {unknown[0][:80]!r} for format version {version}")
        text = meta.get(META_MANIFEST)
        if text is None:
            raise self._damaged("manifest missing")
        if version >= 2 and meta.get(META_DIGEST) != manifest_digest(text):
            raise self._damaged("the manifest does not match its digest: the manifest or the pack header was changed")
        try:
            self.manifest, self.model = parse_manifest(text, version)
            self._checked = check_pack(self.header, self.model, version)
        except ManifestProblem as e:
            raise self._damaged(str(e)) from None
        self._verified: set[str] = set()
        self.tensors: dict[str, dict] = self.manifest["tensors"]
        self.groups: list[dict] = self.manifest["groups"]
        if version < FORMAT_VERSION:
            warnings.warn(HhtldNote(
                f"{self.path}: pack format version {version}: only each array's CRC32 guards it (no digest over the "
                f"manifest and header); encode it again for version {FORMAT_VERSION}'s integrity checks"), stacklevel=2)

    @contextmanager
    def limited(self, memory_limit: int | str | None):
        """Within the block, decodes of this pack may allocate ``memory_limit`` bytes
        (None: leave the pack's own limit as it is)."""
        if memory_limit is None:
            yield self
            return
        saved, self.memory_limit = self.memory_limit, parse_size(memory_limit)
        try:
            yield self
        finally:
            self.memory_limit = saved

    def _damaged(self, what: str) -> PackError:
        return PackError(f"{self.path}: damaged hhtld pack ({what})")

    # -- raw arrays ------------------------------------------------------------
    def _check(self, name: str, raw: np.ndarray) -> None:
        if name in self._verified:
            return
        algo, want = self._checked.hashes[name]
        if algo == "sha256":
            got = hashlib.sha256(memoryview(raw)).hexdigest()
        else:
            got = f"{zlib.crc32(memoryview(raw)) & 0xFFFFFFFF:08x}"
        if got != want:
            raise self._damaged(f"checksum mismatch in '{name}'")

    def raw(self, name: str) -> np.ndarray:
        """A stored array's bytes (uint8, memory-mapped, read-only), hash-checked the
        first time: passthrough tensors of any dtype, numpy's or not, byte for byte."""
        entry = self.header.tensors.get(name)
        if entry is None:
            raise PackError(f"{self.path}: no stored array '{name}'")
        try:
            raw = read_raw(self.header, entry)
        except (OSError, ValueError) as e:
            raise PackError(f"{self.path}: cannot read stored array '{name}': {e}") from None
        if name not in self._verified:
            self._check(name, raw)
            if self._checked.specs.get(name) is None:  # nothing more to check: passthrough tensors, side files
                self._verified.add(name)
        return raw

    def array(self, name: str) -> np.ndarray:
        """A stored array by its stored name (memory-mapped, read-only; its hash and
        values are checked the first time it is read)."""
        first = name not in self._verified
        raw = self.raw(name)
        entry = self.header.tensors[name]
        dt = NUMPY_DTYPES.get(entry.dtype)
        if dt is None:
            raise PackError(f"{self.path}: stored array '{name}': dtype {entry.dtype} has no numpy equivalent")
        arr = raw.view(dt).reshape(entry.shape)
        if first:
            spec = self._checked.specs.get(name)
            if spec is not None and spec.values is not None:
                bad = spec.values(arr)
                if bad:
                    raise self._damaged(f"stored array '{name}' {bad}")
            self._verified.add(name)
        return arr

    def verify(self) -> int:
        """Check every stored array, read by a decode or not (Fisher-z tables, routes,
        radii, ...): its hash and, for codec parts, its values. Returns the number of
        arrays checked; raises one PackError naming every array that fails."""
        bad = []
        for name in self.header.tensors:
            try:
                if self._checked.specs.get(name) is None:  # passthrough tensors and side files: bytes only
                    self.raw(name)
                else:
                    self.array(name)
            except PackError as e:
                bad.append(str(e).removeprefix(f"{self.path}: "))
        if len(bad) == 1:
            raise PackError(f"{self.path}: {bad[0]}")
        if bad:
            raise PackError(f"{self.path}: {len(bad)} stored arrays fail their checks: " + "; ".join(bad))
        return len(self.header.tensors)

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
        return self._checked.codecs[self.info(name)["group"]]

    def group_parts(self, index: int) -> _LazyParts:
        g = self.groups[index]
        return _LazyParts(self, g["params"], {p: group_array_name(index, p) for p in g["parts"]})

    def tensor_parts(self, name: str) -> _LazyParts:
        t = self.info(name)
        return _LazyParts(self, t.get("params", {}), {p: tensor_array_name(name, p) for p in t.get("parts", [])})

    def _row_count(self, name: str) -> int:
        t = self.info(name)
        if t["kind"] == "encoded":
            return t["row_shape"][0]
        if len(t["shape"]) != 2 or t["dtype"] not in FLOAT_DTYPES:
            raise PackError(f"{self.path}: tensor '{name}' is a passthrough {t['dtype']} {t['shape']}, not a float matrix")
        return t["shape"][0]

    def rows(self, name: str, idx=None) -> np.ndarray:
        """float32 rows (m, cols) of the tensor's row matrix (effective shape,
        rows = output features); only the parts of this tensor are read."""
        n = self._row_count(name)
        if idx is not None:
            idx = np.asarray(idx)
            if idx.dtype.kind not in "iu" or (idx.size and (idx.min() < -n or idx.max() >= n)):
                raise PackError(f"{self.path}: tensor '{name}' has {n} rows; row index out of range or not an integer")
        return self._rows(name, idx)

    # -- memory ---------------------------------------------------------------
    def _work_bytes(self, name: str, rows: int, pool: ThreadPoolExecutor | None) -> int:
        """What decoding ``rows`` rows of a tensor block by block holds at once besides
        its output: the blocks in flight, each with its temporaries."""
        in_flight = 2 * pool.width if pool is not None else 1
        return in_flight * self._block_work(name, rows)

    def _block_work(self, name: str, rows: int | None = None) -> int:
        """Bytes one block (or ``rows`` rows, if fewer) holds while it is decoded."""
        n_cols = self._shape2(name)[1]
        step = block_rows(n_cols)
        return (step if rows is None else min(rows, step)) * n_cols * 4 * DECODE_WORK

    def _pool_for(self, name: str, n_blocks: int, keep: int) -> ThreadPoolExecutor | None:
        """The decode pool for a tensor of ``n_blocks`` blocks whose output takes ``keep`` bytes."""
        if n_blocks <= 1:
            return None
        block = self._block_work(name)
        return _decode_pool(keep + block, 2 * block)

    def _shape2(self, name: str) -> tuple[int, int]:
        t = self.info(name)
        if t["kind"] == "encoded":
            return tuple(t["row_shape"])
        shape = t["shape"]
        return (shape[0], int(np.prod(shape[1:], dtype=np.int64))) if len(shape) > 1 else (1, int(np.prod(shape)))

    def reserve(self, name: str, need: int, call: str) -> None:
        """Refuse, before allocating, a decode of tensor ``name`` that needs ``need``
        bytes when this process may not take them (:mod:`hhtld.memory`): one
        PackError naming the file, tensor, declared shape, bytes, limit and remedy."""
        room = memory_room(self.memory_limit)
        if not room.fits(need):
            t = self.info(name)
            raise PackError(f"{self.path}: tensor '{name}' declares shape {list(t['shape'])} ({t['dtype']}): {call} "
                            f"needs {format_bytes(need)}, more than the {room.describe()} this process may use; "
                            f"{_TOO_BIG}")

    def _out_of_memory(self, name: str, call: str, e: BaseException) -> PackError:
        return PackError(f"{self.path}: tensor '{name}': out of memory during {call} ({type(e).__name__}: {e}); "
                         f"{_TOO_BIG}")

    def _rows(self, name: str, sel) -> np.ndarray:
        """Decode rows ``sel`` (None, an index array or a slice) of a tensor; every
        row of a large tensor block by block on the decode threads. The memory it
        needs is reserved first (:meth:`reserve`)."""
        t = self.info(name)
        n_rows, n_cols = self._shape2(name)
        m = n_rows if sel is None else (len(range(n_rows)[sel]) if isinstance(sel, slice) else len(sel))
        try:
            if t["kind"] == "encoded" and sel is None:
                blocks = row_blocks(n_rows, n_cols)
                pool = self._pool_for(name, len(blocks), m * n_cols * 4)
                if pool is not None:
                    self.reserve(name, m * n_cols * 4 + self._work_bytes(name, m, pool), "decoding its rows")
                    out = np.empty((n_rows, n_cols), dtype=np.float32)
                    for (s, e), block in zip(blocks, self._decoded_blocks(name, blocks, pool)):
                        out[s:e] = block
                    return out
            self.reserve(name, m * n_cols * 4 * (DECODE_WORK if t["kind"] == "encoded" else 1), "decoding its rows")
            return self._decode_sel(name, sel)
        except MemoryError as e:
            raise self._out_of_memory(name, "decoding its rows", e) from None

    def _decode_sel(self, name: str, sel) -> np.ndarray:
        """Rows ``sel`` of a tensor in one codec call (memory already reserved)."""
        t = self.info(name)
        if t["kind"] == "encoded":
            codec = self.codec_of(name)
            try:
                return codec.decode_rows(self.group_parts(t["group"]), self.tensor_parts(name), sel)
            except (IndexError, ValueError, TypeError, KeyError) as e:  # validation should make this unreachable
                raise self._damaged(f"tensor '{name}' cannot be decoded: {type(e).__name__}: {e}") from None
        self._row_count(name)
        a = np.asarray(self.array(name), dtype=np.float32)
        return a if sel is None else a[sel]

    def row(self, name: str, i: int) -> np.ndarray:
        """One float32 row (cols,) of a tensor's row matrix."""
        n = self._row_count(name)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise PackError(f"{self.path}: tensor '{name}' has {n} rows; row {i} is out of range")
        return self.rows(name, np.array([i % n]))[0]

    def _decoded_blocks(self, name: str, blocks: list[tuple[int, int]],
                        pool: ThreadPoolExecutor | None) -> Iterator[np.ndarray]:
        """The float32 rows of ``blocks`` in order, decoded on ``pool`` with at most two
        blocks per thread in flight, or one after the other without a pool (each block
        is decoded on its own: the same values as one call for every row)."""
        width = 2 * pool.width if pool is not None else 1
        return ordered_map(lambda span: self._decode_sel(name, slice(*span)), blocks, pool, width)

    def stored_block(self, name: str, block: np.ndarray) -> np.ndarray:
        """Decoded float32 rows as the checkpoint's dtype: a value just past a 16-bit
        float's range is its largest value, not inf."""
        t = self.info(name)
        top = _FINITE_MAX.get(t["dtype"])
        if top is not None:
            block = np.clip(block, -top, top)
        return block.astype(NUMPY_DTYPES[t["dtype"]], copy=False)

    def tensor_blocks(self, name: str) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, rows)`` of an encoded tensor's row matrix, in order, each
        block in the checkpoint's dtype: a whole tensor decoded without holding it
        (what ``hhtld decode`` writes); memory is the blocks in flight only."""
        n_rows, n_cols = self.info(name)["row_shape"]
        blocks = row_blocks(n_rows, n_cols)
        pool = self._pool_for(name, len(blocks), 0)
        self.reserve(name, self._work_bytes(name, n_rows, pool), "decoding one block at a time")
        try:
            for (s, e), block in zip(blocks, self._decoded_blocks(name, blocks, pool)):
                yield s, e, self.stored_block(name, block)
        except MemoryError as e:
            raise self._out_of_memory(name, "decoding it block by block", e) from None

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as the checkpoint stored it: name, shape and dtype (values decoded).

        Encoded tensors are decoded block by block straight into the output
        array, so memory is the tensor in its own dtype plus the float32 blocks
        in flight; that much is reserved first (:meth:`reserve`: a PackError,
        before any allocation, when the process may not take it)."""
        t = self.info(name)
        if t["kind"] == "passthrough":
            return self.array(name)
        n_rows, n_cols = t["row_shape"]
        blocks = row_blocks(n_rows, n_cols)
        dtype = NUMPY_DTYPES[t["dtype"]]
        out_bytes = n_rows * n_cols * np.dtype(dtype).itemsize
        pool = self._pool_for(name, len(blocks), out_bytes)  # threads start before the output is allocated
        need = out_bytes + self._work_bytes(name, n_rows, pool)
        self.reserve(name, need, "decoding it whole")
        try:
            out = np.empty(tuple(t["shape"]), dtype=dtype)
            # the row matrix as a view of ``out``: (rows, cols), or the stored (cols, rows) turned
            view = out.reshape(n_cols, n_rows).T if t["transposed"] else out.reshape(n_rows, n_cols)
            for (s, e), block in zip(blocks, self._decoded_blocks(name, blocks, pool)):
                view[s:e] = self.stored_block(name, block)
        except MemoryError as e:
            raise self._out_of_memory(name, "decoding it whole", e) from None
        return out

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tensors:
            yield name, self.tensor(name)

    # -- side files -------------------------------------------------------------
    def aux_files(self) -> list[str]:
        return list(self.manifest["source"]["aux_files"])

    def aux_bytes(self, rel: str) -> bytes:
        if rel not in self.manifest["source"]["aux_files"]:
            raise PackError(f"{self.path}: no side file '{rel}' in this pack")
        return bytes(self.raw(aux_array_name(rel)))

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
                for p in self.tensors[n]["parts"]:
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


def open_pack(path: str | os.PathLike, memory_limit: int | str | None = None) -> Pack:
    """An open pack (see :class:`Pack`); ``memory_limit``: bytes (or a size such as
    ``"4G"``) one decode call may allocate, instead of what the process may really use."""
    return Pack(path, memory_limit)
