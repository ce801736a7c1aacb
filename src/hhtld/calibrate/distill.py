"""The global step: a short end-to-end distillation of the row gains to the original model.

After the block step (:mod:`hhtld.calibrate.tuning`), every encoded tensor's per-row
gains are tuned together so that the whole model with its decoded weights
reproduces the original model's outputs on the calibration texts:

* causal LMs: the mean next-token KL divergence from the original's distribution,
  kept as its ``TOP_K`` most likely tokens per position and the mass of all the
  others as one more outcome (so the loss is a KL divergence between two
  distributions over k + 1 outcomes, zero only when they agree), computed once,
  block by block;
* embedding models: one minus the cosine of the mean-pooled embeddings.

Codes, palettes, norms and biases stay as they are; only the gains of the blocks'
linear layers move (multipliers ``1 + s``, stored as bf16 gains; the embedding's and
head's per-token gains would fit the calibration's token counts). The calibration
texts are cut into batches of ``texts``; every ``HOLD_OUT``-th batch is held out of the
training and the step is judged on those: Adam, ``steps`` steps, one training batch
each in turn; every ``JUDGE_EVERY`` steps the held-out loss with the stored (bf16)
gains is measured, the best gains so far are kept, and ``PATIENCE`` measurements
without a new best end the step. Gains that never beat the held-out loss before the
step are not taken: the step never makes the held-out loss worse.

Unlike the block step, the global step holds the whole model (its decoded weights in
float32, and one batch's activations for the backward pass), and on SmolLM2-135M it
costs about as much as the block step for a smaller gain (BENCHMARKS.md), so it runs
only when asked for (``--global-steps N``); above ``MAX_BYTES`` of float32 weights a
note says what it holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .tuning import TUNE_THREADS, TorchThreads, check_options, gain_ratio, stored_gain

TOP_K = 64  # the original's most likely tokens kept per position
MAX_BYTES = 1 << 30  # float32 weights above which a note says what the global step holds
HOLD_OUT = 4  # every 4th batch of texts is held out of the training: the step is judged on those
JUDGE_EVERY = 4  # steps between two measurements on the held-out texts
PATIENCE = 2  # measurements without a new best that end the step


@dataclass(frozen=True)
class DistillOptions:
    """``steps`` Adam steps of learning rate ``lr``, ``texts`` calibration texts per step
    (taken in turn)."""

    steps: int = 32
    texts: int = 4
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_options(self, "global step", {"steps": 0, "texts": 1}, ("lr",))

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "texts": self.texts, "lr": self.lr}


@dataclass
class DistillReport:
    loss_before: float
    loss_after: float
    steps: int
    kept: bool
    seconds: float
    loss: str

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "loss_before": self.loss_before, "loss_after": self.loss_after,
                "steps": self.steps, "kept": self.kept, "seconds": round(self.seconds, 3)}


def teacher_targets(lw, batches, family: str) -> list[Any]:
    """What the original model gives on ``batches``, one block at a time: causal, per
    batch (log-probabilities (B, T, k + 1) of the top k tokens and of the rest, the top
    k's token ids (B, T, k));
    embedding, per batch the normalised mean-pooled embeddings (B, d)."""
    import torch

    lw.capture(batches)
    lw.release(lw.outside_blocks())
    for i in range(len(lw.blocks)):
        keys = lw.keys_under(lw.block_prefix(i))
        lw.materialise(keys)
        lw.run_block(i, batches)
        lw.release(keys)
    out = []
    if family != "causal":
        for b in batches:
            out.append(_pooled(b.hidden, b.attention_mask))
        return out
    outside = lw.outside_blocks()
    lw.materialise(outside)
    norm = lw.final_norm()
    head = lw.model.get_output_embeddings()
    with torch.no_grad():
        for b in batches:
            x = norm(b.hidden) if norm is not None else b.hidden
            tops, idxs = [], []
            for r in range(x.shape[0]):  # one text's full-vocabulary logits at a time
                logp = torch.log_softmax(head(x[r]).float(), dim=-1)
                top, idx = logp.topk(TOP_K, dim=-1)
                tops.append(torch.cat([top, _log_rest(top)], dim=-1))  # the top k and the rest's mass
                idxs.append(idx)
            out.append((torch.stack(tops), torch.stack(idxs)))
    lw.release(outside)
    return out


def _log_rest(logp):
    """log(1 − Σ exp(logp)) over the last axis, kept as one more column: the mass of the
    tokens outside the top k (at least 1e-12)."""
    import torch

    return torch.log((1.0 - logp.exp().sum(-1, keepdim=True)).clamp(min=1e-12))


def _pooled(h, mask):
    import torch

    m = mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def distill_gains(lw, pack, batches, family: str, opts: DistillOptions, gains: dict[str, np.ndarray] | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], DistillReport]:
    """The global step (module docstring) for the encoded tensors of ``lw``'s blocks in ``pack``,
    starting from ``gains`` (tensor name → stored bf16 gains, e.g. the block step's; the
    pack's own for the others). Returns the gains to store for every tuned tensor and
    what the step measured."""
    import torch
    from torch.func import functional_call

    from ..classify.shapes import from_row_matrix

    from .layerwise import Batch

    t0 = time.perf_counter()
    gains = dict(gains or {})
    k = opts.texts  # the calibration batches cut into batches of ``texts`` texts: one step each
    batches = [Batch(b.input_ids[r : r + k], b.attention_mask[r : r + k]) for b in batches
               for r in range(0, int(b.input_ids.shape[0]), k)]
    with TorchThreads(TUNE_THREADS):
        torch.manual_seed(0)
        targets = teacher_targets(lw, batches, family)
        encoded = set(pack.encoded_names())
        layers = []  # (name, parameter key, axis, decoded weight with the starting gains, starting gain)
        override = {}
        inside = set(lw.keys_under(lw.blocks_path))
        for name, key in lw.param_of.items():
            info = pack.info(name) if name in encoded and key in inside else None
            if info is None or "gain" not in info["parts"] or len(info["shape"]) != 2:
                continue
            stored = np.asarray(pack.tensor_parts(name)["gain"], dtype=np.float32)
            w = from_row_matrix(pack.rows(name), info["shape"], bool(info.get("transposed")))
            start = gains.get(name)
            if start is not None:
                mult = gain_ratio(start, stored)
                w = w * (mult[None, :] if info.get("transposed") else mult[:, None])
                stored = start.astype(np.float32)
            override[name] = w
            axis = 1 if info.get("transposed") else 0
            layers.append((name, key, axis, stored))
        keys = [k for k, _ in lw.model.named_parameters(remove_duplicate=False)]
        lw.materialise(keys, override=override)
        params = dict(lw.model.named_parameters(remove_duplicate=False))
        base = {key: params[key].detach() for _, key, _, _ in layers}
        s = [torch.zeros(g.shape[0], dtype=torch.float32, requires_grad=True) for *_, g in layers]

        def weights(mults):
            out = {}
            for (_, key, axis, _), m in zip(layers, mults):
                out[key] = base[key] * (m[:, None] if axis == 0 else m[None, :])
            return out

        def loss_of(j, mults, grad: bool):
            b = batches[j]
            with torch.set_grad_enabled(grad):
                kw = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
                if family == "causal":
                    kw["use_cache"] = False
                res = functional_call(lw.model, weights(mults), (), kw)
                if family == "causal":
                    logq = torch.log_softmax(res.logits.float(), dim=-1).gather(-1, targets[j][1])
                    logq = torch.cat([logq, _log_rest(logq)], dim=-1)
                    top = targets[j][0]
                    kl = (top.exp() * (top - logq)).sum(-1)  # (B, T)
                    m = b.attention_mask.to(kl.dtype)
                    return (kl * m).sum(), m.sum()
                emb = _pooled(res.last_hidden_state, b.attention_mask)
                return (1.0 - (emb * targets[j]).sum(-1)).sum(), torch.tensor(float(emb.shape[0]))

        held = [j for j in range(len(batches)) if j % HOLD_OUT == HOLD_OUT - 1] if len(batches) >= HOLD_OUT else []
        train = [j for j in range(len(batches)) if j not in held] or list(range(len(batches)))
        judge = held or train  # the texts the step is judged on: held out of its training

        def measure(mults) -> float:
            tot, n = 0.0, 0.0
            for j in judge:
                e, c = loss_of(j, mults, False)
                tot += float(e)
                n += float(c)
            return tot / max(n, 1.0)

        def stored(xs) -> dict[str, np.ndarray]:
            return {name: stored_gain(g, x.detach().numpy()) for (name, _, _, g), x in zip(layers, xs)}

        def as_mults(new) -> list:
            return [torch.from_numpy(gain_ratio(new[name], g)) for name, _, _, g in layers]

        before = measure([torch.ones(g.shape[0], dtype=torch.float32) for *_, g in layers])
        best, best_loss, worse = None, before, 0
        opt = torch.optim.Adam(s, lr=opts.lr) if layers else None
        done = 0
        for step in range(opts.steps if layers else 0):
            opt.zero_grad(set_to_none=True)
            err, cnt = loss_of(train[step % len(train)], [1.0 + x for x in s], True)
            cnt = float(cnt)
            (err / max(cnt, 1.0)).backward()
            opt.step()
            done += 1
            if done % JUDGE_EVERY == 0 or done == opts.steps:
                new = stored(s)
                loss = measure(as_mults(new))
                if loss < best_loss:
                    best, best_loss, worse = new, loss, 0
                else:
                    worse += 1
                if log:
                    log(f"  global step {done}/{opts.steps}: held-out loss {loss:.4g} (before {before:.4g})")
                if worse >= PATIENCE:
                    break
        lw.release(keys)
    after = best_loss
    kept = best is not None
    out = best if kept else {name: gains[name] for name, *_ in layers if name in gains}
    return out, DistillReport(before, after if kept else before, done, kept, time.perf_counter() - t0,
                              "next-token KL (top 64 and the rest)" if family == "causal" else "1 - embedding cosine")


__all__ = ["MAX_BYTES", "TOP_K", "DistillOptions", "DistillReport", "distill_gains", "teacher_targets"]
