"""What a setting costs each group in row distortion: trials on a row sample.

:class:`GroupTrials` — per group, a deterministic, evenly spaced sample of
its rows, encoded at a ladder rung on demand (memoised): relative squared
error ``D = |x - x̂|² / |x|²`` and the median / 5th percentile of the row
cosines. The data-free allocation spends bits on it directly; the
calibrated one multiplies it by each tensor's measured sensitivity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..checkpoint import Checkpoint
from ..classify.groups import GroupPlan
from ..checkpoint.rows import TensorRows, sample_across
from ..codecs.vq.quantiser import encode_rows, parse_stages
from ..cosine import row_cosines
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


__all__ = ["GroupTrials", "Trial", "sample_group_rows"]
