"""The compiled kernels (numba, plus the small C extension ``_lut`` for the
table sums): ``y = x @ W.T`` from an hhtl-vq weight's stored parts, and the
gather that decodes its rows in the rotated space.

Importing this module imports numba; :mod:`.runtime` decides whether it may.
Every function takes plain numpy arrays (float32, the stored integer dtypes)
and writes into arrays the caller owns. Compiled code is cached on disk by
numba (``cache=True``) the first time each signature runs, except the one
small loop that calls into the C extension (numba cannot cache a function
that holds a foreign function's address; it compiles in well under a second).

Twigs are in the **tiled layout** ``(tiles, segments, 64)``: row ``o`` is lane
``o % 64`` of tile ``o // 64`` (rows past ``n`` are zero twigs), so that one
segment of 64 rows is 64 consecutive bytes — what a vector register takes.

Stage arrays (:class:`hhtld.kernels.vq.StageArrays`): ``palt`` (positions, max
width, k) float32 — the palettes of the pattern's positions, transposed and
zero-padded; ``offs`` / ``widths`` (positions,) int64 — where each position's
segment starts in its period and how wide it is.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .native import gather_function, lut_function, table_function

_JIT = dict(nogil=True, cache=True, boundscheck=False, error_model="numpy")
TILE = 64
GROUP = 16  # segments that share one int16-table scale (the C extension's GROUP)


@njit(fastmath=True, **_JIT)
def _rotate_row(x, signs, block, out, r):
    xr = x[r]
    o = out[r]
    c = xr.shape[0]
    scale = np.float32(1.0 / np.sqrt(block))
    rot = signs.shape[0] > 0
    for i in range(c):
        o[i] = xr[i] * np.float32(signs[i]) if rot else xr[i]
    for i in range(c, o.shape[0]):
        o[i] = np.float32(0.0)
    if not rot:
        return
    for b0 in range(0, c, block):
        blk = o[b0:b0 + block]
        h = 1
        if block >= 4:  # the first two butterfly levels four at a time
            for i in range(0, block, 4):
                a0 = blk[i]
                a1 = blk[i + 1]
                a2 = blk[i + 2]
                a3 = blk[i + 3]
                s0 = a0 + a1
                d0 = a0 - a1
                s1 = a2 + a3
                d1 = a2 - a3
                blk[i] = s0 + s1
                blk[i + 1] = d0 + d1
                blk[i + 2] = s0 - s1
                blk[i + 3] = d0 - d1
            h = 4
        while h < block:
            for i in range(0, block, 2 * h):
                lo = blk[i:i + h]
                hi = blk[i + h:i + 2 * h]
                for j in range(h):
                    a = lo[j]
                    b = hi[j]
                    lo[j] = a + b
                    hi[j] = a - b
            h *= 2
        for i in range(block):
            blk[i] *= scale


@njit(**_JIT)
def _rotate_serial(x, signs, block, out):
    for r in range(x.shape[0]):
        _rotate_row(x, signs, block, out, r)


@njit(parallel=True, **_JIT)
def _rotate_parallel(x, signs, block, out):
    for r in prange(x.shape[0]):
        _rotate_row(x, signs, block, out, r)


def rotate_serial(x, signs, block, out):
    """:func:`rotate_rows` on the calling thread (a few rows)."""
    _rotate_serial(x, signs, block, out)


def rotate_rows(x, signs, block, out):
    """out[:, :c] = (x * signs) @ blockdiag(H_block) for every row (orthonormal
    Sylvester H, applied as a fast Walsh-Hadamard transform); out[:, c:] = 0.
    Without signs (an empty array) out[:, :c] = x. Rows in parallel when there are many."""
    if x.shape[0] > 8:
        _rotate_parallel(x, signs, block, out)
    else:
        _rotate_serial(x, signs, block, out)


@njit(inline="always", **_JIT)
def _segment_table(xrow, palt, offs, widths, period, s, out):
    """out (k,) = dot products of segment ``s`` of the rotated row with every palette row."""
    npos = offs.shape[0]
    p = s // npos
    j = s - p * npos
    col = p * period + offs[j]
    k = palt.shape[2]
    for kk in range(k):
        out[kk] = np.float32(0.0)
    for i in range(widths[j]):
        v = xrow[col + i]
        pi = palt[j, i]
        for kk in range(k):
            out[kk] += v * pi[kk]


@njit(**_JIT)
def tables_f32(xr, palt, offs, widths, n_seg, tab):
    """tab (t, n_seg, k) float32 = every segment of every rotated input row · every palette row."""
    period = 0
    for j in range(offs.shape[0]):
        period += widths[j]
    for r in range(xr.shape[0]):
        for s in range(n_seg):
            _segment_table(xr[r], palt, offs, widths, period, s, tab[r, s])


@njit(parallel=True, **_JIT)
def lookup_f32(twt, tab, n, y, accumulate):
    """y (t, n) (+)= Σ_s tab[r, s, twig[o, s]] over the segments of one stage, float32
    tables ``tab`` (t, n_seg, k), tiled twigs ``twt`` (tiles, n_seg, 64). Parallel over tiles."""
    n_tiles, n_seg, _ = twt.shape
    t = tab.shape[0]
    for ti in prange(n_tiles):
        o0 = ti * TILE
        lanes = min(TILE, n - o0)
        acc = np.zeros(TILE, dtype=np.float32)
        for r in range(t):
            tr = tab[r]
            for i in range(TILE):
                acc[i] = np.float32(0.0)
            for s in range(n_seg):
                idx = twt[ti, s]
                trs = tr[s]
                for i in range(TILE):
                    acc[i] += trs[idx[i]]
            for i in range(lanes):
                if accumulate:
                    y[r, o0 + i] += acc[i]
                else:
                    y[r, o0 + i] = acc[i]


_lut_tiles = lut_function()
_lut_group = table_function()
_lut_gather = gather_function()
if _lut_tiles is not None:
    @njit(inline="always", nogil=True, boundscheck=False)
    def _stage_tables(xrow, palt, offs, widths, s, pmax, ga, gb, tab, scales):
        # int16 table rows of the groups [ga, gb) of one stage's s segments
        npos = palt.shape[0]
        period = 0
        for j in range(npos):
            period += widths[j]
        for g in range(ga, gb):
            _lut_group(xrow.ctypes.data, palt.ctypes.data, offs.ctypes.data, widths.ctypes.data, pmax.ctypes.data,
                       npos, palt.shape[1], palt.shape[2], period, g * GROUP, min(s, g * GROUP + GROUP),
                       tab.ctypes.data, scales[g:].ctypes.data)

    @njit(inline="always", nogil=True, boundscheck=False)
    def _stage_sums(twt, ga, gb, tab, scales, acc, accumulate):
        # the sums of those table rows over every tile of one weight's twigs
        s = twt.shape[1]
        _lut_tiles(twt.ctypes.data, twt.shape[0], s, ga * GROUP, min(s, gb * GROUP), tab.ctypes.data,
                   scales.ctypes.data, acc.ctypes.data, 1 if accumulate else 0)

    @njit(inline="always", nogil=True, boundscheck=False, fastmath=True)
    def _finish_row(acc, chunks, gain, c, leaf, n, y):
        # the chunks' sums, times the gains, plus the leaf
        lanes = leaf.shape[1]
        has_gain = gain.shape[0] > 0
        for o in range(n):
            v = acc[0, o]
            for ch in range(1, chunks):
                v += acc[ch, o]
            if has_gain:
                v *= gain[o]
            if lanes > 0:
                lf = np.float32(0.0)
                for la in range(lanes):
                    lf += c[la] * np.float32(leaf[o, la])
                v += lf
            y[o] = v

    @njit(inline="always", nogil=True, boundscheck=False)
    def _chunk(xrow, p0, o0, w0, m0, p1, o1, w1, m1, s0, s1, g0n, ga, gb, t0a, t1a, t0b, t1b, two,
               tab, scales, out_a, out_b):
        # the groups [ga, gb) of segments of both stages (stage 0's first): their table rows,
        # summed over every tile of one weight (or of two, ``two``)
        done = False
        if ga < min(gb, g0n):
            _stage_tables(xrow, p0, o0, w0, s0, m0, ga, min(gb, g0n), tab, scales)
            _stage_sums(t0a, ga, min(gb, g0n), tab, scales, out_a, False)
            if two:
                _stage_sums(t0b, ga, min(gb, g0n), tab, scales, out_b, False)
            done = True
        if max(ga, g0n) < gb:
            tab1 = tab[s0:]
            sc1 = scales[g0n:]
            _stage_tables(xrow, p1, o1, w1, s1, m1, max(ga, g0n) - g0n, gb - g0n, tab1, sc1)
            _stage_sums(t1a, max(ga, g0n) - g0n, gb - g0n, tab1, sc1, out_a, done)
            if two:
                _stage_sums(t1b, max(ga, g0n) - g0n, gb - g0n, tab1, sc1, out_b, done)
            done = True
        if not done:
            out_a[:] = 0.0
            if two:
                out_b[:] = 0.0

    @njit(inline="always", nogil=True, boundscheck=False)
    def _groups(t0, t1, n_stages, chunks):
        # (segments of stage 0 and 1, stage 0's groups of 16 segments, all groups, groups a chunk)
        s0 = t0.shape[1]
        s1 = t1.shape[1] if n_stages > 1 else 0
        g0n = (s0 + GROUP - 1) // GROUP
        total = g0n + (s1 + GROUP - 1) // GROUP
        return s0, s1, g0n, total, (total + chunks - 1) // chunks

    @njit(parallel=True, nogil=True, boundscheck=False, fastmath=True)
    def _matvec_i16(xrow, p0, o0, w0, t0, m0, p1, o1, w1, t1, m1, n_stages, gain, c, leaf, n,
                    tab, scales, acc, chunks, y):
        # one parallel region: chunk ch takes a range of the groups of segments of both stages,
        # builds their table rows and sums them over every tile into its own acc[ch]
        s0, s1, g0n, total, per = _groups(t0, t1, n_stages, chunks)
        for ch in prange(chunks):
            ga = min(total, ch * per)
            _chunk(xrow, p0, o0, w0, m0, p1, o1, w1, m1, s0, s1, g0n, ga, min(total, ga + per), t0, t1, t0, t1,
                   False, tab, scales, acc[ch], acc[ch])
        _finish_row(acc, chunks, gain, c, leaf, n, y)

    @njit(parallel=True, nogil=True, boundscheck=False, fastmath=True)
    def _matvec2_i16(xrow, p0, o0, w0, m0, p1, o1, w1, m1, n_stages, t0a, t1a, gain_a, na, t0b, t1b, gain_b, nb,
                     tab, scales, acc_a, acc_b, chunks, ya, yb):
        # _matvec_i16 for two weights of the same palettes and rotation: each chunk's table rows
        # are built once and summed over the tiles of both
        s0, s1, g0n, total, per = _groups(t0a, t1a, n_stages, chunks)
        for ch in prange(chunks):
            ga = min(total, ch * per)
            _chunk(xrow, p0, o0, w0, m0, p1, o1, w1, m1, s0, s1, g0n, ga, min(total, ga + per), t0a, t1a, t0b, t1b,
                   True, tab, scales, acc_a[ch], acc_b[ch])
        no_leaf = np.zeros((1, 0), dtype=np.int8)
        no_c = np.zeros(0, dtype=np.float32)
        _finish_row(acc_a, chunks, gain_a, no_c, no_leaf, na, ya)
        _finish_row(acc_b, chunks, gain_b, no_c, no_leaf, nb, yb)


def matvec_i16(xrow, p0, o0, w0, t0, m0, p1, o1, w1, t1, m1, n_stages, gain, c, leaf, n, tab, scales, acc, y):
    """y (n,) = one rotated input row ``xrow`` times the weight of one or two one-byte stages
    (each as palt, offs, widths, tiled twigs, pmax: ``p0 o0 w0 t0 m0`` / ``p1 o1 w1 t1 m1``) with
    int16 tables, times the gains, plus the leaf (``c`` (lanes,) its coefficients for this row):
    the whole product in one parallel region, its ``acc.shape[0]`` chunks each taking a range of
    segments (tables and sums; no barrier), then their sums added. Scratch: ``tab`` (segments of
    both stages, 256) int16, ``scales`` (their groups,), ``acc`` (chunks, tiles × 64)."""
    _matvec_i16(xrow, p0, o0, w0, t0, m0, p1, o1, w1, t1, m1, n_stages, gain, c, leaf, n, tab, scales, acc,
                acc.shape[0], y)


def matvec2_i16(xrow, p0, o0, w0, m0, p1, o1, w1, m1, n_stages, t0a, t1a, gain_a, na, t0b, t1b, gain_b, nb,
                tab, scales, acc_a, acc_b, ya, yb):
    """:func:`matvec_i16` for two weights without a leaf that share their stages' palettes
    and rotation (``p m o w`` per stage as there; tiled twigs ``t0a t1a`` / ``t0b t1b``, gains,
    row counts, ``acc`` scratch and outputs per weight): each table row is built once and
    summed over both weights' tiles. ``ya`` and ``yb`` are what two :func:`matvec_i16` calls give."""
    _matvec2_i16(xrow, p0, o0, w0, m0, p1, o1, w1, m1, n_stages, t0a, t1a, gain_a, na, t0b, t1b, gain_b, nb,
                 tab, scales, acc_a, acc_b, acc_a.shape[0], ya, yb)


