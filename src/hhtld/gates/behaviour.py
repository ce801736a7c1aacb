"""Gates 2 and 4 from a comparison of two runs (:func:`~hhtld.measure.compare.compare_outputs`
for embedding models, :func:`~hhtld.gates.causal.compare_causal` for causal LMs).

Gate 2 — behaviour parity. Embedding models: top-1 retrieval agreement (the
nearest other held-out sentence is the same with original and decoded
weights). Causal LMs: held-out perplexity of the decoded model over the
original's (``ppl_ratio``); next-token top-1 agreement and identical greedy
continuations are reported, not gated (docs/design.md §5: on SmolLM2-135M even int8
weights keep only about 96 % of the top-1).

Gate 4 — output agreement: embedding models: mean cosine between each
sentence's original and decoded embedding (the minimum is reported); causal
LMs: mean KL(original ‖ decoded) of next-token distributions, in nats
(median, 99th percentile and maximum reported).

Measured on several kinds of text (``cmp["kinds"]``), both gates hold on the
worst kind: causal LMs, gate 2 on the largest perplexity ratio of any kind
and gate 4 on the largest mean KL; embedding models, the smallest top-1 and
the smallest mean cosine of any kind. Every kind's figures are in ``measured``.
"""

from __future__ import annotations

from typing import Any

from ..measure.targets import Thresholds
from .report import GateResult

CAUSAL_GATE2_KEYS = ("ppl_a", "ppl_b", "ppl_ratio", "nll_a", "nll_b", "top1", "positions",
                     "greedy_identical", "greedy_prefix", "greedy_tokens", "greedy_texts")
CAUSAL_GATE4_KEYS = ("kl_mean", "kl_max", "kl_p50", "kl_p90", "kl_p99", "positions")


KIND_KEYS = ("texts", "positions", "kl_mean", "kl_p50", "kl_p99", "kl_max", "ppl_a", "ppl_b", "ppl_ratio", "top1")


def per_kind(cmp: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{kind: figures}`` of a per-kind causal comparison (empty without kinds)."""
    return {k: {x: v[x] for x in KIND_KEYS if x in v} for k, v in (cmp.get("kinds") or {}).items()}


def worst_of(kinds: dict[str, dict[str, Any]], key: str, larger_is_worse: bool) -> tuple[str, float]:
    """(kind, value) of the kind whose figure ``key`` is worst."""
    kind = (max if larger_is_worse else min)(kinds, key=lambda k: kinds[k][key])
    return kind, kinds[kind][key]


def gate_behaviour(cmp: dict[str, Any], family: str, th: Thresholds) -> GateResult:
    if family == "embedding":
        kinds = cmp.get("kinds") or {}
        measured = {k: v for k, v in cmp.items() if k != "kinds"}
        if kinds:
            worst, top1 = worst_of(kinds, "top1", larger_is_worse=False)
            value = (f"top-1 retrieval {100 * top1:.1f}% on {worst}, the worst of {len(kinds)} kinds (all kinds "
                     f"{100 * cmp['top1']:.1f}%, top-10 overlap {100 * cmp['top10']:.1f}%)")
            measured.update(worst_kind=worst, worst_top1=top1, kinds=kinds)
        else:
            top1 = cmp["top1"]
            value = f"top-1 retrieval {100 * top1:.1f}% (top-10 overlap {100 * cmp['top10']:.1f}%)"
        return GateResult(2, value, f">={100 * th.min_top1:g}%", top1 >= th.min_top1, measured)
    kinds = per_kind(cmp)
    if kinds:
        worst, ratio = worst_of(kinds, "ppl_ratio", larger_is_worse=True)
        w = kinds[worst]
        value = (f"perplexity ratio {ratio:.4f} on {worst}, the worst of {len(kinds)} kinds ({w['ppl_a']:.2f} -> "
                 f"{w['ppl_b']:.2f}; all kinds {cmp['ppl_ratio']:.4f}); top-1 next token {100 * cmp['top1']:.1f}%")
    else:
        ratio = cmp["ppl_ratio"]
        value = (f"perplexity ratio {ratio:.4f} ({cmp['ppl_a']:.2f} -> {cmp['ppl_b']:.2f}); "
                 f"top-1 next token {100 * cmp['top1']:.1f}%")
    if "greedy_identical" in cmp:
        value += f"; greedy {cmp.get('greedy_tokens', 32)} identical {100 * cmp['greedy_identical']:.1f}%"
    measured = {k: cmp[k] for k in CAUSAL_GATE2_KEYS if k in cmp}
    if kinds:
        measured.update(worst_kind=worst, worst_ppl_ratio=ratio, kinds=kinds)
    return GateResult(2, value, f"ratio<={th.max_ppl_ratio:g}", ratio <= th.max_ppl_ratio, measured)


def gate_output(cmp: dict[str, Any], family: str, th: Thresholds) -> GateResult:
    if family == "embedding":
        kinds = cmp.get("kinds") or {}
        measured = {"cos_mean": cmp["cos_mean"], "cos_min": cmp["cos_min"]}
        if kinds:
            worst, cos = worst_of(kinds, "cos_mean", larger_is_worse=False)
            value = (f"cosine mean {cos:.4f} on {worst}, the worst of {len(kinds)} kinds (min {cmp['cos_min']:.4f}; "
                     f"all kinds {cmp['cos_mean']:.4f})")
            measured.update(worst_kind=worst, worst_cos_mean=cos, kinds=kinds)
            return GateResult(4, value, f"mean>={th.min_cosine:g}", cos >= th.min_cosine, measured)
        value = f"cosine mean {cmp['cos_mean']:.4f} (min {cmp['cos_min']:.4f})"
        return GateResult(4, value, f"mean>={th.min_cosine:g}", cmp["cos_mean"] >= th.min_cosine, measured)
    kinds = per_kind(cmp)
    measured = {k: cmp[k] for k in CAUSAL_GATE4_KEYS if k in cmp}
    if kinds:
        worst, _ = worst_of(kinds, "kl_mean", larger_is_worse=True)
        w = kinds[worst]
        value = (f"KL mean {w['kl_mean']:.4f} nats on {worst}, the worst of {len(kinds)} kinds (p99 {w['kl_p99']:.4f}; "
                 f"all kinds {cmp['kl_mean']:.4f})")
        measured.update(worst_kind=worst, worst_kl_mean=w["kl_mean"], kinds=kinds)
        return GateResult(4, value, f"mean<={th.max_kl:g}", w["kl_mean"] <= th.max_kl, measured)
    value = f"KL mean {cmp['kl_mean']:.4f} nats (max {cmp['kl_max']:.4f})"
    if "kl_p99" in cmp:
        value = f"KL mean {cmp['kl_mean']:.4f} nats (median {cmp['kl_p50']:.4f}, p99 {cmp['kl_p99']:.4f}, max {cmp['kl_max']:.4f})"
    return GateResult(4, value, f"mean<={th.max_kl:g}", cmp["kl_mean"] <= th.max_kl, measured)
