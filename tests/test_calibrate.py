"""Calibrated encode: error feedback, the layer-wise runner, Fisher sensitivities,
per-tensor allocation, targets and exit status (tiny models built here; MiniLM slow)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hhtld.budget.settings import LADDER, setting
from hhtld.calibrate.allocation import TensorStats, allocate, tensor_bits
from hhtld.checkpoint.rows import ArrayRows
from hhtld.classify import EncodablePolicy
from hhtld.classify.groups import GroupKey
from hhtld.codecs.base import DictParts
from hhtld.codecs.vq.codec import HhtlVqCodec
from hhtld.codecs.vq.feedback import FeedbackPlan, output_error, rotated_hessian
from hhtld.codecs.vq.quantiser import rotate

ALL = EncodablePolicy(encode_all=True)


def correlated(seed=0, m=256, c=128, n=2048):
    """Rows and a Hessian of correlated inputs with a few loud channels, like real activations."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((m, c)) * 0.02).astype(np.float32)
    x = rng.standard_normal((n, c)) @ (rng.standard_normal((c, c)) / np.sqrt(c))
    x[:, :4] *= 8
    return w, x.T @ x


@pytest.mark.parametrize("stages", ["2", "4,3", "2+4"])
def test_error_feedback_lowers_the_output_error_and_predicts_it(stages):
    w, h = correlated()
    codec = HhtlVqCodec(stages=stages)
    fit = codec.fit_group(GroupKey("x", "up", w.shape), w)
    errs = []
    for hess in (None, h):
        et = codec.encode_tensor(fit, ArrayRows(w), hessian=hess, measure=True)
        eg = codec.finish_group(fit, [et.stats])
        dec = codec.decode_rows(DictParts(eg.params, eg.arrays), DictParts({}, et.arrays))
        err = output_error(w, dec, h)
        if hess is not None:  # the codec's own prediction is the decoded tensor's error
            assert et.stats["output_error"] == pytest.approx(err, rel=1e-3)
            assert eg.params["bytes"] == sum(a.nbytes for a in et.arrays.values()) + sum(
                a.nbytes for a in eg.arrays.values())  # the same stored format and bytes
        errs.append(err)
    assert errs[1] < 0.5 * errs[0]


def test_a_hessian_rotated_in_place_gives_the_same_plan_and_only_when_allowed():
    w, h = correlated(c=384)
    fit = HhtlVqCodec(stages="2").fit_group(GroupKey("x", "up", w.shape), w)
    m = fit.model
    h32 = h.astype(np.float32)
    # R H Rᵀ turned the plain way: rows, then a C-order copy of the transpose
    plain = rotate(np.ascontiguousarray(rotate(h32, m.signs, block=m.block).T), m.signs, block=m.block)
    r = rotated_hessian(h32, m)
    assert r.flags.f_contiguous and np.ascontiguousarray(r).tobytes() == plain.tobytes()  # LAPACK's order, same bits
    want = FeedbackPlan.build(m, h32)
    assert np.array_equal(h32, h.astype(np.float32))  # not overwritten unless allowed
    own = h32.copy()
    got = FeedbackPlan.build(m, own, overwrite=True)
    assert not np.array_equal(own, h32)  # the rotation took the Hessian's own memory
    assert got.u_chol.tobytes() == want.u_chol.tobytes()
    # widened once, in C order: a one-row block's product then sums as it does for more rows
    assert got.h_rot.flags.c_contiguous and got.h_rot.tobytes() == plain.astype(np.float64).tobytes()
    h64 = h.copy()  # a float64 Hessian is never taken over: it is rotated in float32
    FeedbackPlan.build(m, h64, overwrite=True)
    assert np.array_equal(h64, h)


def test_allocation_spends_bits_where_the_predicted_change_falls_most():
    rel = {"g": {s.name: 2.0 ** (-2 * i / 3) for i, s in enumerate(LADDER)}}
    loud = TensorStats("loud", "g", "up", 64, 64, np.ones(64), sensitivity=100.0)
    quiet = TensorStats("quiet", "g", "up", 64, 64, np.ones(64), sensitivity=1.0)
    budget = tensor_bits(setting("vq6.0"), 64, 64, "up") + tensor_bits(setting("vq2.0"), 64, 64, "up")
    al = allocate([loud, quiet], rel, budget_bits=budget)
    assert al.bits <= budget
    names = [s.name for s in LADDER]
    assert names.index(al.choices["loud"].setting.name) > names.index(al.choices["quiet"].setting.name)
    goal = allocate([loud, quiet], rel, goal=0.5)
    assert goal.predicted <= 0.5
    assert allocate([loud, quiet], rel, goal=10.0).bits < goal.bits


