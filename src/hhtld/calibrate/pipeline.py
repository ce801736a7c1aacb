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
4. **Tuning.** With the codes chosen, the per-row gains are tuned: block by
   block to the original block's outputs (:mod:`hhtld.calibrate.tuning`),
   then, when asked, end to end (:mod:`hhtld.calibrate.distill`).
5. **Check.** The written pack against the original model on the check
   passages (causal LMs: passages of the calibration kinds that calibration
   did not use, plus a kind it never sees; each kind on its own), mean
   next-token KL and perplexity ratio, met only when every kind meets them;
   top-1 retrieval and embedding cosine on the calibration sentences
   (embedding models). A round is taken when every kind meets the target
   within :data:`CHECK_MARGIN` (room for kinds of text the check never
   sees); otherwise the next round aims lower. A target that is not met is
   reported as missed; the pack is still written.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..checkpoint import open_checkpoint
from ..checkpoint.rows import TensorRows
from ..classify import DEFAULT_RULES, EncodablePolicy, RuleTable, plan_checkpoint
from ..classify.groups import GroupPlan
from ..codecs.registry import make_codec
from ..errors import GateError, OptionsError
from ..format import DEFAULT_SAMPLE_ROWS
from ..outputs import make_temp_dir, make_temp_file, publish, remove_temp
from ..pack.encode import tensor_unit_key
from ..pack.choice import make_executor
from ..pack.executor import LocalExecutor
from ..pack.plan import Unit, unit_memory
from ..pack.units import UnitStore, unit_file
from .allocation import TensorAllocation, TensorStats, allocate, tensor_stats
from .fisher import fisher_diagonals
from .layerwise import head_name
from .distill import DistillOptions, DistillReport
from .tuning import BlockTuning, TuneKeep, TuneOptions
from .units import allocation_key, keep_key, stats_arrays, stats_from

# How much calibration text, by family: texts for the Hessians, texts for the Fisher
# diagonal (a subset, a few at a time: the head's logits of a batch are in memory) and
# texts for the final check. Causal: calibration passages of every calibration kind in turn,
# cut to DEFAULT_SEQ_LEN tokens, and check passages (CHECK_TEXTS of each check kind, cut to
# CHECK_SEQ_LEN tokens as verify cuts its passages); embedding: the calibration sentences
# (the check ranks all of them, as verify does).
DEFAULT_SEQ_LEN = 256
CHECK_SEQ_LEN = 128
TEXTS = {"causal": 32, "embedding": 256}
FISHER_TEXTS = {"causal": 8, "embedding": 64}
FISHER_BATCH = {"causal": 2, "embedding": 8}
CHECK_TEXTS = {"causal": 12, "embedding": 256}
BATCH = 8


@dataclass
class CalibrationReport:
    """What the calibrated encode measured and chose: the per-tensor allocation
    of the written round, the check of every round, and whether the target
    was met (None for a ``--bpw`` budget)."""

    family: str
    target: dict[str, Any]
    allocation: TensorAllocation | None
    stats: list[TensorStats]
    check: dict[str, Any] = field(default_factory=dict)
    met: bool | None = None
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # per tensor: rung, cosines, output error
    tuning: dict[str, Any] | None = None  # the block step of the written round (loss per block before and after)

    def to_json(self) -> dict:
        groups: dict[str, dict[str, int]] = {}
        for c in self.allocation.choices.values():
            groups.setdefault(c.group, {}).setdefault(c.setting.name, 0)
            groups[c.group][c.setting.name] += 1
        return {"family": self.family, "target": self.target, "met": self.met, "check": self.check,
                "rounds": self.rounds, "notes": self.notes, "seconds": self.seconds, "calibration_tokens": self.tokens,
                "bpw_tensors": round(self.allocation.bits / max(1, self.allocation.weights), 4),
                "predicted_error": self.allocation.predicted, "rungs_per_group": groups, "tuning": self.tuning,
                "tensors": [c.to_json() for c in self.allocation.choices.values()]}


