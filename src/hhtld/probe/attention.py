"""The codec-space attention probe (docs/design.md §6): can table lookups stand in for ``q · K[i]``?

For one key matrix ``K`` (rows = keys, ``n x d``):

* queries: ``queries`` rows of ``K`` drawn with a seeded generator (without
  replacement while there are enough rows), each plus Gaussian noise of
  standard deviation ``noise x RMS(row)`` per element — so the noise vector's
  norm is about ``noise`` times the row's norm (5 % by default);
* raw path: exact scores ``Q @ K.T``, top-1 and top-5 keys;
* codec path: the codec's palette is built on ``K`` (one-tensor group; not
  timed with the paths); each key has its twig; a query's twig is its nearest
  palette entry in the codec's own metric (Base17 fold + L1 for ``hhtl-d``,
  squared L2 for ``hhtl-f32``); codec scores are the Fisher-z lookups
  ``fisher_z[twig(q), twig(K[i])]`` (the diagonal counts as cosine 1). Keys
  with equal codec scores (same twig, or equal int8 codes) are ranked by
  index, the way a lookup engine would without further information.

Agreement: ``top1`` = codec top-1 key is the raw top-1 key; ``top5`` = mean
overlap of the two top-5 lists (|A ∩ B| / 5); ``top1_in_top5`` = the raw
top-1 key is in the codec's top-5; ``top1_tied`` = the raw top-1 key is among
the keys tied at the codec's best score (an upper bound a tie-breaker could
reach). Verdict on ``top1``: ≥ 90 % viable, 70–90 % needs escalation, < 70 %
not competitive; "not measurable" when the key matrix has fewer than 2
distinct non-zero rows (no ranking to agree on). When the palette has fewer
entries than requested (fewer rows, or fewer distinct rows, than ``k``) the
result says so (``k_requested``, ``k_reduced``, ``k_note``) and so does the
report. The route-table action mix is given over all query x key
pairs, at the raw top-1 key, and over the table. For ``hhtl-f32`` (whose pack
has no route table) HIP families and the route table are built the same way
on the f32 palette's squared-L2 distances.
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ..checkpoint import open_checkpoint
from ..classify import DEFAULT_RULES, GroupKey, RuleTable
from ..codecs.reference.base17_fold import fold
from ..codecs.reference.fisher_z_quality import fisher_z_quality
from ..codecs.reference.fisher_z import FisherZTable
from ..codecs.reference.shared_group import build_group_with_fisher_z
from ..codecs.reference.route_cache import HhtlCache, action_mix
from ..codecs.reference.hhtl_d_tensor import build_shared
from ..codecs.reference.hip import hip_families
from ..codecs.reference.palette import assign_nearest, check_k
from ..errors import OptionsError
from ..format import RouteAction

VIABLE_TOP1 = 0.90
NOT_MEASURABLE = "not measurable"
SEED_LIMIT = 2**31
ESCALATION_TOP1 = 0.70
PROBE_CODECS = ("hhtl-d", "hhtl-f32")
TOP = 5


def verdict_band(top1: float) -> str:
    """≥ 90 % viable, 70–90 % needs escalation, < 70 % not competitive."""
    if top1 >= VIABLE_TOP1:
        return "viable"
    if top1 >= ESCALATION_TOP1:
        return "needs escalation"
    return "not competitive"


_BAND_TEXT = {"viable": "≥ 90 %", "needs escalation": "70–90 %", "not competitive": "< 70 %",
              NOT_MEASURABLE: "the key matrix has fewer than 2 distinct non-zero rows"}


@dataclass
class AttentionProbeResult:
    model: str
    tensor: str
    shape: tuple[int, int]
    group: str
    codec: str
    k: int  # palette entries actually built (<= requested k)
    queries: int
    noise: float
    seed: int
    top1: float
    top5: float
    top1_in_top5: float
    top1_tied: float
    mean_tie_size: float
    twig_hit: float  # query twig == twig of the key row it came from
    verdict: str
    action_mix: dict[str, float]  # over all query x key pairs
    action_mix_top1: dict[str, float]  # at the raw top-1 key of each query
    table_action_mix: dict[str, float]  # off-diagonal pairs of the route table
    route_thresholds: dict[str, float]
    fisher_z_quality: dict[str, Any]
    raw_seconds: float
    codec_seconds: float
    build_seconds: float
    k_requested: int = 0  # the k asked for
    k_reduced: bool = False  # the palette has fewer entries than k_requested
    k_note: str | None = None  # why, when k_reduced
    distinct_rows: int = 0  # distinct rows of the key matrix
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def format(self) -> str:
        def pct(x: float) -> str:
            return f"{100 * x:5.1f} %"

        def mix(m: dict[str, float]) -> str:
            return "  ".join(f"{a.name} {100 * m[a.name]:.1f} %" for a in RouteAction)

        fq = self.fisher_z_quality
        rho = "n/a" if fq.get("spearman") is None else f"{fq['spearman']:.4f}"
        n, d = self.shape
        notes = [f"  note: {self.k_note}"] if self.k_reduced and self.k_note else []
        return "\n".join([
            f"probe attention: {self.tensor} [{n}x{d}] ({self.group}), codec {self.codec}, k={self.k}",
            *notes,
            f"  {self.queries} queries = key rows + noise {self.noise:g} x row RMS (seed {self.seed})",
            f"  top-1 agreement  {pct(self.top1)}   verdict: {self.verdict} ({_BAND_TEXT[self.verdict]})",
            f"  top-5 agreement  {pct(self.top5)}   (overlap of the top-5 lists); raw top-1 in codec top-5: "
            f"{pct(self.top1_in_top5).strip()}",
            f"  ties: raw top-1 among the keys tied at the codec's best score {pct(self.top1_tied).strip()}; "
            f"{self.mean_tie_size:.2f} keys tied at the top on average",
            f"  query twig = twig of its source row: {pct(self.twig_hit).strip()}",
            f"  route actions, all query x key pairs: {mix(self.action_mix)}",
            f"  route action at the raw top-1 key:    {mix(self.action_mix_top1)}",
            f"  route table (off-diagonal pairs):     {mix(self.table_action_mix)}",
            f"  Fisher-z table: Spearman {rho}, mean |restore error| {fq['mean_abs_error']:.4f} "
            f"(max {fq['max_abs_error']:.4f}) over {fq['pairs']} pairs",
            f"  time: raw {1e3 * self.raw_seconds:.2f} ms (dot products + top-5), codec "
            f"{1e3 * self.codec_seconds:.2f} ms (query twigs + table lookups + top-5); "
            f"palette build {1e3 * self.build_seconds:.0f} ms (offline)",
        ])


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _load_key_matrix(model, tensor: str, rules: RuleTable) -> tuple[np.ndarray, GroupKey]:
    ckpt = open_checkpoint(model)
    info = ckpt.tensors.get(tensor)
    if info is None:
        close = difflib.get_close_matches(tensor, list(ckpt.tensors), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise OptionsError(f"{ckpt.path}: no tensor named '{tensor}'{hint}")
    if len(info.shape) != 2:
        raise OptionsError(f"{ckpt.path}: tensor '{tensor}' is {len(info.shape)}-D {list(info.shape)}; "
                           f"the attention probe needs a 2-D key matrix")
    if not info.is_float:
        raise OptionsError(f"{ckpt.path}: tensor '{tensor}' is {info.dtype} {list(info.shape)}, not a float "
                           f"matrix; the attention probe needs float keys")
    k_mat = ckpt.read_float(tensor)  # (n, d) float32
    if rules.transposed(tensor):
        k_mat = np.ascontiguousarray(k_mat.T)
    if not np.all(np.isfinite(k_mat)):
        raise OptionsError(f"{ckpt.path}: tensor '{tensor}' holds non-finite values")
    key = GroupKey(rules.component(tensor), rules.role(tensor), tuple(k_mat.shape))
    return np.ascontiguousarray(k_mat, dtype=np.float32), key


def _top_float(s: np.ndarray, top: int) -> np.ndarray:
    """s (m, n) → (m, top) indices of the largest scores, best first."""
    part = np.argpartition(-s, top - 1, axis=1)[:, :top]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _top_codes(c: np.ndarray, top: int) -> np.ndarray:
    """c (m, n) integer codes → (m, top) indices, best first, ties to the lower key index."""
    n = c.shape[1]
    key = c.astype(np.int64) * n + (n - 1 - np.arange(n))[None, :]  # unique per row
    return _top_float(key, top)


def _codec_parts(codec: str, k_mat: np.ndarray, key: GroupKey, k: int, name: str):
    """→ (key twigs (n,), FisherZTable, HhtlCache, quality json, query-twig function, k')."""
    if codec == "hhtl-d":
        shared, twig, _ = build_shared(k_mat, fold(k_mat), k)
        assign: Callable[[np.ndarray], np.ndarray] = lambda q: shared.palette.assign(fold(q))[0]
        return twig, shared.fisher_z, shared.cache, shared.quality.to_json(), assign, shared.k
    g = build_group_with_fisher_z(key, [name], [k_mat], k)
    c = g.palette.centroids  # (k, d) real rows, bf16-exact
    csq = np.einsum("ij,ij->i", c, c).astype(np.float64)
    dist = np.maximum(csq[:, None] + csq[None, :] - 2.0 * (c.astype(np.float64) @ c.T.astype(np.float64)), 0.0)
    np.fill_diagonal(dist, 0.0)
    cache = HhtlCache.build(dist, hip_families(dist))
    assign = lambda q: assign_nearest(q, c)[0]
    return (g.tensors[name].twig.astype(np.int64), g.fisher_z, cache,
            fisher_z_quality(g.fisher_z, c).to_json(), assign, g.palette.k)


def _effective_codes(fz: FisherZTable) -> np.ndarray:
    """(k, k) int16 codes ordered like ``fz.lookup``: the diagonal (cosine 1) above every int8 code."""
    eff = fz.table.astype(np.int16)
    np.fill_diagonal(eff, 128)
    return eff


def probe_attention(model: str | os.PathLike, tensor: str, queries: int = 512, noise: float = 0.05,
                    k: int = 256, codec: str = "hhtl-d", seed: int = 0, rules: RuleTable = DEFAULT_RULES,
                    repeats: int = 3) -> AttentionProbeResult:
    """Run the probe on ``tensor`` of ``model`` (file, index or folder). Times are the best of ``repeats``."""
    if codec not in PROBE_CODECS:
        raise OptionsError(f"probe attention: unknown codec '{codec}' (choose from {', '.join(PROBE_CODECS)})")
    if isinstance(queries, bool) or not isinstance(queries, (int, np.integer)) or queries < 1:
        raise OptionsError(f"probe attention: --queries must be a positive integer, got {queries!r}")
    if (isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating))
            or not np.isfinite(noise) or noise < 0):
        raise OptionsError(f"probe attention: --noise must be a finite number >= 0, got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
        raise OptionsError(f"probe attention: --seed must be an integer with 0 <= seed < 2**31, got {seed!r}")
    k = check_k(k)
    queries, noise, seed = int(queries), float(noise), int(seed)
    k_mat, key = _load_key_matrix(model, tensor, rules)
    n, d = k_mat.shape
    if n == 0 or d == 0:
        raise OptionsError(f"probe attention: tensor '{tensor}' is empty {[n, d]}")
    top = min(TOP, n)
    uniq = np.unique(k_mat, axis=0)  # (distinct, d)
    distinct = int(uniq.shape[0])
    distinct_nonzero = int(np.count_nonzero(np.any(uniq != 0, axis=1)))

    rng = np.random.default_rng(seed)
    src = rng.choice(n, size=queries, replace=queries > n)  # (m,)
    base = k_mat[src]  # (m, d)
    rms = np.sqrt(np.mean(base.astype(np.float64) ** 2, axis=1)).astype(np.float32)  # (m,)
    q = base + np.float32(noise) * rms[:, None] * rng.standard_normal(base.shape).astype(np.float32)

    t0 = time.perf_counter()
    ktwig, fz, cache, quality, assign, kk = _codec_parts(codec, k_mat, key, k, tensor)
    build_s = time.perf_counter() - t0
    eff = _effective_codes(fz)

    raw_s = codec_s = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        scores = q @ k_mat.T  # (m, n)
        raw_top = _top_float(scores, top)  # (m, top)
        raw_s = min(raw_s, time.perf_counter() - t0)

        t0 = time.perf_counter()
        qtwig = np.asarray(assign(q), dtype=np.int64)  # (m,)
        codes = eff[qtwig[:, None], ktwig[None, :]]  # (m, n) int16
        codec_top = _top_codes(codes, top)  # (m, top)
        codec_s = min(codec_s, time.perf_counter() - t0)

    rows = np.arange(queries)
    raw1, codec1 = raw_top[:, 0], codec_top[:, 0]
    best = codes.max(axis=1)  # (m,)
    top1 = float(np.mean(raw1 == codec1))
    k_note = None
    if kk < k:
        if distinct < k:
            why = (f"the tensor has only {_count(n, 'row')}" if distinct == n
                   else f"the tensor has only {_count(distinct, 'distinct row')}")
            if kk < distinct:
                why += f", and the codec's palette build found only {_count(kk, 'distinct entry', 'distinct entries')}"
        else:
            why = (f"the codec's palette build found only {_count(kk, 'distinct entry', 'distinct entries')} "
                   f"among {distinct} distinct rows")
        k_note = f"palette has {_count(kk, 'entry', 'entries')}, not {k}: {why}"
    res = AttentionProbeResult(
        model=str(model), tensor=tensor, shape=(n, d), group=str(key), codec=codec, k=kk,
        queries=int(queries), noise=float(noise), seed=int(seed),
        top1=top1,
        top5=float(np.mean((raw_top[:, :, None] == codec_top[:, None, :]).any(axis=2).sum(axis=1) / top)),
        top1_in_top5=float(np.mean((codec_top == raw1[:, None]).any(axis=1))),
        top1_tied=float(np.mean(codes[rows, raw1] == best)),
        mean_tie_size=float(np.mean((codes == best[:, None]).sum(axis=1))),
        twig_hit=float(np.mean(qtwig == ktwig[src])),
        verdict=verdict_band(top1) if distinct_nonzero >= 2 else NOT_MEASURABLE,
        action_mix=action_mix(cache.route[qtwig[:, None], ktwig[None, :]]),
        action_mix_top1=action_mix(cache.route[qtwig, ktwig[raw1]]),
        table_action_mix=cache.table_mix(),
        route_thresholds={"attend_max": cache.attend_max, "skip_min": cache.skip_min,
                          "attend_percentile": cache.attend_percentile, "skip_percentile": cache.skip_percentile},
        fisher_z_quality=quality,
        raw_seconds=raw_s, codec_seconds=codec_s, build_seconds=build_s,
        k_requested=k, k_reduced=kk < k, k_note=k_note, distinct_rows=distinct,
        extra={"top": top, "raw_self_top1": float(np.mean(raw1 == src))},
    )
    return res


__all__ = ["AttentionProbeResult", "ESCALATION_TOP1", "NOT_MEASURABLE", "PROBE_CODECS", "VIABLE_TOP1", "probe_attention", "verdict_band"]