@njit(parallel=True, **_JIT)
def finish(acc, gain, c, leaf, y):
    """y (t, n) = acc (t, n) × gain[o] (when ``gain`` has rows) + Σ_l c[r, l] leaf[o, l]
    (when ``leaf`` has lanes)."""
    t, n = y.shape
    lanes = leaf.shape[1]
    has_gain = gain.shape[0] > 0
    for o in prange(n):
        for r in range(t):
            v = acc[r, o]
            if has_gain:
                v *= gain[o]
            if lanes > 0:
                lf = np.float32(0.0)
                for la in range(lanes):
                    lf += c[r, la] * np.float32(leaf[o, la])
                v += lf
            y[r, o] = v


@njit(**_JIT)
def leaf_coefficients(x, basis, scale, c):
    """c (t, lanes) = (x @ basis.T) * scale."""
    t, d = x.shape
    for r in range(t):
        for la in range(basis.shape[0]):
            s = np.float32(0.0)
            for i in range(d):
                s += x[r, i] * basis[la, i]
            c[r, la] = s * scale


@njit(parallel=True, **_JIT)
def gather(twt, palr, offs, widths, start, out, accumulate):
    """out (m, n_cols) (+)= the palette rows that the twigs of rows ``start .. start + m``
    of one stage select (the unit-gain rows in the rotated space), columns past n_cols dropped.
    ``palr`` (positions, k, max width) float32: the palettes row-major. Parallel over rows."""
    m, n_cols = out.shape
    npos = offs.shape[0]
    period = 0
    for j in range(npos):
        period += widths[j]
    n_seg = twt.shape[1]
    full = n_cols // period  # periods that lie inside the row: no column check
    k = palr.shape[1]
    wmax = palr.shape[2]
    flat = palr.reshape(-1)
    for q in prange(m):
        o = start + q
        ti = o // TILE
        lane = o - ti * TILE
        row = out[q]
        if npos == 1 and widths[0] == 2 and not accumulate:  # the ladder's first stage: two columns a twig
            for p in range(full):
                src = np.int64(twt[ti, p, lane]) * wmax
                row[2 * p] = flat[src]
                row[2 * p + 1] = flat[src + 1]
        else:
            for p in range(full):
                for j in range(npos):
                    src = (j * k + np.int64(twt[ti, p * npos + j, lane])) * wmax
                    base = p * period + offs[j]
                    if accumulate:
                        for i in range(widths[j]):
                            row[base + i] += flat[src + i]
                    else:
                        for i in range(widths[j]):
                            row[base + i] = flat[src + i]
        for s in range(full * npos, n_seg):
            p = s // npos
            j = s - p * npos
            src = (j * k + np.int64(twt[ti, s, lane])) * wmax
            base = p * period + offs[j]
            for i in range(widths[j]):
                if base + i < n_cols:
                    if accumulate:
                        row[base + i] += flat[src + i]
                    else:
                        row[base + i] = flat[src + i]


