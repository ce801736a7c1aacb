"""verify and compare_causal on the real SmolLM2-135M-Instruct (slow: runs the
model on a few held-out passages; still part of `make test`)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hhtld import verify  # noqa: E402
from hhtld.classify import EncodablePolicy  # noqa: E402
from hhtld.pack import encode_checkpoint  # noqa: E402
from hhtld.gates import ModelRunner, PackSource, compare_causal, heldout_passages  # noqa: E402

pytestmark = pytest.mark.slow
PASSAGES = heldout_passages()[:4]


@pytest.fixture(scope="module")
def runner(smollm2_dir) -> ModelRunner:
    return ModelRunner.from_model(smollm2_dir)


def test_original_model_predicts_held_out_prose(runner):
    assert runner.family == "causal"
    same = compare_causal(runner, PASSAGES, None, None)
    assert same["positions"] == len(PASSAGES) * (runner.max_tokens - 1)  # every passage fills 128 tokens
    assert same["kl_max"] == 0.0 and same["ppl_ratio"] == 1.0 and same["top1"] == 1.0
    assert 5.0 < same["ppl_a"] < 100.0  # a working 135M model on English prose, not a broken conversion


def test_int4_rounding_of_one_matrix_is_measured(runner):
    name = "model.layers.10.mlp.down_proj.weight"
    w = runner.checkpoint.read_float(name)
    g = w.reshape(w.shape[0], -1, 64)  # symmetric int4 in groups of 64 columns
    s = np.abs(g).max(axis=2, keepdims=True) / 7
    q = (np.clip(np.round(g / s), -8, 7) * s).reshape(w.shape).astype(np.float32)
    cmp = compare_causal(runner, PASSAGES, None, {name: q}, greedy_tokens=4, greedy_texts=1)
    assert 0 < cmp["kl_mean"] < 0.1 and cmp["kl_p50"] <= cmp["kl_p99"] <= cmp["kl_max"]
    assert cmp["ppl_ratio"] != 1.0 and 0.9 < cmp["ppl_ratio"] < 1.1
    assert cmp["top1"] > 0.8 and "greedy_identical" in cmp


def test_verify_a_passthrough_pack_of_smollm2_is_exact(smollm2_dir, runner, tmp_path):
    out = tmp_path / "raw.hhtld"
    encode_checkpoint(smollm2_dir, out, policy=EncodablePolicy(min_rows=10**9), codec="hhtl-f32")
    assert PackSource(out, runner.checkpoint).names() == []  # nothing differs, nothing is swapped
    rep = verify(smollm2_dir, out, texts=2, greedy_tokens=4, greedy_texts=1, runner=runner)
    b = rep.behaviour
    assert b["ppl_ratio"] == 1.0 and b["kl_mean"] == 0.0 and b["top1"] == 1.0 and b["greedy_identical"] == 1.0
    assert b["positions"] == 5 * 2 * 127 and b["n_texts"] == 5 * 2 and "passages of 5 kinds" in b["texts_source"]
    assert all(v["kl_mean"] == 0.0 and v["ppl_ratio"] == 1.0 and v["positions"] == 2 * 127 for v in b["kinds"].values())
    assert rep.gate(2).passed and rep.gate(4).passed and rep.gate(2).target == "ratio<=1.02"
