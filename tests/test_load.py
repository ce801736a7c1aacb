"""hhtld.load and friends on tiny random models built here (Llama tied and
untied, Qwen2, GPT-2 with its transposed Conv1D weights, a BERT encoder with
sentence-transformers files): the weights a pack gives the model must be
exactly those of the decode-to-disk route, kept compressed or not."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hhtld  # noqa: E402
from hhtld import ArchitectureError, LoadError, MissingDependencyError, NoConfigError, TensorMismatchError
from hhtld.classify import EncodablePolicy
from hhtld.pack import Pack, decode_pack, encode_checkpoint
from hhtld.classify.groups import GroupKey  # noqa: E402
from hhtld.cli import main  # noqa: E402
from hhtld.codecs.base import DictParts  # noqa: E402
from hhtld.codecs.vq.codec import HhtlVqCodec  # noqa: E402
from hhtld.loader.compressed import (  # noqa: E402
    CompressedEmbedding,
    CompressedLinear,
    CompressedWeight,
    DecodeCache,
    StoredParts,
)  # noqa: E402
from hhtld.loader.deps import require  # noqa: E402
from hhtld.loader.torch_vq import decode_rows_vq  # noqa: E402

from .test_verify_causal import TEXTS, make_tiny_llama, tiny_tokenizer  # noqa: E402

ALL = EncodablePolicy(encode_all=True)
VQ = {"codec": "hhtl-vq", "codec_options": {"stages": "2+4"}}
TOL = 1e-5
# keep_compressed runs its hhtl-vq linears in the codec's space (tables for a few rows, decode-then-GEMM in
# the rotated space for many): with float32 tables the same product summed in another order (measured up to
# 2.1e-5 on these logits of magnitude up to 4); with the default int16 tables (12-bit entries) the tiny random
# models move by up to 1.8e-2 (measured) — their bound is checked on the real SmolLM2 as a KL
# (tests/test_load_smollm2.py), here only that they stay near the dense model.
TOL_CODEC_SPACE = 1e-4
TOL_INT16 = 0.1
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"


def _save(model, folder: Path, tok=None) -> Path:
    model.save_pretrained(folder)
    (tok or tiny_tokenizer()).save_pretrained(folder)
    return folder


def make_model(kind: str, folder: Path) -> Path:
    """A tiny random model of ``kind`` saved with save_pretrained plus the word-level tokenizer."""
    tok = tiny_tokenizer()
    ids = dict(vocab_size=len(tok), pad_token_id=1, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    if kind == "llama":
        return make_tiny_llama(folder)
    if kind == "llama-tied":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       tie_word_embeddings=True, initializer_range=0.2, **ids)
        return _save(transformers.LlamaForCausalLM(cfg), folder, tok)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       tie_word_embeddings=False, initializer_range=0.2, **ids)
        return _save(transformers.Qwen2ForCausalLM(cfg), folder, tok)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2, **ids)
        return _save(transformers.GPT2LMHeadModel(cfg), folder, tok)
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=128, vocab_size=len(tok), pad_token_id=1)
        return _save(transformers.BertModel(cfg), folder, tok)
    raise ValueError(kind)


CAUSAL = ["llama", "llama-tied", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> (model folder, hhtl-vq pack, decoded folder), made once per module."""
    root = tmp_path_factory.mktemp("load")
    out = {}
    for kind in CAUSAL + ["bert"]:
        folder = make_model(kind, root / kind)
        pack = root / f"{kind}.hhtld"
        encode_checkpoint(folder, pack, policy=ALL, **VQ)
        out[kind] = (folder, pack, decode_pack(pack, root / f"{kind}-decoded").out_dir)
    return out


def _batch(kind):
    enc = tiny_tokenizer()(TEXTS[:6], padding=True, return_tensors="pt")
    if kind != "bert":
        enc.pop("token_type_ids", None)
    return enc


def _out(model, kind):
    with torch.no_grad():
        o = model(**_batch(kind))
    return o.last_hidden_state if kind == "bert" else o.logits


def _from_pretrained(folder, kind, **kw):
    auto = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder, **kw).eval()


# -- dense load ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CAUSAL + ["bert"])
def test_load_equals_the_decode_to_disk_route(built, kind):
    _, pack, decoded = built[kind]
    model = hhtld.load(pack)
    ref = _from_pretrained(decoded, kind)
    assert type(model) is type(ref) and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    mine, theirs = model.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    assert (_out(model, kind) - _out(ref, kind)).abs().max().item() <= TOL
    info = model.hhtld_info
    assert info.family == ("embedding" if kind == "bert" else "causal") and not info.compressed
    assert sorted(info.decoded + info.tied + info.ignored) == sorted(Pack(pack).names())


