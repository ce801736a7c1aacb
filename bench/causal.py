"""SmolLM2-135M rate–KL benchmark: the baselines side (RTN, gguf quantisers, GPTQ).

For each method, on the real SmolLM2-135M-Instruct (``make llm``):

* bits per weight over **all 2-D matrices** (the tied 49152 x 576 embedding
  and the 210 projections; every stored scale counted; anything left dense
  counted at 16 bits; the 61 norm vectors are not matrices and not counted);
* held-out perplexity and its ratio to the original's, mean / p99 next-token
  KL(original ‖ method) and top-1 agreement on the held-out passages of every
  kind (``hhtld.measure.texts``: prose, code, reference, notes, dialogue in the
  chat template; 128 tokens each), overall and per kind, with the worst kind
  (what the gates hold on), measured with :func:`hhtld.gates.compare_causal_many`
  — the comparison ``hhtld verify`` uses, in one pass: per batch the original
  runs once and every method once.

Methods (all implemented here unless named):

* RTN (round to nearest) int4 / int6 / int8 with asymmetric min/scale groups
  along the input columns (fp16 scale + fp16 minimum per group): groups of
  128 and 64, and groups of 32 shifted by 16 columns; int8 per row (symmetric,
  fp16 scale per row).
* The ``gguf`` package's own Q4_0 / Q5_0 / Q8_0 quantisers (blocks of 32).
* GPTQ, written here from the paper's algorithm (Frantar et al., 2022):
  calibration passages (``calibration_passages``: prose, code and dialogue,
  256 tokens each, never the held-out ones) run through the model one decoder layer at a time; the inputs
  of each linear layer give ``H = XᵀX``; columns are quantised in order
  (blocks of 128, lazy batch updates) and each column's error, scaled by the
  Cholesky factor of ``H⁻¹``, is pushed into the columns not yet quantised;
  4-bit asymmetric groups of 128 or 64. Layers are quantised in sequence, each
  seeing the outputs of the already quantised layers before it. The embedding
  (tied with the output head) is not a GPTQ target: RTN int8 per row or int4
  groups of 128, stated per row.

Caveat — alignment. This SmolLM2 comes from a GGUF whose projections are Q4_1
(16 levels per block of 32 input columns) and whose embedding is Q8_0 (blocks
of 32). A quantiser whose groups are those aligned blocks of 32 re-finds the
source grid and is artificially exact: RTN int4 g32 aligned (shown, marked),
and the gguf quantisers (blocks of 32, aligned: Q8_0 on the Q8_0 embedding,
Q5_0 on the Q4_1 projections come out almost or exactly lossless). Groups of
64/128 span several source blocks, and the shifted groups of 32 straddle two,
so they are not exact.

Adding hhtld rows: ``--pack LABEL=PATH`` (repeatable) evaluates ``.hhtld``
packs of this model (decoded tensor by tensor, bits from the pack's own
byte accounting); from Python, ``run(candidates=[...])`` takes extra
:class:`Candidate` objects (a weight source and its bits), e.g. from
:func:`pack_candidate`.

    python bench/causal.py [--quick] [--texts N] [--calibration N] [--methods a,b,...] [--pack LABEL=PATH]

Writes ``bench/causal.json`` and ``bench/causal.md`` (``--quick``: under
``bench/out/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from hhtld.checkpoint import Checkpoint  # noqa: E402
from hhtld.gates import FunctionSource, ModelRunner, PackSource, compare_causal_many  # noqa: E402
from hhtld.measure.texts import USE_KINDS, passages, render  # noqa: E402
from hhtld.outputs import atomic_write_bytes  # noqa: E402
from hhtld.pack.reader import Pack  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EMBED = "model.embed_tokens.weight"
CALIB_TOKENS = 256
LOGITS_BUDGET = 512 * 2**20  # bench: bigger batches than verify's default (fewer weight switches), more memory


# -- stored forms (compact, dequantised on demand) ---------------------------------------
@dataclass
class GroupCodes:
    """Asymmetric integer codes in column groups: ``w ≈ code * scale + low``
    with fp16 ``scale``/``low`` per (row, group); ``bounds`` are the column
    boundaries of the groups (first 0, last = columns)."""

    codes: np.ndarray  # uint8 (rows, cols)
    scale: np.ndarray  # float16 (rows, groups)
    low: np.ndarray  # float16 (rows, groups)
    bounds: np.ndarray  # int64 (groups + 1,)
    bits: int

    def dequant(self) -> np.ndarray:
        sizes = np.diff(self.bounds)
        s = np.repeat(self.scale.astype(np.float32), sizes, axis=1)
        m = np.repeat(self.low.astype(np.float32), sizes, axis=1)
        return self.codes.astype(np.float32) * s + m

    @property
    def stored_bits(self) -> int:
        return self.codes.size * self.bits + self.scale.size * 16 + self.low.size * 16


@dataclass
class RowCodes:
    """Symmetric int8 per row: ``w ≈ code * scale`` with one fp16 scale per row."""

    codes: np.ndarray  # int8 (rows, cols)
    scale: np.ndarray  # float16 (rows, 1)

    def dequant(self) -> np.ndarray:
        return self.codes.astype(np.float32) * self.scale.astype(np.float32)

    @property
    def stored_bits(self) -> int:
        return self.codes.size * 8 + self.scale.size * 16


@dataclass
class GgufCodes:
    """Bytes of one of the ``gguf`` package's block quantisers."""

    data: np.ndarray  # uint8, gguf's own layout
    qtype: Any

    def dequant(self) -> np.ndarray:
        import gguf

        return gguf.dequantize(self.data, self.qtype).astype(np.float32)

    @property
    def stored_bits(self) -> int:
        return self.data.nbytes * 8


