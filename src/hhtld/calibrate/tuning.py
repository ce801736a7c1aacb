"""The block step: tune each block's per-row gains to the original block's outputs.

After a round's tensors are encoded (twigs chosen with error feedback, palettes
trained), the only continuous part a block owns alone is the per-row gain of
each of its encoded linear layers (palettes are shared by the tensors of a
group, across blocks; the calibrated path stores no leaf). The block step moves
those gains, codes and palettes fixed, so that the block run with its decoded
weights reproduces the original block:

* inputs: the hidden states the blocks before it produce *with their tuned,
  decoded weights* (the pack's own stream), so the step also absorbs the drift
  the blocks before it left;
* target: the original block's outputs on the original stream;
* loss: the mean squared error over the calibration tokens (padding left out);
* parameters: one multiplier ``1 + s`` per row of every encoded linear layer of
  the block (the stored gain is multiplied by it, then rounded to bf16 as stored);
* Adam on a subsample of ``tokens`` calibration tokens per step (whole batches,
  taken in turn), ``steps`` steps at most, stopping early when a pass over the
  batches lowers the loss by less than ``min_gain``;
* the loss before and after is measured on every calibration token with the
  bf16-rounded gains, and the block keeps whichever is lower: the step never
  makes a block's loss worse than the error feedback left it.

Torch runs the step on a fixed number of threads (``TUNE_THREADS``, whatever
``--threads`` says), with seeded, ordered batches, so the same input and options
give the same gains, byte for byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..codecs.reference.palette import to_bf16
from ..errors import OptionsError

TUNE_THREADS = 2  # torch's threads inside the step: fixed, so the pack does not depend on --threads


def check_options(opts, what: str, counts: dict[str, int], numbers: tuple[str, ...]) -> None:
    """Refuse (:class:`OptionsError`, naming ``what``) a field of ``opts`` in ``counts`` that is
    not an integer at least its bound, or one in ``numbers`` that is not a number ≥ 0."""
    for name, lo in counts.items():
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise OptionsError(f"{what}: {name} must be an integer ≥ {lo}, got {v!r}")
    for name in numbers:
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise OptionsError(f"{what}: {name} must be a number ≥ 0, got {v!r}")


@dataclass(frozen=True)
class TuneOptions:
    """How long the block step may run: at most ``steps`` Adam steps of learning rate
    ``lr`` on ``tokens`` calibration tokens each; a pass over the batches that lowers
    the loss by less than ``min_gain`` (relative) ends it."""

    steps: int = 10
    tokens: int = 2048
    lr: float = 3e-3
    min_gain: float = 1e-3

    def __post_init__(self) -> None:
        check_options(self, "tuning", {"steps": 0, "tokens": 1}, ("lr", "min_gain"))

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "lr": self.lr, "min_gain": self.min_gain}


@dataclass
class BlockTuning:
    """What the step did to one block: its loss (mean squared error of the block's output
    against the original's, every calibration token) before and after, the steps run,
    whether the tuned gains were kept, and its time."""

    block: int
    tensors: int
    loss_before: float
    loss_after: float
    steps: int
    kept: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block, "tensors": self.tensors, "loss_before": self.loss_before,
                "loss_after": self.loss_after, "steps": self.steps, "kept": self.kept,
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BlockTuning":
        return cls(int(d["block"]), int(d["tensors"]), float(d["loss_before"]), float(d["loss_after"]),
                   int(d["steps"]), bool(d["kept"]), float(d["seconds"]))


@dataclass
class Scaled:
    """One encoded linear layer of a block: its parameter's name inside the block, the
    decoded weight (parameter shape, float32 tensor), its stored gain (float32, bf16-exact)
    and the axis of the weight its rows run along."""

    param: str
    weight: Any
    gain: np.ndarray
    axis: int = 0

    def scaled(self, mult):
        """The weight with row multipliers ``mult`` (a tensor of the rows' length)."""
        return self.weight * (mult[:, None] if self.axis == 0 else mult[None, :])


def stored_gain(gain: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The gain to store for multipliers ``1 + s``: bf16, and never zero or of another
    sign (a row whose product would round to zero keeps its gain)."""
    g = np.asarray(gain, dtype=np.float32)
    new = to_bf16(g * (1.0 + np.asarray(s, dtype=np.float32)))
    bad = ~(new.astype(np.float32) * g > 0)
    if bad.any():
        new = np.where(bad, to_bf16(g), new)
    return new


def gain_ratio(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """``new / old`` as float32 multipliers, 1 where the old gain is zero (a zero row stays zero)."""
    n, o = np.asarray(new, dtype=np.float32), np.asarray(old, dtype=np.float32)
    return np.divide(n, o, out=np.ones_like(o), where=o != 0)


def tune_block(block, layers: list[Scaled], inputs: list[tuple[Any, tuple, dict, Any]], targets: list[Any],
               opts: TuneOptions) -> tuple[dict[str, np.ndarray], float, float, int, list[Any]]:
    """Tune one block's row gains (module docstring).

    ``inputs``: per calibration batch (hidden states (B, T, d), the block's positional
    and keyword arguments, the valid-token mask (B·T,) bool); ``targets``: the original
    block's outputs (B, T, d) on the same batches. Returns (the gains to store per
    layer param, loss before, loss after — both with stored gains, on every batch —,
    steps run, the block's outputs with the gains returned: the next block's inputs)."""
    import torch
    from torch.func import functional_call

    def run(b, mults, grad: bool):
        hidden, args, kwargs, _ = inputs[b]
        params = {ly.param: ly.scaled(m) for ly, m in zip(layers, mults)}
        with torch.set_grad_enabled(grad):
            out = functional_call(block, params, (hidden,) + tuple(args), kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def sq_err(b, out) -> tuple[Any, int]:
        valid = inputs[b][3]
        d = (out - targets[b]).reshape(-1, out.shape[-1])[valid]
        return (d * d).sum(), d.numel()

    def measure(mults) -> tuple[float, list[Any]]:
        total, count, outs = 0.0, 0, []
        for b in range(len(inputs)):
            out = run(b, mults, False)
            e, n = sq_err(b, out)
            total += float(e)
            count += n
            outs.append(out.float())
        return total / max(1, count), outs

    ones = [torch.ones(ly.gain.shape[0], dtype=torch.float32) for ly in layers]
    before, outs_before = measure(ones)
    if not layers:
        return {}, before, before, 0, outs_before
    s = [torch.zeros(ly.gain.shape[0], dtype=torch.float32, requires_grad=True) for ly in layers]
    per_step = max(1, -(-opts.tokens // max(1, int(inputs[0][3].sum()))))  # whole batches per step
    per_step = min(per_step, len(inputs))
    opt = torch.optim.Adam(s, lr=opts.lr)
    cycle = max(1, -(-len(inputs) // per_step))  # steps per pass over the batches
    passes: list[float] = []
    run_loss, done = 0.0, 0
    for step in range(opts.steps):
        opt.zero_grad(set_to_none=True)
        err, count = 0.0, 0
        for q in range(per_step):
            b = (step * per_step + q) % len(inputs)
            e, n = sq_err(b, run(b, [1.0 + x for x in s], True))
            err = err + e
            count += n
        loss = err / max(1, count)
        loss.backward()
        opt.step()
        done += 1
        run_loss += float(loss.detach())
        if done % cycle == 0:
            passes.append(run_loss)
            run_loss = 0.0
            if len(passes) > 1 and passes[-1] >= passes[-2] * (1.0 - opts.min_gain):
                break
    gains = {ly.param: stored_gain(ly.gain, x.detach().numpy()) for ly, x in zip(layers, s)}
    mults = [torch.from_numpy(gain_ratio(g, ly.gain)) for ly, g in zip(layers, gains.values())]
    after, outs_after = measure(mults)
    if after < before:
        return gains, before, after, done, outs_after
    return {ly.param: to_bf16(ly.gain) for ly in layers}, before, before, done, outs_before


class TorchThreads:
    """``torch.set_num_threads(n)`` for a ``with`` block, restored after."""

    def __init__(self, n: int):
        self.n = n
        self.prev = None

    def __enter__(self) -> "TorchThreads":
        import torch

        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.set_num_threads(self.prev)


@dataclass
class TuneKeep:
    """Where the block step keeps what it finished (``--resume``): ``load(i)`` gives block
    ``i``'s (gains, :class:`BlockTuning`) or None; ``carry(i)`` the two streams (original,
    pack) block ``i`` left, or None; ``save(i, gains, record, original, pack)``."""

    load: Callable[[int], Any]
    carry: Callable[[int], Any]
    save: Callable[..., None]


def tune_pack_gains(lw, pack, batches, opts: TuneOptions, *, log: Callable[[str], None] | None = None,
                    run_unit: Callable | None = None,
                    keep: TuneKeep | None = None) -> tuple[dict[str, np.ndarray], list[BlockTuning]]:
    """The block step over every block of ``lw`` (a :class:`LayerwiseModel` of the original)
    for the encoded tensors of ``pack`` (a :class:`hhtld.pack.reader.Pack` written with
    gains): the stored gains to write (tensor name → bf16 (rows,)) and what each block did.

    ``run_unit(i, fn)`` runs block ``i``'s step as the executor's chain unit and returns
    ``fn()``; ``keep``: blocks an interrupted run finished are read back, and each finished
    block is kept (its gains and record; the streams of the last one)."""
    import torch

    from ..classify.shapes import from_row_matrix

    encoded = set(pack.encoded_names())
    gains: dict[str, np.ndarray] = {}
    report: list[BlockTuning] = []
    lw.capture(batches)
    lw.release(lw.outside_blocks())
    stream = [b.hidden for b in batches]  # the pack's stream; ``batches`` carry the original's
    valid = [b.valid for b in batches]
    start = 0
    while keep is not None and start < len(lw.blocks):
        got = keep.load(start)
        if got is None:
            break
        gains.update(got[0])
        report.append(got[1])
        start += 1
    if start:
        carried = keep.carry(start - 1)
        if carried is None:
            start, gains, report = 0, {}, []
        else:
            for b, h in zip(batches, carried[0]):
                b.hidden = torch.from_numpy(np.array(h))
            stream = [torch.from_numpy(np.array(h)) for h in carried[1]]
            if log:
                log(f"  {start} block{'s' if start != 1 else ''} of the tuning kept by an interrupted run")

    def step(i: int):
        t0 = time.perf_counter()
        keys = lw.keys_under(lw.block_prefix(i))
        prefix = lw.block_prefix(i) + "."
        lw.materialise(keys)
        lw.run_block(i, batches)  # the original block on the original stream: the targets
        targets = [b.hidden for b in batches]
        layers, decoded = [], {}
        for n, _ in lw.linears(i):
            info = pack.info(n) if n in encoded else None
            if info is None or "gain" not in info["parts"] or len(info["shape"]) != 2:
                continue
            decoded[n] = from_row_matrix(pack.rows(n), info["shape"], bool(info.get("transposed")))
            key = next(k for k in keys if lw.key_to_name.get(k) == n)
            layers.append((n, key[len(prefix):], bool(info.get("transposed"))))
        lw.materialise(keys, override=decoded)
        block = lw.blocks[i]
        params = dict(block.named_parameters())
        scaled = [Scaled(p, params[p].detach(), np.asarray(pack.tensor_parts(n)["gain"], dtype=np.float32),
                         1 if tr else 0) for n, p, tr in layers]
        ins = [(h, b.args, b.kwargs, v) for h, b, v in zip(stream, batches, valid)]
        new, before, after, steps, outs = tune_block(block, scaled, ins, targets, opts)
        lw.release(keys)
        by_name = {n: new[p] for n, p, _ in layers}
        rec = BlockTuning(i, len(by_name), before, after, steps, after < before, time.perf_counter() - t0)
        return by_name, rec, [o.detach() for o in outs]

    with TorchThreads(TUNE_THREADS):
        torch.manual_seed(0)
        for i in range(start, len(lw.blocks)):
            got, rec, stream = run_unit(i, lambda: step(i)) if run_unit is not None else step(i)
            gains.update(got)
            report.append(rec)
            if keep is not None:
                keep.save(i, got, rec, [b.hidden for b in batches], stream)
            if log:
                log(f"  tuned block {i + 1}/{len(lw.blocks)}: loss {rec.loss_before:.4g} -> {rec.loss_after:.4g}"
                    f" ({rec.steps} steps{'' if rec.kept else ', kept as encoded'}, {rec.seconds:.1f} s)")
    lw.release(lw.outside_blocks())
    return gains, report


__all__ = ["TUNE_THREADS", "BlockTuning", "Scaled", "TorchThreads", "TuneKeep", "TuneOptions", "check_options",
           "gain_ratio", "stored_gain", "tune_block", "tune_pack_gains"]
