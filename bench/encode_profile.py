"""Where an encode spends its time and memory: ``hhtld.encode`` run in this process with a
thread sampling the resident memory every quarter second; every line the encode logs
(``analysed block i/n``, ``allocation, round r``, ``encoded k/n tensors``, the check)
is printed with the seconds since the start and the resident memory, and the peak
resident memory is kept per stage — a stage runs from one log line to the next, so
the check of a round counts under the last ``encoded`` line before it.

Usage (the calibrated default on a synthetic TinyLlama-shaped model)::

    .venv/bin/python bench/synthetic.py --size 1.1b --out "$SCRATCH/s11" --tokenizer
    /usr/bin/time -v .venv/bin/python -u bench/encode_profile.py "$SCRATCH/s11" "$SCRATCH/s11.hhtld"

Extra flags are passed to ``hhtld.encode`` as ``--target rows``, ``--bpw 4`` or
``--stages 2``. Prints the log lines, then a JSON summary (seconds, peaks per stage).
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("output")
    ap.add_argument("--target", default=None)
    ap.add_argument("--bpw", type=float, default=None)
    ap.add_argument("--stages", default=None)
    args = ap.parse_args()

    import hhtld
    from hhtld.memory import resident_bytes

    t0 = time.perf_counter()
    state = {"stage": "start", "done": False}
    peaks: dict[str, int] = {}

    def sample() -> None:
        while not state["done"]:
            peaks[state["stage"]] = max(peaks.get(state["stage"], 0), resident_bytes())
            time.sleep(0.25)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:8.1f} s, resident {resident_bytes() / 1e9:.2f} GB] {msg}", flush=True)
        state["stage"] = msg.strip()[:80]

    threading.Thread(target=sample, daemon=True).start()
    rep = hhtld.encode(args.model, args.output, target=args.target, bpw=args.bpw, stages=args.stages, log=log)
    state["done"] = True
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "path": rep.path_kind, "met": rep.met,
                      "ratio_vs_bf16": rep.info["ratio_vs_bf16"],
                      "stage_seconds": rep.allocation.seconds if rep.allocation else None,
                      "peak_resident_gb_by_stage": {k: round(v / 1e9, 3) for k, v in peaks.items()}}, indent=1))


if __name__ == "__main__":
    main()
