"""Gate computations on synthetic data with known answers (no model is run)."""

from __future__ import annotations

import numpy as np
import pytest

from hhtld import GateError, OptionsError
from hhtld.gates import (
    RunOutputs,
    Thresholds,
    calibration_texts,
    compare_outputs,
    cosine_stats,
    family_of_config,
    gate_behaviour,
    gate_output,
    gate_row_fidelity,
    heldout_texts,
    row_cosines,
)
from hhtld.measure.compare import retrieval_neighbours
from hhtld.measure.texts import CALIBRATION_MODULES, HELDOUT_MODULES


# -- texts --------------------------------------------------------------------------
def test_heldout_and_calibration_texts_are_real_disjoint_and_deterministic():
    h, c = heldout_texts(), calibration_texts()
    assert len(h) >= 200 and len(c) >= 200
    assert len(set(h)) == len(h) and len(set(c)) == len(c)
    assert not set(h) & set(c)
    assert not set(HELDOUT_MODULES) & set(CALIBRATION_MODULES)
    assert heldout_texts() == h and calibration_texts() == c
    h.append("mutating the returned list does not touch the cache")
    assert heldout_texts() != h
    for s in h[:-1] + c:
        assert 6 <= len(s.split()) <= 60 and s[0].isupper() and s[-1] in ".!?"


def test_texts_come_from_the_documented_modules():
    import argparse

    # the first held-out sentence is from the first module's docstrings
    assert heldout_texts()[0] in (argparse.__doc__ or "") + "".join(
        (getattr(argparse, n).__doc__ or "") for n in dir(argparse) if not n.startswith("_"))


# -- gate 1 pieces ----------------------------------------------------------------
def test_row_cosines_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 33)).astype(np.float32)
    assert np.allclose(row_cosines(a, a), 1.0)
    assert np.allclose(row_cosines(a, -a), -1.0)
    assert np.allclose(row_cosines(a, 3.5 * a), 1.0)  # scale-invariant
    b = a.copy()
    b[7] = rng.normal(size=33)  # one replaced row
    cos = row_cosines(a, b)
    assert np.argmin(cos) == 7 and cos[7] < 0.6
    assert np.allclose(np.delete(cos, 7), 1.0)
    z = np.zeros((2, 4))
    assert row_cosines(z, z).tolist() == [1.0, 1.0]
    assert row_cosines(z, np.ones((2, 4))).tolist() == [0.0, 0.0]
    e = np.eye(3)
    assert np.allclose(row_cosines(e, e[[1, 2, 0]]), 0.0)  # shuffled rows: orthogonal


def test_cosine_stats_and_histogram():
    cos = np.linspace(0.0, 1.0, 101)
    s = cosine_stats(cos)
    assert s["n"] == 101 and s["median"] == pytest.approx(0.5) and s["p5"] == pytest.approx(0.05)
    assert s["min"] == 0.0 and s["max"] == 1.0 and s["mean"] == pytest.approx(0.5)
    assert sum(s["hist"]) == 101 and len(s["hist"]) == 400
    assert cosine_stats(np.zeros(0))["n"] == 0


def _rows_result(argmax, index=()):
    return {"regimes": {"argmax": cosine_stats(np.asarray(argmax)), "index": cosine_stats(np.asarray(index))}}


def test_gate_row_fidelity_thresholds():
    good = np.full(100, 0.99)
    assert gate_row_fidelity(_rows_result(good, good), Thresholds()).passed
    # index rows at 0.97: fine for argmax targets, not for index targets
    r = gate_row_fidelity(_rows_result(good, np.full(100, 0.97)), Thresholds())
    assert not r.passed and r.measured["argmax"]["passed"] and not r.measured["index"]["passed"]
    assert gate_row_fidelity(_rows_result(good, np.full(100, 0.97)), Thresholds(index_median=0.9, index_p5=0.9)).passed
    # a low tail (6 % of rows) fails the p5 target while the median passes
    tail = np.concatenate([np.full(94, 0.99), np.full(6, 0.5)])
    r = gate_row_fidelity(_rows_result(tail), Thresholds())
    assert not r.passed and r.measured["argmax"]["median"] == pytest.approx(0.99)
    # nothing encoded: nothing can drift
    empty = gate_row_fidelity(_rows_result([]), Thresholds())
    assert empty.passed and "no encoded rows" in empty.value


def test_thresholds_validate():
    with pytest.raises(OptionsError, match="min_top1"):
        Thresholds(min_top1=95)
    with pytest.raises(OptionsError, match="argmax_median"):
        Thresholds(argmax_median=1.5)
    with pytest.raises(OptionsError, match="max_kl"):
        Thresholds(max_kl=-1)
    assert Thresholds().row_targets("index") == (0.98, 0.95)


