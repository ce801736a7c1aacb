"""The causal-LM path of verify on a tiny random Llama built here (mechanics
only: random weights make no quality claim), plus the CLI's errors and exit
statuses."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hhtld import EncodablePolicy, GateError, encode_checkpoint, open_checkpoint, verify  # noqa: E402
from hhtld.cli import main  # noqa: E402
from hhtld.gates import ModelRunner, compare_outputs, heldout_texts  # noqa: E402

TEXTS = heldout_texts()[:12]


def tiny_tokenizer():
    """A word-level fast tokenizer over the 300 commonest held-out words (offline)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for s in heldout_texts() for w in re.findall(r"\w+|[^\w\s]", s.lower()))
    specials = ["[UNK]", "[PAD]", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w, _ in words.most_common(300)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<s>", eos_token="</s>")


def make_tiny_llama(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random LlamaForCausalLM with the tiny tokenizer, saved with
    save_pretrained (config.json, model.safetensors, tokenizer files)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
                      pad_token_id=1, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def runner(llama) -> ModelRunner:
    return ModelRunner.from_model(llama)


@pytest.fixture(scope="module")
def pack(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "tiny.hhtld"
    encode_checkpoint(llama, out, policy=EncodablePolicy(encode_all=True))
    return out


def test_runner_detects_causal_and_is_exact_with_original_weights(runner):
    assert runner.family == "causal"
    ref = runner.run(TEXTS, greedy_tokens=8, greedy_texts=4)
    assert ref.logprobs.shape[0] == ref.offsets[-1] and ref.greedy.shape == (4, 8)
    ckpt = runner.checkpoint
    same = {n: ckpt.read_float(n) for n in ckpt.tensors}
    cmp = compare_outputs(ref, runner.run(TEXTS, same, greedy_tokens=8, greedy_texts=4))
    assert cmp["top1"] == 1.0 and cmp["kl_mean"] == pytest.approx(0.0, abs=1e-6) and cmp["greedy_identical"] == 1.0
    # the same log-probabilities as transformers' own loading of the folder
    import torch
    from transformers import LlamaForCausalLM

    net = LlamaForCausalLM.from_pretrained(runner.checkpoint.root).eval()
    enc = runner.tokenizer(TEXTS, padding=True, return_tensors="pt")
    enc.pop("token_type_ids", None)
    with torch.no_grad():
        lp = torch.log_softmax(net(**enc).logits, dim=-1)
    theirs = np.concatenate([lp[i][enc["attention_mask"][i].bool()].numpy() for i in range(len(TEXTS))])
    assert np.abs(theirs - ref.logprobs).max() < 1e-4


def test_runner_swaps_weights_in_place_and_restores_them(runner):
    ref = runner.run(TEXTS)
    name = "model.layers.0.mlp.down_proj.weight"
    w = runner.checkpoint.read_float(name)
    bent = w + np.random.default_rng(0).normal(scale=1.0, size=w.shape).astype(np.float32)
    model_before = id(runner.model)
    cmp = compare_outputs(ref, runner.run(TEXTS, {name: bent}))
    assert id(runner.model) == model_before
    assert cmp["kl_mean"] > 1e-3 and cmp["top1"] < 1.0
    # tensors not in the next mapping go back to their original values
    again = compare_outputs(ref, runner.run(TEXTS, {}))
    assert again["top1"] == 1.0 and again["kl_mean"] == pytest.approx(0.0, abs=1e-6)


def test_runner_refuses_bad_replacements(runner):
    with pytest.raises(GateError, match="no tensor named 'nope'"):
        runner.run(TEXTS, {"nope": np.zeros(3)})
    with pytest.raises(GateError, match=r"replacement has shape \[3\]"):
        runner.run(TEXTS, {"model.norm.weight": np.zeros(3)})


def test_verify_causal_pack(llama, pack, runner, tmp_path):
    rep = verify(llama, pack, texts=16, greedy_tokens=8, greedy_texts=4, runner=runner)
    assert rep.family == "causal"
    assert [g.gate for g in rep.gates] == [1, 2, 3, 4]
    g1, g2, g3, g4 = rep.gates
    # every encoded row was measured
    n_rows = sum(t["n"] for t in rep.rows["tensors"])
    ckpt = open_checkpoint(llama)
    assert n_rows == sum(ckpt.tensors[t["name"]].shape[0] for t in rep.rows["tensors"])
    assert rep.rows["regimes"]["index"]["n"] > 0 and rep.rows["regimes"]["argmax"]["n"] > 0
    assert 0.0 <= rep.behaviour["top1"] <= 1.0 and rep.behaviour["kl_mean"] >= 0.0
    assert "greedy_identical" in rep.behaviour and rep.behaviour["greedy_texts"] == 4
    assert g4.measured["kl_mean"] == rep.behaviour["kl_mean"] and g4.passed == (rep.behaviour["kl_mean"] <= 0.02)
    assert g3.measured["ratio"] == pytest.approx(rep.storage["source_bf16_bytes"] / rep.storage["counted_bytes"])
    assert rep.passed == all(g.passed for g in rep.gates)
    text = rep.format()
    assert "1 row fidelity" in text and "4 output agreement" in text and "KL mean" in text
    json.dumps(rep.to_json())


def test_verify_all_passthrough_pack_is_exact(llama, runner, tmp_path):
    out = tmp_path / "raw.hhtld"
    encode_checkpoint(llama, out, policy=EncodablePolicy(min_rows=10**9))
    rep = verify(llama, out, texts=8, greedy_tokens=4, greedy_texts=2, runner=runner)
    assert rep.gate(1).passed and "no encoded rows" in rep.gate(1).value
    assert rep.behaviour["top1"] == 1.0 and rep.behaviour["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert rep.behaviour["greedy_identical"] == 1.0
    assert rep.gate(2).passed and rep.gate(4).passed
    assert not rep.gate(3).passed  # f32 kept byte for byte is about half the bf16 size: honest FAIL
    assert rep.storage["ratio"] < 1.0


def test_verify_gpt2_conv1d_pack_matches_the_decoded_folder(tmp_path):
    """GPT-2 stores Conv1D weights transposed: the weights verify swaps in must
    be exactly those `hhtld decode` writes."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hhtld import decode_pack

    folder = tmp_path / "gpt2"
    tok = tiny_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=4, n_positions=128,
                     initializer_range=0.2, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "gpt2.hhtld"
    encode_checkpoint(folder, out, policy=EncodablePolicy(encode_all=True))
    from hhtld import Pack

    assert any(Pack(out).info(n).get("transposed") for n in Pack(out).encoded_names())
    r = ModelRunner.from_model(folder)
    rep = verify(folder, out, texts=8, greedy_tokens=0, runner=r)
    dec = open_checkpoint(decode_pack(out, tmp_path / "dec").out_dir)
    cmp = compare_outputs(r.run(TEXTS[:8]), r.run(TEXTS[:8], {n: dec.read_float(n) for n in r.param_of}))
    assert rep.behaviour["top1"] == cmp["top1"] and rep.behaviour["kl_mean"] == pytest.approx(cmp["kl_mean"], abs=1e-9)
    assert rep.behaviour["kl_mean"] > 0  # the codec did change this model


# -- CLI -------------------------------------------------------------------------------
def test_cli_verify_writes_json_and_plots(llama, pack, tmp_path, capsys):
    js, plots = tmp_path / "v.json", tmp_path / "plots"
    rc = main(["verify", str(llama), str(pack), "--texts", "8", "--greedy-tokens", "0", "-q",
               "--json", str(js), "--plots", str(plots), "--max-kl", "100", "--min-top1", "0"])
    out = capsys.readouterr().out
    data = json.loads(js.read_text())
    assert [g["gate"] for g in data["gates"]] == [1, 2, 3, 4]
    assert data["thresholds"]["max_kl"] == 100 and data["thresholds"]["min_top1"] == 0
    assert data["gates"][1]["passed"] and data["gates"][3]["passed"]  # loosened targets
    assert rc == (0 if data["passed"] else 2)
    assert sorted(p.name for p in plots.iterdir()) == ["bytes_per_group.png", "row_cosine_argmax.png", "row_cosine_index.png"]
    for line in ("1 row fidelity", "2 behaviour parity", "3 storage", "4 output agreement"):
        assert line in out
    # exit status: a failing gate is 2, --no-fail makes it 0
    rc = main(["verify", str(llama), str(pack), "--texts", "4", "--greedy-tokens", "0", "-q", "--min-ratio", "1000"])
    assert rc == 2
    rc = main(["verify", str(llama), str(pack), "--texts", "4", "--greedy-tokens", "0", "-q", "--min-ratio", "1000", "--no-fail"])
    assert rc == 0


def test_cli_verify_missing_pack(llama, tmp_path, capsys):
    rc = main(["verify", str(llama), str(tmp_path / "none.hhtld")])
    assert rc == 1
    assert capsys.readouterr().err == f"hhtld: error: {tmp_path / 'none.hhtld'}: no such file or directory\n"


def test_cli_verify_mismatched_pack(llama, tmp_path, capsys):
    other = make_tiny_llama(tmp_path / "other", hidden=32, layers=1)
    out = tmp_path / "other.hhtld"
    encode_checkpoint(other, out, policy=EncodablePolicy(encode_all=True))
    vocab = open_checkpoint(llama).tensors["model.embed_tokens.weight"].shape[0]
    capsys.readouterr()
    rc = main(["verify", str(llama), str(out)])
    assert rc == 1
    assert capsys.readouterr().err == (
        f"hhtld: error: {out}: does not match {llama}: tensor 'lm_head.weight' "
        f"has shape [{vocab}, 32] in the pack but [{vocab}, 64] in the model\n")
    # a pack missing a tensor of the model
    other2 = make_tiny_llama(tmp_path / "other2", layers=1)
    out2 = tmp_path / "other2.hhtld"
    encode_checkpoint(other2, out2, policy=EncodablePolicy(encode_all=True))
    capsys.readouterr()
    assert main(["verify", str(llama), str(out2)]) == 1
    assert capsys.readouterr().err == (
        f"hhtld: error: {out2}: does not match {llama}: tensor 'model.layers.1.input_layernorm.weight' "
        f"is in the model but not in the pack\n")


def test_cli_verify_bare_safetensors_needs_config(llama, pack, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(llama / "model.safetensors", bare / "model.safetensors")
    rc = main(["verify", str(bare / "model.safetensors"), str(pack)])
    assert rc == 1
    assert capsys.readouterr().err == (
        f"hhtld: error: {bare / 'model.safetensors'}: no config.json next to the weights, so the model cannot be run; "
        f"give --config CONFIG (a config.json or a model folder)\n")
    rc = main(["verify", str(bare / "model.safetensors"), str(pack), "--config", str(tmp_path / "missing")])
    assert rc == 1
    assert capsys.readouterr().err == (
        f"hhtld: error: {tmp_path / 'missing'}: no config.json there; --config takes a config.json or a folder holding one\n")
    # with --config (a folder holding config.json and the tokenizer) it runs
    rc = main(["verify", str(bare / "model.safetensors"), str(pack), "--config", str(llama), "--texts", "4",
               "--greedy-tokens", "0", "-q", "--no-fail"])
    assert rc == 0
    assert "4 output agreement" in capsys.readouterr().out


def test_cli_verify_bad_texts_option(llama, pack, capsys):
    rc = main(["verify", str(llama), str(pack), "--texts", "1"])
    assert rc == 1
    assert capsys.readouterr().err == "hhtld: error: --texts must be between 2 and 256 (the held-out sentences), got 1\n"


def test_runner_without_tokenizer_says_so(llama, tmp_path):
    folder = tmp_path / "notok"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(llama / f, folder / f)
    with pytest.raises(GateError, match=r"no usable tokenizer next to the config"):
        ModelRunner.from_model(folder)
