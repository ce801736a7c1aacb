"""Calibrated encode: layer-wise Hessians, per-tensor rungs, error feedback, one check.

1. **Analysis.** Calibration tokens (prose passages for causal LMs, the
   calibration sentences for embedding models; never the held-out sets of
   ``verify``) run through the original model one block at a time; the
   inputs of every linear layer give its Hessian, and with it the predicted
   output error of each rung (:mod:`hhtld.calibrate.allocation`).
2. **Allocation.** Per tensor the rung that buys the most predicted output
   agreement per bit, until the goal (or a ``--bpw`` budget) is met. Tensors
   of a group at the same rung share palettes (trained on the group's
   sample, as in the data-free encode).
3. **Encode.** The blocks run again, now on the stream of already encoded
   blocks (GPTQ's sequential order): each linear layer is encoded with error
   feedback against the Hessian of its actual inputs, the block is run with
   the decoded weights, and the next block sees its output. Embedding and
   output tables are encoded last (an output head against the Hessian of the
   final hidden states).
4. **Check.** The written pack against the original model on calibration
   text: mean next-token KL and perplexity ratio (causal LMs), top-1
   retrieval and embedding cosine (embedding models). A target that is not
   met is reported as missed; the pack is still written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..checkpoint import open_checkpoint
from ..checkpoint.rows import TensorRows
from ..classify import DEFAULT_RULES, EncodablePolicy, RuleTable, plan_checkpoint
from ..classify.groups import GroupPlan
from ..codecs.parallel import encode_pool
from ..codecs.registry import make_codec
from ..errors import GateError, OptionsError
from ..format import DEFAULT_SAMPLE_ROWS
from .allocation import TensorAllocation, TensorStats, allocate, tensor_stats
from .fisher import fisher_diagonals

DEFAULT_TEXTS = 64  # calibration passages (causal) ...
DEFAULT_SEQ_LEN = 256  # ... of this many tokens
DEFAULT_SENTENCES = 256  # calibration sentences (embedding models)
BATCH = 8
CHECK_TEXTS = 32  # calibration passages of the final check
FISHER_TEXTS = 16  # calibration texts the Fisher diagonal is taken on ...
FISHER_BATCH = 2  # ... a few at a time (the head's logits of a batch are in memory)


@dataclass
class CalibrationReport:
    family: str
    target: dict[str, Any]
    allocation: TensorAllocation
    stats: list[TensorStats]
    check: dict[str, Any] = field(default_factory=dict)
    met: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # per tensor: rung, cosines, output error

    def to_json(self) -> dict:
        groups: dict[str, dict[str, int]] = {}
        for c in self.allocation.choices.values():
            groups.setdefault(c.group, {}).setdefault(c.setting.name, 0)
            groups[c.group][c.setting.name] += 1
        return {"family": self.family, "target": self.target, "met": self.met, "check": self.check,
                "notes": self.notes, "seconds": self.seconds, "calibration_tokens": self.tokens,
                "bpw_tensors": round(self.allocation.bits / max(1, self.allocation.weights), 4),
                "predicted_error": self.allocation.predicted, "rungs_per_group": groups,
                "tensors": [c.to_json() for c in self.allocation.choices.values()]}


# -- calibration data ------------------------------------------------------------------------
def calibration_batches(tok, family: str, n_texts: int, seq_len: int, batch: int = BATCH):
    """Token batches for the calibration: ``n_texts`` calibration passages cut to
    ``seq_len`` tokens (causal LMs), or calibration sentences padded per batch
    (embedding models). Never the held-out texts of ``verify``."""
    import torch

    from .layerwise import Batch

    out = []
    if family == "causal":
        from ..gates.texts import calibration_passages

        ids = []
        for text in calibration_passages():
            x = tok(text)["input_ids"]
            if len(x) >= seq_len:
                ids.append(x[:seq_len])
            if len(ids) == n_texts:
                break
        if not ids:
            raise GateError(f"no calibration passage has {seq_len} tokens; use a shorter --calibration-tokens")
        for s in range(0, len(ids), batch):
            t = torch.tensor(ids[s : s + batch], dtype=torch.long)
            out.append(Batch(t, torch.ones_like(t)))
        return out
    from ..gates.texts import calibration_texts

    texts = calibration_texts()[:n_texts]
    for s in range(0, len(texts), batch):
        enc = tok(texts[s : s + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(Batch(enc["input_ids"], enc["attention_mask"]))
    return out


def _head_hessian(lw, batches) -> tuple[np.ndarray, int]:
    """``XᵀX`` of the output head's input (the final norm of the last hidden states)."""
    import torch

    norm = lw.final_norm()
    h = None
    n = 0
    with torch.no_grad():
        for b in batches:
            x = b.hidden if norm is None else norm(b.hidden)
            x = x.reshape(-1, x.shape[-1])[b.valid].float()
            xtx = (x.T @ x).double().numpy()
            h = xtx if h is None else h + xtx
            n += int(b.valid.sum())
    return h, n


