"""Segment product quantiser of the budget codec (docs/design.md §2): segments, residual
stages, 8/16-bit twigs, per-row gain, optional randomised Hadamard rotation.

A row (after the optional rotation, divided by its gain) is cut into
segments; each segment gets a twig into a palette shared by the whole group;
residual stages quantise what the previous stages left. A stage's segment
widths are a *pattern* that repeats along the (zero-padded) row, so a stage
``"4,3"`` alternates segments of 4 and 3 columns (8 bits per 3.5 weights)
and one palette is trained per pattern position.

Stage specification (``stages`` option), a string: stages separated by ``+``,
widths of one stage by ``,``, a width may carry ``:k`` (palette size,
default 256; k > 256 uses two-byte twigs), e.g. ``"4"``, ``"4,3"``,
``"2+4"``, ``"8:4096"``.

Palettes start from furthest-point sampling on a sample of the segments and
are refined by faiss k-means (fixed seed, few iterations, sampled training
points), stored as bfloat16; every segment is then assigned (exhaustively,
by faiss) to the bf16-rounded palette, so decoding is a gather per stage.
Everything is seeded: the same rows and options give the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ...cosine import row_cosines
from ...errors import CodecError
from ...format import BF16_BYTES, MAX_PALETTE_K, MAX_PALETTE_K_U16, ROTATION_MAX_BLOCK
from ..reference.palette import check_k, furthest_point_sample, to_bf16

DEFAULT_K = 256
MAX_SEGMENT = 64


# --- stage specification ------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    widths: tuple[int, ...]
    ks: tuple[int, ...]

    @property
    def period(self) -> int:
        return sum(self.widths)

    @property
    def twig_bytes(self) -> int:
        """Bytes of every twig of this stage (one array per stage: u16 if any k > 256)."""
        return 1 if max(self.ks) <= MAX_PALETTE_K else 2

    def __str__(self) -> str:
        return ",".join(f"{w}" if k == DEFAULT_K else f"{w}:{k}" for w, k in zip(self.widths, self.ks))


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """``"4,3+8"`` → (Stage((4, 3), (256, 256)), Stage((8,), (256,)))."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError(f"stages must be a non-empty string like '4' or '2+4', got {spec!r}")
    stages = []
    for st in spec.replace(" ", "").split("+"):
        widths, ks = [], []
        for item in st.split(","):
            w, _, k = item.partition(":")
            try:
                w_i = int(w)
                k_i = int(k) if k else DEFAULT_K
            except ValueError:
                raise CodecError(f"stages {spec!r}: '{item}' is not WIDTH or WIDTH:K") from None
            if not 2 <= w_i <= MAX_SEGMENT:
                raise CodecError(f"stages {spec!r}: segment width {w_i} is out of range (2..{MAX_SEGMENT})")
            check_k(k_i, MAX_PALETTE_K_U16)
            widths.append(w_i)
            ks.append(k_i)
        stages.append(Stage(tuple(widths), tuple(ks)))
    if len(stages) > 8:
        raise CodecError(f"stages {spec!r}: at most 8 residual stages")
    return tuple(stages)


def stages_str(stages: tuple[Stage, ...]) -> str:
    return "+".join(str(s) for s in stages)


