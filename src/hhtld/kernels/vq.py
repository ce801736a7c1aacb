"""``y = x @ W.T`` for an hhtl-vq weight straight from its stored parts (docs/design.md §7).

The weight is ``W = (gain ⊙ Q) H S + c B`` (rows: Σ over stages of the palette
rows the twigs select, times the row gain, un-rotated, plus the leaf on the
basis), so ``x @ W.T = ((x S H) @ Q.T) ⊙ gain + (x @ B.T · scale) @ leaf.T``
and the weight is never materialised:

* **lookup tables** (few input rows: token-by-token generation, small
  batches): rotate each input row once, then per stage and segment the table
  of its dot products with every palette row of the segment's pattern
  position (k entries); an output is ``gain × Σ table[segment, twig]`` plus
  the leaf term. Per output row the work is one twig byte and one table
  read per segment — the pack's bytes, not the dense weight's. Tables are
  ``int16`` by default (12-bit entries, one scale per 16 segments, built and
  summed 64 rows at a time by the C extension's vector path) or ``float32``
  (``tables="float32"``: the product with the decoded weight up to float32
  rounding).
* **decode then GEMM** (many input rows: prompts, batched embedding): the
  rotated unit-gain rows ``Q`` are gathered block by block of output rows (at
  most :data:`GEMM_BLOCK_BYTES` at a time, never the whole weight) and
  multiplied by BLAS: float32 throughout.

:func:`rows_for_tables` is the crossover between the two (measured; see
the function). Twigs are kept in the tiled layout of
:mod:`.compiled` (:func:`tile_twigs`; :class:`TiledTwig` reads rows back).

Shapes: ``x`` (t, n_cols) float32 → (t, n_rows) float32.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import numpy as np

from ..codecs.vq.quantiser import Layout, decode_rows as vq_decode_rows, parse_stages, rotate, sylvester
from .runtime import backend, compiled_kernels, int16_tables, threads

TILE = 64
MAX_TABLE_ROWS = 8  # at most this many input rows go through tables; more are decoded and multiplied
GEMM_BLOCK_BYTES = 8 << 20  # decoded rows held at once by the decode-then-GEMM path
TABLES = ("int16", "float32")
MAX_GEMM_ROTATION = 256  # rotation blocks up to this size are applied to many rows as a matrix product
SUM_CHUNKS = 8  # ranges of segments a one-row int16 product is split into (whatever the threads: the same bits)


def rows_for_tables(t: int) -> bool:
    """Whether ``t`` input rows go through lookup tables (else decode then GEMM).

    Tables cost t × (the twig reads of the whole weight); decoding costs one
    write of the weight plus a GEMM that BLAS runs far faster per
    multiply-add than table reads, so tables win for a few rows only.
    Measured on SmolLM2's default pack (2 threads): at 1 row tables take
    0.07–0.26 ms a weight against 0.3–0.9 ms for decode-then-GEMM, and the
    two meet at about 6–8 rows (k/v projections earlier, wide rows later)."""
    return t <= MAX_TABLE_ROWS


# --- the tiled twig layout ----------------------------------------------------------------
def tile_twigs(tw: np.ndarray) -> np.ndarray:
    """(n, n_seg) twigs → (ceil(n / 64), n_seg, 64): row o is lane o % 64 of tile o // 64
    (rows past n are zero)."""
    tw = np.asarray(tw)
    n, s = tw.shape
    n_tiles = max(1, -(-n // TILE))
    out = np.zeros((n_tiles, s, TILE), dtype=tw.dtype)
    full = n // TILE
    if full:
        out[:full] = tw[:full * TILE].reshape(full, TILE, s).transpose(0, 2, 1)
    if n % TILE:
        out[full, :, :n % TILE] = tw[full * TILE:].T
    return out


class TiledTwig:
    """Row access to tiled twigs as if they were the stored (n, n_seg) array:
    ``tw[sel]`` (a slice or integer indices) and ``np.asarray(tw)`` give rows."""

    def __init__(self, tiled: np.ndarray, n_rows: int):
        self.tiled = tiled
        self.shape = (int(n_rows), int(tiled.shape[1]))
        self.dtype = tiled.dtype
        self.ndim = 2

    def _rows(self) -> np.ndarray:
        return self.tiled.transpose(0, 2, 1).reshape(-1, self.shape[1])[:self.shape[0]]

    def __getitem__(self, sel) -> np.ndarray:
        if isinstance(sel, slice) and sel == slice(None):
            return np.ascontiguousarray(self._rows())
        idx = np.arange(self.shape[0])[sel] if isinstance(sel, slice) else np.asarray(sel, dtype=np.int64)
        if idx.size and (idx.min() < -self.shape[0] or idx.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        return self.tiled[idx // TILE, :, idx % TILE]

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


# --- prepared weights ---------------------------------------------------------------------
@dataclass(frozen=True)
class StageArrays:
    """One residual stage ready for the kernels: ``palt`` (positions, max width, k)
    float32 (palettes transposed, zero-padded), ``offs`` / ``widths`` (positions,)
    int64, ``twt`` tiled twigs (tiles, segments, 64) uint8/uint16."""

    palt: np.ndarray
    offs: np.ndarray
    widths: np.ndarray
    twt: np.ndarray

    @property
    def n_seg(self) -> int:
        return int(self.twt.shape[1])

    @property
    def k(self) -> int:
        return int(self.palt.shape[2])

    @property
    def palr(self) -> np.ndarray:
        """The palettes row-major (positions, k, max width), for the gathers (made on first use)."""
        got = self.__dict__.get("_palr")
        if got is None:
            got = np.ascontiguousarray(self.palt.transpose(0, 2, 1))
            object.__setattr__(self, "_palr", got)
        return got

    @property
    def n_pad(self) -> int:
        """Columns of the zero-padded row the stage's segments cover."""
        npos = self.offs.shape[0]
        return (self.n_seg // npos) * int(self.widths.sum())


def stage_palettes(params: Mapping, group: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per stage ``(palt, offs, widths)`` from a group's stored palettes (bf16 → float32);
    shared by every weight of the group."""
    out = []
    n_cols = int(params["n_cols"])
    for si, st in enumerate(parse_stages(params["stages"])):
        pals = [np.asarray(group[f"palette.{si}.{j}"], dtype=np.float32) for j in range(len(st.widths))]
        k = max(1, max(p.shape[0] for p in pals))
        palt = np.zeros((len(pals), max(st.widths), k), dtype=np.float32)
        for j, p in enumerate(pals):
            palt[j, :p.shape[1], :p.shape[0]] = p.T
        offs = np.asarray(Layout(st, n_cols).offsets(), dtype=np.int64)
        out.append((palt, offs, np.asarray(st.widths, dtype=np.int64)))
    return out


class _Scratch(threading.local):
    """Per-thread reusable buffers (tables, rotated inputs, sums): a token's
    products allocate nothing large."""

    def __init__(self):
        self.bufs: dict[tuple[str, str], np.ndarray] = {}
        self.rows: dict[tuple[int, int, int], tuple] = {}

    def row(self, n_pad: int, segments: int, n_out: int):
        """(xr (1, n_pad), tab (segments, 256) int16, scales, acc (SUM_CHUNKS, n_out)) for one row's
        int16 product: views made once per shape and kept."""
        key = (n_pad, segments, n_out)
        got = self.rows.get(key)
        if got is None:
            got = self.rows[key] = (self.get("xr", (1, n_pad)), self.get("tab16", (segments, 256), np.int16),
                                    self.get("scales", (segments // 16 + 2,)), self.get("acc", (SUM_CHUNKS, n_out)))
        return got

    def get(self, name: str, shape, dtype=np.float32) -> np.ndarray:
        n = math.prod(shape)
        key = (name, np.dtype(dtype).str)
        b = self.bufs.get(key)
        if b is None or b.shape[0] < n:
            b = np.empty(max(n, 1), dtype=dtype)
            self.bufs[key] = b
            self.rows.clear()  # views of the buffer it replaces
        return b[:n].reshape(shape)


_scratch = _Scratch()
_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_EMPTY_I8 = np.zeros(0, dtype=np.int8)
_EMPTY_F32_2D = np.zeros((0, 0), dtype=np.float32)
_EMPTY_I8_2D = np.zeros((1, 0), dtype=np.int8)


class VqKernel:
    """One hhtl-vq weight ``(n_rows, n_cols)`` prepared for :meth:`matmul_t`.

    ``stages``: :class:`StageArrays` per residual stage; ``gain`` (n,) float32 or
    None; ``signs`` (n_cols,) int8 and ``block`` (the rotation) or None; ``leaf``
    (n, lanes) int8, ``basis`` (lanes, n_cols) float32 and ``leaf_scale`` or None.
    Holds the tiled twigs (no other copy of them); the gains and the leaf basis
    as float32."""

    def __init__(self, n_rows: int, n_cols: int, stages: list[StageArrays], gain: np.ndarray | None,
                 signs: np.ndarray | None, block: int, leaf: np.ndarray | None, basis: np.ndarray | None,
                 leaf_scale: float):
        self.n_rows, self.n_cols = int(n_rows), int(n_cols)
        self.stages = stages
        self.gain = _EMPTY_F32 if gain is None else np.ascontiguousarray(gain, dtype=np.float32)
        self.signs = _EMPTY_I8 if signs is None else np.ascontiguousarray(signs, dtype=np.int8)
        self.block = int(block)
        self.leaf = _EMPTY_I8_2D if leaf is None else np.ascontiguousarray(leaf)
        self.basis = None if basis is None else np.ascontiguousarray(basis, dtype=np.float32)
        self.leaf_scale = np.float32(leaf_scale)
        self.n_pad = max([self.n_cols] + [s.n_pad for s in stages])
        self.n_tiles = stages[0].twt.shape[0] if stages else max(1, -(-self.n_rows // TILE))
        # int16 tables: stages taken two at a time (one-byte twigs only)
        self._pairs = None
        if stages and all(s.twt.dtype == np.uint8 for s in stages):
            self._pairs = []
            for i in range(0, len(stages), 2):
                p = stages[i:i + 2]
                st = [(s.palt, s.offs, s.widths, s.twt, np.abs(s.palt).max(axis=2)) for s in p]
                self._pairs.append((st[0], st[-1], len(p), sum(s.n_seg for s in p)))
            self._pair_segments = max(p[3] for p in self._pairs)
        # one row through one or two one-byte stages (the ladder's usual layouts): the stages'
        # arrays bound once for the fast path of matmul_t
        self._row = None
        if self._pairs is not None and len(self._pairs) == 1:
            st0, st1, n_st, _ = self._pairs[0]
            self._row = (*st0, *st1, n_st)

    @property
    def has_leaf(self) -> bool:
        return self.basis is not None

    # --- the product ------------------------------------------------------------------
    def matmul_t(self, x: np.ndarray, tables: str = "int16") -> np.ndarray:
        """``x @ W.T``: x (t, n_cols) float32 → (t, n_rows) float32. ``tables``:
        ``int16`` or ``float32`` (see the module); many rows are decoded and multiplied."""
        if (self._row is not None and tables == "int16" and type(x) is np.ndarray and x.shape == (1, self.n_cols)
                and x.dtype == np.float32 and x.flags.c_contiguous and int16_tables()):
            return self._row_i16(x)  # generation's one row: the same product with less Python around it
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_cols:
            raise ValueError(f"x must be (t, {self.n_cols}), got {x.shape}")
        t = x.shape[0]
        y = np.empty((t, self.n_rows), dtype=np.float32)
        if t == 0:
            return y
        if backend() != "numba":
            return self._gemm(x, y, compiled=False)
        if not rows_for_tables(t):
            return self._gemm(x, y, compiled=True)
        return self._tables(x, y, tables == "int16" and int16_tables())

    def _row_i16(self, x: np.ndarray) -> np.ndarray:
        """One row, int16 tables, one or two one-byte stages: what :meth:`_tables` computes."""
        ck = compiled_kernels()
        xr, tab, scales, acc = _scratch.row(self.n_pad, self._pair_segments, self.n_tiles * TILE)
        ck.rotate_serial(x, self.signs, self.block, xr)
        c = self._leaf_c(x, True)[0] if self.has_leaf else _EMPTY_F32
        y = np.empty((1, self.n_rows), dtype=np.float32)
        ck.matvec_i16(xr[0], *self._row, self.gain, c, self.leaf, self.n_rows, tab, scales, acc, y[0])
        return y

    def _rotated(self, x: np.ndarray) -> np.ndarray:
        xr = _scratch.get("xr", (x.shape[0], self.n_pad))
        t = x.shape[0]
        if t > MAX_TABLE_ROWS and self.signs.shape[0] and self.block <= MAX_GEMM_ROTATION:
            # many rows: (x S) times the block's Hadamard matrix by BLAS (4x the transform's speed here)
            xs = (x * self.signs).reshape(-1, self.block)
            xr[:, :self.n_cols] = _matmul_t(xs, _hadamard(self.block)).reshape(t, self.n_cols)
            xr[:, self.n_cols:] = 0.0
            return xr
        compiled_kernels().rotate_rows(x, self.signs, self.block, xr)
        return xr

    def _leaf_c(self, x: np.ndarray, compiled: bool) -> np.ndarray:
        if not self.has_leaf:
            return _EMPTY_F32_2D
        if compiled:
            c = _scratch.get("leafc", (x.shape[0], self.basis.shape[0]))
            compiled_kernels().leaf_coefficients(x, self.basis, self.leaf_scale, c)
            return c
        return (x @ self.basis.T) * self.leaf_scale

    def _tables(self, x: np.ndarray, y: np.ndarray, int16: bool) -> np.ndarray:
        ck = compiled_kernels()
        t = x.shape[0]
        xr = self._rotated(x)
        c = self._leaf_c(x, True)
        if int16 and self._pairs is not None:
            # one-byte twigs: the vector sums, one or two stages per call
            pairs = self._pairs
            one = len(pairs) == 1
            seg = self._pair_segments
            n_pad = self.n_tiles * TILE
            tab = _scratch.get("tab16", (seg, 256), np.int16)
            scales = _scratch.get("scales", (seg // 16 + 2,))
            acc = _scratch.get("acc", (SUM_CHUNKS, n_pad))
            out = y if one else _scratch.get("pairs", (len(pairs), t, self.n_rows))
            gain = self.gain if one else _EMPTY_F32
            leaf = self.leaf if one else _EMPTY_I8_2D
            for pi, (st0, st1, n_st, n_seg) in enumerate(pairs):
                for r in range(t):
                    ck.matvec_i16(xr[r], *st0, *st1, n_st, gain, c[r] if one and self.has_leaf else _EMPTY_F32, leaf,
                                  self.n_rows, tab, scales, acc, out[r] if one else out[pi, r])
            if not one:
                ck.finish(out.sum(axis=0), self.gain, c, self.leaf, y)
            return y
        acc = _scratch.get("acc", (t, self.n_tiles * TILE))
        for i, s in enumerate(self.stages):
            tab = _scratch.get("tab32", (t, s.n_seg, s.k))
            ck.tables_f32(xr, s.palt, s.offs, s.widths, s.n_seg, tab)
            ck.lookup_f32(s.twt, tab, self.n_tiles * TILE, acc, i > 0)
        ck.finish(acc[:, :self.n_rows], self.gain, c, self.leaf, y)
        return y

    # --- decode then GEMM -------------------------------------------------------------
    def decode_rotated(self, start: int = 0, stop: int | None = None, compiled: bool | None = None,
                       out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``Q`` (the unit-gain rows in the rotated space), float32
        (written into ``out``, C-contiguous (stop - start, n_cols), when given, on the compiled path)."""
        stop = self.n_rows if stop is None else stop
        if compiled is None:
            compiled = backend() == "numba"
        if compiled:
            q = np.empty((stop - start, self.n_cols), dtype=np.float32) if out is None else out
            ck = compiled_kernels()
            fast = int16_tables()  # the extension is there
            done = 0
            if fast and self.stages[0].twt.dtype == np.uint8:  # the first one or two one-byte stages at once
                pair = self.stages[:2] if len(self.stages) > 1 and self.stages[1].twt.dtype == np.uint8 \
                    else self.stages[:1]
                parts = [(s.twt, s.palr, s.offs, s.widths) for s in pair]
                ck.gather_u8(parts[0], parts[-1], len(pair), start, q, threads())
                done = len(pair)
            for i in range(done, len(self.stages)):
                s = self.stages[i]
                ck.gather(s.twt, s.palr, s.offs, s.widths, start, q, i > 0)
            return q
        # numpy: the codec's own gathers (no gain, no rotation), on the twigs read back as rows
        return vq_decode_rows([[s.palt[j, :w].T for j, w in enumerate(s.widths)] for s in self.stages],
                              [TiledTwig(s.twt, self.n_rows)[start:stop] for s in self.stages], self.n_cols,
                              None, None)

    def _gemm(self, x: np.ndarray, y: np.ndarray, compiled: bool) -> np.ndarray:
        if compiled:
            xr = self._rotated(x)[:, :self.n_cols]
        else:
            xr = rotate(x, self.signs, block=self.block) if self.signs.shape[0] else x
        c = self._leaf_c(x, compiled)
        step = max(1, GEMM_BLOCK_BYTES // (4 * self.n_cols))
        for o0 in range(0, self.n_rows, step):
            o1 = min(self.n_rows, o0 + step)
            buf = _scratch.get("q", (o1 - o0, self.n_cols)) if compiled else None  # no fresh pages per call
            q = self.decode_rotated(o0, o1, compiled, out=buf)
            gain = self.gain[o0:o1] if self.gain.shape[0] else None
            if gain is not None and x.shape[0] > self.n_cols:
                q *= gain[:, None]  # the gains where there are fewer products: on the weight's rows
                gain = None
            if o1 - o0 == self.n_rows:
                _matmul_t(xr, q, out=y)  # one block: straight into the output
            else:
                y[:, o0:o1] = _matmul_t(xr, q)
            if gain is not None:  # or on the outputs
                y[:, o0:o1] *= gain
            if self.has_leaf:
                y[:, o0:o1] += _matmul_t(c, self.leaf[o0:o1].astype(np.float32))
        return y


class KernelPair:
    """Two weights that read the same input and share their group's palettes and
    rotation (gate with up, k with v under ``--group-by input``): :meth:`matmul_t`
    builds each lookup table once for both on the one-row int16 path, where the
    table build is a large part of a small weight's product; otherwise (more
    rows, float32 tables, other layouts) the two products run one after the other.
    :meth:`shares` says whether two weights qualify."""

    def __init__(self, a: VqKernel, b: VqKernel):
        self.a, self.b = a, b
        self.shared = self.shares(a, b)

    @staticmethod
    def shares(a: VqKernel, b: VqKernel) -> bool:
        """Whether one table build serves both: the one-row fast layout (one or two one-byte
        stages) on each, the same palettes, offsets and widths per stage, the same rotation,
        gains on both or neither, and no leaf."""
        if a._row is None or b._row is None or a.n_cols != b.n_cols or a.has_leaf or b.has_leaf:
            return False
        if len(a.stages) != len(b.stages) or a.block != b.block or not np.array_equal(a.signs, b.signs):
            return False
        if (a.gain.shape[0] > 0) != (b.gain.shape[0] > 0):
            return False
        for sa, sb in zip(a.stages, b.stages):
            if sa.n_seg != sb.n_seg or not (np.array_equal(sa.offs, sb.offs) and np.array_equal(sa.widths, sb.widths)):
                return False
            if sa.palt is not sb.palt and not (sa.palt.shape == sb.palt.shape and np.array_equal(sa.palt, sb.palt)):
                return False
        return True

    def matmul_t(self, x: np.ndarray, tables: str = "int16") -> tuple[np.ndarray, np.ndarray]:
        """``(x @ A.T, x @ B.T)``, each what :meth:`VqKernel.matmul_t` gives (the same bits)."""
        a, b = self.a, self.b
        if not (self.shared and tables == "int16" and type(x) is np.ndarray and x.shape == (1, a.n_cols)
                and x.dtype == np.float32 and x.flags.c_contiguous and int16_tables()):
            return a.matmul_t(x, tables), b.matmul_t(x, tables)
        ck = compiled_kernels()
        xr, tab, scales, acc_a = _scratch.row(a.n_pad, a._pair_segments, a.n_tiles * TILE)
        acc_b = _scratch.get("acc_b", (SUM_CHUNKS, b.n_tiles * TILE))
        ck.rotate_serial(x, a.signs, a.block, xr)
        ya = np.empty((1, a.n_rows), dtype=np.float32)
        yb = np.empty((1, b.n_rows), dtype=np.float32)
        p0, o0, w0, t0a, m0, p1, o1, w1, t1a, m1, n_st = a._row
        t0b, t1b = b._row[3], b._row[8]
        ck.matvec2_i16(xr[0], p0, o0, w0, m0, p1, o1, w1, m1, n_st, t0a, t1a, a.gain, a.n_rows, t0b, t1b, b.gain,
                       b.n_rows, tab, scales, acc_a, acc_b, ya[0], yb[0])
        return ya, yb


@lru_cache(maxsize=8)
def _hadamard(block: int) -> np.ndarray:
    """The orthonormal Hadamard matrix (block, block) float32 (symmetric: its own transpose)."""
    return sylvester(block) * np.float32(1.0 / np.sqrt(block))


def _matmul_t(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a @ b.T float32 (into ``out``, C-contiguous, when given) by torch's BLAS when torch is
    loaded (its threads are the ones the model uses), else numpy's."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        if out is None:
            return (torch.from_numpy(a) @ torch.from_numpy(b).T).numpy()
        torch.matmul(torch.from_numpy(a), torch.from_numpy(b).T, out=torch.from_numpy(out))
        return out
    return np.matmul(a, b.T, out=out)


def vq_kernel(params: Mapping, group: Mapping[str, np.ndarray], tensor: Mapping[str, np.ndarray],
              palettes: list | None = None) -> VqKernel:
    """A :class:`VqKernel` from an hhtl-vq group's params and parts and one tensor's
    parts (numpy arrays, or :class:`TiledTwig` twigs, whose tiles are used as they
    are; plain twigs are tiled, a copy). ``palettes``: the group's
    :func:`stage_palettes`, when already made for another tensor of the group."""
    from ..codecs.vq.codec import rotation_block

    if palettes is None:
        palettes = stage_palettes(params, group)
    n_cols = int(params["n_cols"])
    stages = []
    n_rows = None
    for si, (palt, offs, widths) in enumerate(palettes):
        tw = tensor[f"twig.{si}"]
        if isinstance(tw, TiledTwig):
            twt = tw.tiled
        else:
            twt = tile_twigs(tw)
        n_rows = tw.shape[0]
        stages.append(StageArrays(palt, offs, widths, np.ascontiguousarray(twt)))
    if n_rows is None:
        n_rows = int(np.asarray(tensor["gain"]).shape[0])
    gain = np.asarray(tensor["gain"], dtype=np.float32) if "gain" in tensor else None
    signs = np.asarray(group["rotation"]) if "rotation" in group else None
    has_leaf = "leaf" in tensor
    return VqKernel(n_rows, n_cols, stages, gain, signs, rotation_block(params) if signs is not None else n_cols,
                    np.asarray(tensor["leaf"]) if has_leaf else None,
                    np.asarray(group["basis"], dtype=np.float32) if has_leaf else None,
                    float(np.asarray(tensor["leaf_scale"])[0]) if has_leaf else 0.0)


__all__ = ["GEMM_BLOCK_BYTES", "MAX_TABLE_ROWS", "TABLES", "TILE", "KernelPair", "StageArrays", "TiledTwig",
           "VqKernel", "rows_for_tables", "stage_palettes", "tile_twigs", "vq_kernel"]
