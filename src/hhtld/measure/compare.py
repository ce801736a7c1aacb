"""Comparing two runs of a model on the same texts: what the behaviour gates and the
calibrated encode's check measure (KL and argmax agreement for causal language
models; cosine and retrieval agreement for embedding models)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import GateError


@dataclass
class RunOutputs:
    """What one run produced, as numpy arrays (never torch tensors).

    embedding: ``embeddings`` float32 ``(n_texts, hidden)``, rows L2-normalised.
    causal: ``logprobs`` float32 ``(n_positions, vocab)`` next-token
    log-probabilities at every prompt position of every text, concatenated
    (memory grows with positions × vocabulary: for many texts or a large
    vocabulary use :func:`hhtld.gates.causal.compare_causal`, which keeps one
    batch at a time);
    ``offsets`` int64 ``(n_texts + 1,)`` where text ``i`` owns rows
    ``offsets[i]:offsets[i+1]``; ``greedy`` int64 ``(n_greedy, greedy_tokens)``
    greedy continuations (``None`` when not asked; shorter continuations that
    hit an end-of-sequence token are padded with -1).
    """

    family: str
    n_texts: int
    embeddings: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    offsets: np.ndarray | None = None
    greedy: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)




# -- the runner --------------------------------------------------------------------------


def retrieval_neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    """int64 ``(n, min(k, n-1))``: for each row of ``emb`` (n, d) the indices of
    its ``k`` most similar OTHER rows by dot product, best first (ties by index)."""
    n = emb.shape[0]
    k = min(k, n - 1)
    sim = emb.astype(np.float64) @ emb.astype(np.float64).T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    return order[:, :k]


def compare_embeddings_by_kind(ref: np.ndarray, new: np.ndarray, kinds) -> dict[str, dict[str, float]]:
    """:func:`compare_outputs` of two embedding runs ``(n_texts, hidden)`` for each kind
    of text on its own (``kinds``: one label per text), retrieval ranked among the
    texts of that kind: ``{kind: {"texts", "top1", "top10", "cos_mean", "cos_min"}}``."""
    labels = np.asarray(kinds)
    out = {}
    for k in dict.fromkeys(kinds):
        sel = labels == k
        n = int(sel.sum())
        out[k] = {"texts": n, **compare_outputs(RunOutputs("embedding", n, embeddings=ref[sel]),
                                                RunOutputs("embedding", n, embeddings=new[sel]))}
    return out


def compare_outputs(ref: RunOutputs, new: RunOutputs) -> dict[str, float]:
    """Agreement of ``new`` with ``ref`` (same texts, same family).

    embedding: ``top1`` fraction of sentences whose nearest other sentence is
    the same under both; ``top10`` mean ``|top10_ref ∩ top10_new| / 10``;
    ``cos_mean`` / ``cos_min`` cosine between each sentence's two embeddings.
    causal: ``top1`` teacher-forced next-token argmax agreement over all
    positions; ``kl_mean`` / ``kl_max`` KL(ref ‖ new) in nats per position;
    ``greedy_identical`` fraction of identical greedy continuations (only
    when both runs made them).
    """
    if ref.family != new.family or ref.n_texts != new.n_texts:
        raise GateError(f"cannot compare a {ref.family} run on {ref.n_texts} texts with a {new.family} run on {new.n_texts}")
    if ref.family == "embedding":
        a, b = ref.embeddings.astype(np.float64), new.embeddings.astype(np.float64)
        cos = np.sum(a * b, axis=1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        cos = np.clip(cos, -1.0, 1.0)
        out = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        if ref.n_texts < 2:
            raise GateError("retrieval agreement needs at least 2 texts")
        k = min(10, ref.n_texts - 1)
        na, nb = retrieval_neighbours(a, k), retrieval_neighbours(b, k)
        out["top1"] = float(np.mean(na[:, 0] == nb[:, 0]))
        overlap = [len(set(x) & set(y)) / k for x, y in zip(na.tolist(), nb.tolist())]
        out["top10"] = float(np.mean(overlap))
        return {k_: out[k_] for k_ in ("top1", "top10", "cos_mean", "cos_min")}
    if not np.array_equal(ref.offsets, new.offsets):
        raise GateError("the two causal runs tokenised the texts differently")
    p, q = ref.logprobs.astype(np.float64), new.logprobs.astype(np.float64)
    top1 = float(np.mean(p.argmax(axis=1) == q.argmax(axis=1)))
    kl = np.sum(np.exp(p) * (p - q), axis=1)
    kl = np.maximum(kl, 0.0)  # rounding can give -1e-12
    out = {"top1": top1, "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}
    if ref.greedy is not None and new.greedy is not None:
        n = min(len(ref.greedy), len(new.greedy))
        out["greedy_identical"] = float(np.mean(np.all(ref.greedy[:n] == new.greedy[:n], axis=1)))
    return out


__all__ = ["RunOutputs", "compare_embeddings_by_kind", "compare_outputs", "retrieval_neighbours"]
