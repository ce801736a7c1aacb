"""Speed of the codec's randomised Hadamard rotation, against a float32 BLAS product.

hhtl-vq rotates every weight row before it is encoded and after it is decoded:
``(x * signs) @ blockdiag(H_b) / sqrt(b)``. The codec sums each block in float64
and rounds once to float32, so a row's bits do not depend on the rows beside it;
this times that form (``hhtld.codecs.vq.quantiser.rotate``) against the plain
float32 product the codec used before (where one BLAS call's rounding followed the
number of rows in it), on the same rows, at the widths of the models measured
here (MiniLM 384/1536, SmolLM2 576/1536, Llama 2048/5632/11008: Hadamard
blocks of 128, 512, 64, 1024, 256). Median of repeated runs, BLAS on one thread
(per core figures). Writes ``bench/rotation.json``.

    python bench/rotation.py [--repeats 7] [--rows 2048]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from threadpoolctl import threadpool_limits

from hhtld.codecs.vq.quantiser import hadamard_block, hadamard_factors, rotate, rotation_signs, sylvester
from timing import median_time

HERE = Path(__file__).resolve().parent


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=HERE / "rotation.json")
    args = ap.parse_args()
    rows = []
    for cols in (384, 576, 1536, 2048, 5632, 11008):
        b = hadamard_block(cols)
        x = np.random.default_rng(cols).standard_normal((args.rows, cols)).astype(np.float32)
        signs = rotation_signs(cols, 0)
        with threadpool_limits(1):
            t64 = median_time(lambda: rotate(x, signs, block=b), args.repeats)
            t32 = median_time(lambda: float32_rotation(x, signs, b), args.repeats)
        diff = float(np.max(np.abs(rotate(x, signs, block=b) - float32_rotation(x, signs, b))))
        row = {"cols": cols, "block": b, "rows": args.rows, "float64_sums_mw_s": round(x.size / t64 / 1e6, 1),
               "float32_blas_mw_s": round(x.size / t32 / 1e6, 1), "float64_time_ratio": round(t64 / t32, 2),
               "max_abs_difference": diff}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