# -- calibration data ------------------------------------------------------------------------
def calibration_batches(tok, family: str, n_texts: int, seq_len: int, batch: int = BATCH, with_kinds: bool = False):
    """Token batches for the calibration: ``n_texts`` calibration passages cut to
    ``seq_len`` tokens, one of each calibration kind in turn (causal LMs), or
    ``n_texts`` calibration sentences and half as many dialogue turns, padded per
    batch (embedding models; ``with_kinds``: also the kind of each batch). Never
    the held-out texts of ``verify``."""
    import torch

    from .layerwise import Batch

    out = []
    if family == "causal":
        from ..measure.texts import USE_KINDS, passages, render

        by_kind = [[render(p, tok) for p in passages("calibration", k)] for k in USE_KINDS["calibration"]]
        ids = []
        for row in zip(*by_kind):  # one passage of each kind in turn
            for text in row:
                x = tok(text)["input_ids"]
                if len(x) >= seq_len and len(ids) < n_texts:
                    ids.append(x[:seq_len])
        if not ids:
            raise GateError(f"no calibration passage has {seq_len} tokens; use a shorter --calibration-tokens")
        for s in range(0, len(ids), batch):
            t = torch.tensor(ids[s : s + batch], dtype=torch.long)
            out.append(Batch(t, torch.ones_like(t)))
        return out
    from ..measure.texts import EMBEDDING_KINDS, calibration_sentences

    kinds = []
    for kind in EMBEDDING_KINDS:  # n_texts sentences of prose, half as many turns of dialogue
        texts = calibration_sentences(kind)[: n_texts if kind == "prose" else max(2, n_texts // 2)]
        for s in range(0, len(texts), batch):
            enc = tok(texts[s : s + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            out.append(Batch(enc["input_ids"], enc["attention_mask"]))
            kinds.append(kind)
    if with_kinds:
        return out, kinds
    return out


def check_batches(tok, per_kind: int, seq_len: int = CHECK_SEQ_LEN, batch: int = BATCH):
    """The calibrated encode's check for causal LMs: ``per_kind`` check passages of
    every check kind (hhtld.measure.texts: the calibration kinds, other passages, and
    one kind calibration never sees), cut to ``seq_len`` tokens (a passage with
    fewer is left out), batched by kind. Returns (batches, the kind of each batch)."""
    import torch

    from ..measure.texts import USE_KINDS, passages, render
    from .layerwise import Batch

    out, kinds = [], []
    for kind in USE_KINDS["check"]:
        ids = [x[:seq_len] for x in (tok(render(p, tok))["input_ids"] for p in passages("check", kind)[:per_kind])
               if len(x) >= seq_len]
        for s in range(0, len(ids), batch):
            t = torch.tensor(ids[s : s + batch], dtype=torch.long)
            out.append(Batch(t, torch.ones_like(t)))
            kinds.append(kind)
    if not out:
        raise GateError(f"no check passage has {seq_len} tokens")
    return out, kinds


_NPY_HEADER_LOCK = threading.Lock()


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


class HessianStore:
    """The Hessians of the analysis pass, one float32 ``.npy`` file per distinct layer
    input in a folder (layers fed the same input share a file), so the encode pass
    needs neither the model nor memory for all of them. The folder is a temporary one,
    or the kept units' (``--resume``), where :meth:`restore` finds them again."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}
        self.tokens: dict[str, int] = {}

    def put(self, name: str, h: np.ndarray, tokens: int, same_as: str | None = None) -> None:
        if same_as is not None and same_as in self.files:
            self.files[name] = self.files[same_as]
        else:
            f = self.folder / f"h-{unit_file(name)}.npy"
            tmp = f.with_name(f".{f.name}.part")  # renamed when whole: a kept unit is never cut short
            with open(tmp, "wb") as out:
                np.save(out, np.asarray(h, dtype=np.float32))
            os.replace(tmp, f)
            self.files[name] = f
        self.tokens[name] = tokens

    def get(self, name: str) -> np.ndarray | None:
        """The Hessian as stored, float32, in a fresh array of its own: the encoder rotates
        it in place (a float64 copy here held 254 MB more per 5632-column tensor in flight;
        the file itself is never written)."""
        f = self.files.get(name)
        if f is None:
            return None
        with _NPY_HEADER_LOCK:  # np.load parses the header with ast.literal_eval: not thread-safe on
            h = np.load(f, mmap_mode="r")  # CPython 3.11 ("AST constructor recursion depth mismatch")
        return np.array(h)  # the data read outside the lock, tensors side by side

    def described(self, names) -> dict[str, list]:
        """Where the Hessians of ``names`` are (file name, tokens, bytes), for :meth:`restore`."""
        return {n: [self.files[n].name, self.tokens[n], self.files[n].stat().st_size] for n in names
                if n in self.files}

    def restore(self, where: dict[str, list]) -> bool:
        """Take the Hessians :meth:`described`; False (nothing taken) if a file is missing or
        not of its recorded size."""
        try:
            ok = all((self.folder / f).stat().st_size == int(size) for f, _, size in where.values())
        except (OSError, ValueError, TypeError):
            ok = False
        if ok:
            for n, (fname, tokens, _) in where.items():
                self.files[n] = self.folder / fname
                self.tokens[n] = int(tokens)
        return ok


def analyse(lw, ckpt, plan, batches, store: HessianStore, log=None, seed: int = 0,
            ex: LocalExecutor | None = None) -> tuple[dict[str, TensorStats], dict]:
    """The original model block by block on the calibration batches: per encoded
    tensor its :class:`TensorStats` and its Hessian (into ``store``). Each block is one
    unit of a chain; with ``ex``'s unit store, a block analysed by an interrupted run
    is read back (its stats, its Hessians' files, the hidden states it left)."""
    import torch

    from .hessian import HessianHooks

    tplans = {t.name: (g, t) for g in plan.groups for t in g.tensors}
    stats: dict[str, TensorStats] = {}
    tokens = sum(int(b.valid.sum()) for b in batches)
    keep = ex.store if ex is not None else None
    lw.capture(batches)
    lw.release(lw.outside_blocks())  # the embedding and head (1.1 B: 524 MB float32): the blocks do not read them
    start = 0
    while keep is not None and start < len(lw.blocks):  # blocks an interrupted run analysed
        got = keep.arrays(keep_key("analyse", f"block {start}"))
        if got is None or not store.restore(got[1]["hessians"]):
            break
        stats.update(stats_from(got[0], got[1]["stats"]))
        start += 1
    if start:  # the hidden states the last of them left (kept before its stats)
        carry = keep.arrays(keep_key("analyse", f"carry {start - 1}"))
        if carry is None:
            start, stats = 0, {}
        else:
            for j, b in enumerate(batches):
                b.hidden = torch.from_numpy(np.array(carry[0][f"h{j}"]))
    if start and log:
        log(f"  {start} block{'s' if start != 1 else ''} of the analysis kept by an interrupted run")

    def block(i: int) -> list[str]:
        keys = lw.keys_under(lw.block_prefix(i))
        lw.materialise(keys)
        lin = {n: m for n, m in lw.linears(i) if n in tplans}
        with HessianHooks(lin) as hk:
            for b in batches:
                hk.new_batch(b.valid)
                lw.run_block(i, [b])
        hs, src = hk.hessians, hk.shared()
        for n in lin:
            g, t = tplans[n]
            stats[n] = tensor_stats(n, str(g.key), t.role, TensorRows(ckpt, t).read(), hs[n], hk.tokens, seed)
            store.put(n, hs[n], hk.tokens, same_as=src[n] if src[n] != n else None)
        lw.release(keys)
        return list(lin)

    def kept(i: int, names: list[str]) -> None:
        keep.put_arrays(keep_key("analyse", f"carry {i}"), {f"h{j}": b.hidden.numpy() for j, b in enumerate(batches)})
        arrays, meta = stats_arrays([stats[n] for n in names])
        keep.put_arrays(keep_key("analyse", f"block {i}"), arrays, {"stats": meta, "hessians": store.described(names)})
        if i:
            keep.path(keep_key("analyse", f"carry {i - 1}"), ".safetensors").unlink(missing_ok=True)

    for i in range(start, len(lw.blocks)):
        unit = Unit("analyse", f"block {i}", (), lw.block_numel(i))
        if ex is None:
            block(i)
        else:
            ex.run(unit, lambda: block(i), save=lambda names: kept(i, names))
        if log:
            log(f"  analysed block {i + 1}/{len(lw.blocks)}")
    hn = head_name(lw)
    if hn is not None and hn in tplans and hn not in stats:
        g, t = tplans[hn]
        got = keep.arrays(keep_key("analyse", "head")) if keep is not None else None
        if got is not None and store.restore(got[1]["hessians"]):
            stats.update(stats_from(got[0], got[1]["stats"]))
        else:
            norm = lw.final_norm()  # the head reads the final norm's output: only its weights are needed
            if norm is not None:
                lw.materialise(lw.keys_under(next(k for k, m in lw.model.named_modules() if m is norm)))
            h, n = _head_hessian(lw, batches)
            stats[hn] = tensor_stats(hn, str(g.key), t.role, TensorRows(ckpt, t).read(), h, n, seed)
            store.put(hn, h, n)
            if keep is not None:
                arrays, meta = stats_arrays([stats[hn]])
                keep.put_arrays(keep_key("analyse", "head"), arrays,
                                {"stats": meta, "hessians": store.described([hn])})
    lw.release(lw.outside_blocks())
    return stats, {"tokens": tokens, "blocks": len(lw.blocks)}


@dataclass
class _Sub:
    """Tensors of one group at one rung: one group of the pack, one set of palettes."""

    plan: GroupPlan  # index = position in the pack
    codec: Any
    fit: Any
    stats: list = field(default_factory=list)


def encode_pass(ckpt, plan, alloc: TensorAllocation, store: HessianStore | None, ex: LocalExecutor,
                codec_options: dict[str, Any], sample_rows: int, log=None,
                fits: dict[tuple[str, str], Any] | None = None) -> dict[str, Any]:
    """Encode every group's tensors at their rungs on ``ex`` (into its open pack): a tensor
    with a Hessian in ``store`` with error feedback against it, the others without.
    Tensors of a group at the same rung share palettes (trained on the whole group's
    sample): one fit unit per (group, rung), kept in ``fits`` for the next round. Several
    tensors are encoded at once; bytes do not depend on it. Returns per-tensor results."""
    from ..checkpoint.rows import sample_across

    fits = {} if fits is None else fits
    rung = {n: c.setting for n, c in alloc.choices.items()}
    subs: dict[tuple[str, str], _Sub] = {}
    sub_of: dict[str, _Sub] = {}
    need: list[tuple[tuple[str, str], GroupPlan, Any]] = []  # fits not made in an earlier round
    for g in plan.groups:
        for t in g.tensors:
            s = rung[t.name]
            key = (str(g.key), s.name)
            if key not in subs:
                codec = make_codec("hhtl-vq", **{**codec_options, **s.options()})
                if key not in fits:
                    need.append((key, g, codec))
                subs[key] = _Sub(GroupPlan(len(subs), g.key, []), codec, None)
            subs[key].plan.tensors.append(t)
            sub_of[t.name] = subs[key]
    # the fits are independent units: here one after another on the pool (a group's sample
    # drawn once for its rungs), on a cluster side by side
    fit_units = [Unit("fit", f"{g.key}@{setting}", (), min(sample_rows, g.n_rows) * g.key.shape[1],
                      unit_memory("fit", cols=g.key.shape[1], sample_rows=min(sample_rows, g.n_rows)), setting)
                 for (_, setting), g, _ in need]
    drawn: dict[str, np.ndarray] = {}

    def fit(j, pool):
        _, g, codec = need[j]
        sample = drawn.get(str(g.key))
        if sample is None:
            drawn.clear()  # one group's sample held at a time
            sample = drawn[str(g.key)] = sample_across([TensorRows(ckpt, x) for x in g.tensors], sample_rows)
        return codec.fit_group(g.key, sample, pool)

    for j, fitted in ex.map(fit_units, fit, threads_inside=True):
        fits[need[j][0]] = fitted
    drawn.clear()
    for key, sub in subs.items():
        sub.fit = fits[key]
    results: dict[str, dict[str, Any]] = {}
    order = [t for g in plan.groups for t in g.tensors]
    hessian = {t.name: store is not None and t.name in store.files for t in order}
    units = [Unit("encode", t.name, (), t.row_shape[0] * t.row_shape[1],
                  unit_memory("encode", *t.row_shape, hessian=hessian[t.name]),
                  ("feedback " if hessian[t.name] else "") + rung[t.name].name) for t in order]
    keys = [tensor_unit_key(t, sub_of[t.name].codec, True, hessian[t.name]) for t in order]

    def encode(i, pool):
        t = order[i]
        sub = sub_of[t.name]
        h = store.get(t.name) if hessian[t.name] else None  # a fresh copy: rotated in place
        return sub.codec.encode_tensor(sub.fit, TensorRows(ckpt, t), pool, measure=True, hessian=h,
                                       overwrite_hessian=True)

    pw = ex.writer
    for k, (i, et) in enumerate(ex.map(units, encode, keys=keys)):
        t = order[i]
        sub = sub_of[t.name]
        pw.write_tensor(t, et)
        sub.stats.append(et.stats)
        results[t.name] = {"setting": rung[t.name].name, "cosine_median": float(np.median(et.cosines)),
                           "output_error": et.stats.get("output_error")}
        if log and (k + 1) % 20 == 0:
            log(f"  encoded {k + 1}/{len(order)} tensors")
    for sub in sorted(subs.values(), key=lambda s: s.plan.index):
        ex.run(Unit("finish", f"{sub.plan.key}@{sub.codec.opts.get('setting', '')}"),
               lambda: pw.write_group(sub.plan, sub.codec, sub.codec.finish_group(sub.fit, sub.stats)))
    return results


def layerwise_compare(lw, batches, replaced: dict[str, Any], family: str,
                      kinds: list[str] | None = None) -> dict[str, Any]:
    """The original model against one whose tensors ``replaced`` ({checkpoint name:
    callable returning the array}) are swapped in, run side by side one block at
    a time (two hidden-state streams, one block's weights at a time; logits one
    chunk of positions at a time). Causal: ``kl_mean``, ``kl_max``, ``top1``,
    ``nll_a``/``nll_b`` and ``ppl_ratio`` over every position with a next token;
    embedding: ``top1``, ``top10``, ``cos_mean``, ``cos_min`` of mean-pooled embeddings.
    Causal with ``kinds`` (the kind of text of each batch): the same figures per kind
    under ``kinds``, and at the top the worst of them (largest KL, ``kl_max`` and
    perplexity ratio, smallest top-1) with ``worst_kind`` (largest mean KL)."""
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
        from ..measure.compare import RunOutputs, compare_outputs

        def pooled(hs):
            out = []
            for b, h in zip(batches, hs):
                m = b.attention_mask.unsqueeze(-1).to(h.dtype)
                p = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(p, dim=-1).numpy())
            return np.concatenate(out)

        ea, eb = pooled(hid_a), pooled(hid_b)
        lw.release(outside)
        if kinds is None:
            return compare_outputs(RunOutputs("embedding", len(ea), embeddings=ea),
                                   RunOutputs("embedding", len(eb), embeddings=eb))
        from ..measure.compare import compare_embeddings_by_kind

        rows = [k for b, k in zip(batches, kinds) for _ in range(b.input_ids.shape[0])]
        per = compare_embeddings_by_kind(ea, eb, rows)  # retrieval among the texts of each kind
        worst = min(per, key=lambda k: per[k]["top1"])
        return {"top1": per[worst]["top1"], "top10": min(v["top10"] for v in per.values()),
                "cos_mean": min(v["cos_mean"] for v in per.values()), "cos_min": min(v["cos_min"] for v in per.values()),
                "worst_kind": worst, "kinds": per}
    norm = lw.final_norm()
    head = lw.model.get_output_embeddings()
    hn = head_name(lw)
    lw.materialise(outside)
    w_a = head.weight.detach().clone()
    b_a = None if getattr(head, "bias", None) is None else head.bias.detach().clone()
    w_b = torch.from_numpy(np.asarray(replaced[hn](), dtype=np.float32).reshape(w_a.shape)) if hn in replaced else w_a
    labels = kinds or ["all"] * len(batches)
    acc = {k: {"kl_sum": 0.0, "kl_max": 0.0, "nll_a": 0.0, "nll_b": 0.0, "agree": 0, "n": 0} for k in labels}
    chunk = 128  # positions whose full-vocabulary log-probabilities are in memory at once
    with torch.no_grad():
        for b, ha, hb, kind in zip(batches, hid_a, hid_b, labels):
            a = acc[kind]
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
                    a["kl_sum"] += float(kl.sum())
                    a["kl_max"] = max(a["kl_max"], float(kl.max()))
                    tgt = ids[r, s + 1 : e + 1]
                    a["nll_a"] -= float(la.gather(-1, tgt[:, None]).sum())
                    a["nll_b"] -= float(lb.gather(-1, tgt[:, None]).sum())
                    a["agree"] += int((la.argmax(-1) == lb.argmax(-1)).sum())
                    a["n"] += e - s
    lw.release(outside)

    def figures(a) -> dict[str, float]:
        n = a["n"]
        return {"kl_mean": a["kl_sum"] / n, "kl_max": a["kl_max"], "top1": a["agree"] / n,
                "ppl_a": float(np.exp(a["nll_a"] / n)), "ppl_b": float(np.exp(a["nll_b"] / n)),
                "ppl_ratio": float(np.exp((a["nll_b"] - a["nll_a"]) / n)), "positions": n}

    if kinds is None:
        return figures(acc["all"])
    per = {k: figures(a) for k, a in acc.items()}
    worst = max(per, key=lambda k: per[k]["kl_mean"])
    return {"kl_mean": per[worst]["kl_mean"], "kl_max": max(v["kl_max"] for v in per.values()),
            "top1": min(v["top1"] for v in per.values()), "ppl_ratio": max(v["ppl_ratio"] for v in per.values()),
            "positions": sum(v["positions"] for v in per.values()), "worst_kind": worst, "kinds": per}



@dataclass(frozen=True)
class Target:
    """What the calibrated encode aims at, by family. Causal LMs: mean next-token KL
    ≤ ``max_kl`` and perplexity ratio ≤ ``max_ppl_ratio``; embedding models:
    top-1 retrieval ≥ ``min_top1`` and mean embedding cosine ≥ ``min_cosine``.
    ``share``: the predicted output change the allocation aims at, as a share of
    what is allowed — room for the prediction's error and for text other than the
    calibration text (default by family, :data:`SHARE`)."""

    max_kl: float = 0.02
    max_ppl_ratio: float = 1.02
    min_top1: float = 0.95
    min_cosine: float = 0.995
    share: float | None = None

    def aim(self, family: str) -> float:
        """The predicted output change the first allocation aims at."""
        return (SHARE[family] if self.share is None else self.share) * self.allowed(family)

    def allowed(self, family: str) -> float:
        """The output change allowed: KL (causal), or 1 − cos (embedding; at most
        EMBED_TOP1_CHANGE, below which retrieval top-1 holds as measured on MiniLM)."""
        if family == "causal":
            return self.max_kl
        return min(1.0 - self.min_cosine, EMBED_TOP1_CHANGE)

    def met(self, family: str, check: dict, margin: float = 1.0) -> bool:
        """Whether ``check`` meets the target; ``margin`` < 1: with that share of the allowed
        KL and perplexity excess (causal LMs; embedding models' figures take no margin)."""
        if family == "causal":
            return (check["kl_mean"] <= margin * self.max_kl
                    and check["ppl_ratio"] - 1.0 <= margin * (self.max_ppl_ratio - 1.0))
        return check["top1"] >= self.min_top1 and check["cos_mean"] >= self.min_cosine

    def to_json(self, family: str) -> dict:
        if family == "causal":
            return {"max_kl": self.max_kl, "max_ppl_ratio": self.max_ppl_ratio}
        return {"min_top1": self.min_top1, "min_cosine": self.min_cosine}


# The first round aims at this share of the allowed change: room for the prediction's error,
# which comes from calibration text, on the check's other kinds. On SmolLM2-135M (check on
# four kinds, one never calibrated) the worst kind measured 1.7x the predicted KL (reference
# text: KL 0.0203, perplexity ratio 1.026 where 0.012 was predicted), so the first round
# missed and the second, aimed by that ratio, met it (worst 0.0117 / 1.015; held out, on
# five kinds: worst 0.0119 / 1.011). MiniLM's top-1 and cosine kept their margin at 0.7.
SHARE = {"causal": 0.6, "embedding": 0.7}
EMBED_TOP1_CHANGE = 0.0015  # 1 − cos of sentence embeddings that kept ≥ 95 % top-1 retrieval on MiniLM
RETIGHTEN = 0.6  # a round that met the change but missed top-1 / perplexity aims this much lower
# A round is taken when its check meets the target within this share of the allowed KL and
# perplexity excess: the held-out text includes a kind the check never sees. Measured on
# SmolLM2-135M: the tuned default's round 1 checked at KL 0.0195 / ratio 1.0193 (worst kinds)
# and gave 0.0232 (notes, never seen) / 1.0206 on the held-out passages — 1.19x the KL; the
# untuned default 0.0117 / 1.0148 on the check, 0.0119 / 1.0108 held out.
CHECK_MARGIN = {"causal": 0.8, "embedding": 1.0}


def change_of(family: str, check: dict) -> float:
    """The measured output change the prediction is about: KL, or 1 − cos."""
    return float(check["kl_mean"]) if family == "causal" else float(1.0 - check["cos_mean"])


def _kept_json(keep: UnitStore | None, key: str) -> tuple[Callable | None, Callable | None]:
    """(load, save) of a unit whose result is JSON, kept under ``key`` (None, None: nothing kept)."""
    if keep is None:
        return None, None
    return (lambda: keep.json(key)), (lambda v: keep.put_json(key, v))


def _fisher_arrays(f: dict) -> tuple[dict[str, np.ndarray], dict]:
    names = sorted(f["rows"])
    return ({f"rows.{i}": np.asarray(f["rows"][n]) for i, n in enumerate(names)},
            {"rows": names, "table": f["table"], "units": f["units"]})


def _fisher_from(got) -> dict | None:
    if got is None:
        return None
    arrays, meta = got
    return {"rows": {n: np.array(arrays[f"rows.{i}"]) for i, n in enumerate(meta["rows"])},
            "table": {k: float(v) for k, v in meta["table"].items()}, "units": meta["units"]}


class Calibration:
    """The analysis of one model, reusable for several encodes: the model built
    empty, calibration batches, per-tensor stats with Fisher sensitivities,
    every layer's Hessian (in a temporary folder next to ``target``, the output path
    or a folder to work in) and the
    groups' rung trials. A context manager: the folder goes on exit.

    ``encode(out, goal=..., bpw=..., feedback=...)`` writes one pack (no check);
    ``check(pack)`` compares a pack with the original on the check texts."""

    def __init__(self, model, target, *, config=None, policy: EncodablePolicy = EncodablePolicy(),
                 rules: RuleTable = DEFAULT_RULES, codec_options: dict[str, Any] | None = None,
                 texts: int | None = None, seq_len: int = DEFAULT_SEQ_LEN, sample_rows: int = DEFAULT_SAMPLE_ROWS,
                 threads: int | None = None, include_aux: bool = True, check_texts: int | None = None,
                 log: Callable[[str], None] | None = None, executor: LocalExecutor | None = None):
        from ..budget.settings import LADDER
        from ..budget.trials import TRIAL_ROWS, GroupTrials, sample_group_rows
        from .layerwise import LayerwiseModel, build_empty, checkpoint_param_map

        t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.model_path = model
        self.ckpt = open_checkpoint(model)
        self.plan = plan_checkpoint(self.ckpt, policy, rules)
        self.rules = rules
        self.policy, self.sample_rows, self.threads, self.include_aux, self.log = (policy, sample_rows, threads,
                                                                                   include_aux, log)
        self.codec_options = {k: v for k, v in (codec_options or {}).items() if k in ("seed", "iters", "per_centroid")}
        seed = int(self.codec_options.get("seed", 0))
        net, tok, self.family, _ = build_empty(model, config)
        self.lw = LayerwiseModel(net, checkpoint_param_map(net, self.ckpt), self.ckpt.read_float)
        self.n_texts = texts or TEXTS[self.family]
        self.seq_len = seq_len
        batches = calibration_batches(tok, self.family, self.n_texts, seq_len)
        n_check = check_texts or CHECK_TEXTS[self.family]
        if self.family == "causal":  # other passages of the calibration kinds, and a kind it never sees
            self.check_batches, self.check_kinds = check_batches(tok, n_check)
        else:  # the calibration sentences of each kind, retrieval ranked within each
            self.check_batches, self.check_kinds = calibration_batches(tok, self.family, min(n_check, self.n_texts),
                                                                       seq_len, with_kinds=True)
        self.total_weights = sum(g.n_weights for g in self.plan.groups) or 1
        target = Path(target)
        self.ex = executor
        self._fits: dict[tuple[str, str], Any] = {}  # (group, rung) -> fit, for the next round
        keep = executor.store if executor is not None else None
        if keep is not None:  # the Hessians are kept with the other units
            self._work = None
            (keep.folder / "hessians").mkdir(exist_ok=True)
        else:
            self._work = make_temp_dir(target / "calibration" if target.is_dir() else target, ".calibration")
        self.seconds["load"] = time.perf_counter() - t0
        try:
            t1 = time.perf_counter()
            self.store = HessianStore(self._work if keep is None else keep.folder / "hessians")
            self.batches = batches  # the tuning runs on them again
            stats, info = analyse(self.lw, self.ckpt, self.plan, batches, self.store, log=log, seed=seed, ex=executor)
            self.tokens = info["tokens"]
            self.seconds["analyse"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            # the rung trials of each group: independent units (one after another here, side by
            # side on a cluster); the function holds the checkpoint and the groups, not this object
            rel, todo = {}, []
            for g in self.plan.groups:
                load, save = _kept_json(keep, keep_key("trials", str(g.key)))
                got = load() if load is not None else None
                if got is None:
                    todo.append((g, save))
                else:
                    rel[str(g.key)] = got
            ckpt, groups = self.ckpt, [g for g, _ in todo]

            def trials(j, pool):
                tr = GroupTrials(sample_group_rows(ckpt, groups[j]), seed=seed)
                return {s.name: tr(s).rel_mse for s in LADDER}

            units = [Unit("trials", str(g.key), (), min(TRIAL_ROWS, g.n_rows) * g.key.shape[1],
                          unit_memory("trials", cols=g.key.shape[1], sample_rows=min(TRIAL_ROWS, g.n_rows)))
                     for g in groups]
            done = (executor.map(units, trials, threads_inside=True) if executor is not None
                    else ((j, trials(j, None)) for j in range(len(units))))
            for j, got in done:
                rel[str(groups[j].key)] = got
                if todo[j][1] is not None:
                    todo[j][1](got)
            self.rel = {str(g.key): rel[str(g.key)] for g in self.plan.groups}
            self.seconds["trials"] = time.perf_counter() - t1
            for g in self.plan.groups:
                for t in g.tensors:
                    if t.name not in stats:  # tables read by index, heads the blocks do not reach
                        stats[t.name] = tensor_stats(t.name, str(g.key), t.role, TensorRows(self.ckpt, t).read())
            t1 = time.perf_counter()
            fb = calibration_batches(tok, self.family, min(self.n_texts, FISHER_TEXTS[self.family]), seq_len,
                                     batch=FISHER_BATCH[self.family])
            k = keep_key("fisher", "all blocks")
            kept = (None, None) if keep is None else (lambda: _fisher_from(keep.arrays(k)),
                                                      lambda f: keep.put_arrays(k, *_fisher_arrays(f)))
            fis = self._run(Unit("fisher", "all blocks", (), self.total_weights),
                            lambda: fisher_diagonals(self.lw, fb, self.family, set(stats), seed=seed), *kept)
            for n, st in stats.items():
                st.set_sensitivity(fis["rows"].get(n), fis["table"].get(n))
            self.stats = list(stats.values())
            self.seconds["fisher"] = time.perf_counter() - t1
        except BaseException:
            self.close()
            raise

    def allocate(self, goal: float | None = None, bpw: float | None = None) -> TensorAllocation:
        """Per-tensor rungs for a predicted-change ``goal`` or a ``bpw`` budget (tensor parts)."""
        return allocate(self.stats, self.rel, goal=goal, budget_bits=None if bpw is None else bpw * self.total_weights,
                        tie=self.rules.tie)

    def _run(self, unit: Unit, fn, load=None, save=None):
        if self.ex is None:
            return fn()
        return self.ex.run(unit, fn, load=load, save=save)

    def encode(self, out, alloc: TensorAllocation, feedback: bool = True, tune: TuneOptions | None = None,
               distill: DistillOptions | None = None) -> dict[str, Any]:
        """Write the pack of allocation ``alloc`` to ``out`` (atomically); per-tensor results,
        and under ``"tuning"`` what the block step (``tune``) and the global step
        (``distill``) did."""
        if self.ex is None:
            with make_executor(self.threads) as ex:
                return self._encode(ex, out, alloc, feedback, tune, distill)
        return self._encode(self.ex, out, alloc, feedback, tune, distill)

    def _finish(self, ex: LocalExecutor, name: str, extra: dict[str, Any]) -> None:
        total = sum(int(np.prod(t.shape)) for t in self.plan.tensors.values())
        ex.close_pack(Unit("manifest", name, (), total), codec=make_codec("hhtl-vq", **self.codec_options),
                      policy=self.policy, sample_rows=self.sample_rows, include_aux=self.include_aux,
                      extra={"calibration": extra})

    def _encode(self, ex: LocalExecutor, out, alloc: TensorAllocation, feedback: bool,
                tune: TuneOptions | None, distill: DistillOptions | None) -> dict[str, Any]:
        from ..format import tensor_array_name
        from ..pack.reader import Pack

        info = {"family": self.family, "tokens": self.tokens, "texts": self.n_texts,
                "seq_len": self.seq_len if self.family == "causal" else None, "feedback": bool(feedback)}
        first = Path(out)
        if tune is not None or distill is not None:  # the encoded round, before its gains are tuned
            fd, first = make_temp_file(Path(out), ".untuned")
            os.close(fd)
        try:
            ex.open_pack(first, self.ckpt, self.plan)
            try:
                results = encode_pass(self.ckpt, self.plan, alloc, self.store if feedback else None, ex,
                                      self.codec_options, self.sample_rows, self.log, self._fits)
            except BaseException:
                ex.abort_pack()
                raise
            self._finish(ex, "manifest", info)
            if first == Path(out):
                return results
            untuned = Pack(first)
            tuning = self._tune(ex, untuned, allocation_key(alloc) + f"|{bool(feedback)}", tune, distill)
            ex.open_pack(Path(out), self.ckpt, self.plan)
            try:
                ex.writer.copy_encoded(untuned, {tensor_array_name(n, "gain"): g
                                                 for n, g in tuning.pop("gains").items()})
            except BaseException:
                ex.abort_pack()
                raise
            del untuned
            # the manifest holds what the bytes depend on: the figures, never the times
            summary = {k: ({f: x for f, x in v.items() if f != "seconds"} if isinstance(v, dict) else v)
                       for k, v in tuning.items() if k != "per_block"}
            self._finish(ex, "manifest (tuned)", {**info, "tuning": summary})
            results["tuning"] = tuning
            return results
        finally:
            if first != Path(out):
                remove_temp(first)

    def _tune(self, ex: LocalExecutor, untuned, key: str, tune: TuneOptions | None,
              distill: DistillOptions | None) -> dict[str, Any]:
        """The block step, then the global step, on the gains of the pack ``untuned``: the
        gains to store (``"gains"``) and what each step measured."""
        from .distill import distill_gains
        from .tuning import tune_pack_gains

        out: dict[str, Any] = {"parts": ["gain"]}
        gains: dict[str, np.ndarray] = {}
        if tune is not None:
            gains, blocks = tune_pack_gains(
                self.lw, untuned, self.batches, tune, log=self.log,
                run_unit=lambda i, fn: ex.run(Unit("tune", f"block {i}", (), self.lw.block_numel(i)), fn),
                keep=None if ex.store is None else _tune_keep(ex.store, key))
            out["block_step"] = {**tune.to_json(), "blocks": len(blocks), "blocks_tuned": sum(b.kept for b in blocks),
                                 "loss_before": float(sum(b.loss_before for b in blocks)),
                                 "loss_after": float(sum(b.loss_after for b in blocks)),
                                 "seconds": round(sum(b.seconds for b in blocks), 2)}
            out["per_block"] = [b.to_json() for b in blocks]
        if distill is not None:
            k = keep_key("distil", "all tensors", key)
            keep = ex.store

            def load():
                got = keep.arrays(k)
                if got is None:
                    return None
                return ({n: np.array(got[0][f"g{j}"]) for j, n in enumerate(got[1]["names"])},
                        DistillReport(**{f: got[1]["report"][f] for f in DistillReport.__dataclass_fields__}))

            def save(res):
                names = sorted(res[0])
                keep.put_arrays(k, {f"g{j}": res[0][n] for j, n in enumerate(names)},
                                {"names": names, "report": vars(res[1])})

            weights = sum(int(np.prod(t.shape)) for g in self.plan.groups for t in g.tensors)
            start = dict(gains)
            got, rep = ex.run(Unit("distil", "all tensors", (), weights),
                              lambda: distill_gains(self.lw, untuned, self.batches, self.family, distill, start,
                                                    log=self.log),
                              load=None if keep is None else load, save=None if keep is None else save)
            gains.update(got)
            out["global_step"] = {**distill.to_json(), **rep.to_json()}
            if self.log:
                log_line = (f"  global step: {rep.loss} {rep.loss_before:.4g} -> {rep.loss_after:.4g} "
                            f"({rep.steps} steps, {rep.seconds:.0f} s{'' if rep.kept else ', not kept'})")
                self.log(log_line)
        out["gains"] = gains
        return out

    def check(self, pack, key: str | None = None) -> dict[str, float]:
        """The pack against the original model on the check texts (per kind for causal LMs);
        ``key``: what the pack's bytes depend on (a kept check is read back under it)."""
        from ..classify.shapes import from_row_matrix
        from ..pack.reader import Pack

        keep = self.ex.store if self.ex is not None and key is not None else None

        def run():
            p = pack if isinstance(pack, Pack) else Pack(pack)
            replaced = {n: (lambda n=n: from_row_matrix(p.rows(n), p.info(n)["shape"],
                                                        bool(p.info(n).get("transposed"))))
                        for n in p.encoded_names()}
            return layerwise_compare(self.lw, self.check_batches, replaced, self.family, self.check_kinds)

        return self._run(Unit("check", "round", (), self.total_weights), run,
                         *_kept_json(keep, keep_key("check", key or "")))

    def close(self) -> None:
        if self._work is not None:
            remove_temp(self._work)

    def __enter__(self) -> "Calibration":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tune_keep(store: UnitStore, round_key: str) -> TuneKeep:
    """The block step's finished blocks in the unit store: per block its gains and record,
    and the two streams of the last finished block (an earlier block's are removed)."""

    def key(kind: str, i: int) -> str:
        return keep_key("tune", f"{kind} {i}", round_key)

    def load(i: int):
        got = store.arrays(key("block", i))
        if got is None:
            return None
        arrays, meta = got
        gains = {n: np.array(arrays[f"g{j}"]) for j, n in enumerate(meta["names"])}
        return gains, BlockTuning.from_json(meta["record"])

    def carry(i: int):
        got = store.arrays(key("carry", i))
        if got is None:
            return None
        a = got[0]
        n = got[1]["batches"]
        return [a[f"o{j}"] for j in range(n)], [a[f"p{j}"] for j in range(n)]

    def save(i: int, gains, rec: BlockTuning, original, pack) -> None:
        arrays = {f"o{j}": h.numpy() for j, h in enumerate(original)}
        arrays.update({f"p{j}": h.numpy() for j, h in enumerate(pack)})
        store.put_arrays(key("carry", i), arrays, {"batches": len(original)})
        names = sorted(gains)
        store.put_arrays(key("block", i), {f"g{j}": gains[n] for j, n in enumerate(names)},
                         {"names": names, "record": rec.to_json()})
        if i:
            store.path(key("carry", i - 1), ".safetensors").unlink(missing_ok=True)

    return TuneKeep(load, carry, save)


def encode_calibrated(model, out, *, target: Target | None = None, bpw: float | None = None, config=None,
                      policy: EncodablePolicy = EncodablePolicy(), rules: RuleTable = DEFAULT_RULES,
                      codec_options: dict[str, Any] | None = None, texts: int | None = None,
                      seq_len: int = DEFAULT_SEQ_LEN, sample_rows: int = DEFAULT_SAMPLE_ROWS,
                      threads: int | None = None, include_aux: bool = True, check_texts: int | None = None,
                      max_rounds: int = 2, feedback: bool = True, log: Callable[[str], None] | None = None,
                      store: UnitStore | None = None, tune: TuneOptions | None = TuneOptions(),
                      distill: DistillOptions | None = None):
    """Calibrated hhtl-vq encode of ``model`` into ``out`` (module docstring).

    Without ``bpw`` the allocation aims at ``target`` (:class:`Target`): if the
    check (every kind of check text) misses it, the goal is corrected by what the
    check measured and the tensors are encoded again (analysis reused), up to
    ``max_rounds``. With ``bpw`` one round spends that budget (bits per encoded
    weight, tensor parts) and the check is reported without a target.
    ``feedback=False`` encodes without error feedback (the same allocation); ``tune``:
    the block step after each round's encode (:mod:`hhtld.calibrate.tuning`), None for none
    (:func:`hhtld.encode` passes None for embedding models by default);
    ``distill``: the global step after it (:mod:`hhtld.calibrate.distill`), None for none.
    Each round is written next to ``out`` and only the chosen one renamed onto
    it. ``store``: where finished units are kept and read back (``--resume``).
    Returns (EncodeResult, CalibrationReport); ``report.met`` says whether
    the target was met. Raises :class:`GateError` (no runnable model) or
    ImportError (torch/transformers/accelerate missing) before any work."""
    from threadpoolctl import threadpool_limits

    from ..outputs import check_output_file
    from ..pack.writer import EncodeResult

    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise OptionsError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    target = target or Target()
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model)
    out = check_output_file(out, [ckpt.weight_path(f) for f in ckpt.files] + [ckpt.aux_path(a) for a in ckpt.aux_files],
                            what="pack")
    out.parent.mkdir(parents=True, exist_ok=True)
    # numpy's BLAS on one thread next to torch's: two thread pools spinning on two cores
    # made small Cholesky factorisations 20-30x slower
    with threadpool_limits(limits=1, user_api="blas"), make_executor(threads, store) as ex, \
            Calibration(model, out, config=config, policy=policy, rules=rules, codec_options=codec_options,
                        texts=texts, seq_len=seq_len, sample_rows=sample_rows, threads=threads,
                        include_aux=include_aux, check_texts=check_texts, log=log, executor=ex) as cal:
        fam = cal.family
        report = CalibrationReport(fam, {} if bpw is not None else target.to_json(fam), None, cal.stats,
                                   tokens=cal.tokens)
        sec = dict(cal.seconds)
        goal = None if bpw is not None else target.aim(fam)
        rounds: list[Path] = []
        try:
            for rnd in range(max_rounds):
                t1 = time.perf_counter()
                alloc = cal.allocate(goal=goal, bpw=bpw)
                if log:
                    log(f"allocation, round {rnd + 1}: {alloc.bits / cal.total_weights:.3f} bits per encoded weight "
                        f"(tensor parts), predicted output change {alloc.predicted:.4g}"
                        + ("" if goal is None else f" (goal {goal:.4g})"))
                fd, tmp = make_temp_file(out, ".round")
                os.close(fd)
                rounds.append(tmp)
                results = cal.encode(rounds[-1], alloc, feedback=feedback, tune=tune, distill=distill)
                tuning = results.pop("tuning", None)
                if len(rounds) > 1:
                    remove_temp(rounds[-2])
                sec[f"encode.{rnd}"] = time.perf_counter() - t1
                if tuning is not None:
                    sec[f"tune.{rnd}"] = sum(tuning.get(k, {}).get("seconds", 0.0)
                                             for k in ("block_step", "global_step"))
                t1 = time.perf_counter()
                check = cal.check(rounds[-1], key=f"{allocation_key(alloc)}|{bool(feedback)}")
                sec[f"check.{rnd}"] = time.perf_counter() - t1
                met = None if bpw is not None else target.met(fam, check)
                safe = None if bpw is not None else target.met(fam, check, CHECK_MARGIN[fam])
                report.rounds.append({"goal": goal, "predicted": alloc.predicted,
                                      "bpw_tensors": round(alloc.bits / cal.total_weights, 4), "check": check,
                                      "met": met, "within_margin": safe, "tuning": None if tuning is None else
                                      {k: v for k, v in tuning.items() if k != "per_block"}})
                report.tuning = tuning
                report.allocation, report.check, report.met, report.results = alloc, check, met, results
                if log:
                    flat = {k: v for k, v in check.items() if k != "kinds"}
                    log("check (the worst kind of check text): " + ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items()))
                    for kind, v in (check.get("kinds") or {}).items():
                        log(f"  {kind}: KL {v['kl_mean']:.4g}, perplexity ratio {v['ppl_ratio']:.4f}, "
                            f"top-1 {100 * v['top1']:.1f}%" if fam == "causal" else
                            f"  {kind}: top-1 retrieval {100 * v['top1']:.1f}%, cosine {v['cos_mean']:.4f}")
                if met is None or safe or rnd + 1 == max_rounds:
                    break
                measured = change_of(fam, check)
                ratio = measured / alloc.predicted if alloc.predicted > 0 else 1.0
                goal = target.aim(fam) / max(ratio, 1e-9)
                if measured <= target.allowed(fam):  # the change was in range: top-1 or perplexity missed
                    goal = min(goal, alloc.predicted * RETIGHTEN)
            publish(rounds[-1], out)
        finally:
            for r in rounds:
                remove_temp(r)
        plan = cal.plan
    if report.met is False:
        report.notes.append("the behaviour target was not met on every kind of check text after "
                            f"{len(report.rounds)} round{'s' if len(report.rounds) != 1 else ''}")
    elif report.met and not report.rounds[-1]["within_margin"]:
        report.notes.append(f"the check met the behaviour target but not within its margin ({CHECK_MARGIN[fam]:g} "
                            "of the allowed change): text of other kinds may miss it")
    sec["total"] = time.perf_counter() - t0
    report.seconds = {k: round(v, 2) for k, v in sec.items()}
    return EncodeResult(out, ckpt.path, sec["total"], cal.total_weights, plan), report