# -- quantisers ------------------------------------------------------------------------------
def group_bounds(cols: int, group: int, offset: int = 0) -> np.ndarray:
    """Column boundaries: groups of ``group`` columns, the first one ``offset`` columns long when ``offset > 0``."""
    edges = [0] + ([offset] if offset else []) + list(range(offset + group, cols, group)) + [cols]
    return np.unique(np.array(edges, dtype=np.int64))


def minmax_params(g: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 (scale, low) of the groups ``g`` (..., n): the grid spans [min, max] with 2**bits levels."""
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    low = lo.astype(np.float16)
    scale = ((hi - low.astype(np.float32)) / (2**bits - 1)).astype(np.float16)
    scale[scale.astype(np.float32) <= 0] = np.float16(1.0)  # a constant group: every code 0 gives `low`
    return scale, low


def rtn_groups(w: np.ndarray, bits: int, group: int, offset: int = 0) -> GroupCodes:
    rows, cols = w.shape
    b = group_bounds(cols, group, offset)
    codes = np.empty((rows, cols), dtype=np.uint8)
    scale = np.empty((rows, len(b) - 1), dtype=np.float16)
    low = np.empty_like(scale)
    top = 2**bits - 1
    for j, (a, e) in enumerate(zip(b[:-1], b[1:])):
        g = w[:, a:e]
        s, m = minmax_params(g, bits)
        scale[:, j], low[:, j] = s, m
        q = np.rint((g - m.astype(np.float32)[:, None]) / s.astype(np.float32)[:, None])
        codes[:, a:e] = np.clip(q, 0, top)
    return GroupCodes(codes, scale, low, b, bits)


def int8_rows(w: np.ndarray) -> RowCodes:
    s = (np.abs(w).max(axis=1, keepdims=True) / 127.0).astype(np.float16)
    s[s.astype(np.float32) == 0] = np.float16(1.0)
    q = np.clip(np.rint(w / s.astype(np.float32)), -127, 127).astype(np.int8)
    return RowCodes(q, s)


def gguf_quant(w: np.ndarray, name: str) -> GgufCodes:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, name)
    return GgufCodes(gguf.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype)


# -- GPTQ -------------------------------------------------------------------------------------
def gptq_matrix(w: np.ndarray, h: np.ndarray, bits: int, group: int, damp: float = 0.01,
                block: int = 128) -> GroupCodes:
    """GPTQ of one weight matrix ``w`` (out, in) float32 with the Hessian ``h``
    (in, in) of its inputs: column-order quantisation with Cholesky-based error
    feedback into the columns not yet quantised; asymmetric groups of ``group``
    columns whose fp16 scale/low are set from the (already updated) weights
    when the group starts."""
    import torch

    if block % group:
        raise ValueError(f"GPTQ block {block} must be a multiple of the group {group}")
    W = torch.tensor(w, dtype=torch.float32)
    H = torch.tensor(h, dtype=torch.float64)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)  # H⁻¹ = UᵀU
    codes = torch.zeros((rows, cols), dtype=torch.uint8)
    bounds = group_bounds(cols, group)
    scale = np.zeros((rows, len(bounds) - 1), dtype=np.float16)
    low = np.zeros_like(scale)
    top = 2**bits - 1
    s_cur = m_cur = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if c % group == 0:  # a new group (inside this block): its grid from the current, error-fed weights
                s16, m16 = minmax_params(W1[:, i:i + group].numpy(), bits)
                scale[:, c // group], low[:, c // group] = s16, m16
                s_cur = torch.from_numpy(s16.astype(np.float32))
                m_cur = torch.from_numpy(m16.astype(np.float32))
            col = W1[:, i]
            q = torch.clamp(torch.round((col - m_cur) / s_cur), 0, top)
            codes[:, c] = q.to(torch.uint8)
            err = (col - (q * s_cur + m_cur)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return GroupCodes(codes.numpy(), scale, low, bounds, bits)


class _Stop(Exception):
    pass


def gptq_model(runner: ModelRunner, texts: list[str], bits: int, group: int, embed: str,
               batch: int = 8, log: Callable[[str], None] = print) -> dict[str, Any]:
    """GPTQ of every linear layer inside the decoder layers of ``runner``'s
    model, layer by layer on ``texts`` (truncated to 256 tokens); the embedding
    is quantised first by ``embed`` (an RTN method name) and the calibration
    runs with it. Returns ``{checkpoint name: stored form}``; the runner's
    model is back on the original weights afterwards."""
    import torch

    runner.set_weights(None)
    model = runner.model
    key_to_name = {v: k for k, v in runner.param_of.items()}
    out: dict[str, Any] = {EMBED: METHODS[embed][1](runner.checkpoint.read_float(EMBED))}
    runner.set_weights({EMBED: out[EMBED].dequant()})
    tok = runner.tokenizer
    batches = [tok(texts[s:s + batch], truncation=True, max_length=CALIB_TOKENS, return_tensors="pt")
               for s in range(0, len(texts), batch)]
    layers = model.model.layers
    inputs, kwargs = [], []

    def catch(_mod, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    with torch.no_grad():
        h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for enc in batches:
                try:
                    model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                except _Stop:
                    pass
        finally:
            h.remove()
        for li, layer in enumerate(layers):
            t0 = time.perf_counter()
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            hess = {n: torch.zeros((m.in_features, m.in_features), dtype=torch.float64) for n, m in linears.items()}
            count = {n: 0 for n in linears}
            source: dict[str, int] = {}  # which input each linear reads (q/k/v share one, gate/up another)
            last: dict[str, Any] = {"x": None, "n": 0}

            def hook(name):
                def f(_mod, args):
                    if args[0] is not last["x"]:  # a new input (held here, so its memory cannot be reused)
                        x = args[0].reshape(-1, args[0].shape[-1])
                        last.update(x=args[0], xtx=(x.T @ x).double(), rows=x.shape[0], n=last["n"] + 1)
                    source.setdefault(name, last["n"])
                    hess[name] += last["xtx"]
                    count[name] += last["rows"]
                return f

            hooks = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
            try:
                for x, kw in zip(inputs, kwargs):
                    layer(x, **kw)
            finally:
                for hk in hooks:
                    hk.remove()
            # GPTQ treats rows independently given H: matrices reading the same input are done as one stack
            stacks: dict[int, list[str]] = {}
            for n in linears:
                stacks.setdefault(source[n], []).append(n)
            prefix = f"model.layers.{li}."
            for names in stacks.values():
                w = np.concatenate([linears[n].weight.detach().numpy() for n in names], axis=0)
                codes = gptq_matrix(w, (hess[names[0]] / max(count[names[0]], 1)).numpy(), bits, group)
                r0 = 0
                for n in names:
                    r1 = r0 + linears[n].out_features
                    part = GroupCodes(codes.codes[r0:r1], codes.scale[r0:r1], codes.low[r0:r1], codes.bounds, bits)
                    out[key_to_name[f"{prefix}{n}.weight"]] = part
                    linears[n].weight.data.copy_(torch.from_numpy(part.dequant()))
                    r0 = r1
            inputs = [_hidden(layer(x, **kw)) for x, kw in zip(inputs, kwargs)]
            log(f"  gptq layer {li}: {len(linears)} matrices in {len(stacks)} stacks, {time.perf_counter() - t0:.1f} s")
    runner.reload_original()  # the layers were changed in place: every parameter back from the checkpoint
    return out


def _hidden(o):
    return o[0] if isinstance(o, (tuple, list)) else o


# -- methods ----------------------------------------------------------------------------------
# name -> (label, quantiser of one matrix, note)
METHODS: dict[str, tuple[str, Callable[[np.ndarray], Any], str]] = {
    "rtn4_g128": ("RTN int4 g128", lambda w: rtn_groups(w, 4, 128), ""),
    "rtn4_g64": ("RTN int4 g64", lambda w: rtn_groups(w, 4, 64), ""),
    "rtn4_g32_off16": ("RTN int4 g32 offset 16", lambda w: rtn_groups(w, 4, 32, 16), "groups straddle two source blocks"),
    "rtn4_g32": ("RTN int4 g32 aligned", lambda w: rtn_groups(w, 4, 32),
                 "ALIGNED with the Q4_1 source blocks: artificially exact"),
    "rtn6_g128": ("RTN int6 g128", lambda w: rtn_groups(w, 6, 128), ""),
    "rtn8_g128": ("RTN int8 g128", lambda w: rtn_groups(w, 8, 128), ""),
    "rtn8_row": ("RTN int8 per row", int8_rows, ""),
    "q4_0": ("gguf Q4_0", lambda w: gguf_quant(w, "Q4_0"), "aligned blocks of 32"),
    "q5_0": ("gguf Q5_0", lambda w: gguf_quant(w, "Q5_0"), "aligned blocks of 32: holds the Q4_1 grid almost exactly"),
    "q8_0": ("gguf Q8_0", lambda w: gguf_quant(w, "Q8_0"), "aligned blocks of 32: exact on the Q8_0 embedding"),
}
# name -> (label, bits, group, embedding method)
GPTQ = {
    "gptq4_g128_emb8": ("GPTQ 4b g128 + emb int8/row", 4, 128, "rtn8_row"),
    "gptq4_g64_emb8": ("GPTQ 4b g64 + emb int8/row", 4, 64, "rtn8_row"),
    "gptq4_g128_emb4": ("GPTQ 4b g128 + emb RTN int4 g128", 4, 128, "rtn4_g128"),
    "gptq3_g128_emb8": ("GPTQ 3b g128 + emb int8/row", 3, 128, "rtn8_row"),
    "gptq3_g128_emb4": ("GPTQ 3b g128 + emb RTN int4 g128", 3, 128, "rtn4_g128"),
}
QUICK = ("rtn4_g128", "rtn8_row", "q4_0", "gptq4_g128_emb8")


@dataclass
class Candidate:
    """One row of the table: a weight source for the runner and its size.
    ``bits`` = stored bits of all 2-D matrices (dense ones at 16 bits)."""

    key: str
    label: str
    source: Any
    bits: float
    note: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def matrices(ckpt: Checkpoint) -> list[str]:
    return [n for n, t in ckpt.tensors.items() if len(t.shape) == 2 and t.is_float]


def stored_candidate(key: str, label: str, store: dict[str, Any], ckpt: Checkpoint, note: str,
                     seconds: float) -> Candidate:
    mats = matrices(ckpt)
    bits = sum(store[n].stored_bits if n in store else 16 * math.prod(ckpt.tensors[n].shape) for n in mats)
    src = FunctionSource(list(store), lambda n: store[n].dequant(), label)
    return Candidate(key, label, src, bits, note, seconds)


def pack_candidate(path: str | os.PathLike, ckpt: Checkpoint, label: str | None = None) -> Candidate:
    """A ``.hhtld`` pack of this model as a row: decoded tensor by tensor;
    bits = every stored byte of its groups (palettes, tables, entries...) plus
    its dense 2-D matrices at 16 bits."""
    from hhtld.gates.storage import measure_storage

    p = Pack(path)
    st = measure_storage(p)
    bits = 8 * sum(g["bytes"] for g in st["groups"])
    encoded = set(p.encoded_names())
    bits += sum(16 * math.prod(ckpt.tensors[n].shape) for n in matrices(ckpt) if n not in encoded)
    name = label or Path(path).stem
    return Candidate(f"pack:{name}", name, PackSource(p, ckpt, label=name), bits, f"hhtld pack {Path(path).name}")


HHTLD_BPW = (3.5, 4.0, 4.5, 5.0, 6.0)  # calibrated budgets (bits per weight of the tensors' own parts)


VARIANTS = ("tuned", "global", "feedback", "plain")


def hhtld_candidates(model: Path, ckpt: Checkpoint, folder: Path, bpws=HHTLD_BPW, variants=VARIANTS,
                     log: Callable[[str], None] = print, budgets_only: bool = False) -> list[Candidate]:
    """hhtld's rows, encoded here into ``folder``: the default (``--target behaviour``:
    calibrated, KL <= 0.02 on every kind of check text, tuned), the data-free ``--target
    rows``, and the calibrated encode at fixed budgets (one calibration, reused) in the
    ``variants``: ``tuned`` (error feedback, then the block step, as the default does),
    ``global`` (and the global step after it), ``feedback`` (error feedback, no tuning),
    ``plain`` (neither). Every
    matrix is encoded (``--encode-all``). ``budgets_only``: the fixed budgets alone."""
    from threadpoolctl import threadpool_limits

    from hhtld.classify import EncodablePolicy
    from hhtld.calibrate.distill import DistillOptions
    from hhtld.calibrate.pipeline import Calibration
    from hhtld.calibrate.tuning import TuneOptions

    pol = EncodablePolicy(encode_all=True)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    if not budgets_only:
        out += _default_and_rows(model, ckpt, folder, pol, log)
    labels = {"tuned": "", "global": " (+ global step)", "feedback": " (error feedback, no tuning)",
              "plain": " (no error feedback, no tuning)"}
    with threadpool_limits(limits=1, user_api="blas"), Calibration(model, folder, policy=pol, log=log) as cal:
        for b in bpws:
            alloc = cal.allocate(bpw=b)
            for v in variants:
                t0 = time.perf_counter()
                name = f"bpw{b}-{v}"
                cal.encode(folder / f"{name}.hhtld", alloc, feedback=v != "plain",
                           tune=TuneOptions() if v in ("tuned", "global") else None,
                           distill=DistillOptions() if v == "global" else None)
                out.append(pack_candidate(folder / f"{name}.hhtld", ckpt,
                                          f"hhtld --target behaviour --bpw {b}{labels[v]}"))
                out[-1].note = f"calibrated allocation, predicted KL {alloc.predicted:.4f}"
                out[-1].seconds = time.perf_counter() - t0
    return out


def _default_and_rows(model, ckpt, folder, pol, log) -> list[Candidate]:
    """The default encode and the data-free ``--target rows``, as rows."""
    from hhtld import encode

    out = []
    t0 = time.perf_counter()
    al = encode(model, folder / "default.hhtld", target="behaviour", policy=pol, log=log).allocation
    c = al.calibration.check
    out.append(pack_candidate(folder / "default.hhtld", ckpt, "hhtld default (--target behaviour)"))
    out[-1].note = (f"calibrated; target {'met' if al.met else 'NOT met'} on every kind of check text (worst: KL "
                    f"{c['kl_mean']:.4f}, ppl ratio {c['ppl_ratio']:.4f}); {len(al.calibration.rounds)} round(s)")
    out[-1].seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    al = encode(model, folder / "rows.hhtld", target="rows", policy=pol, log=log).allocation
    out.append(pack_candidate(folder / "rows.hhtld", ckpt, "hhtld --target rows (data-free)"))
    out[-1].note, out[-1].seconds = "data-free; causal minimum rungs", time.perf_counter() - t0
    return out


# -- the run ----------------------------------------------------------------------------------
def _portable(path: Path) -> str:
    """``path`` relative to the repository when inside it (results never name this machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return Path(path).name


def run(model_dir: Path, methods: list[str], n_texts: int, n_calib: int, candidates: list[Candidate] = (),
        log: Callable[[str], None] = print) -> dict[str, Any]:
    t_all = time.perf_counter()
    runner = ModelRunner.from_model(model_dir, progress=sys.stderr.isatty())
    ckpt = runner.checkpoint
    mats = matrices(ckpt)
    n_weights = sum(math.prod(ckpt.tensors[n].shape) for n in mats)
    kinds = [k for k in USE_KINDS["heldout"] for _ in passages("heldout", k)[:n_texts]]
    texts = [render(p, runner.tokenizer) for k in USE_KINDS["heldout"] for p in passages("heldout", k)[:n_texts]]
    by_kind = [[render(p, runner.tokenizer) for p in passages("calibration", k)] for k in USE_KINDS["calibration"]]
    calib = [t for row in zip(*by_kind) for t in row][:n_calib]  # one passage of each kind in turn
    cands: list[Candidate] = []
    for key in methods:
        t0 = time.perf_counter()
        if key in METHODS:
            label, fn, note = METHODS[key]
            store = {n: fn(ckpt.read_float(n)) for n in mats}
        else:
            label, bits, group, emb = GPTQ[key]
            log(f"{label}: calibrating on {len(calib)} passages x {CALIB_TOKENS} tokens")
            store = gptq_model(runner, calib, bits, group, emb, log=log)
            note = f"calibration: {len(calib)} passages x {CALIB_TOKENS} tokens"
        cands.append(stored_candidate(key, label, store, ckpt, note, time.perf_counter() - t0))
        log(f"{label}: {cands[-1].bits / n_weights:.3f} bits/weight ({cands[-1].seconds:.1f} s)")
    cands += list(candidates)
    t0 = time.perf_counter()
    res = compare_causal_many(runner, texts, None, {c.key: c.source for c in cands},
                              logits_budget=LOGITS_BUDGET, desc="held-out", kinds=kinds)
    t_eval = time.perf_counter() - t0
    first = next(iter(res.values()))
    rows = []
    for c in cands:
        r = res[c.key]
        rows.append({"key": c.key, "method": c.label, "bits_per_weight": c.bits / n_weights, "ppl": r["ppl_b"],
                     "ppl_ratio": r["ppl_ratio"], "kl_mean": r["kl_mean"], "kl_p50": r["kl_p50"],
                     "kl_p99": r["kl_p99"], "kl_max": r["kl_max"], "top1": r["top1"], "note": c.note,
                     "quantise_seconds": c.seconds, "worst_kind": r["worst_kind"],
                     "kinds": {k: {x: v[x] for x in ("kl_mean", "kl_p99", "ppl_ratio", "top1", "positions")}
                               for k, v in r["kinds"].items()}})
    return {
        "model": _portable(model_dir), "matrices": len(mats), "matrix_weights": n_weights,
        "texts": len(texts), "texts_per_kind": n_texts, "kinds": list(dict.fromkeys(kinds)),
        "positions": first["positions"], "tokens_per_text": runner.max_tokens,
        "calibration_passages": len(calib), "calibration_tokens": CALIB_TOKENS,
        "original_ppl": first["ppl_a"], "rows": rows,
        "seconds": {"evaluate": t_eval, "total": time.perf_counter() - t_all},
        "batch_size": first["batch_size"], "weight_switches": first["swaps"], "cpu_count": os.cpu_count(),
    }


def to_markdown(r: dict[str, Any], command: str) -> str:
    out = [f"`{command}`", "",
           f"SmolLM2-135M-Instruct, {r['texts']} held-out passages ({r['texts_per_kind']} of each kind: "
           f"{', '.join(r['kinds'])}) x {r['tokens_per_text']} tokens "
           f"({r['positions']} positions); original perplexity {r['original_ppl']:.3f}. Bits per weight over all "
           f"{r['matrices']} 2-D matrices ({r['matrix_weights']:,} weights). GPTQ calibration: "
           f"{r['calibration_passages']} passages x {r['calibration_tokens']} tokens (disjoint from the held-out set).",
           "",
           "Caveat: the source projections are GGUF Q4_1 (16 levels per aligned block of 32 input columns) and the "
           "embedding Q8_0; quantisers on aligned blocks of 32 re-find that grid and look artificially good "
           "(RTN int4 g32 aligned, gguf Q4_0/Q5_0/Q8_0).",
           "",
           "| method | bits/weight | perplexity | ratio | KL mean | KL p99 | top-1 | note |",
           "|---|---|---|---|---|---|---|---|"]
    for x in sorted(r["rows"], key=lambda x: x["bits_per_weight"]):
        out.append(f"| {x['method']} | {x['bits_per_weight']:.3f} | {x['ppl']:.3f} | {x['ppl_ratio']:.4f} | "
                   f"{x['kl_mean']:.4f} | {x['kl_p99']:.4f} | {100 * x['top1']:.1f} % | {x['note']} |")
    kinds = r["kinds"]
    out += ["", "Per kind of held-out text: mean next-token KL / perplexity ratio (the gates hold on the worst kind, "
                "marked *; targets KL <= 0.02, ratio <= 1.02):", "",
            "| method | bits/weight | " + " | ".join(kinds) + " | worst KL | worst ratio |",
            "|---|---|" + "---|" * (len(kinds) + 2)]
    for x in sorted(r["rows"], key=lambda x: x["bits_per_weight"]):
        k = x["kinds"]
        worst_ratio = max(v["ppl_ratio"] for v in k.values())
        cells = [f"{k[n]['kl_mean']:.4f}{'*' if n == x['worst_kind'] else ''} / {k[n]['ppl_ratio']:.4f}" for n in kinds]
        out.append(f"| {x['method']} | {x['bits_per_weight']:.3f} | " + " | ".join(cells)
                   + f" | {k[x['worst_kind']]['kl_mean']:.4f} | {worst_ratio:.4f} |")
    out += ["", f"Evaluation {r['seconds']['evaluate']:.0f} s, total {r['seconds']['total']:.0f} s "
                f"({r['cpu_count']} CPUs; batch {r['batch_size']}, {r['weight_switches']} weight switches)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None, candidates: list[Candidate] = ()) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke subset: 32 passages, 16 calibration, {', '.join(QUICK)}")
    ap.add_argument("--texts", type=int, default=None, help="held-out passages of each kind (default 64; --quick 8)")
    ap.add_argument("--calibration", type=int, default=None,
                    help="GPTQ calibration passages, the kinds in turn (default 32, as hhtld's; --quick 16)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(list(METHODS) + list(GPTQ))}")
    ap.add_argument("--pack", action="append", default=[], metavar="LABEL=PATH", help="also evaluate an .hhtld pack")
    ap.add_argument("--hhtld", action="store_true",
                    help="also encode and evaluate hhtld: the default, --target rows, and calibrated --bpw "
                         f"{', '.join(map(str, HHTLD_BPW))} with and without error feedback (packs in bench/out/causal)")
    ap.add_argument("--hhtld-variants", default=",".join(VARIANTS), metavar="V,V,...",
                    help="with --hhtld: the fixed-budget packs to make (tuned: as the default; global: and the "
                         "global step; feedback: error feedback, no tuning; plain: neither; default all four)")
    ap.add_argument("--hhtld-budgets-only", action="store_true",
                    help="with --hhtld: only the fixed budgets (not the default and --target rows encodes)")
    ap.add_argument("--hhtld-bpw", default=None, metavar="B,B,...",
                    help=f"with --hhtld: the calibrated budgets (default {','.join(map(str, HHTLD_BPW))}; --quick 4.0,5.0)")
    ap.add_argument("--llama-cpp", default=None, metavar="T,T,...",
                    help="also llama.cpp's quantisations with an importance matrix on the calibration passages "
                         "(bench/llama_quants.py; builds the tools into .cache/llama.cpp), e.g. "
                         "Q3_K_M,Q4_K_M,IQ4_XS,Q5_K_M,Q6_K,Q8_0")
    ap.add_argument("--model", default=None, help="the SmolLM2 folder (default: make llm's, made when missing)")
    ap.add_argument("--out", default=None, help="output stem (default bench/causal; --quick bench/out/causal-quick)")
    args = ap.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(REPO / "scripts"))
        from smollm2 import ensure_smollm2

        model = ensure_smollm2()
    else:
        model = Path(args.model)
    methods = args.methods.split(",") if args.methods else (list(QUICK) if args.quick else list(METHODS) + list(GPTQ))
    unknown = [m for m in methods if m not in METHODS and m not in GPTQ]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(list(METHODS) + list(GPTQ))}")
    n_texts = args.texts or (8 if args.quick else 64)
    n_calib = args.calibration or (16 if args.quick else 32)
    from hhtld.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model)
    extra = list(candidates)
    for spec in args.pack:
        label, _, path = spec.rpartition("=")
        extra.append(pack_candidate(path, ckpt, label or None))
    if args.llama_cpp:
        from llama_quants import candidates as llama_candidates

        extra += llama_candidates(model, matrices(ckpt), Candidate, args.llama_cpp.split(","))
    if args.hhtld:
        bpws = (tuple(float(b) for b in args.hhtld_bpw.split(",")) if args.hhtld_bpw
                else (4.0, 5.0) if args.quick else HHTLD_BPW)
        variants = tuple(v for v in args.hhtld_variants.split(",") if v)
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            ap.error(f"--hhtld-variants: unknown variant {bad[0]!r} (known: {', '.join(VARIANTS)})")
        extra += hhtld_candidates(model, ckpt, HERE / "out" / "causal", bpws, variants,
                                  budgets_only=args.hhtld_budgets_only)
    res = run(model, methods, n_texts, n_calib, extra)
    command = "python bench/causal.py" + (" " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
    res["command"] = command
    stem = Path(args.out) if args.out else (HERE / "out" / "causal-quick" if args.quick else HERE / "causal")
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(f"{stem}.json"), (json.dumps(res, indent=2) + "\n").encode("utf-8"))
    atomic_write_bytes(Path(f"{stem}.md"), to_markdown(res, command).encode("utf-8"))
    print(to_markdown(res, command))
    print(f"wrote {stem}.json and {stem}.md")
    return res


if __name__ == "__main__":
    main()
