"""What a setting costs each group: row distortion (trials on a row sample)
and output sensitivity (model runs on the calibration set, never held-out).

* :class:`GroupTrials` — per group, a deterministic, evenly spaced sample of
  its rows, encoded at a ladder rung on demand (memoised): relative squared
  error ``D = |x - x̂|² / |x|²`` and the median / 5th percentile of the row
  cosines.
* :func:`measure_sensitivity` — per group, how much the model output moves
  when only that group is perturbed: each row gets white noise with relative
  energy ``delta`` (what a VQ error of that size looks like to the model),
  the model is run on calibration texts and the output change (1 − mean
  embedding cosine, or mean next-token KL) is divided by ``delta``. To first
  order the output change of an allocation is ``sum_g a_g D_g`` (independent
  perturbations add in energy), which is what the allocator spends bits on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..checkpoint import Checkpoint
from ..classify.groups import GroupPlan
from ..classify.shapes import from_row_matrix
from ..checkpoint.rows import TensorRows, sample_across
from ..codecs.vq import encode_rows, parse_stages
from ..cosine import row_cosines
from ..pack.writer import read_rows
from .settings import Setting

TRIAL_ROWS = 384


@dataclass
class Trial:
    rel_mse: float
    median: float
    p5: float


def sample_group_rows(ckpt: Checkpoint, g: GroupPlan, max_rows: int = TRIAL_ROWS) -> np.ndarray:
    """Evenly spaced rows across the group's tensors (each tensor contributes its
    share), read from the memory map: only the sampled rows are touched."""
    return sample_across([TensorRows(ckpt, t) for t in g.tensors], max_rows)


@dataclass
class GroupTrials:
    """Row distortion of one group at ladder rungs, measured on a row sample:
    palettes are trained on every other sampled row and the distortion is
    measured on the others (rows the palettes did not see, as almost all rows
    of a full group are), so the trial is not optimistic."""

    sample: np.ndarray
    seed: int = 0
    iters: int = 6
    per_centroid: int = 32
    cache: dict[str, Trial] = field(default_factory=dict)

    def __call__(self, s: Setting) -> Trial:
        t = self.cache.get(s.name)
        if t is None:
            x = np.concatenate([self.sample[0::2], self.sample[1::2]])
            n_train = (self.sample.shape[0] + 1) // 2
            if self.sample.shape[0] < 64:  # tiny group: its palettes see every row anyway
                n_train = None
            _, rec = encode_rows(x, parse_stages(s.stages), s.gain, s.rotate, self.seed, self.iters,
                                 self.per_centroid, train_rows=n_train)
            if n_train is not None:
                x, rec = x[n_train:], rec[n_train:]
            cos = row_cosines(x, rec)
            err = float(np.sum((x.astype(np.float64) - rec) ** 2))
            tot = float(np.sum(x.astype(np.float64) ** 2))
            t = Trial(err / tot if tot > 0 else 0.0, float(np.median(cos)), float(np.percentile(cos, 5)))
            self.cache[s.name] = t
        return t


def to_original(t, rows: np.ndarray) -> np.ndarray:
    """Row matrix (effective shape, maybe transposed) → the tensor's original shape."""
    return from_row_matrix(rows, t.shape, t.transposed)


def noisy(rows: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    """Rows plus white noise of relative energy ``delta`` in every row."""
    rms = np.sqrt(np.mean(rows.astype(np.float64) ** 2, axis=1, keepdims=True))
    noise = rng.standard_normal(rows.shape).astype(np.float32)
    return (rows + noise * (rms * np.sqrt(delta)).astype(np.float32)).astype(np.float32)


def output_change(cmp: dict, family: str) -> float:
    """The scalar the allocator drives down: 1 − mean cosine (embedding) or mean KL (causal)."""
    return float(cmp["kl_mean"]) if family == "causal" else float(1.0 - cmp["cos_mean"])


def measure_sensitivity(runner, ckpt: Checkpoint, groups: list[GroupPlan], texts: list[str], ref,
                        delta: float = 0.003, seed: int = 0, min_share: float = 0.0,
                        log: Callable[[str], None] | None = None) -> dict[str, float]:
    """``{str(key): a_g}`` with ``a_g = output change / delta`` (see module doc).

    Every group is run by default (one model run each). With ``min_share`` > 0,
    groups holding less of the encoded weights than that share are not run;
    they get the largest measured per-weight sensitivity scaled to their size
    (a cautious guess). Measured on MiniLM, running them all found the pooler
    unused (0) and the position table insensitive (0.024), which saved 1 %
    of the pack for one extra second."""
    from ..gates.runner import compare_outputs

    total = sum(g.n_weights for g in groups) or 1
    out: dict[str, float] = {}
    per_weight = []
    for g in groups:
        if g.n_weights < min_share * total:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, g.index, 0xA11C]))
        weights = {t.name: to_original(t, noisy(read_rows(ckpt, t), delta, rng)) for t in g.tensors}
        new = runner.run(texts, weights)
        a = max(output_change(compare_outputs(ref, new), runner.family), 0.0) / delta
        out[str(g.key)] = a
        per_weight.append(a / g.n_weights)
        if log:
            log(f"  sensitivity {g.key}: {a:.4g} per unit relative error")
    top = max(per_weight) if per_weight else 1.0
    for g in groups:
        out.setdefault(str(g.key), top * g.n_weights)
    return out


__all__ = ["GroupTrials", "Trial", "measure_sensitivity", "noisy", "output_change", "sample_group_rows",
           "to_original"]
