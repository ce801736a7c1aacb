"""The calibrated encode's units: its plan, and how their results are kept for ``--resume``.

The units, in order (:data:`hhtld.pack.plan.UNIT_KINDS` says what each does):

1. ``analyse`` block 0 … n−1 — a **chain**: block ``i`` runs on the hidden states block
   ``i − 1`` produced; then ``analyse`` of the output head (its Hessian, from the last
   hidden states). Kept per block: the block's tensor statistics, their Hessians and
   the hidden states the next block reads.
2. ``trials`` per group — **independent**: the group's row sample at every rung.
3. ``fisher`` — a **chain** over the blocks (forward, then backward); one unit, kept whole.
4. per round: ``fit`` per (group, rung) and ``encode`` per tensor — **independent**
   (a tensor reads its fit and its Hessian) —, ``finish`` per (group, rung), the
   ``manifest`` (with the passthrough tensors), and the ``check`` of the written round.
   A tensor whose rung is the same in the next round is not encoded again: its
   encode depends only on the checkpoint, its rung, its group's sample and its
   Hessian, so the kept result is the one the round would compute.
5. per round with the block step: ``tune`` block 0 … n−1 — a **chain** (block ``i`` reads
   the hidden states the tuned blocks before it produced) —, the global step ``distil``
   (one unit: the whole model), then the pack written again with the tuned gains (a
   second ``manifest``) and its ``check``. Kept per block: its gains and what the step
   measured; the two streams of the last finished block; the global step's gains.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..budget.trials import TRIAL_ROWS
from ..classify import Plan
from ..pack.plan import FLOAT32, FLOAT64, EncodePlan, Unit, block_of, unit_memory
from .allocation import TensorStats
from .distill import DistillOptions
from .tuning import TuneOptions

_STAT_FIELDS = ("rows", "cols", "output_energy", "ldl_trace", "trace", "sensitivity")


def stats_arrays(stats: list[TensorStats]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """What is kept of some tensors' statistics: their row energies (arrays) and fields."""
    arrays = {f"row_energy.{i}": s.row_energy for i, s in enumerate(stats)}
    meta = [{"name": s.name, "group": s.group, "role": s.role, **{f: getattr(s, f) for f in _STAT_FIELDS}}
            for s in stats]
    return arrays, meta


def stats_from(arrays: dict[str, np.ndarray], meta: list[dict]) -> dict[str, TensorStats]:
    out = {}
    for i, m in enumerate(meta):
        out[m["name"]] = TensorStats(m["name"], m["group"], m["role"], int(m["rows"]), int(m["cols"]),
                                     np.array(arrays[f"row_energy.{i}"]), float(m["output_energy"]),
                                     float(m["ldl_trace"]), float(m["trace"]), float(m["sensitivity"]))
    return out


def allocation_key(alloc) -> str:
    """What a round's pack depends on: every tensor's rung."""
    return json.dumps(sorted((n, c.setting.name) for n, c in alloc.choices.items()))


