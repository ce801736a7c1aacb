"""Use a pack directly on SmolLM2-135M-Instruct: memory and equality of ``hhtld.load``.

SmolLM2-135M-Instruct (``make llm``) encoded with one fixed data-free rung
(``--encode-all --stages 2``: one vq rung, about 4 bits a weight;
``--encode-all`` so the 192-row k/v projections are encoded too), then:

* peak RSS (``/usr/bin/time -v``, one fresh process each, the helper of
  ``bench/load.py``) of: the imports alone (baseline), ``hhtld.load(pack)``,
  ``hhtld.load(pack, keep_compressed=True)``, and the decode-to-disk route's
  ``AutoModelForCausalLM.from_pretrained(decoded folder)`` (decoding not
  included), and the same after reading every weight once (transformers
  memory-maps the folder's file: its pages count only once read); the
  target: ``hhtld.load`` at most 1.3 × the dense float32 checkpoint + the
  pack above the imports;
* equality (max abs of the logits) on the first 8 held-out passages
  (``heldout_passages()``, 128 tokens each, one passage per forward):
  ``hhtld.load`` vs the decoded folder, ``keep_compressed`` vs dense (with and
  without the codec-space product), and, for scale, the dense float32 logits
  vs the same weights run in float64;
* weights held in memory (``hhtld.weight_memory``), dense vs keep_compressed,
  against the pack's bytes.

No speed figures: the machine this ran on is shared with timing jobs. torch
and BLAS run on one thread, children included. Writes ``bench/load_smollm2.json``
and ``bench/load_smollm2.md``.

    python bench/load_smollm2.py [--model .cache/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # the RSS children too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = "2"
PASSAGES = 8
MAX_TOKENS = 128


def _bench_load():
    """bench/load.py as a module (its ``peak_rss`` and ``mb``): bench/ is not a package."""
    spec = importlib.util.spec_from_file_location("hhtld_bench_load", HERE / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_load = _bench_load()
peak_rss, mb = _load.peak_rss, _load.mb

_IMPORTS = "import torch, transformers, hhtld; torch.set_num_threads(1); transformers.LlamaForCausalLM"
CHILD = {
    "baseline": _IMPORTS,
    "hhtld.load": f"{_IMPORTS}; m = hhtld.load(PACK)",
    "hhtld.load keep_compressed": f"{_IMPORTS}; m = hhtld.load(PACK, keep_compressed=True)",
    "decode route: from_pretrained": f"{_IMPORTS}; m = transformers.AutoModelForCausalLM.from_pretrained(DECODED)",
    # from_pretrained leaves the weights as pages of the memory-mapped file, resident only once read
    "decode route: from_pretrained, every weight read": (
        f"{_IMPORTS}; m = transformers.AutoModelForCausalLM.from_pretrained(DECODED); "
        "s = sum(float(p.sum()) for p in m.parameters())"),
}
LABEL = {
    "baseline": "imports only (baseline)",
    "hhtld.load": "`hhtld.load(pack)`",
    "hhtld.load keep_compressed": "`hhtld.load(pack, keep_compressed=True)`",
    "decode route: from_pretrained": "decode route: `AutoModelForCausalLM.from_pretrained(decoded folder)`",
    "decode route: from_pretrained, every weight read": "the same, then every weight read once (`p.sum()`)",
}


def measure(model: Path, root: Path) -> dict:
    import copy

    import torch
    import transformers

    import hhtld
    from hhtld.classify import EncodablePolicy
    from hhtld.pack import decode_pack, encode_checkpoint
    from hhtld.measure.texts import heldout_passages

    pack = root / "smollm2.hhtld"
    encode_checkpoint(model, pack, policy=EncodablePolicy(encode_all=True), codec="hhtl-vq",
                      codec_options={"stages": STAGES}, threads=1)
    decoded = decode_pack(pack, root / "decoded").out_dir
    p = hhtld.open(pack)
    bd = p.byte_breakdown()
    res: dict = {"pack_bytes": bd["file_bytes"], "pack_weight_bytes": bd["file_bytes"] - bd["total"]["aux_files"],
                 "dense_bytes": (model / "model.safetensors").stat().st_size,
                 "encoded_tensors": len(p.encoded_names()), "tensors": len(p.names()), "rss": {}}
    for name, code in CHILD.items():
        res["rss"][name] = peak_rss(code, pack, decoded)
    base = res["rss"]["baseline"]
    res["rss_increment"] = {k: v - base for k, v in res["rss"].items() if k != "baseline"}
    res["rss_budget"] = 1.3 * res["dense_bytes"] + res["pack_bytes"]
    res["rss_target_met"] = res["rss_increment"]["hhtld.load"] <= res["rss_budget"]

    dense = hhtld.load(pack)
    tok = hhtld.load_tokenizer(pack)
    ref = transformers.AutoModelForCausalLM.from_pretrained(decoded).eval()
    comp = hhtld.load(pack, keep_compressed=True)
    plain = hhtld.load(pack, keep_compressed=True, codec_space=False)
    wide = copy.deepcopy(dense).double()
    res["tied_one_tensor"] = dense.lm_head.weight is dense.model.embed_tokens.weight
    texts = heldout_passages()[:PASSAGES]
    batches = [tok(t, truncation=True, max_length=MAX_TOKENS, return_tensors="pt") for t in texts]
    res["positions"] = sum(int(b["input_ids"].shape[1]) for b in batches)
    diff = {"load_vs_decode_route": 0.0, "compressed_vs_dense": 0.0, "compressed_codec_space_false_vs_dense": 0.0,
            "dense_float32_vs_float64": 0.0, "logit_absmax": 0.0}
    same_argmax = 0
    with torch.no_grad():
        for b in batches:
            d = dense(**b).logits
            c = comp(**b).logits
            for key, other in (("load_vs_decode_route", ref(**b).logits), ("compressed_vs_dense", c),
                               ("compressed_codec_space_false_vs_dense", plain(**b).logits)):
                diff[key] = max(diff[key], (other - d).abs().max().item())
            diff["dense_float32_vs_float64"] = max(diff["dense_float32_vs_float64"],
                                                   (wide(**b).logits - d.double()).abs().max().item())
            diff["logit_absmax"] = max(diff["logit_absmax"], d.abs().max().item())
            same_argmax += int((c.argmax(-1) == d.argmax(-1)).sum())
    res["maxabs"] = diff
    res["compressed_same_argmax"] = same_argmax
    res["weight_memory"] = {"dense": hhtld.weight_memory(dense), "compressed": hhtld.weight_memory(comp)}
    return res


def write_md(res: dict) -> str:
    m = res
    rows = ["| process (fresh Python) | peak RSS | above the imports |", "|---|---|---|"]
    for k, v in m["rss"].items():
        inc = "—" if k == "baseline" else mb(m["rss_increment"][k])
        rows.append(f"| {LABEL[k]} | {mb(v)} | {inc} |")
    inc = m["rss_increment"]["hhtld.load"]
    wm_d, wm_c = m["weight_memory"]["dense"], m["weight_memory"]["compressed"]
    d = m["maxabs"]
    lines = [
        f"SmolLM2-135M-Instruct, `--encode-all --stages {STAGES}` ({m['encoded_tensors']} of {m['tensors']} tensors "
        f"encoded): pack {mb(m['pack_bytes'])} ({mb(m['pack_weight_bytes'])} without the carried side files), "
        f"dense float32 {mb(m['dense_bytes'])}; torch/BLAS threads 1 (load average at start "
        f"{m['load_average_at_start'][0]:.1f} on {os.cpu_count()} cores).",
        "",
        *rows,
        "",
        f"Target for `hhtld.load`: ≤ 1.3 × dense + pack = {mb(m['rss_budget'])} above the imports — "
        f"**{'met' if m['rss_target_met'] else 'missed'}** ({mb(inc)}, {inc / m['rss_budget']:.2f} of the budget).",
        "",
        f"| equality, max abs of the logits ({PASSAGES} held-out passages, {m['positions']} positions, "
        f"logits up to ±{d['logit_absmax']:.1f}) | value |",
        "|---|---|",
        f"| `hhtld.load` vs `hhtld decode` + `from_pretrained` | {d['load_vs_decode_route']:.1e} |",
        f"| `keep_compressed` vs dense load (codec-space product) | {d['compressed_vs_dense']:.1e} |",
        f"| `keep_compressed`, `codec_space=False` vs dense load | {d['compressed_codec_space_false_vs_dense']:.1e} |",
        f"| for scale: dense float32 vs the same weights in float64 | {d['dense_float32_vs_float64']:.1e} |",
        "",
        f"keep_compressed picks the dense load's argmax at {m['compressed_same_argmax']} of {m['positions']} "
        f"positions; the tied `lm_head` is the embedding tensor: {'yes' if m['tied_one_tensor'] else 'no'}.",
        "",
        "| SmolLM2 weights in memory (`hhtld.weight_memory`) | bytes | × pack weight bytes |",
        "|---|---|---|",
        f"| dense load | {mb(wm_d['total'])} | {wm_d['total'] / m['pack_weight_bytes']:.2f} |",
        f"| keep_compressed: stored parts {mb(wm_c['compressed'])} + dense norms {mb(wm_c['dense'])} | "
        f"{mb(wm_c['total'])} | {wm_c['total'] / m['pack_weight_bytes']:.2f} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / ".cache" / "smollm2-135m-instruct",
                    help="the SmolLM2-135M-Instruct folder (make llm)")
    args = ap.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    if not (args.model / "model.safetensors").is_file():
        raise SystemExit(f"{args.model}: no model.safetensors; run `make llm` first")
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hhtld-bench-load-smollm2-") as tmp:
        res = measure(args.model.resolve(), Path(tmp))
    res = {"model": args.model.name, "stages": STAGES, "threads": 1, "load_average_at_start": load_avg, **res}
    (HERE / "load_smollm2.json").write_text(json.dumps(res, indent=2) + "\n")
    md = write_md(res)
    (HERE / "load_smollm2.md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