@dataclass(frozen=True)
class Layout:
    """Where the segments of one stage lie in a row of ``n_cols`` columns."""

    stage: Stage
    n_cols: int

    @property
    def n_periods(self) -> int:
        return -(-self.n_cols // self.stage.period)

    @property
    def n_pad(self) -> int:
        return self.n_periods * self.stage.period

    @property
    def n_segments(self) -> int:
        return self.n_periods * len(self.stage.widths)

    def offsets(self) -> list[int]:
        return list(np.cumsum((0,) + self.stage.widths[:-1]))

    def row_bytes(self) -> int:
        return self.n_segments * self.stage.twig_bytes

    def k_eff(self, j: int, n_rows: int) -> int:
        """Palette size actually stored: no more centroids than training segments."""
        return max(1, min(self.stage.ks[j], n_rows * self.n_periods))


def twig_dtype(k: int):
    return np.uint8 if k <= MAX_PALETTE_K else np.uint16


# --- rotation -----------------------------------------------------------------
def hadamard_block(n_cols: int, max_block: int = ROTATION_MAX_BLOCK) -> int:
    """Block size of the block-diagonal Hadamard: the largest power of two
    dividing n_cols, at most ``max_block``."""
    return int(min(n_cols & -n_cols, max_block))


@lru_cache(maxsize=32)
def sylvester(b: int, dtype=np.float32) -> np.ndarray:
    """(b, b) Sylvester Hadamard matrix of ±1 (b a power of two), float32 unless ``dtype``
    says otherwise; cached, so read-only."""
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    h = h.astype(dtype)
    h.flags.writeable = False
    return h


def kronecker_factors(b: int) -> tuple[int, int]:
    """b = p * q with p, q powers of two and p >= q as close as possible (1024 = 32 * 32)."""
    q = 1
    while q * q * 4 <= b:
        q *= 2
    return b // q, q


def rotation_signs(n_cols: int, seed: int) -> np.ndarray:
    """(n_cols,) int8 of ±1: the random signs of the randomised Hadamard transform."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED, n_cols]))
    return np.where(rng.random(n_cols) < 0.5, -1, 1).astype(np.int8)


KRONECKER_FROM = 128  # Hadamard blocks from this size are applied as H_p ⊗ H_q


def hadamard_factors(b: int) -> tuple[int, int]:
    """(p, q) with H_b applied as H_p ⊗ H_q: :func:`kronecker_factors` from ``KRONECKER_FROM``
    columns, else (1, b) — one (b, b) product."""
    return kronecker_factors(b) if b >= KRONECKER_FROM else (1, b)


HADAMARD_CHUNK = 1 << 18  # weights a float64 slice of the rotation holds at a time (2 MiB)


def _hadamard_blocks(x: np.ndarray, b: int, out: np.ndarray | None = None) -> np.ndarray:
    """Every length-b block of every row times H_b / sqrt(b); x (n, c) float32, into a new
    array or ``out`` (n, c) float32, which may be ``x``: each slice of rows is read into
    float64 before its result is written back.

    The sums run in float64 and are rounded to float32 once: a float32 BLAS product
    rounds in an order that depends on the number of rows in the call on some CPUs
    (seen on AVX2 machines: one row transformed alone differed by an ulp from the same
    row in a block), while the float64 sums of at most b float32 terms are exact or
    within far less than a float32 ulp of it — so each row's bits do not depend on the
    other rows, the thread count or the library (torch decodes the same way). It costs
    1.4-2.1x the time of the float32 product (143-235 against 222-465 M weights/s a core,
    ``bench/rotation.py``); the float64 copies are made a few hundred thousand weights
    at a time.

    H_b = H_p ⊗ H_q (Sylvester), so a block seen as a (p, q) matrix X becomes
    H_p X H_q: one (n c/q, q) @ (q, q) product and one batched (p, p) @ (p, q)
    product, 2 (p + q) flops a weight instead of 2 b. Blocks of at most
    ``KRONECKER_FROM // 2`` columns take one (n c/b, b) @ (b, b) product instead:
    there the batched product's per-matrix overhead outweighs the flops it saves
    (float64, one core, AVX2: the one product runs 370-470 M weights/s at b = 16-32
    against 140-190 split, and as fast at 64; at b = 128 and 256 it is flop-bound,
    136 and 68 against 229 and 201 split, ``bench/rotation.py``)."""
    n, c = x.shape
    p, q = hadamard_factors(b)
    h_p, h_q = sylvester(p, np.float64), sylvester(q, np.float64)
    y = np.empty((n, c), dtype=np.float32) if out is None else out
    step = max(1, HADAMARD_CHUNK // max(c, 1))  # float64 copies of a few MB, not of the tensor
    for r in range(0, n, step):
        x64 = np.asarray(x[r:r + step], dtype=np.float64)
        m = x64.shape[0]
        y64 = x64.reshape(-1, q) @ h_q
        if p > 1:
            y64 = np.matmul(h_p, y64.reshape(-1, p, q))
        y[r:r + m] = y64.reshape(m, c)
    y *= np.float32(1.0 / np.sqrt(b))
    return y


def rotate(x: np.ndarray, signs: np.ndarray, inverse: bool = False, block: int | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """Randomised block Hadamard: forward ``(x * signs) @ blockdiag(H_b)``; inverse undoes it
    (H is symmetric and orthonormal). x: (n, c) float32; ``block`` b: the Hadamard block
    (default :func:`hadamard_block` of c); ``out``: a writeable (n, c) float32 array for the
    result, either ``x`` itself (rotated in place, in any memory order; same bits) or one
    that does not overlap it."""
    c = x.shape[1]
    b = hadamard_block(c) if block is None else int(block)
    s = signs.astype(np.float32)
    if not inverse:
        y = np.multiply(x, s, out=out)  # a new array unless ``out`` is given; a float32 one is turned in place
        return _hadamard_blocks(y, b, out=y if y.dtype == np.float32 else None)
    y = _hadamard_blocks(x, b, out=out)
    y *= s
    return y


# --- palettes -------------------------------------------------------------------
def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency of hhtld
        raise CodecError("the hhtl-vq codec needs faiss-cpu, a dependency of hhtld: pip install faiss-cpu") from e
    # Exhaustive search through BLAS for every batch: faiss's default sends
    # batches under 128,000 distances to a scalar loop that is 10x slower for
    # the 2..64-wide segments here (measured: 1.2 vs 13 M points/s). One path
    # for every batch size also keeps assignments independent of batching.
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES
    return faiss


BLAS_FROM_QUERIES = 1
SMALL_PROBLEM = 1 << 18  # points below which faiss runs on one thread (no OpenMP overhead)


class _threads:
    """faiss on one thread for small problems: on a busy 2-core machine OpenMP's
    barriers cost more than the second core gives back."""

    def __init__(self, n_points: int):
        self.one = n_points < SMALL_PROBLEM

    def __enter__(self):
        if self.one:
            faiss = _faiss()
            self.prev = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)

    def __exit__(self, *exc):
        if self.one:
            _faiss().omp_set_num_threads(self.prev)


def _draw(m: int, w: int, k: int, seed: int, per_centroid: int) -> np.ndarray | None:
    """Indices (sorted) of the at most ``per_centroid * k`` of ``m`` points a
    palette is trained on, drawn with ``seed``; None when all of them are."""
    k = min(int(k), m)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), m, w, k]))
    n_train = min(m, max(k, per_centroid * k))
    return None if n_train == m else np.sort(rng.choice(m, n_train, replace=False))


def _kmeans(sample: np.ndarray, k: int, seed: int, iters: int) -> np.ndarray:
    """Palette of at most k rows trained on ``sample`` (n, w): a furthest-point
    cover of a 16k-point subsample, then ``iters`` k-means iterations (faiss)."""
    n_train, w = sample.shape
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if k == n_train:
        return to_bf16(sample).astype(np.float32)
    sub = sample[: min(n_train, 16 * k)]
    init = sub[furthest_point_sample(sub, k)]
    if init.shape[0] < k:  # fewer distinct points than k
        return to_bf16(init).astype(np.float32)
    if iters > 0:
        faiss = _faiss()
        km = faiss.Kmeans(w, k, niter=int(iters), seed=int(seed) & 0x7FFFFFFF, verbose=False,
                          max_points_per_centroid=max(1, n_train // k + 1), min_points_per_centroid=1)
        with _threads(n_train):
            km.train(sample, init_centroids=np.ascontiguousarray(init))
        cent = km.centroids
    else:
        cent = init
    return to_bf16(cent).astype(np.float32)


def train_palette(points: np.ndarray, k: int, seed: int, iters: int, per_centroid: int) -> np.ndarray:
    """Palette of at most k rows for ``points`` (m, w) float32, bf16-exact float32.

    Training uses at most ``per_centroid * k`` points drawn with ``seed``;
    the start is a furthest-point cover of a 16k-point subsample, then
    ``iters`` k-means iterations (faiss)."""
    m, w = points.shape
    if m == 0:
        return np.zeros((0, w), dtype=np.float32)
    idx = _draw(m, w, k, seed, per_centroid)
    return _kmeans(points if idx is None else points[idx], min(int(k), m), seed, iters)


def _train_position(resid: np.ndarray, lay: Layout, j: int, k: int, seed: int, iters: int,
                    per_centroid: int) -> np.ndarray:
    """``train_palette`` on the segments of pattern position j of ``resid`` (m, c),
    gathering only the drawn segments (the same draw as on the full segment array)."""
    m, c = resid.shape
    w = lay.stage.widths[j]
    n_seg = m * lay.n_periods
    if n_seg == 0:
        return np.zeros((0, w), dtype=np.float32)
    idx = _draw(n_seg, w, k, seed, per_centroid)
    if idx is None:
        idx = np.arange(n_seg)
    r, p = np.divmod(idx, lay.n_periods)
    cols = (p * lay.stage.period + lay.offsets()[j])[:, None] + np.arange(w)  # (n, w)
    pts = np.where(cols < c, resid[r[:, None], np.minimum(cols, c - 1)], np.float32(0.0)).astype(np.float32)
    return _kmeans(pts, min(int(k), n_seg), seed, iters)


def assign(points: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Nearest palette row (squared L2) of every point: (m,) int64."""
    if points.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    faiss = _faiss()
    index = faiss.IndexFlatL2(palette.shape[1])
    index.add(np.ascontiguousarray(palette, dtype=np.float32))
    with _threads(points.shape[0]):
        _, idx = index.search(np.ascontiguousarray(points, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64)


# --- encode / decode --------------------------------------------------------------
@dataclass
class VqResult:
    """Encoded rows (one block, one tensor or a stacked group)."""

    palettes: list[list[np.ndarray]]  # [stage][position] (k, w) float32 (bf16-exact)
    twigs: list[np.ndarray]  # [stage] (n, n_segments) uint8/uint16
    gain: np.ndarray | None  # (n,) float32 bf16-exact, or None
    signs: np.ndarray | None  # (n_cols,) int8, or None


@dataclass
class VqModel:
    """The shared parts of one group: palettes per stage and pattern position,
    rotation signs and block, and whether rows carry a gain. Everything a
    block of rows needs to be encoded on its own."""

    stages: tuple[Stage, ...]
    n_cols: int
    palettes: list[list[np.ndarray]]  # [stage][position] (k, w) float32, bf16-exact
    signs: np.ndarray | None  # (n_cols,) int8
    block: int  # Hadamard block of the rotation
    gain: bool


@dataclass
class VqBlock:
    """One encoded block: twigs per stage (m, n_segments), gain (m,) float32 or
    None, and on request the reconstruction (m, c) float32 and the row cosines (m,)."""

    twigs: list[np.ndarray]
    gain: np.ndarray | None
    rec: np.ndarray | None = None
    cosines: np.ndarray | None = None
    output_error: float | None = None  # tr(ΔW H ΔWᵀ) of the block, when encoded against a Hessian


def _segments(xp: np.ndarray, lay: Layout, j: int) -> np.ndarray:
    """Segments of pattern position j: (n * n_periods, w) view-copy from padded rows (n, n_pad)."""
    n = xp.shape[0]
    off = lay.offsets()[j]
    w = lay.stage.widths[j]
    v = xp.reshape(n, lay.n_periods, lay.stage.period)[:, :, off : off + w]
    return np.ascontiguousarray(v).reshape(-1, w)


def _prepare(x: np.ndarray, signs: np.ndarray | None, block: int, gain: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """x (n, c) → (rotated rows y (n, c), the rows the stages quantise (y / g0), g0 (n,) or None)."""
    c = x.shape[1]
    y = rotate(x, signs, block=block) if signs is not None else np.asarray(x, dtype=np.float32)
    if not gain:
        return y, y, None
    ss = np.einsum("ij,ij->i", y, y)
    big = ~np.isfinite(ss)
    if big.any():  # squares past float32's range (|w| beyond ~1e19): the same sum in float64
        ss = ss.astype(np.float64)
        ss[big] = np.einsum("ij,ij->i", y[big], y[big], dtype=np.float64)
    g0 = np.sqrt(ss / c).astype(np.float32)
    g0 = np.where(g0 > 0, g0, 1.0).astype(np.float32)
    return y, y / g0[:, None], g0


def _quantise_stage(resid: np.ndarray, lay: Layout, palettes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One stage on residual rows (n, c): (twigs (n, n_segments), quantised rows (n, c) float32)."""
    n, c = resid.shape
    st = lay.stage
    if len(st.widths) == 1 and lay.n_pad == c:  # one width that tiles the row: no padding, no copies
        idx = assign(np.ascontiguousarray(resid).reshape(-1, st.widths[0]), palettes[0])
        q = palettes[0][idx].reshape(n, c)
        return idx.reshape(n, lay.n_segments).astype(twig_dtype(st.ks[0])), q
    rp = np.zeros((n, lay.n_pad), dtype=np.float32)
    rp[:, :c] = resid
    q = np.zeros_like(rp)
    qv = q.reshape(n, lay.n_periods, st.period)
    tw = np.zeros((n, lay.n_periods, len(st.widths)), dtype=twig_dtype(max(st.ks)))
    for j, (w, pal) in enumerate(zip(st.widths, palettes)):
        idx = assign(_segments(rp, lay, j), pal)
        off = lay.offsets()[j]
        qv[:, :, off : off + w] = pal[idx].reshape(n, lay.n_periods, w)
        tw[:, :, j] = idx.reshape(n, lay.n_periods)
    return tw.reshape(n, lay.n_segments), q[:, :c]


def _by_blocks(fn, x: np.ndarray, pool=None) -> np.ndarray:
    """``fn`` applied to row blocks of ``x`` (m, c) (on ``pool`` when given), rows concatenated."""
    from ...checkpoint.rows import row_blocks

    spans = row_blocks(*x.shape)
    if pool is None or len(spans) <= 1:
        parts = [fn(x[s:e]) for s, e in spans]
    else:
        parts = list(pool.map(lambda se: fn(x[se[0]:se[1]]), spans))
    return np.concatenate(parts) if parts else np.zeros((0,) + x.shape[1:], np.float32)


def fit_model(sample: np.ndarray, stages: tuple[Stage, ...], gain: bool, rotate_rows: bool, seed: int,
              iters: int, per_centroid: int, block: int | None = None, pool=None) -> VqModel:
    """Train the palettes of every stage on ``sample`` (m, c) float32: stage s is
    trained on what stages < s left of the sample. ``block``: the Hadamard block
    (default :func:`hadamard_block` of c); ``pool``: threads for the sample's blocks."""
    m, c = sample.shape
    signs = rotation_signs(c, seed) if rotate_rows else None
    blk = hadamard_block(c) if block is None else int(block)
    resid = _by_blocks(lambda x: _prepare(x, signs, blk, gain)[1], sample, pool)
    palettes: list[list[np.ndarray]] = []
    for si, st in enumerate(stages):
        lay = Layout(st, c)
        pals = [_train_position(resid, lay, j, k, seed * 1009 + si * 31 + j, iters, per_centroid)
                for j, k in enumerate(st.ks)]
        palettes.append(pals)
        if si + 1 < len(stages):
            resid = resid - _by_blocks(lambda x: _quantise_stage(x, lay, pals)[1], resid, pool)
    return VqModel(tuple(stages), c, palettes, signs, blk, bool(gain))


def encode_block(model: VqModel, x: np.ndarray, rec: bool = False, cosines: bool = False) -> VqBlock:
    """Encode rows x (m, c) float32 with the group's shared parts. ``rec``: also
    return the reconstruction (what decode gives, up to float rounding);
    ``cosines``: the per-row cosine of x and its reconstruction (float64 (m,),
    computed in the rotated space, where it is the same: the rotation is orthonormal)."""
    n, c = x.shape
    y, yn, g0 = _prepare(x, model.signs, model.block, model.gain)
    resid = yn
    approx = np.zeros_like(yn)
    twigs = []
    for st, pals in zip(model.stages, model.palettes):
        tw, q = _quantise_stage(resid, Layout(st, c), pals)
        twigs.append(tw)
        approx += q
        resid = yn - approx
    g = None
    if model.gain:
        # least-squares refit of the gain to the quantised shape, stored bf16
        qq = np.einsum("ij,ij->i", approx, approx)
        xq = np.einsum("ij,ij->i", yn, approx)
        fit = np.where(qq > 0, xq / np.where(qq > 0, qq, 1.0), 1.0)
        g = to_bf16(g0 * fit).astype(np.float32)
        approx *= g[:, None]
    out = VqBlock(twigs, g)
    if cosines:
        out.cosines = row_cosines(y, approx)
    if rec:
        out.rec = rotate(approx, model.signs, inverse=True, block=model.block) if model.signs is not None else approx
    return out


def encode_rows(x: np.ndarray, stages: tuple[Stage, ...], gain: bool, rotate_rows: bool, seed: int,
                iters: int, per_centroid: int, train_rows: int | None = None) -> tuple[VqResult, np.ndarray]:
    """x: (n, c) float32, all in memory. Returns the encoding and the reconstruction (n, c) float32.

    ``train_rows``: palettes are trained on the first ``train_rows`` rows only
    (all when None) — the allocator's trials use it to measure distortion on
    rows the palettes did not see."""
    train = x if train_rows is None else x[:train_rows]
    model = fit_model(train, stages, gain, rotate_rows, seed, iters, per_centroid)
    blk = encode_block(model, x, rec=True)
    return VqResult(model.palettes, blk.twigs, blk.gain, model.signs), blk.rec


def decode_rows(palettes: list[list[np.ndarray]], twigs: list[np.ndarray], n_cols: int,
                gain: np.ndarray | None, signs: np.ndarray | None, block: int | None = None) -> np.ndarray:
    """Vectorised gathers: one per stage and pattern position. twigs[s]: (m, n_segments)."""
    m = twigs[0].shape[0] if twigs else 0
    out = None
    for pals, tw in zip(palettes, twigs):
        pals = [np.asarray(p, dtype=np.float32) for p in pals]
        widths = tuple(p.shape[1] for p in pals)
        period = sum(widths)
        n_periods = -(-n_cols // period)
        t3 = np.asarray(tw).reshape(m, n_periods, len(widths))
        if len(widths) == 1:  # one gather gives the whole stage, (m, n_periods, w)
            q = np.take(pals[0], t3[:, :, 0], axis=0)
        else:
            q = np.empty((m, n_periods, period), dtype=np.float32)
            off = 0
            for j, (p, w) in enumerate(zip(pals, widths)):
                np.take(p, t3[:, :, j], axis=0, out=q[:, :, off : off + w], mode="clip")
                off += w
        q2 = q.reshape(m, n_periods * period)[:, :n_cols]
        if out is None:
            out = q2 if n_periods * period == n_cols else q2.copy()  # q is ours: no copy needed
        else:
            out += q2
    if out is None:
        out = np.zeros((m, n_cols), dtype=np.float32)
    if gain is not None:
        out *= np.asarray(gain, dtype=np.float32)[:, None]
    if signs is not None:
        out = rotate(out, np.asarray(signs), inverse=True, block=block)
    return out


def palette_bytes(stages: tuple[Stage, ...], n_cols: int, n_rows: int) -> int:
    """Stored bytes of all palettes of a group (bf16) with ``n_rows`` rows in the group."""
    total = 0
    for st in stages:
        lay = Layout(st, n_cols)
        for j, w in enumerate(st.widths):
            total += lay.k_eff(j, n_rows) * w * BF16_BYTES
    return total


def twig_row_bytes(stages: tuple[Stage, ...], n_cols: int) -> int:
    return sum(Layout(st, n_cols).row_bytes() for st in stages)


__all__ = [
    "Layout", "Stage", "VqBlock", "VqModel", "VqResult", "assign", "decode_rows", "encode_block", "encode_rows",
    "fit_model", "hadamard_block", "hadamard_factors", "kronecker_factors", "HADAMARD_CHUNK", "KRONECKER_FROM",
    "palette_bytes", "parse_stages", "rotate", "rotation_signs", "stages_str", "sylvester", "train_palette",
    "twig_row_bytes",
]