def test_tied_lm_head_is_one_tensor(built):
    _, pack, _ = built["llama-tied"]
    assert "lm_head.weight" not in Pack(pack).names()  # save_pretrained stores the tied weight once
    model = hhtld.load(pack)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cm = hhtld.load(pack, keep_compressed=True)
    assert isinstance(cm.lm_head, CompressedLinear) and isinstance(cm.model.embed_tokens, CompressedEmbedding)
    assert cm.lm_head.source is cm.model.embed_tokens.source


def test_checkpoint_dtype_is_kept_and_dtype_overrides(tmp_path):
    folder = make_model("llama", tmp_path / "m")
    bf = tmp_path / "bf16"
    transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(bf)
    tiny_tokenizer().save_pretrained(bf)
    pack = tmp_path / "bf16.hhtld"
    encode_checkpoint(bf, pack, policy=ALL, **VQ)
    decoded = decode_pack(pack, tmp_path / "dec").out_dir
    model = hhtld.load(pack)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = _from_pretrained(decoded, "llama", dtype=torch.bfloat16)
    assert (_out(model, "llama").float() - _out(ref, "llama").float()).abs().max().item() == 0.0
    m32 = hhtld.load(pack, dtype="float32")
    assert {p.dtype for p in m32.parameters()} == {torch.float32}
    ref32 = _from_pretrained(decoded, "llama", dtype=torch.float32)
    assert (_out(m32, "llama") - _out(ref32, "llama")).abs().max().item() <= TOL
    c32 = hhtld.load(pack, dtype=torch.float32, keep_compressed=True, codec_space=False)
    assert (_out(c32, "llama") - _out(m32, "llama")).abs().max().item() <= TOL
    # in the codec's space the weights are the codec's float32 rows, not rounded to bfloat16 first
    # (the difference is the bfloat16 rounding of the weights: measured 0.076 on logits up to 3.5)
    f32 = hhtld.load(pack, dtype=torch.float32, keep_compressed=True, tables="float32")
    assert (_out(f32, "llama") - _out(m32, "llama")).abs().max().item() <= 0.15


# -- compressed in memory ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", CAUSAL + ["bert"])
def test_keep_compressed_equals_dense(built, kind):
    _, pack, _ = built[kind]
    dense = hhtld.load(pack)
    comp = hhtld.load(pack, keep_compressed=True, tables="float32")
    assert (_out(comp, kind) - _out(dense, kind)).abs().max().item() <= TOL_CODEC_SPACE
    fast = hhtld.load(pack, keep_compressed=True)
    assert (_out(fast, kind) - _out(dense, kind)).abs().max().item() <= TOL_INT16
    p = Pack(pack)
    kept = set(comp.hhtld_info.compressed)
    assert kept and kept <= set(p.encoded_names())
    swapped = [m for m in comp.modules() if isinstance(m, (CompressedLinear, CompressedEmbedding))]
    assert len({id(m.source) for m in swapped}) == len(kept)
    assert not any(isinstance(m, torch.nn.Linear) for m in comp.modules())
    mem, dmem = hhtld.weight_memory(comp), hhtld.weight_memory(dense)
    assert mem["compressed"] > 0 and dmem["compressed"] == 0
    assert mem["total"] < dmem["total"]
    stored = sum(m.nbytes() for m in {id(x): x for x in comp.modules() if isinstance(x, StoredParts)}.values())
    assert stored == mem["compressed"]


def test_codec_space_product_and_the_exact_decode(built):
    """One token at a time every linear is applied in the codec's space (within
    float32 rounding); codec_space=False decodes each weight as the dense load does
    (bit for bit on the CPU; an embedding row decoded alone may differ in the
    last bits, the BLAS product of its rotation summing in another order)."""
    _, pack, _ = built["llama"]
    ids = tiny_tokenizer()("the module defines", return_tensors="pt")["input_ids"][:, :1]
    dense, fast = hhtld.load(pack), hhtld.load(pack, keep_compressed=True, tables="float32")
    exact = hhtld.load(pack, keep_compressed=True, codec_space=False)
    x = torch.zeros(1, 1, 64)
    assert fast.model.layers[0].mlp.up_proj.source.codec_space_ok(x)
    assert fast.model.layers[0].mlp.up_proj.source.codec_space_ok(torch.zeros(500, 64))  # any rows on the CPU
    assert not exact.model.layers[0].mlp.up_proj.source.codec_space_ok(x)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        assert (exact(input_ids=ids).logits - ref).abs().max().item() <= TOL
    for name in ("lm_head", "model.layers.1.mlp.down_proj"):
        assert torch.equal(exact.get_submodule(name).weight, dense.get_submodule(name).weight)
        assert (fast(input_ids=ids).logits - ref).abs().max().item() <= TOL_CODEC_SPACE