def test_tied_tensors_of_one_group_get_one_rung():
    rel = {"g": {s.name: 2.0 ** (-2 * i / 3) for i, s in enumerate(LADDER)},
           "h": {s.name: 2.0 ** (-2 * i / 3) for i, s in enumerate(LADDER)}}
    loud = TensorStats("loud", "g", "up", 64, 64, np.ones(64), sensitivity=100.0)
    quiet = TensorStats("quiet", "g", "up", 64, 64, np.ones(64), sensitivity=1.0)
    other = TensorStats("other", "h", "up", 64, 64, np.ones(64), sensitivity=1.0)
    budget = 2 * tensor_bits(setting("vq6.0"), 64, 64, "up") + tensor_bits(setting("vq2.0"), 64, 64, "up")
    free = allocate([loud, quiet, other], rel, budget_bits=budget)
    assert free.choices["loud"].setting != free.choices["quiet"].setting
    tie = {"quiet": "loud", "other": "loud"}.get
    tied = allocate([loud, quiet, other], rel, budget_bits=budget, tie=lambda n: tie(n) or n)
    assert tied.choices["loud"].setting == tied.choices["quiet"].setting  # one unit: one rung
    assert tied.bits <= budget and tied.bits == sum(c.bits for c in tied.choices.values())
    assert tied.predicted == pytest.approx(sum(t.sensitivity * rel[t.group][tied.choices[t.name].setting.name]
                                               for t in (loud, quiet, other)))
    # a partner in another group is not tied: the same as allocating it alone
    alone = allocate([loud, quiet, other], rel, budget_bits=budget, tie=lambda n: "loud" if n == "other" else n)
    assert {n: c.setting for n, c in alone.choices.items()} == {n: c.setting for n, c in free.choices.items()}


# -- the tiny Llama -------------------------------------------------------------------------------------
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from .test_verify_causal import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden=64, layers=2)


@pytest.fixture(scope="module")
def lw(llama):
    from hhtld import open_checkpoint
    from hhtld.calibrate.layerwise import LayerwiseModel, build_empty, checkpoint_param_map

    net, tok, fam, _ = build_empty(llama)
    ck = open_checkpoint(llama)
    return LayerwiseModel(net, checkpoint_param_map(net, ck), ck.read_float), tok, fam, ck


def test_layerwise_self_comparison_is_exact_and_holds_one_block(lw):
    from hhtld.calibrate.pipeline import calibration_batches, layerwise_compare

    model, tok, fam, ck = lw
    batches = calibration_batches(tok, fam, 4, 32)
    same = {n: (lambda n=n: ck.read_float(n)) for n in ck.tensors if n.endswith("proj.weight")}
    c = layerwise_compare(model, batches, same, fam)
    assert c["kl_mean"] == pytest.approx(0.0, abs=1e-6) and c["top1"] == 1.0 and c["ppl_ratio"] == pytest.approx(1.0)
    assert c["positions"] == 4 * 31
    assert all(p.device.type == "meta" for p in model.model.parameters())  # everything released again


def test_fisher_reaches_every_linear_and_the_tables(lw):
    from hhtld.calibrate.fisher import fisher_diagonals
    from hhtld.calibrate.pipeline import calibration_batches

    model, tok, fam, ck = lw
    names = {n for n in ck.tensors if n.endswith(".weight") and len(ck.tensors[n].shape) == 2}
    f = fisher_diagonals(model, calibration_batches(tok, fam, 4, 32, batch=2), fam, names)
    linears = {n for n in names if "proj" in n} | {"lm_head.weight"}
    assert set(f["rows"]) == linears
    for n in linears:
        assert f["rows"][n].shape == (ck.tensors[n].shape[0],) and np.all(f["rows"][n] >= 0) and f["rows"][n].sum() > 0
    assert set(f["table"]) == {"model.embed_tokens.weight"} and f["table"]["model.embed_tokens.weight"] > 0


