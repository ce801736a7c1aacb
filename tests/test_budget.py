"""Rate allocation: ladder accounting, greedy, the rows target, --bpw, behaviour on MiniLM (slow)."""

from __future__ import annotations

import pytest

from hhtld import encode
from hhtld.budget import LADDER, spend
from hhtld.budget.allocate import allocate_rows
from hhtld.budget.trials import Trial
from hhtld.classify import EncodablePolicy
from hhtld.classify.groups import GroupKey, GroupPlan
from hhtld.errors import OptionsError
from hhtld.measure.targets import Thresholds
from hhtld.pack.reader import Pack


def _encode(*args, **kw):
    """hhtld.encode as (the writer's result, the allocation)."""
    rep = encode(*args, **kw)
    return rep.result, rep.allocation


def test_ladder_is_cheapest_first_and_rates_are_exact():
    bits = [s.bpw(6, 1536, 384) for s in LADDER]
    assert bits == sorted(bits)
    s = next(x for x in LADDER if x.name == "vq2.0")  # "4": 96 u8 twigs + bf16 gain a row, 4 palettes... one
    n = 6 * 1536
    want = n * (96 + 2) + 256 * 4 * 2 + 384  # twigs + gains, palette (256 x 4 bf16), rotation signs
    assert s.bits(6, 1536, 384) == 8 * want


class _FakeTrials:
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, s):
        i = [x.name for x in LADDER].index(s.name)
        d = self.scale * 2.0 ** (-i)
        return Trial(d, 1 - d, 1 - 2 * d)


def _groups():
    gs = []
    for i, (role, n) in enumerate((("embed", 1), ("up", 4), ("qko", 12))):
        g = GroupPlan(i, GroupKey("encoder", role, (384, 384)))
        g.tensors = [None] * n
        gs.append(g)
    return gs


def test_rows_target_takes_the_cheapest_passing_rung():
    gs = _groups()
    trials = {str(g.key): _FakeTrials(0.1) for g in gs}
    ch = allocate_rows(gs, trials, Thresholds(), margin=0.0)
    for g in gs:
        c = ch[str(g.key)]
        i = [x.name for x in LADDER].index(c.setting.name)
        med, p5 = Thresholds().row_targets(g.regime)
        t = trials[str(g.key)](c.setting)
        assert t.median >= med and t.p5 >= p5
        assert i == 0 or not (trials[str(g.key)](LADDER[i - 1]).median >= med and trials[str(g.key)](LADDER[i - 1]).p5 >= p5)


def test_greedy_spends_bits_where_they_buy_most_and_keeps_the_budget():
    gs = _groups()
    sens = {str(gs[0].key): 0.01, str(gs[1].key): 10.0, str(gs[2].key): 1.0}
    trials = {str(g.key): _FakeTrials(0.1) for g in gs}

    def loss(g, s):
        return sens[str(g.key)] * trials[str(g.key)](s).rel_mse

    total_w = sum(g.n_weights for g in gs)
    bits = {str(g.key): [s.group_bits(g.key, len(g.tensors)) for s in LADDER] for g in gs}
    losses = {str(g.key): [loss(g, s) for s in LADDER] for g in gs}
    st = spend(bits, losses, budget_bits=3.0 * total_w)
    used = sum(LADDER[st[str(g.key)]].group_bits(g.key, len(g.tensors)) for g in gs)
    assert used <= 3.0 * total_w
    assert st[str(gs[1].key)] > st[str(gs[0].key)]  # the sensitive group got more
    st2 = spend(bits, losses, goal=1e-3)
    assert sum(loss(g, LADDER[st2[str(g.key)]]) for g in gs) <= 1e-3


def test_rows_target_on_a_small_checkpoint_falls_back_with_a_note(small_folder, tmp_path):
    out = tmp_path / "m.hhtld"
    res, al = _encode(small_folder, out, target="behaviour", policy=EncodablePolicy(encode_all=True))
    assert al.target == "rows" and any("falling back" in n for n in al.notes)
    assert al.checks[-1]["ok"]
    p = Pack(out)
    assert {g["codec"] for g in p.groups} == {"hhtl-vq"}
    assert all("setting" in g["options"] and g["options"]["setting"] for g in p.groups)
    res2, al2 = _encode(small_folder, tmp_path / "n.hhtld", target="rows", policy=EncodablePolicy(encode_all=True))
    assert out.read_bytes() == (tmp_path / "n.hhtld").read_bytes()  # same input and options, same bytes


def test_bpw_budget_is_kept(small_ckpt, tmp_path):
    for bpw in (2.5, 5.0):
        res, al = _encode(small_ckpt, tmp_path / f"b{bpw}.hhtld", target="rows", bpw=bpw,
                                policy=EncodablePolicy(encode_all=True))
        assert al.bpw <= bpw
        p = Pack(res.path)
        b = p.byte_breakdown()
        stored = sum(sum(v for k, v in g.items()) for g in b["groups"])
        assert 8 * stored == al.bits  # the allocation's accounting is the pack's