def head_name(lw) -> str | None:
    """The checkpoint tensor of the output head (lm_head, or the embedding it is tied to)."""
    head = lw.model.get_output_embeddings() if hasattr(lw.model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return None
    for key, p in lw.model.named_parameters(remove_duplicate=False):
        if p is head.weight:
            for k in lw.ties.get(key, [key]):
                if k in lw.key_to_name:
                    return lw.key_to_name[k]
    return None


def _to_original(t, rows: np.ndarray) -> np.ndarray:
    from ..classify.shapes import from_row_matrix

    return from_row_matrix(rows, t.shape, t.transposed)


def analyse(lw, ckpt, plan, batches, log=None, seed: int = 0) -> tuple[dict[str, TensorStats], dict[str, Any]]:
    """Pass 1: the original model block by block; per encoded tensor its
    :class:`TensorStats`, plus the residual-stream energy at each block input."""
    from .hessian import HessianHooks

    tplans = {t.name: (g, t) for g in plan.groups for t in g.tensors}
    stats: dict[str, TensorStats] = {}
    tokens = sum(int(b.valid.sum()) for b in batches)
    info = {"tokens": tokens, "blocks": len(lw.blocks)}
    lw.capture(batches)
    for i in range(len(lw.blocks)):
        keys = lw.keys_under(lw.block_prefix(i))
        lw.materialise(keys)
        lin = {n: m for n, m in lw.linears(i) if n in tplans}
        with HessianHooks(lin) as hk:
            for b in batches:
                hk.new_batch(b.valid)
                lw.run_block(i, [b])
        for n in lin:
            g, t = tplans[n]
            w = TensorRows(ckpt, t).read()
            stats[n] = tensor_stats(n, str(g.key), t.role, w, hk.hessians[n], hk.tokens, seed)
        lw.release(keys)
        if log:
            log(f"  analysed block {i + 1}/{len(lw.blocks)}")
    hn = head_name(lw)
    if hn is not None and hn in tplans and hn not in stats:
        g, t = tplans[hn]
        h, n = _head_hessian(lw, batches)
        stats[hn] = tensor_stats(hn, str(g.key), t.role, TensorRows(ckpt, t).read(), h, n, seed)
    lw.release(lw.outside_blocks())
    return stats, info


@dataclass
class _Sub:
    """Tensors of one group at one rung: one group of the pack, one set of palettes."""

    plan: GroupPlan  # index = position in the pack
    codec: Any
    fit: Any
    stats: list = field(default_factory=list)


def encode_pass(lw, ckpt, plan, batches, alloc: TensorAllocation, fixed: dict[str, Any], pw, pool,
                codec_options: dict[str, Any], sample_rows: int, log=None) -> dict[str, Any]:
    """Pass 2: encode every group's tensors at their rungs, the linears of each block
    with error feedback on the stream of the already encoded blocks. ``fixed``:
    tensors with no Hessian → their rung (encoded without feedback). Writes tensors
    and groups to ``pw``; returns per-tensor results (cosines, predicted errors)."""
    from ..checkpoint.rows import sample_across
    from ..codecs.base import DictParts
    from .hessian import HessianHooks

    rung = {n: c.setting for n, c in alloc.choices.items()}
    rung.update(fixed)
    subs: dict[tuple[str, str], _Sub] = {}
    sub_of: dict[str, _Sub] = {}
    for g in plan.groups:
        sample = None
        for t in g.tensors:
            s = rung[t.name]
            key = (str(g.key), s.name)
            if key not in subs:
                if sample is None:
                    sample = sample_across([TensorRows(ckpt, x) for x in g.tensors], sample_rows)
                codec = make_codec("hhtl-vq", **{**codec_options, **s.options()})
                subs[key] = _Sub(GroupPlan(len(subs), g.key, []), codec, codec.fit_group(g.key, sample, pool))
            subs[key].plan.tensors.append(t)
            sub_of[t.name] = subs[key]
    tplans = {t.name: t for g in plan.groups for t in g.tensors}
    results: dict[str, dict[str, Any]] = {}

    def encode(name: str, hessian=None) -> np.ndarray:
        sub = sub_of[name]
        t = tplans[name]
        et = sub.codec.encode_tensor(sub.fit, TensorRows(ckpt, t), pool, measure=True, hessian=hessian)
        pw.write_tensor(t, et)
        sub.stats.append(et.stats)
        results[name] = {"setting": rung[name].name, "cosine_median": float(np.median(et.cosines)),
                         "output_error": et.stats.get("output_error")}
        rows = sub.codec.decode_rows(sub.fit.decode_parts(), DictParts({}, et.arrays))
        return _to_original(t, rows)

    lw.capture(batches)
    for i in range(len(lw.blocks)):
        keys = lw.keys_under(lw.block_prefix(i))
        lw.materialise(keys)
        lin = {n: m for n, m in lw.linears(i) if n in sub_of}
        with HessianHooks(lin) as hk:
            for b in batches:
                hk.new_batch(b.valid)
                lw.run_block(i, [b], update=False)
        decoded = {n: encode(n, hk.hessians[n]) for n in lin}
        lw.materialise([lw.param_of[n] for n in decoded], override=decoded)
        lw.run_block(i, batches)
        lw.release(keys)
        if log:
            log(f"  encoded block {i + 1}/{len(lw.blocks)}")
    hn = head_name(lw)
    if hn is not None and hn in sub_of and hn not in results:
        h, _ = _head_hessian(lw, batches)
        encode(hn, h)
    lw.release(lw.outside_blocks())
    for g in plan.groups:  # tables and anything else the blocks do not hold, in checkpoint order
        for t in g.tensors:
            if t.name not in results:
                encode(t.name)
    for sub in sorted(subs.values(), key=lambda s: s.plan.index):
        pw.write_group(sub.plan, sub.codec, sub.codec.finish_group(sub.fit, sub.stats))
    return results


def layerwise_compare(lw, batches, replaced: dict[str, Any], family: str) -> dict[str, float]:
    """The original model against one whose tensors ``replaced`` ({checkpoint name:
    callable returning the array}) are swapped in, run side by side one block at
    a time (two hidden-state streams, one block's weights at a time; logits one
    chunk of positions at a time). Causal: ``kl_mean``, ``kl_max``, ``top1``,
    ``nll_a``/``nll_b`` and ``ppl_ratio`` over every position with a next token;
    embedding: ``top1``, ``top10``, ``cos_mean``, ``cos_min`` of mean-pooled embeddings."""
    import torch

    def override(names):
        return {n: replaced[n]() for n in names if n in replaced}

    outside = lw.outside_blocks()
    lw.capture(batches)
    hid_a = [b.hidden for b in batches]
    lw.materialise(outside, override=override([lw.key_to_name[k] for k in outside if k in lw.key_to_name]))
    lw.capture(batches, materialise=False)
    hid_b = [b.hidden for b in batches]
    for i in range(len(lw.blocks)):
        keys = lw.keys_under(lw.block_prefix(i))
        names = lw.names_in_block(i)
        lw.materialise(keys)
        for b, h in zip(batches, hid_a):
            b.hidden = h
        lw.run_block(i, batches)
        hid_a = [b.hidden for b in batches]
        lw.materialise(keys, override=override(names))
        for b, h in zip(batches, hid_b):
            b.hidden = h
        lw.run_block(i, batches)
        hid_b = [b.hidden for b in batches]
        lw.release(keys)
    if family != "causal":
        from ..gates.runner import RunOutputs, compare_outputs

        def pooled(hs):
            out = []
            for b, h in zip(batches, hs):
                m = b.attention_mask.unsqueeze(-1).to(h.dtype)
                p = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(p, dim=-1).numpy())
            return np.concatenate(out)

        ea, eb = pooled(hid_a), pooled(hid_b)
        lw.release(outside)
        return compare_outputs(RunOutputs("embedding", len(ea), embeddings=ea), RunOutputs("embedding", len(eb), embeddings=eb))
    norm = lw.final_norm()
    head = lw.model.get_output_embeddings()
    hn = head_name(lw)
    lw.materialise(outside)
    w_a = head.weight.detach().clone()
    b_a = None if getattr(head, "bias", None) is None else head.bias.detach().clone()
    w_b = torch.from_numpy(np.asarray(replaced[hn](), dtype=np.float32).reshape(w_a.shape)) if hn in replaced else w_a
    kl_sum = nll_a = nll_b = 0.0
    kl_max = 0.0
    agree = n = 0
    chunk = 512
    with torch.no_grad():
        for b, ha, hb in zip(batches, hid_a, hid_b):
            xa = norm(ha) if norm is not None else ha
            xb = norm(hb) if norm is not None else hb
            T = xa.shape[1]
            ids = b.input_ids
            for r in range(xa.shape[0]):
                for s in range(0, T - 1, chunk):
                    e = min(T - 1, s + chunk)
                    la = torch.log_softmax(xa[r, s:e] @ w_a.T + (0 if b_a is None else b_a), dim=-1)
                    lb = torch.log_softmax(xb[r, s:e] @ w_b.T + (0 if b_a is None else b_a), dim=-1)
                    kl = (la.exp() * (la - lb)).sum(-1).clamp(min=0)
                    kl_sum += float(kl.sum())
                    kl_max = max(kl_max, float(kl.max()))
                    tgt = ids[r, s + 1 : e + 1]
                    nll_a -= float(la.gather(-1, tgt[:, None]).sum())
                    nll_b -= float(lb.gather(-1, tgt[:, None]).sum())
                    agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
                    n += e - s
    lw.release(outside)
    return {"kl_mean": kl_sum / n, "kl_max": kl_max, "top1": agree / n, "ppl_a": float(np.exp(nll_a / n)),
            "ppl_b": float(np.exp(nll_b / n)), "ppl_ratio": float(np.exp((nll_b - nll_a) / n)), "positions": n}