def test_calibrated_encode_writes_the_same_pack_for_any_thread_count(llama, tmp_path):
    from hhtld.pack import open_pack
    from hhtld.calibrate.pipeline import encode_calibrated

    outs = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}.hhtld"
        res, rep = encode_calibrated(llama, out, bpw=5.0, policy=ALL, texts=8, seq_len=32, threads=threads)
        outs.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert outs[0] == outs[1]
    p = open_pack(tmp_path / "t1.hhtld")
    assert rep.met is None and rep.target == {} and len(rep.rounds) == 1
    assert rep.allocation.bits <= 5.0 * sum(c.weights for c in rep.allocation.choices.values())
    assert {c["codec"] for c in p.groups} == {"hhtl-vq"}
    assert json.loads(p.header.metadata["hhtld.manifest"])["calibration"]["feedback"] is True
    # a linear encoded with feedback reports its predicted output error; tables have none
    assert rep.results["model.layers.0.mlp.down_proj.weight"]["output_error"] > 0
    assert rep.results["model.embed_tokens.weight"]["output_error"] is None
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t1.hhtld", "t2.hhtld"]  # no leftovers


def test_the_tuning_moves_only_gains_reports_every_block_and_never_makes_one_worse(llama, tmp_path):
    """The block step and the global step change nothing but the stored gains (codes,
    palettes, norms the same bytes), never raise the loss they report, and the pack says so."""
    from hhtld import load
    from hhtld.calibrate.distill import DistillOptions
    from hhtld.calibrate.pipeline import encode_calibrated
    from hhtld.calibrate.tuning import TuneOptions
    from hhtld.classify.shapes import from_row_matrix
    from hhtld.inspection import format_inspect, inspect_pack
    from hhtld.pack import open_pack

    kw = dict(bpw=3.0, policy=ALL, texts=8, seq_len=32)
    _, plain = encode_calibrated(llama, tmp_path / "plain.hhtld", tune=None, **kw)
    _, tuned = encode_calibrated(llama, tmp_path / "tuned.hhtld", tune=TuneOptions(steps=10, lr=3e-3),
                                 distill=DistillOptions(steps=4), **kw)
    a, b = open_pack(tmp_path / "plain.hhtld"), open_pack(tmp_path / "tuned.hhtld")
    arrays_a, arrays_b = a.manifest["arrays"], b.manifest["arrays"]
    assert set(arrays_a) == set(arrays_b)
    changed = {n for n in arrays_a if arrays_a[n]["sha256"] != arrays_b[n]["sha256"]}
    assert changed and all(n.endswith("::gain") for n in changed), sorted(changed)[:3]
    # per block: loss after <= before; the global step too; the summary is in the manifest
    t = tuned.tuning
    assert [x["block"] for x in t["per_block"]] == [0, 1]
    assert all(x["loss_after"] <= x["loss_before"] for x in t["per_block"])
    assert any(x["loss_after"] < x["loss_before"] for x in t["per_block"])
    assert t["global_step"]["loss_after"] <= t["global_step"]["loss_before"]
    cal = b.manifest["calibration"]["tuning"]
    assert cal["parts"] == ["gain"] and cal["block_step"]["blocks"] == 2 and "per_block" not in cal
    assert "block step: the gain of" in format_inspect(inspect_pack(tmp_path / "tuned.hhtld"))
    assert "no block step" in format_inspect(inspect_pack(tmp_path / "plain.hhtld"))
    assert tuned.check["kl_mean"] < plain.check["kl_mean"]
    # the tuned pack decodes to what hhtld.load computes from the same stored parts
    model = load(tmp_path / "tuned.hhtld", dtype="float32")
    params = dict(model.named_parameters())
    for n in b.encoded_names():
        want = from_row_matrix(b.rows(n), b.info(n)["shape"], bool(b.info(n).get("transposed")))
        np.testing.assert_array_equal(params[n].detach().float().numpy(), want)


def test_error_feedback_lowers_the_measured_kl(llama, tmp_path):
    from hhtld.calibrate.pipeline import encode_calibrated

    kl = {}
    for fb in (True, False):
        _, rep = encode_calibrated(llama, tmp_path / f"{fb}.hhtld", bpw=3.0, policy=ALL, texts=8, seq_len=32,
                                   feedback=fb)
        kl[fb] = rep.check["kl_mean"]
    assert kl[True] < kl[False]


