"""Encode and decode at scale: time, CPU and peak memory on synthetic Llama-shaped checkpoints.

For every size (``bench/synthetic.py``: 0.1b, 0.4b, 1.1b, deep; ``--size 7b``
adds a Llama-2-7B-shaped one, 13.5 GB on disk) it runs, each in a fresh
process so that peak RSS is that command's own (``os.wait4``):

* every data-free encode of ``hhtld encode``: ``--codec hhtl-f32``,
  ``--codec hhtl-d``, hhtl-vq ``--stages 4,3`` (vq2.3), ``--stages 2``
  (vq4.0), ``--target rows`` and ``--bpw 4``;
* ``hhtld decode`` of the ``--target rows`` pack to a folder, and
  ``Pack.rows`` over every encoded tensor (no writes: the decode speed);
* baselines on the same tensors, read and written the same way (bf16
  shards in, one safetensors file out): int8 per row (numpy) and the
  ``gguf`` package's Q4_0 and Q8_0 quantisers (llama.cpp's reference
  numpy implementation, single-threaded as shipped).

Wall seconds, CPU seconds (user + sys), M weights per wall second and per
CPU second, peak RSS (and per GB of checkpoint) and the pack's ratio
against bf16 go to ``bench/scale.json`` and ``bench/scale.md``.

    python bench/scale.py [--sizes 0.1b,0.4b,1.1b,deep] [--size 7b] [--dir DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from synthetic import SIZES, write_checkpoint  # noqa: E402

ENCODES = {
    "hhtl-f32": ["--codec", "hhtl-f32"],
    "hhtl-d": ["--codec", "hhtl-d"],
    "hhtl-vq --stages 4,3 (vq2.3)": ["--stages", "4,3"],
    "hhtl-vq --stages 2 (vq4.0)": ["--stages", "2"],
    "hhtl-vq --target rows": ["--target", "rows"],
    "hhtl-vq --bpw 4": ["--bpw", "4"],
}
BASELINES = ("int8/row", "gguf Q4_0", "gguf Q8_0")

BASELINE_SCRIPT = r"""
import sys, numpy as np
from pathlib import Path
sys.path.insert(0, {src!r})
from hhtld import open_checkpoint
from hhtld.stfile import SafetensorsWriter
method, model, out = sys.argv[1:4]
ck = open_checkpoint(model)
if method != "int8/row":
    import gguf
    qtype = {{"gguf Q4_0": gguf.GGMLQuantizationType.Q4_0, "gguf Q8_0": gguf.GGMLQuantizationType.Q8_0}}[method]
n = 0
with SafetensorsWriter(out) as w:
    for name, info in ck.tensors.items():
        if len(info.shape) != 2 or not info.is_float:
            w.add_raw(name, info.dtype, info.shape, ck.read_raw(name))
            continue
        x = ck.read_float(name)
        n += x.size
        if method == "int8/row":
            s = np.abs(x).max(axis=1, keepdims=True) / 127.0
            s[s == 0] = 1.0
            w.add(name + ".q", np.clip(np.rint(x / s), -127, 127).astype(np.int8))
            w.add(name + ".s", s.astype(np.float16))
        else:
            w.add(name, gguf.quants.quantize(x, qtype))
print(n)
"""

DECODE_SCRIPT = r"""
import sys, time, statistics
sys.path.insert(0, {src!r})
from hhtld import open as open_pack
p = open_pack(sys.argv[1])
names = p.encoded_names()
for n in names:
    p.rows(n)  # warm-up: page cache, checksums
times = []
for _ in range(3):
    t = time.perf_counter()
    w = 0
    for n in names:
        w += p.rows(n).size
    times.append(time.perf_counter() - t)
print(w, statistics.median(times))
"""


def measure(cmd: list[str], env=None) -> dict:
    """Run ``cmd``; its wall and CPU seconds and peak RSS (this child only)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_gb": ru.ru_maxrss * 1024 / 1e9, "stdout": out,
            "stderr": err}