# -- gates 2 and 4 from run comparisons ----------------------------------------------
def _emb(n=40, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_compare_embeddings_identical():
    e = _emb()
    cmp = compare_outputs(RunOutputs("embedding", 40, embeddings=e), RunOutputs("embedding", 40, embeddings=e.copy()))
    assert cmp["top1"] == 1.0 and cmp["top10"] == 1.0
    assert cmp["cos_mean"] == pytest.approx(1.0) and cmp["cos_min"] == pytest.approx(1.0)
    assert gate_behaviour(cmp, "embedding", Thresholds()).passed
    assert gate_output(cmp, "embedding", Thresholds()).passed


def test_compare_embeddings_detects_a_swapped_sentence():
    e = _emb()
    ref = retrieval_neighbours(e, 1)[:, 0]
    f = e.copy()
    f[[3, 4]] = f[[4, 3]]  # two sentences swap embeddings
    cmp = compare_outputs(RunOutputs("embedding", 40, embeddings=e), RunOutputs("embedding", 40, embeddings=f))
    # queries 3 and 4, plus every query whose neighbour was 3 or 4, now disagree
    expected_wrong = {3, 4} | {i for i in range(40) if ref[i] in (3, 4)}
    new = retrieval_neighbours(f, 1)[:, 0]
    assert cmp["top1"] == pytest.approx(np.mean(ref == new))
    assert cmp["top1"] <= 1 - 2 / 40 and cmp["top1"] >= 1 - len(expected_wrong) / 40
    assert cmp["cos_min"] < 0.9 and cmp["cos_mean"] < 1.0


def test_compare_embeddings_noise_lowers_cosine_and_top1():
    e = _emb(n=200, d=8)
    noisy = e + np.random.default_rng(1).normal(scale=0.5, size=e.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    cmp = compare_outputs(RunOutputs("embedding", 200, embeddings=e), RunOutputs("embedding", 200, embeddings=noisy))
    assert cmp["top1"] < 0.95 and cmp["cos_mean"] < 0.995
    assert not gate_behaviour(cmp, "embedding", Thresholds()).passed
    assert not gate_output(cmp, "embedding", Thresholds()).passed


def _causal(logits, offsets, greedy=None):
    lp = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    return RunOutputs("causal", len(offsets) - 1, logprobs=lp, offsets=np.asarray(offsets), greedy=greedy)


def test_compare_causal_identical_and_perturbed():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(30, 50))
    g = rng.integers(0, 50, size=(2, 32))
    ref = _causal(logits, [0, 12, 30], g)
    same = compare_outputs(ref, _causal(logits.copy(), [0, 12, 30], g.copy()))
    assert same["top1"] == 1.0 and same["kl_mean"] == pytest.approx(0.0, abs=1e-12) and same["greedy_identical"] == 1.0
    assert gate_output(same, "causal", Thresholds()).passed
    # flip the argmax at exactly 3 positions, and one greedy token
    bent = logits.copy()
    for i in (0, 5, 20):
        bent[i, np.argmin(bent[i])] = bent[i].max() + 5
    g2 = g.copy()
    g2[1, 31] = (g2[1, 31] + 1) % 50
    cmp = compare_outputs(ref, _causal(bent, [0, 12, 30], g2))
    assert cmp["top1"] == pytest.approx(27 / 30)
    assert cmp["greedy_identical"] == 0.5
    p = np.exp(ref.logprobs[0])
    q_lp = _causal(bent, [0, 12, 30]).logprobs[0]
    assert cmp["kl_max"] >= np.sum(p * (ref.logprobs[0] - q_lp)) - 1e-9
    assert cmp["kl_mean"] > 0.02
    assert not gate_output(cmp, "causal", Thresholds()).passed


def test_causal_gate2_is_the_perplexity_ratio_not_top1():
    base = {"ppl_a": 40.0, "nll_a": np.log(40.0), "top1": 0.5, "positions": 1000}
    ok = {**base, "ppl_b": 40.8, "nll_b": np.log(40.8), "ppl_ratio": 1.02}
    g = gate_behaviour(ok, "causal", Thresholds())
    assert g.passed and g.target == "ratio<=1.02" and g.measured["ppl_ratio"] == 1.02
    assert g.value == "perplexity ratio 1.0200 (40.00 -> 40.80); top-1 next token 50.0%"
    bad = {**base, "ppl_b": 40.9, "nll_b": np.log(40.9), "ppl_ratio": 1.0225}
    assert not gate_behaviour(bad, "causal", Thresholds()).passed
    assert gate_behaviour(bad, "causal", Thresholds(max_ppl_ratio=1.05)).passed
    with pytest.raises(OptionsError, match="max_ppl_ratio"):
        Thresholds(max_ppl_ratio=0)


def test_compare_refuses_mismatched_runs():
    e = _emb()
    with pytest.raises(GateError, match="cannot compare"):
        compare_outputs(RunOutputs("embedding", 40, embeddings=e), RunOutputs("embedding", 39, embeddings=e[:39]))
    lp = np.zeros((5, 3))
    with pytest.raises(GateError, match="tokenised"):
        compare_outputs(_causal(lp, [0, 5]), _causal(lp, [0, 4]))


def test_family_of_config():
    assert family_of_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) == "causal"
    assert family_of_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}) == "causal"
    assert family_of_config({"architectures": ["BertModel"], "model_type": "bert"}) == "embedding"
    assert family_of_config({"model_type": "llama"}) == "causal"
    assert family_of_config({"model_type": "bert"}) == "embedding"


def test_text_sets_do_not_depend_on_what_was_imported_first():
    """The held-out set is data: importing torch first once changed it when it was extracted at run time."""
    import hashlib
    import subprocess
    import sys

    from hhtld.measure.texts import calibration_texts, heldout_texts

    code = ("import torch, hashlib\nfrom hhtld.measure.texts import heldout_texts, calibration_texts\n"
            "print(hashlib.sha256('\\n'.join(heldout_texts() + calibration_texts()).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hashlib.sha256("\n".join(heldout_texts() + calibration_texts()).encode()).hexdigest()
    assert len(heldout_texts()) == 256 and len(calibration_texts()) == 256
    assert not set(heldout_texts()) & set(calibration_texts())
