"""Run a pack the way people run compressed models: speed, memory and fidelity of
``keep_compressed`` on SmolLM2-135M-Instruct, beside dense float32 torch and llama.cpp.

In one run, on ``--threads`` threads (default 2), each configuration in a fresh
child process (so its peak memory is its own):

* **generation**: batch-1 greedy ``generate`` of ``--tokens`` new tokens
  (``min_new_tokens`` = max, so every pass makes the same count) from a short
  prompt; tokens per second of each of ``--runs`` passes after one warm-up
  pass, median reported; time to first token excluded by subtracting a
  one-token pass.
* **prompt**: the prompt pass of generation over a ``--prompt-tokens``-token
  prompt (a held-out passage): one forward, the last position's logits only
  (transformers' ``logits_to_keep=1``, as its ``generate`` runs it), median of
  ``--runs``.
* **memory**: the child's peak resident memory (``VmHWM``) and its resident
  memory right before the model is loaded (after importing torch,
  transformers, hhtld and the Llama modelling code, loading the tokenizer
  and warming the kernels up); "above imports" is the difference. The kernels' fixed cost (numba + compiled code) is measured
  in its own child: imports with and without ``hhtld.kernels.warm_up()``.
* **llama.cpp** (when ``make llama-cpp`` built it): ``llama-bench -t THREADS
  -p PROMPT -n TOKENS -r RUNS`` on Q4_0, Q4_K_M and Q8_0 of the same model.
* **fidelity** of the int16 tables: KL(decoded pack ‖ run path) per token over
  the held-out passages (``--kl-passages`` per kind, ``--kl-tokens`` each),
  every row through the tables (as token-by-token generation runs them), and
  float32 tables for scale.
* **where a token's time goes**: one timed generation of the default run path
  (int16 tables, lean loop): time in the kernels per projection, and the rest.

Configurations: dense float32 (``hhtld.load``) under transformers' ``generate``
and under hhtld's lean decode loop (:mod:`hhtld.loader.lean`), and
``keep_compressed`` with int16 tables (lean loop: what ``hhtld generate
--keep-compressed`` runs; and under transformers' ``generate``) and with
float32 tables (lean loop). Prompt time of a lean configuration is one
forward of the whole prompt through the lean loop. Writes ``bench/generate.json`` and
``bench/generate.md``.

    python bench/generate.py [--pack bench/out/smollm2-default.hhtld]

Without ``--pack`` the default pack is encoded first (``hhtld encode`` with the
default options: the calibrated behaviour target; about 4 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The capital of France is"
DENSE = "dense float32, transformers generate"
BEST = "hhtld keep_compressed, int16 tables, lean loop"
CONFIGS = {
    DENSE: {"keep_compressed": False, "engine": "transformers"},
    "dense float32, lean loop": {"keep_compressed": False, "engine": "lean"},
    BEST: {"keep_compressed": True, "tables": "int16", "engine": "lean"},
    "hhtld keep_compressed, float32 tables, lean loop": {"keep_compressed": True, "tables": "float32",
                                                         "engine": "lean"},
    "hhtld keep_compressed, int16 tables, transformers generate": {"keep_compressed": True, "tables": "int16",
                                                                    "engine": "transformers"},
}
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")


# --- the child: one configuration --------------------------------------------------------
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401

    import hhtld
    from hhtld.measure.texts import rendered
    from hhtld.kernels import warm_up

    opts = json.loads(args.child)
    if opts.get("imports_only") is not None:
        if opts["imports_only"]:
            warm_up()
        return {"peak": _status("VmHWM"), "rss": _status("VmRSS")}
    warm_up()  # the kernels in memory for every configuration: the baseline is the same process
    tok = hhtld.load_tokenizer(args.pack)
    from transformers.models.llama import modeling_llama  # noqa: F401  (what load imports lazily)

    from hhtld.kernels import sync_threads
    from hhtld.loader.lean import LeanDecoder

    engine = opts.pop("engine")
    base = _status("VmRSS")
    model = hhtld.load(args.pack, **opts)
    loaded = _status("VmRSS")
    enc = tok(PROMPT, return_tensors="pt")
    lean = LeanDecoder(model, opts.get("tables", "int16")) if engine == "lean" else None
    sync_threads(args.threads)

    def gen(n: int) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            if lean is not None:
                lean.generate(enc["input_ids"][0].tolist(), n)  # no end-of-sequence id: n tokens
            else:
                model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.eos_token_id)
            return time.perf_counter() - t0

    def prompt(ids):  # the prompt pass of generation: the next token's logits only
        if lean is not None:
            return lean.logits(ids[0].tolist(), stepwise=False, last_only=True)
        return model(input_ids=ids, logits_to_keep=1)

    gen(4)
    rates = []
    for _ in range(args.runs):
        first = gen(1)
        rates.append((args.tokens - 1) / max(1e-9, gen(args.tokens) - first))
    text = next(t for k, t in rendered("heldout", tok) if k == "prose")
    ids = tok(text, return_tensors="pt")["input_ids"][:, :args.prompt_tokens]
    prompt_s = []
    with torch.no_grad():
        prompt(ids)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            prompt(ids)
            prompt_s.append(time.perf_counter() - t0)
    return {"tok_s": rates, "prompt_s": prompt_s, "prompt_tokens": int(ids.shape[1]), "base": base,
            "loaded": loaded, "peak": _status("VmHWM"), "weights": hhtld.weight_memory(model)}


def run_child(args, opts: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(opts), "--pack", str(args.pack), "--threads",
           str(args.threads), "--runs", str(args.runs), "--tokens", str(args.tokens), "--prompt-tokens",
           str(args.prompt_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), NUMBA_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"child {opts} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- fidelity and profile (in this process) --------------------------------------------------
def fidelity(args) -> dict:
    import torch

    import hhtld
    from hhtld.measure.texts import USE_KINDS, rendered
    from hhtld.kernels import vq

    torch.set_num_threads(args.threads)
    tok = hhtld.load_tokenizer(args.pack)
    dense = hhtld.load(args.pack)
    runs = {t: hhtld.load(args.pack, keep_compressed=True, tables=t) for t in ("int16", "float32")}
    kinds = USE_KINDS["heldout"]
    texts = {k: [t for kk, t in rendered("heldout", tok) if kk == k][:args.kl_passages] for k in kinds}
    out = {}
    saved = vq.MAX_TABLE_ROWS
    vq.MAX_TABLE_ROWS = 1 << 30  # every row through the tables, as token-by-token generation runs them
    try:
        for name, model in runs.items():
            per_kind = {}
            for k, ts in texts.items():
                total, n, worst = 0.0, 0, 0.0
                for text in ts:
                    ids = tok(text, return_tensors="pt")["input_ids"][:, :args.kl_tokens]
                    with torch.no_grad():
                        p = torch.log_softmax(dense(input_ids=ids).logits[0].double(), -1)
                        q = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                    kl = (p.exp() * (p - q)).sum(-1)
                    total += float(kl.sum())
                    n += kl.numel()
                    worst = max(worst, float(kl.max()))
                per_kind[k] = {"kl_mean": total / n, "kl_max": worst, "positions": n}
            out[name] = {"per_kind": per_kind, "kl_mean": max(v["kl_mean"] for v in per_kind.values())}
    finally:
        vq.MAX_TABLE_ROWS = saved
    return out


def profile(args) -> dict:
    """Where one generated token's time goes on the default run path (int16 tables, the lean
    loop): the kernels (by projection), and everything else (embedding row, norms, rotary,
    attention, the loop)."""
    import numpy as np
    import torch

    import hhtld
    from hhtld.kernels import sync_threads, warm_up
    from hhtld.kernels.native import simd
    from hhtld.loader import lean as lean_mod

    torch.set_num_threads(args.threads)
    warm_up()
    tok = hhtld.load_tokenizer(args.pack)
    model = hhtld.load(args.pack, keep_compressed=True)
    sync_threads(args.threads)
    lean = lean_mod.LeanDecoder(model, "int16")
    names = {}
    for layer in lean.layers:
        for key in ("q", "k", "v", "o", "gate", "up", "down"):
            names[id(getattr(layer, key))] = key
    names[id(lean.lm_head)] = "lm_head"
    spent = {k: 0.0 for k in ("q", "k", "v", "o", "gate", "up", "down", "lm_head")}
    orig = lean_mod._Linear.__call__

    def timed(self, x):
        t0 = time.perf_counter()
        try:
            return orig(self, x)
        finally:
            if x.shape[0] == 1:
                spent[names[id(self)]] += time.perf_counter() - t0

    ids = tok(PROMPT, return_tensors="pt")["input_ids"][0].tolist()
    lean.generate(ids, 4)
    lean_mod._Linear.__call__ = timed
    try:
        one = time.perf_counter()
        lean.generate(ids, 1)  # the prompt and one token, for the time to subtract
        one = time.perf_counter() - one
        for k in spent:
            spent[k] = 0.0
        t0 = time.perf_counter()
        lean.generate(ids, args.tokens + 1)
        total = time.perf_counter() - t0 - one
    finally:
        lean_mod._Linear.__call__ = orig
    per = 1000.0 / args.tokens
    kern = {k: v * per for k, v in spent.items()}
    return {"ms_per_token": total * per, "kernels_ms": float(np.sum(list(kern.values()))), "kernels_by_projection_ms":
            kern, "rest_ms": total * per - float(np.sum(list(kern.values()))), "simd": simd()}


# --- llama.cpp --------------------------------------------------------------------------------
def llama_cpp(args) -> dict:
    root = Path(args.llama_cpp)
    bench = root / "build" / "bin" / "llama-bench"
    if not bench.exists():
        return {}
    out = {}
    for q in QUANTS:
        gguf = root / "gguf" / f"smollm2-135m-{q}.gguf"
        if not gguf.exists():
            continue
        res = subprocess.run([str(bench), "-m", str(gguf), "-t", str(args.threads), "-p", str(args.prompt_tokens),
                              "-n", str(args.tokens), "-r", str(args.runs), "-o", "json"], capture_output=True,
                             text=True, timeout=1800)
        if res.returncode != 0:
            out[q] = {"error": res.stderr[-500:]}
            continue
        rows = json.loads(res.stdout)
        entry = {"file_bytes": gguf.stat().st_size}
        for r in rows:
            key = "prompt_tok_s" if r.get("n_prompt") else "gen_tok_s"
            entry[key] = r.get("avg_ts")
            entry[key + "_samples"] = r.get("samples_ts")
        out[q] = entry
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", default=str(HERE / "out" / "smollm2-default.hhtld"))
    ap.add_argument("--model", default=str(ROOT / ".cache" / "smollm2-135m-instruct"))
    ap.add_argument("--llama-cpp", default=str(ROOT / ".cache" / "llama.cpp"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--kl-passages", type=int, default=2, help="held-out passages per kind for the KL")
    ap.add_argument("--kl-tokens", type=int, default=128)
    ap.add_argument("--json", default=str(HERE / "generate.json"))
    ap.add_argument("--md", default=str(HERE / "generate.md"))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: fidelity, profile, llama")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    pack = Path(args.pack)
    if not pack.exists():
        pack.parent.mkdir(parents=True, exist_ok=True)
        hh = shutil.which("hhtld") or str(Path(sys.executable).parent / "hhtld")
        res = subprocess.run([hh, "encode", args.model, "-o", str(pack)])
        if res.returncode not in (0, 3):
            return res.returncode
    t_start = time.time()
    results = {"pack": str(pack.relative_to(ROOT)) if pack.is_relative_to(ROOT) else "$PACK",
               "pack_bytes": pack.stat().st_size, "threads": args.threads, "runs": args.runs,
               "tokens": args.tokens, "prompt_tokens": args.prompt_tokens}
    results["imports"] = {"plain": run_child(args, {"imports_only": False}),
                          "with kernels": run_child(args, {"imports_only": True})}
    results["configs"] = {}
    for name, opts in CONFIGS.items():
        print(f"running {name} ...", flush=True)
        results["configs"][name] = run_child(args, opts)
    if "llama" not in skip:
        print("running llama.cpp ...", flush=True)
        results["llama_cpp"] = llama_cpp(args)
    if "profile" not in skip:
        print("profiling one generation ...", flush=True)
        results["profile"] = profile(args)
    if "fidelity" not in skip:
        print("measuring KL of the run paths ...", flush=True)
        results["fidelity"] = fidelity(args)
    results["seconds"] = time.time() - t_start
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    Path(args.md).write_text(report(results))
    print(report(results))
    return 0


def report(r: dict) -> str:
    dense = r["configs"][DENSE]
    d_tok = statistics.median(dense["tok_s"])
    d_prompt = statistics.median(dense["prompt_s"])
    imp = r["imports"]
    lines = [f"SmolLM2-135M-Instruct, {r['threads']} threads, medians of {r['runs']}; pack {_mb(r['pack_bytes'])}; "
             f"{r['tokens']} new tokens batch 1 greedy; prompt {r['prompt_tokens']} tokens.", "",
             "| runs SmolLM2-135M | file / weights held | prompt tok/s | prompt × dense time | generation tok/s "
             "| × dense | peak RSS above imports |", "|---|---|---|---|---|---|---|"]
    for name, c in r["configs"].items():
        tok_s = statistics.median(c["tok_s"])
        p = statistics.median(c["prompt_s"])
        lines.append(f"| {name} | {_mb(c['weights']['total'])} | {c['prompt_tokens'] / p:.0f} | {p / d_prompt:.2f} "
                     f"| {tok_s:.1f} | {tok_s / d_tok:.2f} | {_mb(c['peak'] - c['base'])} |")
    for q, e in (r.get("llama_cpp") or {}).items():
        if "error" in e:
            continue
        lines.append(f"| llama.cpp {q} | {_mb(e['file_bytes'])} | {e.get('prompt_tok_s', 0):.0f} | — "
                     f"| {e.get('gen_tok_s', 0):.1f} | {e.get('gen_tok_s', 0) / d_tok:.2f} | — |")
    lines += ["", f"Imports alone (torch, transformers, hhtld): peak {_mb(imp['plain']['peak'])}; with the kernels "
              f"imported and compiled code loaded (`warm_up()`): {_mb(imp['with kernels']['peak'])} "
              f"(the kernels' fixed cost {_mb(imp['with kernels']['peak'] - imp['plain']['peak'])})."]
    ll = r.get("llama_cpp") or {}
    if "Q4_K_M" in ll and "gen_tok_s" in ll["Q4_K_M"]:
        best = statistics.median(r["configs"][BEST]["tok_s"])
        lines.append(f"hhtld int16 vs llama.cpp Q4_K_M generation: {best / ll['Q4_K_M']['gen_tok_s']:.2f}×.")
    if "profile" in r:
        p = r["profile"]
        by = ", ".join(f"{k} {v:.1f}" for k, v in p["kernels_by_projection_ms"].items())
        lines += ["", f"Where a token's time goes ({BEST}, one generation of {r['tokens']} tokens, "
                      f"{p['ms_per_token']:.1f} ms a token): kernels {p['kernels_ms']:.1f} ms ({by}), "
                      f"everything else (embedding row, norms, rotary, attention, the loop) {p['rest_ms']:.1f} ms."]
    if "fidelity" in r:
        lines += ["", "| run path vs the decoded pack | " + " | ".join(
            next(iter(r["fidelity"].values()))["per_kind"]) + " | worst |", "|---|" + "---|" * (
            len(next(iter(r["fidelity"].values()))["per_kind"]) + 1)]
        for name, f in r["fidelity"].items():
            lines.append(f"| {name} tables, KL mean | " + " | ".join(
                f"{v['kl_mean']:.2e}" for v in f["per_kind"].values()) + f" | {f['kl_mean']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
