"""Speed of the codec's randomised Hadamard rotation: its float64 sums against a float32
BLAS product, and the Kronecker split's threshold.

hhtl-vq rotates every weight row before it is encoded and after it is decoded:
``(x * signs) @ blockdiag(H_b) / sqrt(b)``. The codec sums each block in float64
and rounds once to float32, so a row's bits do not depend on the rows beside it;
it applies ``H_b`` as ``H_p ⊗ H_q`` (two small products) from ``KRONECKER_FROM``
columns on, and as one ``(b, b)`` product below. This times, on the same rows, at
the widths of the models measured here (MiniLM 384/1536, SmolLM2 576/1536, Llama
2048/5632/11008, Qwen 896: Hadamard blocks of 128, 512, 64, 1024, 256):

- the codec's form (``hhtld.codecs.vq.quantiser.rotate``);
- the same float64 sums with the split from 512 columns (the threshold before it
  was 128: blocks of 128 and 256 took one product);
- the plain float32 product the codec used before the float64 sums (one BLAS
  call's rounding followed the number of rows in it), with the codec's split.

The forms take turns within each repeat (this machine's speed drifts by tens of
per cent over minutes), after one warm-up pass over everything; median, BLAS on
one thread (per-core figures). ``--pack`` adds ``Pack.rows`` of every tensor of
an hhtl-vq pack with each split, taking turns the same way. Writes
``bench/rotation.json``.

    python bench/rotation.py [--repeats 15] [--rows 2048] [--pack PACK.hhtld]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from threadpoolctl import threadpool_limits

from hhtld.codecs.vq import quantiser
from hhtld.codecs.vq.quantiser import hadamard_block, hadamard_factors, rotate, rotation_signs, sylvester
from timing import take_turns

HERE = Path(__file__).resolve().parent
WIDTHS = (384, 576, 896, 1536, 2048, 5632, 11008)
SPLIT_BEFORE = 512  # KRONECKER_FROM before it was lowered to the codec's value


def float32_rotation(x: np.ndarray, signs: np.ndarray, b: int) -> np.ndarray:
    """The same transform as float32 BLAS products on the whole array (the same Kronecker split)."""
    n, c = x.shape
    p, q = hadamard_factors(b)
    y = (x * signs.astype(np.float32)).reshape(-1, q) @ sylvester(q)
    if p > 1:
        y = np.matmul(sylvester(p), y.reshape(-1, p, q))
    y = y.reshape(n, c)
    y *= np.float32(1.0 / np.sqrt(b))
    return y


def with_split(split: int, fn):
    """``fn`` run with the Kronecker split from ``split`` columns."""
    def run():
        keep = quantiser.KRONECKER_FROM
        quantiser.KRONECKER_FROM = split
        try:
            return fn()
        finally:
            quantiser.KRONECKER_FROM = keep
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--pack", type=Path, help="an hhtl-vq pack whose decode is timed with each split")
    ap.add_argument("--out", type=Path, default=HERE / "rotation.json")
    args = ap.parse_args()
    now = quantiser.KRONECKER_FROM
    data = {c: np.random.default_rng(c).standard_normal((args.rows, c)).astype(np.float32) for c in WIDTHS}
    rows = []
    with threadpool_limits(1):
        for c in WIDTHS:  # warm-up: the CPU's clock, the caches, the Sylvester matrices
            rotate(data[c], rotation_signs(c, 0), block=hadamard_block(c))
        for c in WIDTHS:
            x, b, signs = data[c], hadamard_block(c), rotation_signs(c, 0)
            t = take_turns({
                "float64": lambda: rotate(x, signs, block=b),
                "float64_split_before": with_split(SPLIT_BEFORE, lambda: rotate(x, signs, block=b)),
                "float32": lambda: float32_rotation(x, signs, b)}, args.repeats)
            y = rotate(x, signs, block=b)
            before = with_split(SPLIT_BEFORE, lambda: rotate(x, signs, block=b))()
            diff = float(np.max(np.abs(y - float32_rotation(x, signs, b))))
            row = {"cols": c, "block": b, "rows": args.rows, "factors": list(hadamard_factors(b)),
                   "float64_sums_mw_s": round(x.size / t["float64"] / 1e6, 1),
                   "float64_split_from_512_mw_s": round(x.size / t["float64_split_before"] / 1e6, 1),
                   "float32_blas_mw_s": round(x.size / t["float32"] / 1e6, 1),
                   "float64_time_ratio": round(t["float64"] / t["float32"], 2),
                   "same_bits_as_split_from_512": bool(np.array_equal(before.view(np.uint32), y.view(np.uint32))),
                   "max_abs_difference_to_float32": diff}
            rows.append(row)
            print(json.dumps(row), flush=True)
    res: dict = {"repeats": args.repeats, "kronecker_from": now, "results": rows}
    if args.pack:
        from hhtld.pack import open_pack

        pk = open_pack(args.pack)
        names = pk.encoded_names()
        n_w = sum(pk.rows(n).size for n in names)
        t = take_turns({"now": lambda: [pk.rows(n) for n in names],
                        "split_from_512": with_split(SPLIT_BEFORE, lambda: [pk.rows(n) for n in names])},
                       args.repeats)
        res["pack_decode"] = {"pack": args.pack.name, "weights": n_w,
                              "mw_s": round(n_w / t["now"] / 1e6, 1),
                              "split_from_512_mw_s": round(n_w / t["split_from_512"] / 1e6, 1)}
        print(json.dumps(res["pack_decode"]), flush=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
