"""Encode time, memory and data moved: the local executor against Ray with 1 and 2 workers.

For each synthetic Llama shape of ``--sizes`` (``bench/synthetic.py``; ``7b:2`` is the
7B shape with its first 2 blocks only), the data-free default (``hhtld encode DIR -o
PACK --bpw X``... here ``--target rows``) runs three times: ``--executor local``,
``--executor ray`` with a local cluster of 1 worker (``--threads 1``) and of 2
(``--threads 2``). Measured: wall time, the peak RSS of the encode process (the
driver) and of its whole process tree (with a local cluster, its Ray processes and
workers are in it), sampled every 0.2 s; the tasks and the bytes they handed back
(the encode JSON's ``executor``). The three packs must be the same bytes (checked).

From the two Ray runs, a model of the time: ``T(w) = C + P / w`` for ``w`` workers,
``C`` what stays on the driver (planning, a lone tensor's encode — a group of one, as
an embedding or a head — on the driver's pool, the writes, the cluster's start) and
``P`` the group fits and tensor encodes; ``P = 2 (T(1) − T(2))``. It is
projected to 70 B (the 7B shape's per-weight figures × 10.4) on N nodes of 16 cores.

    python bench/executors.py --sizes 0.1b,1.1b,7b:2 --dir "$SCRATCH"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from synthetic import SIZES, write_checkpoint  # noqa: E402

RUNS = (("local", ["--executor", "local", "--threads", "2"]), ("ray, 1 worker", ["--executor", "ray", "--threads", "1"]),
        ("ray, 2 workers", ["--executor", "ray", "--threads", "2"]))
W70 = 68.98e9  # weights of a Llama-2-70B


def sample_tree(p: subprocess.Popen) -> tuple[int, int]:
    """Peak RSS (bytes) of process ``p`` and of its whole tree, sampled until it ends."""
    import psutil

    top = psutil.Process(p.pid)
    own = tree = 0
    while p.poll() is None:
        try:
            procs = [top] + top.children(recursive=True)
            rss = [q.memory_info().rss for q in procs]
        except psutil.Error:
            continue
        own, tree = max(own, rss[0]), max(tree, sum(rss))
        time.sleep(0.2)
    return own, tree


def run(folder: Path, out: Path, extra: list[str]) -> dict:
    js = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "hhtld", "encode", str(folder), "-o", str(out), "--target", "rows", "-q",
           "--json", str(js), *extra]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    own, tree = sample_tree(p)
    err = p.stderr.read()
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    wall = time.perf_counter() - t0
    ex = json.loads(js.read_text()).get("executor", {})
    return {"wall_s": round(wall, 1), "driver_peak_rss_gb": round(own / 1e9, 3),
            "tree_peak_rss_gb": round(tree / 1e9, 3), "tasks": ex.get("tasks"), "bytes_back": ex.get("bytes_back"),
            "pack": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1b,1.1b,7b:2", help="sizes, SIZE or SIZE:BLOCKS, comma-separated")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "executors.json")
    args = ap.parse_args()
    result = {}
    for spec in args.sizes.split(","):
        size, _, blocks = spec.partition(":")
        shape = SIZES[size] if not blocks else replace(SIZES[size], layers=int(blocks))
        folder = write_checkpoint(size, args.dir / spec.replace(":", "-"), layers=int(blocks) if blocks else None)
        rows = {}
        for name, extra in RUNS:
            rows[name] = run(folder, args.dir / f"{spec.replace(':', '-')}-{name.split(',')[0]}-{extra[-1]}.hhtld",
                             extra)
            print(spec, name, json.dumps({k: v for k, v in rows[name].items() if k != "pack"}, default=str),
                  flush=True)
        packs = [r.pop("pack") for r in rows.values()]
        same = len({p.read_bytes() for p in packs}) == 1
        for p in packs:
            p.unlink()
        t1, t2 = rows["ray, 1 worker"]["wall_s"], rows["ray, 2 workers"]["wall_s"]
        par = max(0.0, 2 * (t1 - t2))
        result[spec] = {"weights": shape.n_weights, "runs": rows, "same_bytes": same,
                        "model": {"driver_s": round(t1 - par, 1), "parallel_s": round(par, 1)}}
    big = result.get("7b:2") or result[max(result, key=lambda k: result[k]["weights"])]
    per_w_c = big["model"]["driver_s"] / big["weights"]
    per_w_p = big["model"]["parallel_s"] / big["weights"]
    result["projection_70b"] = {
        "assumes": "per-weight costs of the largest shape measured; 16 workers per node; data-free --target rows",
        "driver_s": round(per_w_c * W70, 0),
        "by_nodes": {n: round(per_w_c * W70 + per_w_p * W70 / (16 * n), 0) for n in (1, 2, 4, 8, 16)},
        "bound_speedup": round((per_w_c + per_w_p) / max(per_w_c, 1e-12), 2)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["projection_70b"], indent=2))


if __name__ == "__main__":
    main()
