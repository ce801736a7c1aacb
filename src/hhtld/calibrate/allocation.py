"""Per-tensor rungs from predicted output change (calibrated encode).

For a tensor ``W`` (rows × c) with input Hessian ``H`` the encoder's error
at a rung with relative weight error ``D`` (measured per group on a row
sample, as the data-free allocation does) is nearly white in the rotated,
gain-normalised rows. With error feedback (columns in order, GPTQ/LDLQ) the
output error of row ``i`` per token is then ``D · |w_i|²/c · tr(Λ)/N``,
where ``Λ`` is the diagonal of the LDL factorisation of the rotated, damped
``H`` (``1/U_jj²`` for the Cholesky factor ``U`` of ``H⁻¹``; without
feedback it would be ``tr(H)``) over ``N`` tokens. Weighted by the Fisher
row sums ``R_i = Σ_j F_ij`` of the weights (:mod:`hhtld.calibrate.fisher`)
this predicts the model's output change — mean next-token KL in nats, or
``1 − cos`` of the sentence embedding — as ``a · D`` with
``a = ½ Σ_i R_i |w_i|²/c · tr(Λ)/tr(H)`` (the Fisher of white row errors,
shrunk by what error feedback removes), plus ``½ Σ_v |G_v|² |e_v|²/c``
for a table read by index. The allocation spends bits greedily on the next
rung of the tensor that removes the most predicted change per extra bit,
until the sum meets the goal or the bits run out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..budget.greedy import spend
from ..budget.settings import LADDER, Setting
from ..codecs.vq.quantiser import hadamard_block, rotation_signs
from ..codecs.vq.feedback import DEFAULT_DAMP, inverse_cholesky, rotated_hessian


@dataclass
class TensorStats:
    """What the calibration measured of one tensor: ``row_energy`` |w_i|² (rows,),
    ``output_energy`` tr(W H Wᵀ), ``ldl_trace`` tr(Λ) and ``trace`` tr(H), all
    per calibration token (no Hessian: zeros), and ``sensitivity`` ``a``: the
    predicted output change per unit of relative weight error."""

    name: str
    group: str
    role: str
    rows: int
    cols: int
    row_energy: np.ndarray
    output_energy: float = 0.0
    ldl_trace: float = 0.0
    trace: float = 0.0
    sensitivity: float = 0.0

    def set_sensitivity(self, rows: np.ndarray | None = None, table: float | None = None) -> float:
        """``a`` from the Fisher row sums (rows,) (a row's error spread evenly over its
        columns, shrunk by error feedback by ``tr(Λ)/tr(H)``) and/or the table term."""
        a = 0.0
        if rows is not None:
            fb = self.ldl_trace / self.trace if self.trace > 0 else 1.0
            a += 0.5 * float(np.dot(np.asarray(rows, dtype=np.float64), self.row_energy)) / self.cols * fb
        if table is not None:
            a += 0.5 * float(table)
        self.sensitivity = a
        return a

    def to_json(self) -> dict:
        return {"name": self.name, "group": self.group, "sensitivity": self.sensitivity,
                "output_energy": self.output_energy, "ldl_trace": self.ldl_trace, "trace": self.trace,
                "feedback_factor": self.ldl_trace / self.trace if self.trace > 0 else None}


def tensor_stats(name: str, group: str, role: str, w: np.ndarray, h: np.ndarray | None = None, tokens: int = 0,
                 seed: int = 0, damp: float = DEFAULT_DAMP) -> TensorStats:
    """Stats of row matrix ``w`` (rows, c) float32 and Hessian ``h`` (c, c) summed over ``tokens``."""
    from ..codecs.vq.quantiser import VqModel

    rows, c = w.shape
    wd = w.astype(np.float64)
    st = TensorStats(name, group, role, rows, c, np.einsum("ij,ij->i", wd, wd))
    if h is None:
        return st
    model = VqModel((), c, [], rotation_signs(c, seed), hadamard_block(c), True)
    u = inverse_cholesky(rotated_hessian(h, model), damp)
    n = max(1, tokens)
    st.ldl_trace = float(np.sum(1.0 / np.diag(u) ** 2)) / n
    st.output_energy = float(np.einsum("ij,ij->", wd @ h, wd)) / n
    st.trace = float(np.trace(h)) / n
    return st


def tensor_bits(s: Setting, rows: int, cols: int, role: str) -> int:
    """Stored bits of one tensor's own parts at a rung (palettes are the group's)."""
    return 8 * s.nbytes(1, rows, cols, role)["tensors"]


@dataclass
class TensorChoice:
    name: str
    group: str
    setting: Setting
    bits: int
    weights: int
    predicted: float  # predicted output change at this rung

    def to_json(self) -> dict:
        return {"name": self.name, "group": self.group, "setting": self.setting.name,
                "bpw": round(self.bits / max(1, self.weights), 4), "predicted_error": self.predicted}


@dataclass
class TensorAllocation:
    choices: dict[str, TensorChoice] = field(default_factory=dict)
    goal: float | None = None

    @property
    def bits(self) -> int:
        return sum(c.bits for c in self.choices.values())

    @property
    def weights(self) -> int:
        return sum(c.weights for c in self.choices.values())

    @property
    def predicted(self) -> float:
        return sum(c.predicted for c in self.choices.values())

    def settings_by_group(self) -> dict[str, dict[str, list[str]]]:
        """{group: {rung name: [tensor names]}}, in choice order."""
        out: dict[str, dict[str, list[str]]] = {}
        for c in self.choices.values():
            out.setdefault(c.group, {}).setdefault(c.setting.name, []).append(c.name)
        return out


def allocate(stats: list[TensorStats], rel_mse: dict[str, dict[str, float]], goal: float | None = None,
             budget_bits: float | None = None, floor: dict[str, int] | None = None,
             tie: Callable[[str], str] | None = None) -> TensorAllocation:
    """Per-tensor rungs (:func:`hhtld.budget.greedy.spend`): ``rel_mse[group][rung]`` is
    the group's relative weight error at each rung; stop when the predicted total
    change is at most ``goal`` or when the next step would pass ``budget_bits``.
    ``floor``: the lowest rung index per role. ``tie(name)``: the unit a tensor is
    allocated with (tensors of one group and one unit get one rung, their bits and
    losses summed; ``RuleTable.tie``); default each tensor alone."""
    group = {st.name: st.group for st in stats}
    unit = {}
    for st in stats:
        other = tie(st.name) if tie else st.name
        unit[st.name] = other if group.get(other) == st.group else st.name  # a partner in another group: alone
    bits: dict[str, list[int]] = {}
    loss: dict[str, list[float]] = {}
    start: dict[str, int] = {}
    for st in stats:
        u = unit[st.name]
        b = [tensor_bits(s, st.rows, st.cols, st.role) for s in LADDER]
        e = [st.sensitivity * rel_mse[st.group][s.name] for s in LADDER]
        bits[u] = [x + y for x, y in zip(bits[u], b)] if u in bits else b
        loss[u] = [x + y for x, y in zip(loss[u], e)] if u in loss else e
        start[u] = max(start.get(u, 0), (floor or {}).get(st.role, 0))
    idx = spend(bits, loss, start, goal=goal, budget_bits=budget_bits)
    out = TensorAllocation(goal=goal)
    for st in stats:
        i = idx[unit[st.name]]
        out.choices[st.name] = TensorChoice(st.name, st.group, LADDER[i], tensor_bits(LADDER[i], st.rows, st.cols,
                                                                                    st.role), st.rows * st.cols,
                                            st.sensitivity * rel_mse[st.group][LADDER[i].name])
    return out


__all__ = ["TensorAllocation", "TensorChoice", "TensorStats", "allocate", "tensor_bits", "tensor_stats"]