def test_compressed_embedding_decodes_only_the_looked_up_rows(built):
    _, pack, _ = built["llama"]
    comp = hhtld.load(pack, keep_compressed=True)
    emb = comp.model.embed_tokens
    ids = torch.tensor([[5, 7, 5, 9], [9, 9, 5, 7]])
    out = emb(ids)
    dense = hhtld.load(pack).model.embed_tokens
    assert torch.equal(out, dense(ids))
    assert emb.source.rows_decoded == 3  # ids 5, 7, 9 once each, not the 304-row table
    with pytest.raises(IndexError, match="index out of range"):
        emb(torch.tensor([emb.num_embeddings]))


def test_cache_layers_keeps_the_last_n_decoded_weights(built):
    _, pack, _ = built["llama"]
    comp = hhtld.load(pack, keep_compressed=True, cache_layers=3)
    ref = _out(comp, "llama")
    cache = comp.lm_head.source.cache
    assert len(cache) == 3
    # the lm_head runs last: it is in the cache, and the first layer's q_proj is not
    assert cache.get(id(comp.lm_head.source)) is not None
    assert cache.get(id(comp.model.layers[0].self_attn.q_proj.source)) is None
    assert hhtld.weight_memory(comp)["decoded_cache"] > 0
    assert torch.equal(_out(comp, "llama"), ref)
    none = hhtld.load(pack, keep_compressed=True)
    _out(none, "llama")
    assert len(none.lm_head.source.cache) == 0


def test_keep_compressed_with_a_numpy_codec(tmp_path):
    """hhtl-f32 (palette + Slot L leaf) goes through the codec's numpy decode_rows."""
    folder = make_model("llama", tmp_path / "m")
    pack = tmp_path / "f32.hhtld"
    encode_checkpoint(folder, pack, policy=ALL, codec="hhtl-f32")
    dense, comp = hhtld.load(pack), hhtld.load(pack, keep_compressed=True)
    assert comp.hhtld_info.compressed
    assert (_out(comp, "llama") - _out(dense, "llama")).abs().max().item() <= TOL
    decoded = decode_pack(pack, tmp_path / "dec").out_dir
    assert (_out(dense, "llama") - _out(_from_pretrained(decoded, "llama"), "llama")).abs().max().item() <= TOL


def test_compressed_model_follows_dtype_casts(built):
    _, pack, _ = built["llama"]
    comp = hhtld.load(pack, keep_compressed=True, codec_space=False).to(torch.bfloat16)
    src = comp.model.layers[0].mlp.up_proj.source
    assert src.dtype == torch.bfloat16 and src.tensor["twig.0"].dtype == torch.uint8
    assert src.group["palette.0.0"].dtype == torch.bfloat16
    dense = hhtld.load(pack).to(torch.bfloat16)
    assert (_out(comp, "llama").float() - _out(dense, "llama").float()).abs().max().item() == 0.0
    # in the codec's space: bfloat16 inputs, float32 kernels, bfloat16 outputs
    fast = hhtld.load(pack, keep_compressed=True, tables="float32").to(torch.bfloat16)
    assert fast.model.layers[0].mlp.up_proj.source.codec_space_ok(torch.zeros(1, 64, dtype=torch.bfloat16))
    out = _out(fast, "llama")
    assert out.dtype == torch.bfloat16
    ref = _out(hhtld.load(pack), "llama")  # float32: both bfloat16 runs are as far from it
    assert (out.float() - ref).abs().max().item() <= 2 * (_out(dense, "llama").float() - ref).abs().max().item()