def hhtld_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hhtld.cli", *args]


def checkpoint_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9


def run_size(size: str, ckdir: Path, work: Path, threads: int | None, encodes: dict[str, list[str]] = ENCODES) -> dict:
    from hhtld import open_checkpoint
    from hhtld.pack import open_pack

    t = time.perf_counter()
    model = write_checkpoint(size, ckdir / size)
    made = time.perf_counter() - t
    ck = open_checkpoint(model)
    n_w = sum(int(__import__("numpy").prod(i.shape)) for i in ck.tensors.values() if len(i.shape) == 2)
    largest = max(int(__import__("numpy").prod(i.shape)) for i in ck.tensors.values()) * 4 / 1e9
    gb = checkpoint_gb(model)
    res = {"size": size, "weights": n_w, "checkpoint_gb": gb, "largest_tensor_f32_gb": largest,
           "rss_target_gb": 1.5 + 3 * largest, "made_seconds": round(made, 1), "rows": []}
    print(f"== {size}: {n_w / 1e9:.3f} B weights, {gb:.2f} GB, largest tensor {largest:.3f} GB as f32", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    extra = [] if threads is None else ["--threads", str(threads)]
    work.mkdir(parents=True, exist_ok=True)

    def row(method: str, kind: str, m: dict, n: int, **kw) -> None:
        r = {"method": method, "kind": kind, "wall": round(m["wall"], 2), "cpu": round(m["cpu"], 2),
             "mw_per_s": round(n / m["wall"] / 1e6, 2), "mw_per_cpu_s": round(n / max(m["cpu"], 1e-9) / 1e6, 2),
             "rss_gb": round(m["rss_gb"], 3), "rss_per_ckpt_gb": round(m["rss_gb"] / gb, 3), **kw}
        res["rows"].append(r)
        print(f"  {method:32s} {kind:7s} {r['wall']:8.1f} s wall {r['cpu']:8.1f} s cpu {r['mw_per_s']:8.2f} M w/s "
              f"{r['rss_gb']:6.2f} GB" + (f"  {kw}" if kw else ""), flush=True)

    for base in BASELINES:
        out = work / "baseline.safetensors"
        script = BASELINE_SCRIPT.format(src=str(ROOT / "src"))
        m = measure([sys.executable, "-c", script, base, str(model), str(out)], env)
        row(base, "encode", m, n_w, out_gb=round(out.stat().st_size / 1e9, 3))
        out.unlink()
    rows_pack = None
    for name, args in encodes.items():
        pack = work / f"{name.split()[0]}-{len(res['rows'])}.hhtld"
        m = measure(hhtld_cmd("encode", str(model), "-o", str(pack), "-q", *args, *extra), env)
        p = open_pack(pack)
        row(name, "encode", m, n_w, ratio=round(p.storage_ratio(), 3), pack_gb=round(pack.stat().st_size / 1e9, 3))
        if args == ["--target", "rows"]:
            rows_pack = pack
        else:
            pack.unlink()
    dec = work / "decoded"
    m = measure(hhtld_cmd("decode", str(rows_pack), "-o", str(dec), "-q", "--force"), env)
    row("hhtld decode (--target rows pack)", "decode", m, n_w)
    shutil.rmtree(dec, ignore_errors=True)
    m = measure([sys.executable, "-c", DECODE_SCRIPT.format(src=str(ROOT / "src")), str(rows_pack)], env)
    w, secs = m["stdout"].split()
    res["pack_rows_mw_per_s"] = round(int(w) / float(secs) / 1e6, 1)
    row("Pack.rows (--target rows pack)", "decode", m, n_w, rows_mw_per_s=res["pack_rows_mw_per_s"])
    rows_pack.unlink()
    q4 = next(r for r in res["rows"] if r["method"] == "gguf Q4_0")
    for r in res["rows"]:
        r["x_q4_0"] = round(r["mw_per_s"] / q4["mw_per_s"], 3)
    return res


def to_markdown(results: list[dict], cmd: str) -> str:
    lines = [f"Command: `{cmd}`", ""]
    if "$SCRATCH" in cmd:
        lines += ["(`$SCRATCH`: a folder with room for the checkpoints and packs, outside the repository.)", ""]
    for res in results:
        lines += [f"### {res['size']}: {res['weights'] / 1e9:.3f} B weights, checkpoint {res['checkpoint_gb']:.2f} GB "
                  f"(bf16), largest tensor {res['largest_tensor_f32_gb'] * 1000:.0f} MB as float32", "",
                  "| method | wall s | CPU s | M w/s (wall) | M w / CPU-s | × gguf Q4_0 (wall) | peak RSS GB | "
                  "RSS / GB ckpt | ratio vs bf16 |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['method']} ({r['kind']}) | {r['wall']:.1f} | {r['cpu']:.1f} | {r['mw_per_s']:.1f} | "
                         f"{r['mw_per_cpu_s']:.1f} | {r['x_q4_0']:.2f} | {r['rss_gb']:.2f} | {r['rss_per_ckpt_gb']:.2f} | "
                         f"{r.get('ratio', '')} |")
        lines += ["", f"RSS target (1.5 GB + 3 × largest tensor in float32): {res['rss_target_gb']:.2f} GB; "
                  f"`Pack.rows` decode of the `--target rows` pack: {res['pack_rows_mw_per_s']:.0f} M weights/s.", ""]
    return "\n".join(lines)


def _portable(arg: str, folder: Path) -> str:
    """A command-line argument as the recorded command shows it: the scratch
    folder as a path relative to the repository, or ``$SCRATCH`` outside it."""
    if arg != str(folder):
        return arg
    try:
        return str(folder.resolve().relative_to(ROOT))
    except ValueError:
        return "SCRATCH_FOLDER"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.1b,0.4b,1.1b,deep", help="comma-separated sizes (default %(default)s)")
    ap.add_argument("--size", action="append", default=[], choices=sorted(SIZES), help="add a size (e.g. 7b)")
    ap.add_argument("--dir", type=Path, default=HERE / "out" / "scale", help="checkpoints and packs (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="hhtld --threads (default: all usable cores)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--encodes", default=None, metavar="K,K,...",
                    help="hhtld encodes to run, by their first words (e.g. 'hhtl-f32,hhtl-vq --target rows'; "
                         "default: all of " + "; ".join(ENCODES) + "). The --target rows pack is always made: "
                         "the decode rows read it")
    args = ap.parse_args()
    encodes = ENCODES
    if args.encodes:
        want = [w.strip() for w in args.encodes.split(",") if w.strip()]
        encodes = {k: v for k, v in ENCODES.items() if any(k.startswith(w) for w in want)}
        encodes.setdefault("hhtl-vq --target rows", ENCODES["hhtl-vq --target rows"])
    sizes = [s for s in args.sizes.split(",") if s] + args.size
    results = []
    cmd = ("python bench/scale.py " + shlex.join(_portable(a, args.dir) for a in sys.argv[1:])).replace(
        "SCRATCH_FOLDER", '"$SCRATCH"')
    for size in sizes:
        results.append(run_size(size, args.dir / "ckpt", args.dir / "work", args.threads, encodes))
        (HERE / "scale.json").write_text(json.dumps({"command": cmd, "results": results}, indent=2) + "\n")
        (HERE / "scale.md").write_text(to_markdown(results, cmd) + "\n")
        if not args.keep:
            shutil.rmtree(args.dir / "ckpt" / size, ignore_errors=True)
    print(f"wrote {HERE / 'scale.md'} and {HERE / 'scale.json'}")


if __name__ == "__main__":
    main()
