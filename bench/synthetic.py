"""Synthetic Llama-shaped checkpoints for the scale benchmark.

Random weights (normal, std 0.02; norms 1.0), bfloat16, written as shards
of at most 500 MB with a ``model.safetensors.index.json`` and a
``config.json`` (LlamaConfig fields), as Hugging Face saves a Llama model.
The weights carry no information: they measure time and memory, never
quality. Shapes:

=========  ======  ============  ======  =====  ========  ================
size       hidden  intermediate  layers  heads  kv heads  vocab (untied)
=========  ======  ============  ======  =====  ========  ================
0.1b       768     2048          12      12     12        32000
0.4b       1024    2816          24      16     16        32000
1.1b       2048    5632          22      32     4         32000 (TinyLlama)
deep       1024    2816          32      16     16        8000
7b         4096    11008         32      32     32        32000 (Llama-2-7B)
=========  ======  ============  ======  =====  ========  ================

    python bench/synthetic.py --size 1.1b --out DIR
    python bench/synthetic.py --size 7b --layers 2 --tokenizer --out DIR   # its first 2 blocks only
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hhtld.stfile import SafetensorsWriter  # noqa: E402

SHARD_BYTES = 500 * 1000 * 1000


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * hd
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def n_weights(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "hidden_act": "silu",
        }


SIZES = {
    "0.1b": Shape(768, 2048, 12, 12, 12, 32000),
    "0.4b": Shape(1024, 2816, 24, 16, 16, 32000),
    "1.1b": Shape(2048, 5632, 22, 32, 4, 32000),
    "deep": Shape(1024, 2816, 32, 16, 16, 8000),
    "7b": Shape(4096, 11008, 32, 32, 32, 32000),
}


def write_checkpoint(size: str, out: Path, seed: int = 0, layers: int | None = None) -> Path:
    """Write the checkpoint of ``size`` into folder ``out`` (skipped when its index exists);
    ``layers``: only that many blocks (the shapes of ``size`` otherwise), to profile its first blocks."""
    shape = SIZES[size] if layers is None else replace(SIZES[size], layers=layers)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return out
    rng = np.random.default_rng(seed)
    tensors = shape.tensors()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, s in tensors:
        nbytes = int(np.prod(s)) * 2
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, s))
        used += nbytes
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(out / fname, {"format": "pt"}) as w:
            for name, s in shard:
                if len(s) == 1:
                    a = np.ones(s, dtype=np.float32)
                else:
                    a = np.empty(s, dtype=np.float32)
                    step = max(1, (1 << 24) // s[1])
                    for r in range(0, s[0], step):  # bounded memory for the 7B shapes
                        a[r:r + step] = rng.standard_normal((min(step, s[0] - r), s[1]), dtype=np.float32)
                    a *= np.float32(0.02)
                total += w.add(name, a.astype(ml_dtypes.bfloat16))
                weight_map[name] = fname
    (out / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over the words of hhtld's calibration and held-out
    passages (at most ``vocab`` entries), so a synthetic checkpoint can be run on
    text (the calibrated encode); the ids carry no meaning for random weights."""
    import re
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hhtld.measure.texts import calibration_passages, heldout_passages

    words = Counter(w for t in calibration_passages() + heldout_passages() for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    specials = ["<unk>", "<s>", "</s>"]
    table = {w: i for i, w in enumerate(specials + [w for w, _ in words.most_common(vocab - len(specials))])}
    tk = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", action="store_true", help="also write a word-level tokenizer (to run it on text)")
    ap.add_argument("--layers", type=int, default=None, metavar="N", help="only the first N blocks of that shape")
    args = ap.parse_args()
    p = write_checkpoint(args.size, args.out, layers=args.layers)
    if args.tokenizer:
        write_tokenizer(p, SIZES[args.size].vocab)
    shape = SIZES[args.size] if args.layers is None else replace(SIZES[args.size], layers=args.layers)
    print(f"{p}: {shape.n_weights / 1e9:.3f} B weights")


if __name__ == "__main__":
    main()