# -- the torch decode of hhtl-vq -------------------------------------------------------------------
@pytest.mark.parametrize("opts", [
    {"stages": "2+4"}, {"stages": "4,3"}, {"stages": "3+8:512"}, {"stages": "4", "rotate": False},
    {"stages": "4", "gain": False}, {"stages": "2", "leaf_lanes": 4},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_torch_decode_and_codec_space_product_match_numpy(opts):
    rng = np.random.default_rng(1)
    n, c = 300, 160  # 160 = 5 * 32: a Hadamard block of 32, a row the 3- and 7-wide patterns must pad
    rows = [(rng.standard_t(5, (n, c)) * rng.uniform(0.2, 3, (n, 1))).astype(np.float32) for _ in range(2)]
    role = "embed" if opts.get("leaf_lanes") else "up"
    eg = HhtlVqCodec(**opts).encode_group(GroupKey("encoder", role, (n, c)), ["a", "b"], rows)
    g, t = DictParts.of(eg), DictParts.of(eg.tensors["b"])
    if opts.get("leaf_lanes"):
        assert "leaf" in t
    want = HhtlVqCodec.decode_rows(g, t)
    scale = max(1.0, float(np.abs(want).max()))
    G, T = StoredParts(eg.params, eg.arrays), StoredParts({}, eg.tensors["b"].arrays)
    # the torch decode (other devices): within float32 rounding of the numpy decode
    assert np.abs(decode_rows_vq(eg.params, G, T).numpy() - want).max() <= 1e-6 * scale
    idx = np.array([7, 0, 299, 7])
    sub = decode_rows_vq(eg.params, G, T, torch.from_numpy(idx)).numpy()
    assert np.abs(sub - want[idx]).max() <= 1e-6 * scale
    # the weight kept compressed: its CPU decode is the numpy decode, bit for bit
    w = CompressedWeight("b", HhtlVqCodec, G, T, (n, c), torch.float32, torch.float32, DecodeCache(0))
    assert np.array_equal(w.dense().numpy(), want)
    assert np.array_equal(w.rows(torch.from_numpy(idx)).numpy(), HhtlVqCodec.decode_rows(g, t, idx))
    # and x @ W.T in the codec's space equals the product with the decoded weight
    x = torch.from_numpy(rng.standard_normal((5, c)).astype(np.float32))
    assert w.codec_space_ok(x) and w.codec_space_ok(torch.zeros(n, c))  # on the CPU any number of rows
    ref = x @ torch.from_numpy(want).t()
    bound = max(1.0, ref.abs().max().item())
    w.tables = "float32"
    assert (w.matmul_t(x) - ref).abs().max().item() <= 1e-5 * bound
    w.tables = "int16"  # 12-bit tables: measured at most 1.6e-3 of the largest output here
    assert (w.matmul_t(x) - ref).abs().max().item() <= 5e-3 * bound
    many = torch.from_numpy(rng.standard_normal((40, c)).astype(np.float32))  # decode then GEMM: float32
    ref = many @ torch.from_numpy(want).t()
    assert (w.matmul_t(many) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


# -- sentence-transformers and embed -----------------------------------------------------------------
@pytest.fixture(scope="module")
def st_bert(built, tmp_path_factory):
    """The tiny BERT as a sentence-transformers model with CLS pooling (not the
    mean+L2 fallback), saved with its modules.json, and its pack."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():  # the classic import path, deprecated in sentence-transformers 6
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.models import Normalize, Pooling, Transformer

    folder, _, _ = built["bert"]
    root = tmp_path_factory.mktemp("st")
    st = SentenceTransformer(modules=[Transformer(str(folder)), Pooling(64, "cls"), Normalize()], device="cpu")
    st.save(str(root / "st"))
    pack = root / "st.hhtld"
    encode_checkpoint(root / "st", pack, policy=ALL, **VQ)
    return root / "st", pack, decode_pack(pack, root / "st-decoded").out_dir


def test_load_sentence_transformer_equals_the_decoded_folder(st_bert):
    from sentence_transformers import SentenceTransformer

    _, pack, decoded = st_bert
    assert "modules.json" in Pack(pack).aux_files()
    ref = SentenceTransformer(str(decoded), device="cpu").encode(TEXTS[:8])
    st = hhtld.load_sentence_transformer(pack, device="cpu")
    assert np.abs(st.encode(TEXTS[:8]) - ref).max() <= TOL
    comp = hhtld.load_sentence_transformer(pack, device="cpu", keep_compressed=True)
    assert np.abs(comp.encode(TEXTS[:8]) - ref).max() <= TOL
    assert hhtld.loader.embedding_pooling(pack) == "sentence-transformers"
    vec = hhtld.embed(pack, TEXTS[:8])
    assert vec.dtype == np.float32 and np.abs(vec - ref).max() <= TOL


def test_embed_without_sentence_transformers_files_is_mean_pooling(built):
    folder, pack, decoded = built["bert"]
    assert hhtld.loader.embedding_pooling(pack) == "mean+l2"
    ref = _from_pretrained(decoded, "bert")
    enc = tiny_tokenizer()(TEXTS[:5], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert np.abs(hhtld.embed(pack, TEXTS[:5]) - want).max() <= TOL


def test_load_sentence_transformer_needs_modules_json(built):
    pytest.importorskip("sentence_transformers")
    _, pack, _ = built["bert"]
    with pytest.raises(LoadError) as e:
        hhtld.load_sentence_transformer(pack)
    assert str(e.value) == (f"{pack}: the pack carries no sentence-transformers modules.json; use hhtld.load "
                            f"(a transformers model) or hhtld.embed (mean pooling + L2 normalisation)")


# -- generate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_is_greedy_decoding_of_the_decoded_model(built, kind):
    _, pack, decoded = built[kind]
    g = hhtld.generate(pack, "the module defines", max_new_tokens=6)
    tok = tiny_tokenizer()
    enc = tok("the module defines", return_tensors="pt")
    enc.pop("token_type_ids", None)
    ref = _from_pretrained(decoded, kind).generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert g.tokens == ref[0, enc["input_ids"].shape[1]:].tolist()
    assert g.prompt_tokens == enc["input_ids"].shape[1] and not g.chat
    assert g.text == tok.decode(g.tokens, skip_special_tokens=True)
    assert hhtld.generate(pack, "the module defines", max_new_tokens=6, keep_compressed=True).tokens == g.tokens


# the lean loop's logits against transformers' forward, both float32: the same products summed in
# another order (and the kernels' float tables in codec space), so a few float32 ulps of the logits' scale
LEAN_LOGITS_TOL = 2e-5


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2"])
@pytest.mark.parametrize("keep", [False, True])
def test_lean_loop_gives_transformers_greedy_tokens_and_logits(built, kind, keep):
    from hhtld.loader.lean import LeanDecoder, lean_support

    _, pack, _ = built[kind]
    model = hhtld.load(pack, keep_compressed=keep, tables="float32")
    assert lean_support(model) is None
    lean = LeanDecoder(model, tables="float32")
    enc = tiny_tokenizer()("the module defines", return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    with torch.no_grad():
        ref = model.generate(enc["input_ids"], max_new_tokens=12, do_sample=False, pad_token_id=1,
                             eos_token_id=None, min_new_tokens=12)[0, len(ids):].tolist()
    got = []
    assert lean.generate(ids, 12, eos_ids=(), put=got.append) == ref == got
    seq = torch.tensor([ids + ref])
    with torch.no_grad():
        theirs = model(seq).logits[0].numpy()
    for stepwise in (True, False):  # token by token through the cache, and the whole sequence as one block
        mine = lean.logits(seq[0].tolist(), stepwise=stepwise)
        assert np.abs(mine - theirs).max() <= LEAN_LOGITS_TOL * max(1.0, np.abs(theirs).max())
    mine = lean.logits(seq[0].tolist(), stepwise=False, last_only=True)  # generation's prompt pass
    assert mine.shape == (1, theirs.shape[1])
    assert np.abs(mine[0] - theirs[-1]).max() <= LEAN_LOGITS_TOL * max(1.0, np.abs(theirs).max())
    stop = ref.index(ref[2]) + 1
    assert lean.generate(ids, 12, eos_ids=(ref[2],)) == ref[:stop]  # stops after an end-of-sequence id


@pytest.mark.skipif(hhtld.kernels.backend() != "numba", reason="numba is not available")
def test_lean_loop_builds_one_table_for_the_pairs_of_a_pack_grouped_by_input(built, tmp_path):
    """gate with up and k with v in one group (``--group-by input``): the loop pairs their kernels,
    gives the same bits as the products one by one, and transformers' greedy tokens."""
    from hhtld.classify import DEFAULT_RULES
    from hhtld.loader.lean import LeanDecoder

    folder, _, _ = built["llama"]
    pack = tmp_path / "by-input.hhtld"
    encode_checkpoint(folder, pack, policy=ALL, rules=DEFAULT_RULES.group_by("input"), **VQ)
    roles = {t["role"] for n, t in hhtld.open(pack).tensors.items() if "gate_proj" in n}
    assert roles == {"up"}
    model = hhtld.load(pack, keep_compressed=True)
    lean = LeanDecoder(model)
    assert all(p.pair is not None and p.pair.shared for L in lean.layers for p in (L.kv, L.gate_up))
    ids = tiny_tokenizer()("the module defines", return_tensors="pt")["input_ids"][0].tolist()
    paired = lean.logits(ids)
    for L in lean.layers:
        L.kv.pair = L.gate_up.pair = None
    assert np.array_equal(paired, lean.logits(ids))
    exact = hhtld.load(pack, keep_compressed=True, tables="float32")
    with torch.no_grad():
        ref = exact.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=1, eos_token_id=None)[0, len(ids):].tolist()
    assert LeanDecoder(exact, tables="float32").generate(ids, 8) == ref


def test_lean_loop_without_numba_runs_its_numpy_steps(built, monkeypatch):
    """The numpy path of the loop (no compiled ops, no kernels) gives the same tokens and logits."""
    from hhtld.kernels import runtime
    from hhtld.loader.lean import LeanDecoder

    _, pack, _ = built["qwen2"]
    model = hhtld.load(pack, keep_compressed=True, tables="float32")
    ids = tiny_tokenizer()("the module defines", return_tensors="pt")["input_ids"][0].tolist()
    compiled = LeanDecoder(model, tables="float32")
    want, want_logits = compiled.generate(ids, 8), compiled.logits(ids)
    monkeypatch.setenv("HHTLD_KERNELS", "numpy")
    runtime.reset()
    try:
        assert runtime.decode_ops() is None
        plain = LeanDecoder(model, tables="float32")
        assert plain.generate(ids, 8) == want
        got = plain.logits(ids)
        assert np.abs(got - want_logits).max() <= LEAN_LOGITS_TOL * max(1.0, np.abs(want_logits).max())
    finally:
        monkeypatch.delenv("HHTLD_KERNELS")
        runtime.reset()


def test_engine_choice(built):
    _, llama, _ = built["llama"]
    _, gpt2, _ = built["gpt2"]
    assert hhtld.generate(llama, "the module defines", max_new_tokens=3).engine == "lean"
    a = hhtld.generate(llama, "the module defines", max_new_tokens=3, engine="transformers")
    assert a.engine == "transformers"
    assert hhtld.generate(gpt2, "the module defines", max_new_tokens=3).engine == "transformers"
    with pytest.raises(hhtld.LoadError) as e:
        hhtld.generate(gpt2, "the module defines", max_new_tokens=3, engine="lean")
    assert str(e.value) == (f"{gpt2}: the lean decode loop does not apply (model type 'gpt2' is not one of llama, "
                            f"mistral, qwen2); use engine 'transformers' (--engine transformers)")
    with pytest.raises(hhtld.LoadError, match="engine must be one of auto, lean, transformers, got 'fast'"):
        hhtld.generate(llama, "x", engine="fast")
    bf16 = hhtld.load(llama, dtype="bfloat16")
    from hhtld.loader.lean import lean_support
    assert lean_support(bf16) == "dtype bfloat16 (float32 only)"


def test_generate_chat_uses_the_template(tmp_path):
    folder = make_model("llama", tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    pack = tmp_path / "chat.hhtld"
    encode_checkpoint(folder, pack, policy=ALL, **VQ)
    g = hhtld.generate(pack, "what is a module", max_new_tokens=4, chat=True)
    text = tok.apply_chat_template([{"role": "user", "content": "what is a module"}], tokenize=False,
                                   add_generation_prompt=True)
    assert g.chat and g.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    assert g.prompt_tokens != len(tok("what is a module")["input_ids"])


# -- errors --------------------------------------------------------------------------------------
def test_pack_without_config_needs_one(built, tmp_path):
    folder, _, decoded = built["llama"]
    bare = tmp_path / "bare.hhtld"
    encode_checkpoint(folder / "model.safetensors", bare, policy=ALL, **VQ)
    with pytest.raises(NoConfigError) as e:
        hhtld.load(bare)
    assert str(e.value) == (f"{bare}: the pack carries no config.json (it was made from a bare .safetensors file or "
                            f"with --no-aux-files); pass config= (a config.json, a folder holding one, or a "
                            f"transformers config)")
    with pytest.raises(NoConfigError, match=r"missing: no config.json there; config= takes a config.json"):
        hhtld.load(bare, config=tmp_path / "missing")
    ref = _out(hhtld.load(built["llama"][1]), "llama")
    for cfg in (folder, folder / "config.json", transformers.AutoConfig.from_pretrained(folder),
                json.loads((folder / "config.json").read_text())):
        assert torch.equal(_out(hhtld.load(bare, config=cfg), "llama"), ref)
    with pytest.raises(LoadError, match="carries no side files, so no tokenizer"):
        hhtld.load_tokenizer(bare)
    assert main(["generate", str(bare), "hi"]) == 1


def test_architecture_errors(built, capsys):
    _, pack, _ = built["llama"]
    with pytest.raises(ArchitectureError) as e:
        hhtld.load(pack, auto_class="AutoModelForMaskedLM")
    assert str(e.value).startswith(f"{pack}: transformers cannot build AutoModelForMaskedLM from this config "
                                   f"(model_type 'llama'; ValueError: Unrecognized configuration class")
    with pytest.raises(ArchitectureError, match=r"transformers cannot read this config \(ValueError: Unrecognized model"):
        hhtld.load(pack, config={"model_type": "no-such-architecture"})
    with pytest.raises(LoadError, match="auto_class='AutoModelForNothing' is not a class of transformers"):
        hhtld.load(pack, auto_class="AutoModelForNothing")
    with pytest.raises(LoadError, match="unknown model family 'vision'"):
        hhtld.load(pack, family="vision")


def test_tensor_mismatch_errors_name_the_tensors(built, tmp_path):
    big, pack2, _ = built["llama"]  # 2 layers, hidden 64
    one = make_tiny_llama(tmp_path / "one", layers=1)
    pack1 = tmp_path / "one.hhtld"
    encode_checkpoint(one, pack1, policy=ALL, **VQ)
    with pytest.raises(TensorMismatchError) as e:
        hhtld.load(pack1, config=big)
    assert str(e.value) == (
        f"{pack1}: 9 parameter(s) of LlamaForCausalLM have no tensor in the pack: "
        f"'model.layers.1.self_attn.q_proj.weight', 'model.layers.1.self_attn.k_proj.weight', "
        f"'model.layers.1.self_attn.v_proj.weight', 'model.layers.1.self_attn.o_proj.weight', "
        f"'model.layers.1.mlp.gate_proj.weight' and 4 more; is this the right config or auto_class?")
    with pytest.raises(TensorMismatchError) as e:
        hhtld.load(pack2, config=one)
    assert str(e.value).startswith(f"{pack2}: 9 tensor(s) of the pack have no parameter in LlamaForCausalLM: "
                                   f"'model.layers.1.")
    assert str(e.value).endswith("; is this the right config or auto_class? (strict=False ignores them)")
    loose = hhtld.load(pack2, config=one, strict=False)
    assert len(loose.hhtld_info.ignored) == 9 and len(loose.model.layers) == 1
    narrow = make_tiny_llama(tmp_path / "narrow", hidden=32, layers=2)
    with pytest.raises(TensorMismatchError) as e:
        hhtld.load(pack2, config=narrow)
    assert str(e.value) == (f"{pack2}: tensor 'lm_head.weight' has shape [304, 64] in the pack but "
                            f"LlamaForCausalLM expects [304, 32] for 'lm_head.weight'")


def test_missing_dependency_names_the_extra(built, monkeypatch):
    with pytest.raises(MissingDependencyError) as e:
        require("hhtld_no_such_module", "hhtld.load")
    assert str(e.value) == ("hhtld.load needs hhtld_no_such_module, which is not installed (No module named "
                            "'hhtld_no_such_module'); install it with pip install 'hhtld[load]'")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without transformers raises
    with pytest.raises(MissingDependencyError) as e:
        hhtld.load(built["llama"][1])
    assert str(e.value).startswith("hhtld.load needs transformers, which is not installed (")
    assert str(e.value).endswith("); install it with pip install 'hhtld[load]'")
    assert isinstance(e.value, ImportError)


def test_side_files_go_to_a_private_folder_that_is_removed(built):
    _, pack, _ = built["bert"]
    before_tmp = {p.name for p in Path(tempfile.gettempdir()).glob("hhtld-side-*")}
    before_dir = sorted(p.name for p in pack.parent.iterdir())
    hhtld.load(pack)
    hhtld.load_tokenizer(pack)
    hhtld.embed(pack, ["a text"])
    assert {p.name for p in Path(tempfile.gettempdir()).glob("hhtld-side-*")} == before_tmp
    assert sorted(p.name for p in pack.parent.iterdir()) == before_dir


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_generate(built, capsys, tmp_path):
    _, pack, _ = built["llama"]
    g = hhtld.generate(pack, "the module defines", max_new_tokens=5)
    pieces = []
    assert hhtld.generate(pack, "the module defines", max_new_tokens=5, stream=pieces.append).tokens == g.tokens
    assert len(pieces) >= 1 and "".join(pieces) == g.text  # the text as it came, piece by piece
    assert g.peak_memory >= g.base_memory > 0
    assert main(["generate", str(pack), "the module defines", "--max-new-tokens", "5"]) == 0
    cap = capsys.readouterr()
    assert cap.out == g.text + "\n"
    size = r"(\d+\.\d [KMG]iB|\d+ B)"  # in a process that peaked before loading, 0 B above it
    assert re.fullmatch(rf"5 tokens in \d+\.\d\d s \(\d+\.\d tok/s, lean\); peak memory {size} "
                        rf"\({size} above the process before loading\)\n", cap.err), cap.err
    assert main(["generate", str(pack), "the module defines", "--max-new-tokens", "5", "--json",
                 "--keep-compressed", "--cache-layers", "2"]) == 0
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert data["tokens"] == g.tokens and data["new_tokens"] == len(g.tokens) and data["text"] == g.text
    assert data["chat"] is False and data["prompt_tokens"] == g.prompt_tokens
    assert data["peak_memory_bytes"] >= data["memory_before_load_bytes"] > 0 and data["tables"] == "int16"
    assert data["engine"] == "lean"
    assert cap.err.startswith("5 tokens in ")
    assert main(["generate", str(pack), "hi", "--tables", "float32"]) == 1
    assert capsys.readouterr().err == "hhtld: error: --tables applies to --keep-compressed\n"
    assert main(["generate", str(pack), "hi", "--chat"]) == 1
    assert capsys.readouterr().err == (f"hhtld: error: {pack}: the carried tokenizer has no chat template; "
                                       f"drop --chat (chat=True)\n")
    assert main(["generate", str(pack), "hi", "--cache-layers", "2"]) == 1
    assert capsys.readouterr().err == "hhtld: error: --cache-layers applies to --keep-compressed\n"


def test_cli_wrong_family_is_one_line(built, capsys):
    _, llama, _ = built["llama"]
    _, bert, _ = built["bert"]
    assert main(["embed", str(llama), "some text"]) == 1
    assert capsys.readouterr().err == (f"hhtld: error: {llama}: a causal LM (LlamaForCausalLM), not an embedding "
                                       f"model; embed does not apply, use hhtld generate / hhtld.generate\n")
    assert main(["generate", str(bert), "some text"]) == 1
    assert capsys.readouterr().err == (f"hhtld: error: {bert}: an embedding model (BertModel), not a causal LM; "
                                       f"generate does not apply, use hhtld embed / hhtld.embed\n")


def test_cli_embed(built, capsys, tmp_path):
    _, pack, _ = built["bert"]
    texts = ["the module defines a class", "a class is defined by the module", "return the value"]
    want = hhtld.embed(pack, texts)
    out = tmp_path / "e.json"
    assert main(["embed", str(pack), *texts, "--json", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    data = json.loads(out.read_text())
    assert data["texts"] == texts and data["dim"] == 64 and data["pooling"] == "mean+l2"
    assert np.abs(np.array(data["embeddings"], dtype=np.float32) - want).max() <= 1e-6
    assert main(["embed", str(pack), *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 embedding(s) of 64 dims (pooling: mean+l2); --json for the full vectors"
    assert lines[1].startswith("[0] norm 1.0000  ") and lines[1].endswith("'the module defines a class'")
    assert lines[4] == "cosine similarity:" and len(lines) == 9
    cos = float(lines[6].split()[2])
    assert cos == pytest.approx(float(want[0] @ want[1]), abs=1e-4)
    assert main(["embed", str(pack), "x", "--batch-size", "0"]) == 1
    assert capsys.readouterr().err == "hhtld: error: --batch-size must be >= 1, got 0\n"


def test_cli_missing_pack(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "none.hhtld"), "x"]) == 1
    assert capsys.readouterr().err == f"hhtld: error: {tmp_path / 'none.hhtld'}: no such file or directory\n"


def test_import_hhtld_stays_light():
    import subprocess

    code = "import sys, hhtld; hhtld.load; print('torch' in sys.modules, 'transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": str(Path(hhtld.__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert r.stdout.split() == ["False", "False"]
