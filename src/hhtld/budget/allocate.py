"""Rate allocation: which ladder rung each group (or tensor) gets (docs/design.md §4).

Targets:

* ``rows`` (data-free) — per group, the cheapest rung whose row cosines meet
  the gate-1 thresholds of its regime (measured on a row sample with a small
  margin, then on every decoded row while encoding).
* ``behaviour`` (runs the model) — the calibrated encode of
  :mod:`hhtld.calibrate`: layer-wise Hessians and Fisher diagonals on
  calibration text, per-tensor rungs by predicted output change, error
  feedback, and one check of the written pack on calibration text.
* ``--bpw X`` — a fixed budget of X bits per encoded weight: data-free (spent
  where it removes the most row distortion), or with ``behaviour`` where it
  removes the most predicted output change.

Every choice lands in the manifest (group ``options.setting``) and in
``inspect``; :class:`Allocation` keeps the measurements for the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..checkpoint import open_checkpoint
from ..classify import DEFAULT_RULES, EncodablePolicy, RuleTable, plan_checkpoint
from ..classify.groups import GroupPlan
from ..errors import GateError, OptionsError
from ..outputs import check_output_file
from ..format import DEFAULT_SAMPLE_ROWS
from ..pack.encode import encode_checkpoint
from ..pack.writer import EncodeResult
from .greedy import spend
from .trials import GroupTrials, sample_group_rows
from .settings import LADDER, Setting

TARGETS = ("rows", "behaviour")
ROW_MARGIN = 0.001  # cosine margin of the sample-based rows decision
START = {"argmax": "vq2.0", "index": "vq2.7"}  # first rung tried by the rows target
# Causal LMs: rows that pass gate 1 can still wreck the model (measured on SmolLM2-135M:
# perplexity x48 with the plain rows target). The data-free rows target keeps every
# role of a causal LM at or above these rungs (measured to hold perplexity within 25 %).
CAUSAL_ROWS_FLOOR = {"embed": "vq6.0", "lm_head": "vq6.0"}
CAUSAL_ROWS_FLOOR_DEFAULT = "vq5.0"
CAUSAL_ROWS_WARNING = ("row gates do not predict the behaviour of a causal LM: --target rows keeps every role at or "
                       "above a measured minimum rung ({floors}), but only --target behaviour measures the model")


@dataclass
class Choice:
    key: str
    regime: str
    n_tensors: int
    n_weights: int
    setting: Setting
    bits: int
    sensitivity: float | None = None

    def to_json(self) -> dict:
        return {"group": self.key, "regime": self.regime, "setting": self.setting.name,
                "stages": self.setting.stages, "bpw": round(self.bits / max(1, self.n_weights), 4),
                "weights": self.n_weights, "sensitivity": self.sensitivity}


@dataclass
class Allocation:
    """What an allocation chose and measured. ``choices``: a rung per group (data-free
    targets); ``calibration``: the calibrated encode's report (per-tensor rungs);
    ``met``: whether the target was met (None for a plain ``--bpw`` budget)."""

    target: str
    choices: dict[str, Choice]
    notes: list[str] = field(default_factory=list)
    predicted: dict[str, float] = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: Any = None
    met: bool | None = None

    def group_options(self) -> dict[str, dict[str, Any]]:
        return {k: c.setting.options() for k, c in self.choices.items()}

    @property
    def bits(self) -> int:
        if self.calibration is not None:
            return self.calibration.allocation.bits
        return sum(c.bits for c in self.choices.values())

    @property
    def n_weights(self) -> int:
        if self.calibration is not None:
            return self.calibration.allocation.weights
        return sum(c.n_weights for c in self.choices.values())

    @property
    def bpw(self) -> float:
        return self.bits / max(1, self.n_weights)

    def to_json(self) -> dict:
        out = {"target": self.target, "met": self.met, "bpw": round(self.bpw, 4), "notes": self.notes,
               "predicted": self.predicted, "checks": self.checks, "seconds": self.seconds,
               "groups": [c.to_json() for c in self.choices.values()]}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_json()
        return out


def _choice(g: GroupPlan, s: Setting, sens: float | None = None) -> Choice:
    return Choice(str(g.key), g.regime, len(g.tensors), g.n_weights, s, s.group_bits(g.key, len(g.tensors)), sens)


def _ladder_index(name: str) -> int:
    return [s.name for s in LADDER].index(name)


# --- rows ---------------------------------------------------------------------------
def rows_ok(t, regime: str, thresholds, margin: float = 0.0) -> bool:
    med, p5 = thresholds.row_targets(regime)
    return t.median >= med + margin and t.p5 >= p5 + margin


def allocate_rows(groups: list[GroupPlan], trials: dict[str, GroupTrials], thresholds,
                  margin: float = ROW_MARGIN, floor: dict[str, int] | None = None) -> dict[str, Choice]:
    """Cheapest rung per group whose sampled row cosines pass its regime's gate (with margin)."""
    out = {}
    for g in groups:
        k = str(g.key)
        lo = (floor or {}).get(k, 0)
        i = max(lo, _ladder_index(START.get(g.regime, "vq2.0")))
        tr = trials[k]
        if rows_ok(tr(LADDER[i]), g.regime, thresholds, margin):
            while i > lo and rows_ok(tr(LADDER[i - 1]), g.regime, thresholds, margin):
                i -= 1
        else:
            while i < len(LADDER) - 1 and not rows_ok(tr(LADDER[i]), g.regime, thresholds, margin):
                i += 1
        out[k] = _choice(g, LADDER[i])
    return out


