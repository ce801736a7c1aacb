"""Gates 2 and 4 from a comparison of two runs (:func:`compare_outputs`).

Gate 2 — behaviour parity: top-1 agreement. Embedding models: the nearest
other held-out sentence is the same with original and decoded weights.
Causal LMs: the teacher-forced next-token argmax is the same.

Gate 4 — output agreement: embedding models: mean cosine between each
sentence's original and decoded embedding (the minimum is reported); causal
LMs: mean KL(original ‖ decoded) of next-token distributions, in nats.
"""

from __future__ import annotations

from typing import Any

from .report import GateResult
from .targets import Thresholds


def gate_behaviour(cmp: dict[str, Any], family: str, th: Thresholds) -> GateResult:
    top1 = cmp["top1"]
    if family == "embedding":
        value = f"top-1 retrieval {100 * top1:.1f}% (top-10 overlap {100 * cmp['top10']:.1f}%)"
    else:
        value = f"top-1 next token {100 * top1:.1f}%"
        if "greedy_identical" in cmp:
            value += f" (greedy {cmp.get('greedy_tokens', 32)} identical {100 * cmp['greedy_identical']:.1f}%)"
    return GateResult(2, value, f">={100 * th.min_top1:g}%", top1 >= th.min_top1, dict(cmp))


def gate_output(cmp: dict[str, Any], family: str, th: Thresholds) -> GateResult:
    if family == "embedding":
        value = f"cosine mean {cmp['cos_mean']:.4f} (min {cmp['cos_min']:.4f})"
        return GateResult(4, value, f"mean>={th.min_cosine:g}", cmp["cos_mean"] >= th.min_cosine,
                          {"cos_mean": cmp["cos_mean"], "cos_min": cmp["cos_min"]})
    value = f"KL mean {cmp['kl_mean']:.4f} nats (max {cmp['kl_max']:.4f})"
    return GateResult(4, value, f"mean<={th.max_kl:g}", cmp["kl_mean"] <= th.max_kl,
                      {"kl_mean": cmp["kl_mean"], "kl_max": cmp["kl_max"]})
