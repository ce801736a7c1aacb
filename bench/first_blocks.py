"""The calibrated default at sizes that do not fit the time here: profile the first
blocks, project the whole.

For a synthetic Llama shape (``bench/synthetic.py``, random bf16 weights and a
word-level tokenizer: time and memory only, never quality) the default calibrated
encode (``hhtld encode DIR -o PACK``) runs on checkpoints of that shape with the
first N blocks only, for each N of ``--layers`` (e.g. 1 and 2). Per stage of the
encode (the ``seconds`` of its JSON: load, analysis, trials, Fisher, each round's
encode, block step and check), the cost of one block is the difference between
two block counts and the rest is what does not grow with blocks (the embedding
and head); the whole model's time is projected as ``fixed + layers × per block``.
Peak RSS of the encode process is measured (``/usr/bin/time``); the streaming
design says it follows the largest tensor, not the block count, so it is
projected flat and the table shows it for each N. ``--full`` also runs the whole
model, to check the projection against a measurement.

    python bench/first_blocks.py --size 7b --layers 1,2 --dir "$SCRATCH"
    python bench/first_blocks.py --size 0.1b --layers 1,2 --full --dir "$SCRATCH"
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from synthetic import SIZES, write_checkpoint, write_tokenizer  # noqa: E402

STAGES = ("load", "analyse", "trials", "fisher", "encode.0", "tune.0", "check.0", "encode.1", "tune.1", "check.1")


def run_encode(folder: Path, out: Path, threads: int | None) -> dict:
    """One default calibrated encode, its JSON, wall time and peak RSS."""
    js = out.with_suffix(".json")
    cmd = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "hhtld", "encode", str(folder), "-o", str(out),
           "--json", str(js), "-q"]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 3):
        raise SystemExit(f"encode of {folder} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss_kb, _ = p.stderr.strip().splitlines()[-1].split()
    info = json.loads(js.read_text())
    seconds = info.get("allocation", {}).get("seconds") or {}
    tuning = (info.get("allocation", {}).get("calibration") or {}).get("tuning") or {}
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(int(rss_kb) / 1e6, 3), "seconds": seconds,
            "rounds": len(info.get("allocation", {}).get("rounds") or []),
            "per_block_tune_s": [b.get("seconds") for b in tuning.get("per_block", [])],
            "pack_bytes": out.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--layers", default="1,2", help="block counts to run, comma-separated (at least two)")
    ap.add_argument("--full", action="store_true", help="also run every block of the shape (checks the projection)")
    ap.add_argument("--dir", type=Path, required=True, help="scratch folder for checkpoints and packs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "first_blocks.json")
    args = ap.parse_args()
    shape = SIZES[args.size]
    counts = sorted({int(x) for x in args.layers.split(",")})
    if len(counts) < 2:
        raise SystemExit("--layers needs two block counts at least")
    if args.full:
        counts.append(shape.layers)
    runs = {}
    for n in counts:
        folder = args.dir / f"{args.size}-{n}"
        write_checkpoint(args.size, folder, layers=n)
        if not (folder / "tokenizer.json").exists():
            write_tokenizer(folder, shape.vocab)
        print(f"{args.size} with {n} block(s): {replace(shape, layers=n).n_weights / 1e9:.3f} B weights", flush=True)
        runs[n] = run_encode(folder, args.dir / f"{args.size}-{n}.hhtld", args.threads)
        print(json.dumps(runs[n]), flush=True)
        (args.dir / f"{args.size}-{n}.hhtld").unlink()
        if n == shape.layers and n not in counts[:-1]:
            shutil.rmtree(folder)
    a, b = counts[0], counts[1]
    proj = {}
    for st in set(runs[a]["seconds"]) | set(runs[b]["seconds"]):
        if st == "total":
            continue
        xa, xb = runs[a]["seconds"].get(st, 0.0), runs[b]["seconds"].get(st, 0.0)
        per = (xb - xa) / (b - a)
        proj[st] = {"fixed_s": round(xa - a * per, 1), "per_block_s": round(per, 2),
                    "projected_s": round(xa + (shape.layers - a) * per, 1)}
    per_wall = (runs[b]["wall_s"] - runs[a]["wall_s"]) / (b - a)
    result = {"size": args.size, "layers": shape.layers, "weights": shape.n_weights, "runs": runs, "stages": proj,
              "projected_wall_s": round(runs[a]["wall_s"] + (shape.layers - a) * per_wall, 1),
              "per_block_wall_s": round(per_wall, 1),
              "projected_peak_rss_gb": max(r["peak_rss_gb"] for r in runs.values())}
    if args.full:
        result["measured_full_wall_s"] = runs[shape.layers]["wall_s"]
    prev = json.loads(args.out.read_text()) if args.out.exists() else {}
    prev[args.size] = result
    args.out.write_text(json.dumps(prev, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