def test_rows_target_writes_only_out_and_says_when_the_top_rung_is_not_enough(small_ckpt, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    out = d / "m.hhtld"
    res, al = _encode(small_ckpt, out, target="rows", policy=EncodablePolicy(encode_all=True))
    assert res.path == out and al.checks[-1]["ok"]
    assert sorted(p.name for p in d.iterdir()) == ["m.hhtld"]
    p = Pack(out)  # a readable pack; gate 1 measured while encoding is in the manifest
    for g in p.groups:
        med, p5 = Thresholds().row_targets(g["regime"])
        assert g["row_cosine"]["median"] >= med and g["row_cosine"]["p5"] >= p5
    # a target no rung can meet: the allocation goes to the top rung at once, which fails, and says so
    strict = Thresholds(argmax_median=1.0, argmax_p5=1.0, index_median=1.0, index_p5=1.0)
    out2 = d / "strict.hhtld"
    res2, al2 = _encode(small_ckpt, out2, target="rows", policy=EncodablePolicy(encode_all=True),
                              thresholds=strict)
    assert res2.path == out2 and len(al2.checks) == 1 and not al2.checks[-1]["ok"]
    failing = ", ".join(str(g.key) for g in res2.plan.groups)
    assert al2.notes == [f"the rows target was not met: {failing} fail gate 1 even at the top rung"]
    assert {c.setting.name for c in al2.choices.values()} == {LADDER[-1].name}
    assert sorted(p.name for p in d.iterdir()) == ["m.hhtld", "strict.hhtld"]


def test_a_group_that_fails_its_row_check_is_encoded_again_one_rung_higher(small_ckpt, tmp_path, monkeypatch):
    import hhtld.budget.allocate as allocate

    real = allocate.allocate_rows

    def too_cheap(groups, trials, th, **kw):  # start every group on the cheapest rung
        return {k: allocate._choice(g, LADDER[0]) for k, g in zip(real(groups, trials, th, **kw), groups)}

    monkeypatch.setattr(allocate, "allocate_rows", too_cheap)
    out = tmp_path / "m.hhtld"
    res, al = _encode(small_ckpt, out, target="rows", policy=EncodablePolicy(encode_all=True))
    assert al.checks[-1]["ok"] and al.checks[-1]["raised"]
    raised = {r.split("→")[0] for r in al.checks[-1]["raised"]}
    assert raised == {k for k, c in al.choices.items() if c.setting.name != LADDER[0].name} != set()
    p = Pack(out)
    assert [g["options"]["setting"] for g in p.groups] == [c.setting.name for c in al.choices.values()]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.hhtld", "model.safetensors"]


def test_interrupted_encode_leaves_out_untouched_and_no_temporary_files(small_ckpt, tmp_path, monkeypatch):
    from hhtld.codecs.vq.codec import HhtlVqCodec

    out = tmp_path / "out" / "m.hhtld"
    out.parent.mkdir()
    out.write_bytes(b"previous pack")
    seen = []

    def interrupted(self, fit, rows, *a, **k):
        seen.append(rows.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(HhtlVqCodec, "encode_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _encode(small_ckpt, out, target="rows", policy=EncodablePolicy(encode_all=True))
    assert len(seen) == 1
    assert out.read_bytes() == b"previous pack"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.hhtld"]


def test_budget_output_path_errors(small_ckpt, tmp_path):
    with pytest.raises(OptionsError) as e:
        _encode(small_ckpt, tmp_path, target="rows")
    assert str(e.value) == f"{tmp_path}: is a directory; the pack needs a file name"
    with pytest.raises(OptionsError) as e:
        _encode(small_ckpt, small_ckpt, target="rows")
    assert str(e.value) == f"{small_ckpt}: is an input of this command; refusing to overwrite it with the pack"
    with pytest.raises(OptionsError) as e:
        _encode(small_ckpt, tmp_path / "m.hhtld", target="behaviour", max_rounds=0)
    assert str(e.value) == "max_rounds must be a positive integer, got 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.slow
def test_behaviour_target_on_minilm(minilm_dir, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "minilm.hhtld"
    res, al = _encode(minilm_dir, out, target="behaviour", policy=EncodablePolicy(encode_all=True))
    assert al.target == "behaviour" and al.met is True
    check = al.checks[-1]
    assert check["top1"] >= 0.95 and check["cos_mean"] >= 0.995
    assert Pack(out).storage_ratio() >= 2.5
    cal = al.calibration
    # the prediction the allocation steered by is within a factor 2 of what the check measured
    assert 0.5 <= (1 - check["cos_mean"]) / cal.allocation.predicted <= 2.0
    # several rungs per group: the allocation is per tensor
    assert any(len(r) > 1 for r in cal.to_json()["rungs_per_group"].values())