def calibrated_plan(plan: Plan, *, width: int, sample_rows: int, tokens: int, head: str | None = None,
                    rounds: int = 1, fisher_tokens: int = 0, logit_rows: int = 0,
                    check_tokens: int = 0, tune_steps: int = 0, global_steps: int = 0,
                    texts: int = 1) -> EncodePlan:
    """The units of a calibrated encode of ``plan`` (module docstring) for its first round:
    blocks from the tensor names, ``tokens`` calibration tokens (the hidden states the
    analysis carries: ``tokens`` × width float32, three copies), ``fisher_tokens`` those of
    the Fisher pass (every block's inputs are kept for the backward pass) and
    ``logit_rows`` the positions whose full-vocabulary logits it holds at once and
    ``check_tokens`` those of the check (two streams of hidden states), ``texts`` the
    calibration texts ``tokens`` come from; ``tune_steps``: the
    block step after each round's encode (one chain unit per block) and ``global_steps`` the
    global step after it (one unit holding the whole model), then the pack written again
    with the tuned gains."""
    blocks: dict[int, list] = {}
    encoded = [t for g in plan.groups for t in g.tensors]
    outside = []
    for t in plan.tensors.values():
        b = block_of(t.name)
        if b is None:
            outside.append(t)
        else:
            blocks.setdefault(b, []).append(t)
    hidden = max((t.row_shape[1] for t in encoded), default=0)
    carry = 3 * tokens * hidden * FLOAT32
    outside_bytes = sum(int(np.prod(t.shape)) * FLOAT32 for t in outside if t.encoded or len(t.shape) == 2)
    total = sum(int(np.prod(t.shape)) for t in plan.tensors.values())
    n_encoded = sum(g.n_weights for g in plan.groups)
    units: list[Unit] = []
    prev: tuple[str, ...] = ()
    for i in sorted(blocks):
        ts = blocks[i]
        w = sum(int(np.prod(t.shape)) for t in ts)
        hess = sum(t.row_shape[1] ** 2 * FLOAT64 for t in ts if t.encoded)
        u = Unit("analyse", f"block {i}", prev, w, FLOAT32 * w + hess + carry)
        units.append(u)
        prev = (u.id,)
    if head is not None:
        cols = plan.tensors[head].row_shape[1]
        units.append(Unit("analyse", "head", prev, 0, carry + cols * cols * FLOAT64))
    analysed = tuple(u.id for u in units)
    trials = [Unit("trials", str(g.key), (), min(TRIAL_ROWS, g.n_rows) * g.key.shape[1],
                   unit_memory("trials", cols=g.key.shape[1], sample_rows=min(TRIAL_ROWS, g.n_rows)))
              for g in plan.groups]
    units += trials
    vocab = max((t.shape[0] for t in outside if t.encoded and len(t.shape) == 2), default=0)
    biggest = max((FLOAT32 * sum(int(np.prod(t.shape)) for t in ts) for ts in blocks.values()), default=0)
    fisher = (2 * biggest + fisher_tokens * hidden * FLOAT32 * (len(blocks) + 2)
              + 3 * logit_rows * vocab * FLOAT32 + outside_bytes)  # a block and its gradients, every block's inputs
    units.append(Unit("fisher", "all blocks", analysed, n_encoded, fisher))
    # the check: a block at a time, two streams of hidden states, logits of 128 positions at once
    check = biggest + 2 * check_tokens * hidden * FLOAT32 + 3 * 128 * vocab * FLOAT32 + outside_bytes
    ready = tuple(u.id for u in units)
    for rnd in range(rounds):
        tag = f" (round {rnd + 1})" if rounds > 1 else ""
        fin = []
        for g in plan.groups:
            rows, cols = g.key.shape
            m = min(sample_rows, g.n_rows)
            fit = Unit("fit", f"{g.key}{tag}", ready, m * cols, unit_memory("fit", cols=cols, sample_rows=m))
            mem = unit_memory("encode", rows, cols, hessian=True)
            enc = [Unit("encode", f"{t.name}{tag}", (fit.id,), rows * cols, mem, "feedback") for t in g.tensors]
            fu = Unit("finish", f"{g.key}{tag}", tuple(u.id for u in enc))
            fin.append(fu.id)
            units += [fit, *enc, fu]
        man = Unit("manifest", f"round {rnd + 1}", tuple(fin), total)
        units.append(man)
        if tune_steps or global_steps:
            prev = (man.id,)
            for i in sorted(blocks) if tune_steps else ():
                w = sum(int(np.prod(t.shape)) for t in blocks[i])
                # the block's weights, original and decoded; three streams; a step's activations
                step = min(tokens, TuneOptions().tokens) if tokens else TuneOptions().tokens
                u = Unit("tune", f"block {i}{tag}", prev, w, 2 * FLOAT32 * w + carry + _step_memory(blocks[i], step))
                units.append(u)
                prev = (u.id,)
            if global_steps:
                # the whole model in float32 twice (decoded, and the scaled copy the step differentiates)
                # and one step's activations of every block
                step = DistillOptions().texts * (tokens // max(1, texts))
                acts = sum(_step_memory(ts, step) for ts in blocks.values())
                u = Unit("distil", f"all tensors{tag}", prev, n_encoded, 2 * FLOAT32 * total + acts
                         + 3 * step * vocab * FLOAT32)
                units.append(u)
                prev = (u.id,)
            man = Unit("manifest", f"round {rnd + 1}, tuned gains", prev, total)
            units.append(man)
        units.append(Unit("check", f"round {rnd + 1}", (man.id,), n_encoded, check))
    notes = ["the rungs are chosen after the analysis: a group gets one fit and one finish per rung its tensors take",
             "a second round runs only when the first misses its target; it encodes again only the tensors whose "
             "rung changed"]
    return EncodePlan("calibrated", units, width, notes)


def _step_memory(tensors, tokens: int) -> int:
    """A step's activations: every linear layer's input and output for ``tokens`` tokens,
    kept for the backward pass."""
    return sum(tokens * (t.row_shape[0] + t.row_shape[1]) * FLOAT32 for t in tensors if t.encoded)


def keep_key(kind: str, name: str, extra: Any = "") -> str:
    """The key a calibrated unit's result is kept under."""
    return f"{kind}:{name}" + (f"|{extra}" if extra != "" else "")


__all__ = ["allocation_key", "calibrated_plan", "keep_key", "stats_arrays", "stats_from"]
