"""Calibrated encode: layer-wise Hessians, per-tensor rungs, error feedback, one check.

1. **Analysis.** Calibration tokens (prose passages for causal LMs, the
   calibration sentences for embedding models; never the held-out sets of
   ``verify``) run through the original model one block at a time; the
   inputs of every linear layer give its Hessian, and with it the predicted
   output error of each rung (:mod:`hhtld.calibrate.allocation`).
2. **Allocation.** Per tensor the rung that buys the most predicted output
   agreement per bit, until the goal (or a ``--bpw`` budget) is met. Tensors
   of a group at the same rung share palettes (trained on the group's
   sample, as in the data-free encode).
3. **Encode.** The blocks run again, now on the stream of already encoded
   blocks (GPTQ's sequential order): each linear layer is encoded with error
   feedback against the Hessian of its actual inputs, the block is run with
   the decoded weights, and the next block sees its output. Embedding and
   output tables are encoded last (an output head against the Hessian of the
   final hidden states).
4. **Check.** The written pack against the original model on calibration
   text: mean next-token KL and perplexity ratio (causal LMs), top-1
   retrieval and embedding cosine (embedding models). A target that is not
   met is reported as missed; the pack is still written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..checkpoint import open_checkpoint
from ..checkpoint.rows import TensorRows
from ..classify import DEFAULT_RULES, EncodablePolicy, RuleTable, plan_checkpoint
from ..classify.groups import GroupPlan
from ..codecs.parallel import encode_pool
from ..codecs.registry import make_codec
from ..errors import GateError, OptionsError
from ..format import DEFAULT_SAMPLE_ROWS
from .allocation import TensorAllocation, TensorStats, allocate, tensor_stats

DEFAULT_TEXTS = 64  # calibration passages (causal) ...
DEFAULT_SEQ_LEN = 256  # ... of this many tokens
DEFAULT_SENTENCES = 256  # calibration sentences (embedding models)
BATCH = 8
CHECK_TEXTS = 32  # calibration passages of the final check


@dataclass
class CalibrationReport:
    family: str
    target: dict[str, Any]
    allocation: TensorAllocation
    stats: list[TensorStats]
    check: dict[str, Any] = field(default_factory=dict)
    met: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def to_json(self) -> dict:
        groups: dict[str, dict[str, int]] = {}
        for c in self.allocation.choices.values():
            groups.setdefault(c.group, {}).setdefault(c.setting.name, 0)
            groups[c.group][c.setting.name] += 1
        return {"family": self.family, "target": self.target, "met": self.met, "check": self.check,
                "notes": self.notes, "seconds": self.seconds, "calibration_tokens": self.tokens,
                "bpw_tensors": round(self.allocation.bits / max(1, self.allocation.weights), 4),
                "predicted_error": self.allocation.predicted, "rungs_per_group": groups,
                "tensors": [c.to_json() for c in self.allocation.choices.values()]}