def encode_calibrated(model, out, *, family_target: dict[str, float] | None = None, bpw: float | None = None,
                      goal: float | None = None, config=None, policy: EncodablePolicy = EncodablePolicy(),
                      rules: RuleTable = DEFAULT_RULES, codec_options: dict[str, Any] | None = None,
                      texts: int | None = None, seq_len: int = DEFAULT_SEQ_LEN, sample_rows: int = DEFAULT_SAMPLE_ROWS,
                      threads: int | None = None, include_aux: bool = True, check_texts: int = CHECK_TEXTS,
                      floor: dict[str, int] | None = None, log: Callable[[str], None] | None = None):
    """Calibrated hhtl-vq encode of ``model`` into ``out`` (module docstring).

    ``goal``: the predicted output change to reach; ``bpw``: a budget of bits
    per encoded weight instead. Returns (EncodeResult, CalibrationReport)."""
    from threadpoolctl import threadpool_limits

    # numpy's BLAS on one thread next to torch's: two thread pools spinning on two cores
    # made small Cholesky factorisations 100x slower
    with threadpool_limits(limits=1, user_api="blas"):
        return _encode_calibrated(model, out, family_target=family_target, bpw=bpw, goal=goal, config=config,
                                  policy=policy, rules=rules, codec_options=codec_options, texts=texts,
                                  seq_len=seq_len, sample_rows=sample_rows, threads=threads,
                                  include_aux=include_aux, check_texts=check_texts, floor=floor, log=log)