def test_a_missed_target_writes_the_pack_and_exits_3(llama, tmp_path, capsys):
    from hhtld.cli import main

    out = tmp_path / "m.hhtld"
    rc = main(["encode", str(llama), "-o", str(out), "--encode-all", "--max-kl", "1e-9", "--calibration-texts", "8",
               "-q", "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 3 and out.is_file()
    assert "hhtld: target not met: mean KL" in err and "(exit status 3)" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["allocation"]["met"] is False and len(report["allocation"]["calibration"]["rounds"]) == 2


def test_a_target_met_on_some_kinds_of_check_text_but_not_on_all_is_missed(llama, tmp_path):
    """The same allocation (the same aim, share x max_kl) checked against two targets: met
    when every kind is within it; missed when one kind is not, though the others are."""
    from hhtld.calibrate.pipeline import Target, encode_calibrated
    from hhtld.measure.texts import USE_KINDS

    kw = dict(policy=ALL, texts=8, seq_len=32, check_texts=3, max_rounds=1)
    _, loose = encode_calibrated(llama, tmp_path / "a.hhtld", target=Target(1.0, 1e6, share=0.05), **kw)
    kinds = loose.check["kinds"]
    assert list(kinds) == list(USE_KINDS["check"]) and loose.met is True
    kl = sorted(v["kl_mean"] for v in kinds.values())
    assert kl[-1] > kl[-2]  # one kind is the worst
    between = (kl[-1] + kl[-2]) / 2
    _, tight = encode_calibrated(llama, tmp_path / "b.hhtld", target=Target(between, 1e6, share=0.05 / between), **kw)
    assert (tmp_path / "a.hhtld").read_bytes() == (tmp_path / "b.hhtld").read_bytes()
    assert tight.check["kinds"] == kinds
    assert sum(v["kl_mean"] <= between for v in kinds.values()) == len(kinds) - 1  # all the others meet it
    assert tight.met is False and tight.check["worst_kind"] == max(kinds, key=lambda k: kinds[k]["kl_mean"])
    assert tight.notes == ["the behaviour target was not met on every kind of check text after 1 round"]


@pytest.mark.slow
def test_calibrated_encode_of_the_real_smollm2(smollm2_dir, tmp_path):
    """The whole calibrated path on SmolLM2-135M with a small calibration: the check
    runs on every check kind (the worst counts), the predicted KL is within a
    factor 4 of the check's mean over kinds, and the pack decodes to a model as
    close on held-out text of every kind (verify's comparison)."""
    from hhtld.calibrate.pipeline import encode_calibrated
    from hhtld.gates import ModelRunner, PackSource, compare_causal
    from hhtld.measure.texts import USE_KINDS, passages, render

    out = tmp_path / "smol.hhtld"
    _, rep = encode_calibrated(smollm2_dir, out, bpw=5.0, policy=ALL, texts=8, seq_len=128, check_texts=4)
    kinds = rep.check["kinds"]
    assert rep.family == "causal" and list(kinds) == list(USE_KINDS["check"])
    assert all(v["positions"] == 4 * 127 for v in kinds.values()) and rep.check["positions"] == 4 * 4 * 127
    assert rep.check["kl_mean"] == max(v["kl_mean"] for v in kinds.values())  # the worst kind is what counts
    assert rep.check["ppl_ratio"] == max(v["ppl_ratio"] for v in kinds.values())
    # the prediction comes from the calibration text (8 passages here); on other text the KL runs higher:
    # measured 2.8x on the mean of the check kinds (0.056 against 0.020 predicted)
    mean_kl = sum(v["kl_mean"] for v in kinds.values()) / len(kinds)
    assert 0.5 <= mean_kl / rep.allocation.predicted <= 4.0, (mean_kl, rep.allocation.predicted, kinds)
    assert rep.check["kl_mean"] < 0.1 and rep.check["ppl_ratio"] < 1.1
    runner = ModelRunner.from_model(smollm2_dir, max_tokens=128)
    texts = [render(p, runner.tokenizer) for k in USE_KINDS["heldout"] for p in passages("heldout", k)[:2]]
    held = compare_causal(runner, texts, None, PackSource(out, runner.checkpoint),
                          kinds=[k for k in USE_KINDS["heldout"] for _ in range(2)])
    assert held["kl_mean"] < 0.1 and held["ppl_ratio"] < 1.1, held["kinds"]


def test_a_round_is_taken_only_within_the_check_margin():
    """The tuned default's round 1 checked at KL 0.0195 / ratio 1.0193 and missed the held-out
    notes kind (0.0232): within the target, but not within its margin, so a second round runs."""
    from hhtld.calibrate.pipeline import CHECK_MARGIN, Target

    t = Target()
    edge = {"kl_mean": 0.0195, "ppl_ratio": 1.0193}
    assert t.met("causal", edge) and not t.met("causal", edge, CHECK_MARGIN["causal"])
    assert t.met("causal", {"kl_mean": 0.0159, "ppl_ratio": 1.0159}, CHECK_MARGIN["causal"])
    assert not t.met("causal", {"kl_mean": 0.01, "ppl_ratio": 1.0161}, CHECK_MARGIN["causal"])
    emb = {"top1": 0.95, "cos_mean": 0.995}
    assert t.met("embedding", emb, CHECK_MARGIN["embedding"])