GATHER_ROWS = 32  # rows decoded through every stage before the next rows (they stay in cache)

if _lut_gather is not None:
    @njit(nogil=True, boundscheck=False)
    def _gather_u8_rows(tw0, pal0, off0, w0, tw1, pal1, off1, w1, n_stages, start, out):
        m, n_cols = out.shape
        for r0 in range(0, m, GATHER_ROWS):
            r1 = min(m, r0 + GATHER_ROWS)
            _lut_gather(tw0.ctypes.data, tw0.shape[1], pal0.ctypes.data, off0.ctypes.data, w0.ctypes.data,
                        off0.shape[0], pal0.shape[1], pal0.shape[2], start + r0, start + r1, n_cols, 0,
                        out[r0:].ctypes.data)
            if n_stages > 1:
                _lut_gather(tw1.ctypes.data, tw1.shape[1], pal1.ctypes.data, off1.ctypes.data,
                            w1.ctypes.data, off1.shape[0], pal1.shape[1], pal1.shape[2], start + r0,
                            start + r1, n_cols, 1, out[r0:].ctypes.data)

    @njit(parallel=True, nogil=True, boundscheck=False)
    def _gather_u8(tw0, pal0, off0, w0, tw1, pal1, off1, w1, n_stages, start, out, chunks):
        m = out.shape[0]
        per = (m + chunks - 1) // chunks
        for ch in prange(chunks):
            a = ch * per
            b = min(m, a + per)
            if a < b:
                _gather_u8_rows(tw0, pal0, off0, w0, tw1, pal1, off1, w1, n_stages, start + a, out[a:b])


def gather_u8(st0, st1, n_stages, start, out, chunks):
    """out (m, n_cols) = the rows ``start .. start + m`` of Q over one or two stages of one-byte
    twigs (``st0`` / ``st1``: (tiled twigs, palr, offs, widths)), by the C extension, GATHER_ROWS
    rows through both stages at a time, in ``chunks`` ranges of rows in parallel (``out``
    C-contiguous); only when :func:`hhtld.kernels.native.gather_function` is not None."""
    _gather_u8(*st0, *st1, n_stages, start, out, chunks)


__all__ = ["GROUP", "TILE", "finish", "gather", "leaf_coefficients", "gather_u8", "lookup_f32",
           "matvec_i16", "matvec2_i16", "rotate_rows", "rotate_serial", "tables_f32"]