# --- the driver ------------------------------------------------------------------------
def _say(log, msg: str) -> None:
    if log:
        log(msg)


def check_budget_options(bpw: float | None, max_rounds: int = 2) -> None:
    """:class:`OptionsError` for a ``bpw`` outside [0.5, 16] or a ``max_rounds`` that is not a
    positive integer."""
    if bpw is not None and not 0.5 <= bpw <= 16:
        raise OptionsError(f"--bpw must lie in [0.5, 16], got {bpw}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise OptionsError(f"max_rounds must be a positive integer, got {max_rounds!r}")


def encode_rows(model, out, bpw: float | None = None, policy: EncodablePolicy = EncodablePolicy(),
                rules: RuleTable = DEFAULT_RULES, codec_options: dict[str, Any] | None = None,
                include_aux: bool = True, progress: bool = False, thresholds=None,
                log: Callable[[str], None] | None = None, sample_rows: int = DEFAULT_SAMPLE_ROWS,
                threads: int | None = None, notes: list[str] | None = None,
                store=None) -> tuple[EncodeResult, Allocation]:
    """The data-free allocation of hhtl-vq: a rung per group, then one streaming encode to ``out``.

    Without ``bpw`` (the ``rows`` target) each group gets the cheapest rung whose sampled
    rows pass gate 1 of its regime, and every group's decoded rows are checked as it is
    encoded (a group that fails is encoded again one rung higher); with ``bpw`` the
    budget of ``bpw`` bits per encoded weight is spent where it removes the most row
    distortion. ``notes`` (kept) start the allocation's notes; ``store`` keeps finished
    units (:class:`~hhtld.pack.units.UnitStore`)."""
    from ..measure.targets import Thresholds

    check_budget_options(bpw)
    th = thresholds or Thresholds()
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    ckpt = open_checkpoint(model)
    out = check_pack_output(out, ckpt)
    plan = plan_checkpoint(ckpt, policy, rules)
    groups = plan.groups
    extra = {k: v for k, v in (codec_options or {}).items() if k in ("seed", "iters", "per_centroid")}
    t1 = time.perf_counter()
    trials = {str(g.key): GroupTrials(sample_group_rows(ckpt, g), seed=int(extra.get("seed", 0)))
              for g in groups}
    seconds["trials.sample"] = time.perf_counter() - t1
    target = "rows"
    alloc = Allocation(target, {}, list(notes or []))
    total_w = sum(g.n_weights for g in groups) or 1
    budget_bits = None if bpw is None else bpw * total_w
    enc_kw = dict(codec="hhtl-vq", codec_options=codec_options or {}, policy=policy, rules=rules,
                  include_aux=include_aux, progress=progress, sample_rows=sample_rows, threads=threads, store=store)

    def rows_loss(g, s):
        med, _ = th.row_targets(g.regime)
        d_target = 1.0 / med**2 - 1.0
        return g.n_weights * trials[str(g.key)](s).rel_mse / d_target

    result = _encode_data_free(model, out, plan, target, bpw, budget_bits, trials, rows_loss, th, alloc,
                               seconds, log, enc_kw)
    seconds["total"] = time.perf_counter() - t0
    alloc.seconds = {k: round(v, 3) for k, v in seconds.items()}
    return result, alloc


def _allocation_line(alloc: Allocation, bpw, rnd: int | None = None) -> str:
    head = f"allocation ({alloc.target}{'' if bpw is None else f', bpw {bpw}'})"
    if rnd is not None:
        head += f", round {rnd + 1}"
    return (head + ": " + ", ".join(f"{k}={c.setting.name}" for k, c in alloc.choices.items())
            + f" → {alloc.bpw:.3f} bits per encoded weight")


def _encode_data_free(model, out, plan, target, bpw, budget_bits, trials, rows_loss, th, alloc, seconds, log,
                      enc_kw) -> EncodeResult:
    """One streaming encode; the rows target re-encodes a group one rung higher
    while its decoded rows fail gate 1 (and a higher rung exists)."""
    groups = plan.groups
    t1 = time.perf_counter()
    floor = {}
    if bpw is None and _is_causal(model):
        floor = {str(g.key): _ladder_index(CAUSAL_ROWS_FLOOR.get(g.key.role, CAUSAL_ROWS_FLOOR_DEFAULT))
                 for g in groups}
        floors = ", ".join(f"{r} {v}" for r, v in CAUSAL_ROWS_FLOOR.items()) + f", others {CAUSAL_ROWS_FLOOR_DEFAULT}"
        alloc.notes.append(CAUSAL_ROWS_WARNING.format(floors=floors))
    if bpw is not None:
        state = spend({str(g.key): [s.group_bits(g.key, len(g.tensors)) for s in LADDER] for g in groups},
                      {str(g.key): [rows_loss(g, s) for s in LADDER] for g in groups}, budget_bits=budget_bits)
        alloc.choices = {str(g.key): _choice(g, LADDER[state[str(g.key)]]) for g in groups}
    else:
        alloc.choices = allocate_rows(groups, trials, th, floor=floor)
    seconds["allocate"] = time.perf_counter() - t1
    _say(log, _allocation_line(alloc, bpw))
    by_key = {str(g.key): g for g in groups}
    raised: list[str] = []

    def check_group(res) -> dict[str, Any] | None:
        if bpw is not None:
            return None
        cos = res.all_cosines()
        med, p5 = th.row_targets(res.plan.regime)
        if np.median(cos) >= med and np.percentile(cos, 5) >= p5:
            return None
        i = _ladder_index(alloc.choices[res.key].setting.name)
        if i == len(LADDER) - 1:  # the top rung cannot be raised further
            return None
        alloc.choices[res.key] = _choice(by_key[res.key], LADDER[i + 1])
        raised.append(f"{res.key}→{LADDER[i + 1].name}")
        return alloc.choices[res.key].setting.options()

    t1 = time.perf_counter()
    result = encode_checkpoint(model, out, group_options=alloc.group_options(), check_group=check_group, **enc_kw)
    seconds["encode"] = time.perf_counter() - t1
    check = _rows_summary(result, th)
    if raised:
        check["raised"] = raised
        _say(log, "raised after the check of the decoded rows: " + ", ".join(raised))
    alloc.checks.append(check)
    _say(log, "check of the decoded rows: " + ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items() if k != "raised"))
    if not check["ok"] and bpw is None:
        failing = ", ".join(check["failing"])
        alloc.notes.append(f"the rows target was not met: {failing} fail gate 1 even at the top rung")
    return result


