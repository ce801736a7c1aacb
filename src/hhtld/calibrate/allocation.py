"""Per-tensor rungs from predicted output error (calibrated encode).

For a tensor ``W`` (rows × c) with input Hessian ``H`` the encoder's error
at a rung with relative weight error ``D`` (measured per group on a row
sample, as the data-free allocation does) is nearly white in the rotated,
gain-normalised rows. With error feedback (columns in order, GPTQ/LDLQ) its
output error is then ``D · |W|²/c · tr(Λ)``, where ``Λ`` is the diagonal of
the LDL factorisation of the rotated, damped ``H`` (``1/U_jj²`` for the
Cholesky factor ``U`` of ``H⁻¹``); without feedback it would be
``D · |W|²/c · tr(H)``. Divided by the layer's output energy
``tr(W H Wᵀ)`` this is the layer's relative output error ``ε(D)``, which
the allocation spends bits on: greedily, the next rung of the tensor that
removes the most ``ε`` per extra bit, until the sum meets the goal or the
bits run out.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from ..budget.settings import LADDER, Setting
from ..codecs.hhtl_vq_codec import stored_bytes
from ..codecs.vq import hadamard_block, rotation_signs
from ..codecs.vq_feedback import DEFAULT_DAMP, inverse_cholesky, rotated_hessian


@dataclass
class TensorStats:
    """What the calibration measured of one tensor: ``weight_energy`` |W|²,
    ``output_energy`` tr(W H Wᵀ) / tokens, ``ldl_trace`` tr(Λ) / tokens and
    ``trace`` tr(H) / tokens (per calibration token), its shape and group."""

    name: str
    group: str
    role: str
    rows: int
    cols: int
    weight_energy: float
    output_energy: float
    ldl_trace: float
    trace: float

    def gain(self) -> float:
        """Output error per unit of relative weight error, relative to the output energy."""
        if self.output_energy <= 0:
            return 0.0
        return self.weight_energy / self.cols * self.ldl_trace / self.output_energy

    def to_json(self) -> dict:
        return {"name": self.name, "group": self.group, "weight_energy": self.weight_energy,
                "output_energy": self.output_energy, "ldl_trace": self.ldl_trace, "trace": self.trace,
                "feedback_factor": self.ldl_trace / self.trace if self.trace > 0 else None}


def tensor_stats(name: str, group: str, role: str, w: np.ndarray, h: np.ndarray, tokens: int, seed: int = 0,
                 damp: float = DEFAULT_DAMP) -> TensorStats:
    """Stats of row matrix ``w`` (rows, c) float32 and Hessian ``h`` (c, c) summed over ``tokens``."""
    from ..codecs.vq import VqModel

    rows, c = w.shape
    model = VqModel((), c, [], rotation_signs(c, seed), hadamard_block(c), True)
    u = inverse_cholesky(rotated_hessian(h, model), damp)
    ldl = float(np.sum(1.0 / np.diag(u) ** 2))
    wd = w.astype(np.float64)
    out = float(np.einsum("ij,ij->", wd @ h, wd))
    n = max(1, tokens)
    return TensorStats(name, group, role, rows, c, float(np.sum(wd * wd)), out / n, ldl / n, float(np.trace(h)) / n)


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
    predicted: float  # relative output error ε at this rung

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
             budget_bits: float | None = None, floor: dict[str, int] | None = None) -> TensorAllocation:
    """Greedy per-tensor rungs: ``rel_mse[group][rung]`` is the group's relative
    weight error at each rung; stop when the predicted sum of ``ε`` is at most
    ``goal`` or when the next step would pass ``budget_bits``. ``floor``: the
    lowest rung index per role."""
    floor = floor or {}
    idx = {}
    bits = {}
    eps = {}
    for st in stats:
        lo = floor.get(st.role, 0)
        idx[st.name] = lo
        bits[st.name] = [tensor_bits(s, st.rows, st.cols, st.role) for s in LADDER]
        eps[st.name] = [st.gain() * rel_mse[st.group][s.name] for s in LADDER]
    by_name = {st.name: st for st in stats}
    used = sum(bits[n][i] for n, i in idx.items())
    total = sum(eps[n][i] for n, i in idx.items())

    def best_step(n: str):
        i = idx[n]
        best = None
        for j in range(i + 1, min(len(LADDER), i + 4)):  # look a few rungs ahead (rates are not convex)
            db = bits[n][j] - bits[n][i]
            de = eps[n][i] - eps[n][j]
            if db > 0 and de > 0 and (best is None or de / db > best[0]):
                best = (de / db, j, db, de)
        return best

    heap = []
    for n in idx:
        b = best_step(n)
        if b is not None:
            heapq.heappush(heap, (-b[0], n, b[1], idx[n]))
    while heap and (goal is None or total > goal):
        _, n, j, at = heapq.heappop(heap)
        if idx[n] != at:  # stale entry
            continue
        db = bits[n][j] - bits[n][at]
        if budget_bits is not None and used + db > budget_bits:
            continue
        total -= eps[n][at] - eps[n][j]
        used += db
        idx[n] = j
        b = best_step(n)
        if b is not None:
            heapq.heappush(heap, (-b[0], n, b[1], j))
    out = TensorAllocation(goal=goal)
    for n, i in idx.items():
        st = by_name[n]
        out.choices[n] = TensorChoice(n, st.group, LADDER[i], bits[n][i], st.rows * st.cols, eps[n][i])
    return out


__all__ = ["TensorAllocation", "TensorChoice", "TensorStats", "allocate", "tensor_bits", "tensor_stats"]