def _encode_calibrated(model, out, *, family_target, bpw, goal, config, policy, rules, codec_options, texts, seq_len,
                       sample_rows, threads, include_aux, check_texts, floor, log):
    from ..budget.sensitivity import GroupTrials, sample_group_rows
    from ..budget.settings import LADDER, setting
    from ..pack.writer import EncodeResult, _PackWriter
    from .layerwise import LayerwiseModel, build_empty, checkpoint_param_map

    t0 = time.perf_counter()
    sec: dict[str, float] = {}
    ckpt = open_checkpoint(model)
    out = Path(out)
    plan = plan_checkpoint(ckpt, policy, rules)
    codec_options = {k: v for k, v in (codec_options or {}).items() if k in ("seed", "iters", "per_centroid")}
    seed = int(codec_options.get("seed", 0))
    net, tok, fam, cfile = build_empty(model, config)
    lw = LayerwiseModel(net, checkpoint_param_map(net, ckpt), ckpt.read_float)
    n_texts = texts or (DEFAULT_TEXTS if fam == "causal" else DEFAULT_SENTENCES)
    batches = calibration_batches(tok, fam, n_texts, seq_len)
    sec["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    stats, info = analyse(lw, ckpt, plan, batches, log=log, seed=seed)
    sec["analyse"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    rel = {}
    for g in plan.groups:
        tr = GroupTrials(sample_group_rows(ckpt, g), seed=seed)
        rel[str(g.key)] = {s.name: tr(s).rel_mse for s in LADDER}
    sec["trials"] = time.perf_counter() - t1
    total_w = sum(g.n_weights for g in plan.groups) or 1
    # tensors the calibration cannot see (tables read by index, unused heads): their relative
    # weight error is their relative output error
    for g in plan.groups:
        for t in g.tensors:
            if t.name not in stats:  # tables read by index, heads the blocks do not reach
                stats[t.name] = tensor_stats(t.name, str(g.key), t.role, TensorRows(ckpt, t).read())
    t1 = time.perf_counter()
    fb = calibration_batches(tok, fam, min(n_texts, FISHER_TEXTS), seq_len, batch=FISHER_BATCH)
    fis = fisher_diagonals(lw, fb, fam, set(stats), seed=seed)
    for n, st in stats.items():
        st.set_sensitivity(fis["rows"].get(n), fis["table"].get(n))
    sec["fisher"] = time.perf_counter() - t1
    alloc = allocate(list(stats.values()), rel, goal=goal, budget_bits=None if bpw is None else bpw * total_w,
                     floor=floor)
    if log:
        log(f"allocation: {alloc.bits / total_w:.3f} bits per encoded weight (tensor parts), predicted "
            f"output change {alloc.predicted:.4g}")
    t1 = time.perf_counter()
    pw = _PackWriter(out, ckpt, plan)
    try:
        with encode_pool(threads) as pool:
            results = encode_pass(lw, ckpt, plan, batches, alloc, {}, pw, pool, codec_options, sample_rows, log)
        pw.finish(make_codec("hhtl-vq", **codec_options), policy, sample_rows, include_aux,
                  extra={"calibration": {"family": fam, "tokens": info["tokens"], "texts": n_texts,
                                         "seq_len": seq_len if fam == "causal" else None}})
    except BaseException:
        pw.abort()
        raise
    sec["encode"] = time.perf_counter() - t1
    report = CalibrationReport(fam, dict(family_target or {}), alloc, list(stats.values()), tokens=info["tokens"])
    t1 = time.perf_counter()
    from ..pack.reader import Pack
    from ..classify.shapes import from_row_matrix

    pack = Pack(out)
    replaced = {n: (lambda n=n: from_row_matrix(pack.rows(n), pack.info(n)["shape"], bool(pack.info(n).get("transposed"))))
                for n in pack.encoded_names()}
    check_batches = batches[: max(1, -(-min(check_texts, n_texts) // BATCH))]
    report.check = layerwise_compare(lw, check_batches, replaced, fam)
    sec["check"] = time.perf_counter() - t1
    sec["total"] = time.perf_counter() - t0
    report.seconds = {k: round(v, 2) for k, v in sec.items()}
    report.results = results
    return EncodeResult(out, ckpt.path, sec["total"], total_w, plan), report
