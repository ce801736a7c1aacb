"""Two (or more) weight sets of one causal LM compared in bounded memory.

:func:`compare_causal` runs a :class:`~hhtld.gates.runner.ModelRunner` on
texts with weight source A and weight source B and measures, over every
teacher-forced position that has a next token in the text:

* ``kl_mean`` / ``kl_max`` / ``kl_p50`` / ``kl_p90`` / ``kl_p99`` — the
  next-token KL(A ‖ B) in nats, from the full-vocabulary distributions;
* ``top1`` — the fraction of positions where A's and B's argmax agree;
* ``nll_a`` / ``nll_b`` — mean negative log-likelihood of the text's next
  token in nats, ``ppl_a`` / ``ppl_b`` = exp of them, ``ppl_ratio`` = ppl_b / ppl_a;
* ``positions`` (positions counted), ``texts``, ``batch_size``, ``swaps``
  (weight-set changes), and with greedy continuations ``greedy_identical``
  (fraction of identical continuations) and ``greedy_prefix`` (mean number of
  leading tokens they share);
* given the kind of every text (prose, code, dialogue, ...), ``kinds``: the
  same statistics per kind, and ``worst_kind``: the kind with the largest
  mean KL (the gates hold on the worst kind, docs/design.md §5).

Memory: nothing of size positions × vocabulary is kept across batches. Per
batch of texts the model runs with one weight set, keeps that batch's
float32 log-probabilities ``(batch, tokens, vocab)``, switches to the other set
tensor by tensor (only the tensors a source replaces are touched) and
compares; the order alternates from batch to batch, so each batch costs one
switch. The batch is sized so that one such array stays under
``logits_budget`` bytes. Weights are never held twice: each source is read
one tensor at a time into the model's own parameters.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import GateError
from .sources import WeightSource, as_source

DEFAULT_LOGITS_BUDGET = 128 * 2**20  # bytes of one (batch, tokens, vocab) float32 array
KL_PERCENTILES = (50, 90, 99)


def vocab_size(runner) -> int:
    """Rows of the model's output head (the logits' last dimension)."""
    head = runner.model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(runner.model.config.vocab_size)


def causal_batch_size(runner, requested: int | None = None, logits_budget: int = DEFAULT_LOGITS_BUDGET) -> int:
    """Texts per batch: ``requested`` (default the runner's batch size), capped
    so that ``batch × max_tokens × vocab × 4`` bytes stay within ``logits_budget``."""
    per_text = int(runner.max_tokens) * vocab_size(runner) * 4
    cap = max(1, int(logits_budget) // max(per_text, 1))
    return max(1, min(int(requested or runner.batch_size), cap))


class _Tally:
    """Per-position statistics of one comparison, accumulated batch by batch."""

    def __init__(self) -> None:
        self.kl: list[np.ndarray] = []  # float64 (positions,) per text: small
        self.agree = 0
        self.nll_a = 0.0
        self.nll_b = 0.0
        self.n = 0

    def add(self, lp_a, lp_b, enc) -> None:
        """``lp_a``/``lp_b``: float32 torch ``(batch, tokens, vocab)`` log-probabilities of one batch."""
        ids = enc["input_ids"]
        mask = enc["attention_mask"].bool()
        valid = mask[:, :-1] & mask[:, 1:]  # position t predicts token t+1 of the text
        targets = ids[:, 1:]
        for i in range(ids.shape[0]):
            v = valid[i]
            n = int(v.sum())
            if n == 0:
                continue
            a = lp_a[i, :-1][v]
            b = lp_b[i, :-1][v]
            t = targets[i][v].unsqueeze(-1)
            # float32 terms, summed pairwise by torch: ~1e-7 relative error per term, KL exactly 0 when a == b
            kl = (a.exp() * (a - b)).sum(-1).clamp_min(0.0)
            self.kl.append(kl.double().numpy())
            self.agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            self.nll_a -= float(a.gather(-1, t).double().sum())
            self.nll_b -= float(b.gather(-1, t).double().sum())
            self.n += n

    def merged(self, others: Sequence["_Tally"]) -> "_Tally":
        """One tally of every position of ``others``."""
        t = _Tally()
        for o in others:
            t.kl += o.kl
            t.agree += o.agree
            t.nll_a += o.nll_a
            t.nll_b += o.nll_b
            t.n += o.n
        return t

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise GateError("the texts give no position with a next token to predict (each needs 2+ tokens)")
        kl = np.concatenate(self.kl)
        nll_a, nll_b = self.nll_a / self.n, self.nll_b / self.n
        out = {"positions": self.n, "top1": self.agree / self.n, "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}
        for q in KL_PERCENTILES:
            out[f"kl_p{q}"] = float(np.percentile(kl, q))
        out.update({"nll_a": nll_a, "nll_b": nll_b, "ppl_a": math.exp(nll_a), "ppl_b": math.exp(nll_b),
                    "ppl_ratio": math.exp(nll_b - nll_a)})
        return out


def _greedy_stats(ref: np.ndarray, new: np.ndarray) -> dict[str, float]:
    same = ref == new
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return {"greedy_identical": float(same.all(axis=1).mean()), "greedy_prefix": float(prefix.mean())}


def worst_kind(kinds: Mapping[str, Mapping[str, Any]]) -> str:
    """The kind with the largest mean KL (ties: the larger perplexity ratio)."""
    return max(kinds, key=lambda k: (kinds[k]["kl_mean"], kinds[k]["ppl_ratio"]))


def compare_causal_many(runner, texts: Sequence[str], reference=None,
                        candidates: Mapping[str, Any] | None = None, *, batch_size: int | None = None,
                        greedy_tokens: int = 0, greedy_texts: int | None = None,
                        logits_budget: int = DEFAULT_LOGITS_BUDGET, desc: str = "compare",
                        kinds: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Compare every candidate weight set with ``reference`` on ``texts``.

    ``reference`` and each candidate: ``None`` (the checkpoint's weights), a
    mapping of replacement arrays, or a :class:`~hhtld.gates.sources.WeightSource`.
    Returns ``{candidate name: statistics}`` (the keys of :func:`compare_causal`,
    A = reference, B = candidate). Per batch the reference runs once and each
    candidate once; the candidate order reverses from batch to batch so the
    weight set loaded at the end of one batch runs first in the next (n
    switches per batch for n candidates). The runner is left holding one of
    the weight sets. ``kinds``: the kind of each text; then every candidate's
    statistics also come per kind (``kinds``, ``worst_kind``), batches never mix
    kinds, and the greedy continuations run on the first texts of each kind.
    """
    if runner.family != "causal":
        raise GateError(f"{runner.config_path}: compare_causal needs a causal language model, this one is {runner.family}")
    texts = [str(t) for t in texts]
    if not texts:
        raise GateError("no texts to run the model on")
    if kinds is not None and len(kinds) != len(texts):
        raise GateError(f"{len(kinds)} kinds for {len(texts)} texts")
    labels = [str(k) for k in kinds] if kinds is not None else ["all"] * len(texts)
    by_kind = list(dict.fromkeys(labels))
    if not candidates:
        raise GateError("compare_causal needs at least one weight set to compare with the reference")
    if greedy_tokens < 0:
        raise GateError(f"greedy_tokens must be >= 0, got {greedy_tokens}")
    import torch
    from tqdm import tqdm

    ref = as_source(reference)
    names = list(candidates)
    cands = [as_source(candidates[k]) for k in names]
    if any(c is ref for c in cands):  # the same object twice: compare it with itself, copied separately
        cands = [_Alias(c) if c is ref else c for c in cands]
    bs = causal_batch_size(runner, batch_size, logits_budget)
    tallies = [{k: _Tally() for k in by_kind} for _ in cands]
    swaps = 0
    loaded: WeightSource | None = None

    def logprobs(src: WeightSource, enc):
        nonlocal swaps, loaded
        if src is not loaded:
            runner.set_weights(src)
            swaps += 1
            loaded = src
        logits = runner.model(**enc, use_cache=False).logits
        lp = torch.log_softmax(logits.float(), dim=-1)
        del logits
        if not torch.isfinite(lp).all():
            raise GateError(f"the model with {src.label} produces non-finite outputs")
        return lp

    order = list(range(len(cands)))
    spans = []  # (kind, index list) per batch: a batch holds texts of one kind
    for k in by_kind:
        idx = [i for i, lab in enumerate(labels) if lab == k]
        spans += [(k, idx[s:s + bs]) for s in range(0, len(idx), bs)]
    bar = tqdm(spans, desc=desc, unit="batch", disable=not runner.progress, leave=False, dynamic_ncols=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for bi, (kind, idx) in enumerate(bar):
            enc = runner._encode([texts[i] for i in idx])
            enc.pop("token_type_ids", None)
            seq = order if bi % 2 == 0 else order[::-1]
            if loaded is cands[seq[0]]:  # the candidate still loaded runs before the reference
                first = seq[0]
                lp_first = logprobs(cands[first], enc)
                lp_ref = logprobs(ref, enc)
                tallies[first][kind].add(lp_ref, lp_first, enc)
                del lp_first
                seq = seq[1:]
            else:
                lp_ref = logprobs(ref, enc)
            for i in seq:
                lp = logprobs(cands[i], enc)
                tallies[i][kind].add(lp_ref, lp, enc)
                del lp
            del lp_ref
        out = {}
        for k, t in zip(names, tallies):
            out[k] = {"texts": len(texts), **_Tally().merged(list(t.values())).result(), "batch_size": bs}
            if kinds is not None:
                out[k]["kinds"] = {kind: {"texts": labels.count(kind), **t[kind].result()} for kind in by_kind}
                out[k]["worst_kind"] = worst_kind(out[k]["kinds"])
        if greedy_tokens > 0:
            n = len(texts) if greedy_texts is None else min(len(texts), int(greedy_texts))
            if n > 0:
                # the first texts of each kind in turn, so every kind is continued
                firsts = [[i for i, lab in enumerate(labels) if lab == k] for k in by_kind]
                pick = [i for row in zip(*firsts) for i in row] if len(firsts) > 1 else firsts[0]
                prompts = [texts[i] for i in (pick + [i for i in range(len(texts)) if i not in set(pick)])[:n]]
                # the loaded set first, so the continuations cost one switch per candidate
                seq = [i for i in order if cands[i] is loaded] + [i for i in order if cands[i] is not loaded]
                done: dict[int, np.ndarray] = {}
                if seq and cands[seq[0]] is loaded:
                    done[seq[0]] = runner._greedy(prompts, greedy_tokens, desc)
                    seq = seq[1:]
                if loaded is not ref:
                    runner.set_weights(ref)
                    swaps += 1
                    loaded = ref
                g_ref = runner._greedy(prompts, greedy_tokens, desc)
                for i in seq:
                    runner.set_weights(cands[i])
                    swaps += 1
                    loaded = cands[i]
                    done[i] = runner._greedy(prompts, greedy_tokens, desc)
                for i, k in enumerate(names):
                    out[k].update(_greedy_stats(g_ref, done[i]), greedy_tokens=greedy_tokens, greedy_texts=n)
    for k in names:
        out[k]["swaps"] = swaps
    return out


class _Alias(WeightSource):
    """The same weights as another source under a distinct identity (so a
    comparison of a source with itself still loads both sides)."""

    def __init__(self, src: WeightSource):
        self.src = src
        self.label = src.label

    def names(self) -> list[str]:
        return self.src.names()

    def read(self, name: str) -> np.ndarray:
        return self.src.read(name)


def compare_causal(runner, texts: Sequence[str], source_a=None, source_b=None, *, batch_size: int | None = None,
                   greedy_tokens: int = 0, greedy_texts: int | None = None,
                   logits_budget: int = DEFAULT_LOGITS_BUDGET, desc: str = "compare",
                   kinds: Sequence[str] | None = None) -> dict[str, Any]:
    """Next-token agreement of weight set B with weight set A on ``texts``
    (module docstring: the keys, what is counted, the memory bound).

    ``source_a`` / ``source_b``: ``None`` (the runner's checkpoint), a mapping
    ``{original tensor name: array}`` or a :class:`~hhtld.gates.sources.WeightSource`
    (e.g. :class:`~hhtld.gates.sources.PackSource`). Texts are truncated to
    the runner's ``max_tokens``. Raises :class:`GateError` for a model that is
    not causal, no texts, or non-finite outputs.
    """
    return compare_causal_many(runner, texts, source_a, {"b": source_b}, batch_size=batch_size,
                               greedy_tokens=greedy_tokens, greedy_texts=greedy_texts,
                               logits_budget=logits_budget, desc=desc, kinds=kinds)["b"]