def _is_causal(model) -> bool:
    """Whether the model's config.json (if it has one) describes a causal LM."""
    try:
        from ..checkpoint.config import family_of_config, find_config, load_config_json

        return family_of_config(load_config_json(find_config(model))) == "causal"
    except (GateError, ImportError):
        return False


def _rows_summary(result: EncodeResult, th) -> dict[str, Any]:
    """Gate 1 per regime over the encoded pack's rows (measured while encoding)."""
    res: dict[str, Any] = {}
    per_regime: dict[str, list[np.ndarray]] = {}
    failing = []
    for gr in result.groups:
        cos = gr.all_cosines()
        per_regime.setdefault(gr.plan.regime, []).append(cos)
        med, p5 = th.row_targets(gr.plan.regime)
        if cos.size and (np.median(cos) < med or np.percentile(cos, 5) < p5):
            failing.append(gr.key)
    ok = not failing
    for regime, parts in per_regime.items():
        cs = np.concatenate(parts)
        if not cs.size:
            continue
        res[f"{regime}_median"] = float(np.median(cs))
        res[f"{regime}_p5"] = float(np.percentile(cs, 5))
        med, p5 = th.row_targets(regime)
        ok &= res[f"{regime}_median"] >= med and res[f"{regime}_p5"] >= p5
    res["ok"] = bool(ok)
    res["failing"] = failing
    return res


def check_pack_output(out, ckpt) -> Path:
    """``out`` checked as the writer checks it (the rounds go to temporary files); its folder is created."""
    out = check_output_file(out, [ckpt.weight_path(f) for f in ckpt.files] + [ckpt.aux_path(a) for a in ckpt.aux_files],
                            what="pack")
    if str(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


__all__ = ["Allocation", "Choice", "TARGETS", "allocate_rows", "check_budget_options", "check_pack_output",
           "encode_rows"]
