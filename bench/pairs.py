"""What one table for two weights saves at run time: two packs of one model, the same
bits, grouped by role and by input (``hhtld encode --group-by input``), run
alternately in one process.

For each pack (``keep_compressed``, int16 tables, the lean decode loop, 2 threads):

* **generation**: batch-1 greedy tokens per second of ``--tokens`` new tokens
  (the first token's time subtracted), ``--rounds`` rounds alternating the packs;
  the ratio is taken within each round (the machine is noisy);
* **the paired products**: per token, the time of k, v, gate and up called one
  by one and through the lean loop's pairs (median of ``--calls`` calls per
  layer, summed over the layers), three times.

Usage::

    .venv/bin/python bench/pairs.py ROLE.hhtld INPUT.hhtld

Prints the figures; BENCHMARKS.md ("Grouping by input") has a run and the
encode and verify commands that made the packs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packs", nargs=2, help="the pack grouped by role, then the one grouped by input")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import hhtld
    from hhtld.kernels import sync_threads, warm_up
    from hhtld.loader.lean import LeanDecoder

    warm_up()
    sync_threads(args.threads)
    tok = hhtld.load_tokenizer(args.packs[0])
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"][0].tolist()
    dec = {}
    for p in args.packs:
        d = LeanDecoder(hhtld.load(p, keep_compressed=True))
        n = sum(q.pair is not None and q.pair.shared for layer in d.layers for q in (layer.kv, layer.gate_up))
        print(f"{p}: {n} pairs share a table")
        dec[p] = d

    def gen(d, n: int) -> float:
        t0 = time.perf_counter()
        d.generate(ids, n)
        return time.perf_counter() - t0

    for d in dec.values():
        gen(d, 4)
    rates: dict[str, list[float]] = {p: [] for p in args.packs}
    for _ in range(args.rounds):
        for p, d in dec.items():
            rates[p].append((args.tokens - 1) / (gen(d, args.tokens) - gen(d, 1)))
    for p in args.packs:
        print(f"{p}: tok/s {' '.join(f'{r:.1f}' for r in rates[p])} (median {statistics.median(rates[p]):.1f})")
    print("by input / by role, per round:", " ".join(f"{b / a:.3f}" for a, b in zip(*rates.values())))

    x = np.random.default_rng(0).standard_normal((1, next(iter(dec.values())).layers[0].norm_in.w.shape[0]))
    x = x.astype(np.float32)

    def med(f) -> float:
        ts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    for _ in range(3):
        for p, d in dec.items():
            alone = sum(med(lambda: (L.k(x), L.v(x), L.gate(x), L.up(x))) for L in d.layers)
            paired = sum(med(lambda: (L.kv(x), L.gate_up(x))) for L in d.layers)
            print(f"{p}: k, v, gate, up per token: one by one {alone * 1e3:.2f} ms, through the pairs "
                  f"{paired * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
