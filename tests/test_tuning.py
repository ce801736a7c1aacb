"""The block step (hhtld.calibrate.tuning): row gains tuned to a block's outputs, codes fixed.

A tiny synthetic block whose optimum is known; the step never makes a block worse; the
stored gains are bf16, positive and the same bits for any torch thread count."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hhtld.calibrate.tuning import Scaled, TuneOptions, stored_gain, tune_block  # noqa: E402
from hhtld.codecs.reference.palette import to_bf16  # noqa: E402
from hhtld.errors import OptionsError  # noqa: E402


class Tiny(torch.nn.Module):
    """A residual MLP block: x + down(silu(up(x)))."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.up = torch.nn.Linear(d, h, bias=False)
        self.down = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


def _setup(seed=0, off=0.1):
    """A block with the original weights, its decoded stand-in whose rows are off by known
    factors (decoded row = original row / c, stored gain g), and calibration batches."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    orig = Tiny()
    with torch.no_grad():
        for p in orig.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    inputs = [(torch.randn(4, 8, 16, generator=g), (), {}, torch.ones(32, dtype=torch.bool)) for _ in range(4)]
    with torch.no_grad():
        targets = [orig(x[0]) for x in inputs]
    dec = Tiny()
    layers, factor = [], {}
    for name in ("up", "down"):
        w = getattr(orig, name).weight.detach()
        c = (1.0 + off * rng.uniform(-1, 1, w.shape[0])).astype(np.float32)
        factor[name] = c
        with torch.no_grad():
            getattr(dec, name).weight.copy_(w / torch.from_numpy(c)[:, None])
        gain = to_bf16(rng.uniform(0.5, 2.0, w.shape[0]).astype(np.float32)).astype(np.float32)
        layers.append(Scaled(f"{name}.weight", getattr(dec, name).weight.detach().clone(), gain))
    return dec, layers, inputs, targets, factor


def test_the_block_step_finds_a_known_optimum():
    dec, layers, inputs, targets, factor = _setup()
    gains, before, after, steps, outs = tune_block(dec, layers, inputs, targets,
                                                   TuneOptions(steps=400, tokens=32, lr=3e-3, min_gain=0.0))
    assert steps == 400
    assert after < 0.01 * before  # the rows are recovered up to the bf16 gains
    for ly in layers:
        name = ly.param.split(".")[0]
        got = gains[ly.param].astype(np.float32) / ly.gain
        assert gains[ly.param].dtype == to_bf16(np.ones(1, np.float32)).dtype
        np.testing.assert_allclose(got, factor[name], rtol=0.01)
    # the outputs handed to the next block are the block's outputs with the stored gains
    with torch.no_grad():
        for ly in layers:
            mod = getattr(dec, ly.param.split(".")[0])
            mod.weight.copy_(ly.weight * torch.from_numpy(gains[ly.param].astype(np.float32) / ly.gain)[:, None])
        for (x, *_), o in zip(inputs, outs):
            torch.testing.assert_close(dec(x), o)


def test_the_block_step_never_makes_a_block_worse():
    dec, layers, inputs, targets, _ = _setup(seed=1)
    gains, before, after, steps, outs = tune_block(dec, layers, inputs, targets,
                                                   TuneOptions(steps=5, tokens=32, lr=5.0, min_gain=0.0))
    assert after == before  # a step that made it worse is not kept
    for ly in layers:
        np.testing.assert_array_equal(gains[ly.param].astype(np.float32), ly.gain)
    with torch.no_grad():
        for (x, *_), o in zip(inputs, outs):
            torch.testing.assert_close(dec(x), o)


def test_the_block_step_stops_when_it_stops_paying():
    dec, layers, inputs, targets, _ = _setup(seed=2, off=0.0)  # already optimal: nothing to gain
    _, before, after, steps, _ = tune_block(dec, layers, inputs, targets, TuneOptions(steps=100, tokens=32))
    assert steps < 100
    assert after <= before


def test_padding_is_left_out_of_the_loss():
    dec, layers, inputs, targets, _ = _setup(seed=3)
    masked = [(x, a, k, torch.arange(32) < 16) for x, a, k, _ in inputs]
    noisy = [t.clone() for t in targets]
    for t in noisy:
        t.view(-1, 16)[16:] += 100.0  # what padding positions "should" give does not count
    _, before_clean, _, _, _ = tune_block(dec, layers, masked, targets, TuneOptions(steps=0))
    _, before_noisy, _, _, _ = tune_block(dec, layers, masked, noisy, TuneOptions(steps=0))
    assert before_clean == before_noisy


def test_the_tuned_gains_are_the_same_bits_for_one_and_two_torch_threads():
    got = []
    prev = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            dec, layers, inputs, targets, _ = _setup(seed=4)
            gains, *_ = tune_block(dec, layers, inputs, targets, TuneOptions(steps=30, tokens=32, lr=3e-3))
            got.append({k: v.tobytes() for k, v in gains.items()})
    finally:
        torch.set_num_threads(prev)
    assert got[0] == got[1]


def test_a_stored_gain_is_never_zero_or_of_another_sign():
    g = np.array([1.0, 0.5, 2.0, 1e-3], dtype=np.float32)
    out = stored_gain(g, np.array([0.01, -1.0, -3.0, 0.0], dtype=np.float32))
    assert out.astype(np.float32)[0] == pytest.approx(1.01, rel=1e-2)
    np.testing.assert_array_equal(out.astype(np.float32)[1:], to_bf16(g[1:]).astype(np.float32))


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(tokens=0), dict(lr=-1.0), dict(steps=True), dict(lr="x")])
def test_bad_tuning_options_are_refused(bad):
    with pytest.raises(OptionsError, match="tuning: "):
        TuneOptions(**bad)
