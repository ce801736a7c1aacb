"""The encode as a plan: units of work, what each reads and writes, and how they depend.

An encode is a list of :class:`Unit` s. Each has a ``kind`` (:data:`UNIT_KINDS`), the
units whose outputs it reads (``after``), the weights it touches and its predicted
memory. Two kinds of dependency exist, and only two:

* **chain** — the unit reads what the unit before it of the same chain produced: the
  calibrated analysis runs the original model block by block (block ``i`` reads block
  ``i − 1``'s outputs); the Fisher pass runs the blocks backwards. A chain runs one
  unit at a time, in order.
* **independent** — the unit reads only finished inputs (its group's fit, its
  Hessian, the checkpoint) and may run beside any other independent unit: the rung
  trials of every group, the fit of each group (at each rung), the encode of each
  tensor. The local executor runs the tensor encodes side by side on its workers
  (:data:`SIDE_BY_SIDE`) while their predicted memory fits, and the fits (each
  spreading its k-means over the workers) and trials one at a time; it takes results
  in plan order, so the pack's bytes never depend on how many ran at once.

Writes (a tensor's arrays, a group's shared arrays and manifest entry, passthrough
tensors, the manifest) are done by the executor itself, in plan order, as results
arrive (:mod:`hhtld.pack.executor`). The calibrated path's check runs the model on
the written pack; a second round, when the first misses its target, is planned after
that check (its allocation depends on it), and its tensors whose rung did not change
are the first round's units, not encoded again.

Predictions (``hhtld inspect MODEL --plan``): memory from the arrays each unit holds
at once (:func:`unit_memory`; the libraries' own memory — torch, numba, faiss — is not
counted), time from a line fitted to what units of the same kind (and setting) took on
this machine (:class:`UnitTimings`), or none before a unit of that kind has run here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_write_bytes

# kind -> (dependency, what the unit does)
UNIT_KINDS: dict[str, tuple[str, str]] = {
    "analyse": ("chain", "run one block of the original model on the calibration batches; the Hessians of its "
                         "linear layers' inputs and its tensors' statistics"),
    "fisher": ("chain", "the Fisher pass: the blocks backwards on a few calibration batches; every tensor's "
                        "sensitivity"),
    "trials": ("independent", "encode a group's row sample at every rung of the ladder (relative error per rung)"),
    "fit": ("independent", "train a group's shared parts (palettes, leaf basis) at one setting on its row sample"),
    "encode": ("independent", "encode one tensor against its group's fit (with error feedback against its Hessian "
                              "on the calibrated path); its arrays are written in plan order"),
    "tune": ("chain", "the block step: tune one block's row gains so that the block run with its decoded weights "
                      "gives the original block's outputs (codes fixed; its inputs from the tuned blocks before it)"),
    "distil": ("chain", "the global step: tune every tensor's row gains so that the whole model with its decoded "
                        "weights gives the original's outputs on the calibration texts"),
    "finish": ("chain", "write a group's shared arrays and its manifest entry (after its tensors)"),
    "manifest": ("chain", "copy the tensors that are not encoded byte for byte, the side files, the manifest; the "
                          "reader's checks of every array; the rename over the target"),
    "check": ("chain", "run the original model and the written pack on the check texts (calibrated path)"),
}
# Kinds the local executor runs side by side (at most ``width`` at once); the others run one at
# a time, their own work spread over the workers (a fit's k-means, the analysis's torch).
SIDE_BY_SIDE = ("encode",)
BLOCK_RE = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")
FLOAT32 = 4
FLOAT64 = 8


@dataclass(frozen=True)
class Unit:
    """One unit of an encode plan (module docstring). ``name`` is unique within its
    kind; ``after`` lists the ids (``kind:name``) of the units it reads; ``memory`` is
    the predicted bytes it holds at once."""

    kind: str
    name: str
    after: tuple[str, ...] = ()
    weights: int = 0
    memory: int = 0
    setting: str = ""

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def chain(self) -> bool:
        return UNIT_KINDS[self.kind][0] == "chain"

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "kind": self.kind, "dependency": UNIT_KINDS[self.kind][0], "after": list(self.after),
               "weights": self.weights, "memory_bytes": self.memory}
        if self.setting:
            out["setting"] = self.setting
        return out


@dataclass
class EncodePlan:
    """The units of one encode, in the order their results are written. ``path``: the
    encode's path (calibrated, rows, fixed); ``width``: how many independent units run at
    once; ``notes``: what the plan cannot say before it runs."""

    path: str
    units: list[Unit]
    width: int = 1
    notes: list[str] = field(default_factory=list)
    _index: dict[str, Unit] = field(default_factory=dict, repr=False)

    def unit(self, uid: str) -> Unit:
        if len(self._index) != len(self.units):
            self._index = {u.id: u for u in self.units}
        return self._index[uid]

    def group_units(self, g) -> tuple[Unit, list[Unit], Unit]:
        """A data-free group's fit, tensor encodes and finish."""
        key = str(g.key)
        return self.unit(f"fit:{key}"), [self.unit(f"encode:{t.name}") for t in g.tensors], self.unit(f"finish:{key}")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in self.units:
            out[u.kind] = out.get(u.kind, 0) + 1
        return out

    def peak_memory(self) -> int:
        """Predicted arrays held at once: the largest unit, or the largest ``width``
        tensor encodes side by side."""
        best = max((u.memory for u in self.units), default=0)
        mems = sorted((u.memory for u in self.units if u.kind in SIDE_BY_SIDE), reverse=True)
        return max(best, sum(mems[: self.width]))

    def seconds(self, timings: "UnitTimings") -> dict[str, float | None]:
        """Predicted seconds per kind (None: no unit of that kind measured here yet), the
        tensor encodes divided among ``width`` workers."""
        out: dict[str, float | None] = {}
        for kind in self.counts():
            total = 0.0
            for u in self.units:
                if u.kind != kind:
                    continue
                s = timings.predict(u)
                if s is None:
                    total = None
                    break
                total += s
            out[kind] = None if total is None else total / (self.width if kind in SIDE_BY_SIDE else 1)
        return out

    def to_json(self, timings: "UnitTimings | None" = None) -> dict[str, Any]:
        out = {"path": self.path, "width": self.width, "units": [u.to_json() for u in self.units],
               "counts": self.counts(), "peak_memory_bytes": self.peak_memory(), "notes": list(self.notes),
               "dependencies": {k: v[0] for k, v in UNIT_KINDS.items() if k in self.counts()}}
        if timings is not None:
            sec = self.seconds(timings)
            out["seconds"] = sec
            out["total_seconds"] = None if any(v is None for v in sec.values()) else sum(sec.values())
            basis = {}
            for kind in self.counts():
                big = max((u for u in self.units if u.kind == kind), key=lambda u: u.weights)
                b = timings.basis(big)
                b["planned_largest_weights"] = big.weights
                basis[kind] = b
            out["time_basis"] = basis
        return out


# -- predicted memory ---------------------------------------------------------------------------
def unit_memory(kind: str, rows: int = 0, cols: int = 0, sample_rows: int = 0, hessian: bool = False) -> int:
    """Bytes a unit holds at once, from its arrays: ``fit`` the float32 sample and two
    working copies (rotated, residual); ``encode`` the tensor's float32 rows, a residual of
    the same size and, with error feedback, what is held while its Hessian is factored:
    the Hessian as read and rotated in place (float32), LAPACK's copy and the inverse
    (float64); ``trials`` as ``fit``; ``passthrough`` nothing (memory-mapped)."""
    if kind in ("fit", "trials"):
        return 3 * sample_rows * cols * FLOAT32
    if kind == "encode":
        return 2 * rows * cols * FLOAT32 + ((FLOAT32 + 2 * FLOAT64) * cols * cols if hessian else 0)
    return 0


def block_of(name: str) -> int | None:
    """The block (layer) index in a tensor name (``model.layers.3.mlp…`` → 3), or None."""
    m = BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


# -- measured time -------------------------------------------------------------------------------
def timings_path() -> Path:
    """Where measured unit times are kept: ``$HHTLD_CACHE`` or the user's cache folder."""
    root = os.environ.get("HHTLD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hhtld")
    return Path(root) / "unit-seconds.json"


class UnitTimings:
    """Seconds of the units that ran on this machine, by kind and setting: the last
    :data:`KEEP` ``(weights, seconds)`` pairs of each. A unit's time is predicted by a
    least-squares line ``seconds = a + b · weights`` through the pairs of its kind and
    setting (or of its kind, when its setting has not run here), ``a, b ≥ 0``: a fixed
    cost per unit and a cost per weight; a unit far larger than any measured one is an
    extrapolation (:meth:`basis` says how far)."""

    KEEP = 500

    def __init__(self, data: dict[str, list[list[float]]] | None = None):
        self.data = dict(data or {})
        self._new: dict[str, list[list[float]]] = {}

    @classmethod
    def load(cls, path: Path | None = None) -> "UnitTimings":
        p = path or timings_path()
        try:
            raw = json.loads(p.read_text())
        except (OSError, ValueError):
            return cls()
        data: dict[str, list[list[float]]] = {}
        for k, v in (raw.items() if isinstance(raw, dict) else ()):
            for x in v if isinstance(v, list) else ():
                try:
                    pair = [float(x[0]), float(x[1])]
                except (TypeError, ValueError, IndexError, KeyError):
                    continue  # a damaged entry of a cache: skipped
                if len(x) == 2 and all(np.isfinite(pair)) and min(pair) >= 0:
                    data.setdefault(str(k), []).append(pair)
        return cls(data)

    @staticmethod
    def keys(u: Unit) -> list[str]:
        """Most specific first: ``encode/feedback vq4.0``, ``encode/feedback``, ``encode``."""
        words = u.setting.split()
        return [f"{u.kind}/{' '.join(words[:n])}" for n in range(len(words), 0, -1)] + [u.kind]

    def add(self, u: Unit, seconds: float) -> None:
        for k in self.keys(u):
            self._new.setdefault(k, []).append([float(u.weights), float(seconds)])

    def _pairs(self, u: Unit) -> list[list[float]]:
        for k in self.keys(u):
            if self.data.get(k):
                return self.data[k]
        return []

    def predict(self, u: Unit) -> float | None:
        pairs = self._pairs(u)
        if not pairs:
            return None
        w = np.array([p[0] for p in pairs])
        s = np.array([p[1] for p in pairs])
        if np.ptp(w) > 0:
            b, a = np.polyfit(w, s, 1)
            if a >= 0 and b >= 0:
                return float(a + b * u.weights)
        if w.max() > 0 and u.weights > 0:  # one size measured: proportional to the weights
            return float(np.median(s / np.maximum(w, 1)) * u.weights)
        return float(np.median(s))

    def basis(self, u: Unit) -> dict[str, Any]:
        """How a prediction was made: the measured units and their largest size."""
        pairs = self._pairs(u)
        return {"measured": len(pairs), "largest_weights": int(max((p[0] for p in pairs), default=0))}

    def save(self, path: Path | None = None) -> None:
        """Merge this run's measurements into the file (best effort: a cache)."""
        if not self._new:
            return
        p = path or timings_path()
        merged = UnitTimings.load(p).data
        for k, v in self._new.items():
            merged[k] = (merged.get(k, []) + v)[-self.KEEP:]
        try:
            atomic_write_bytes(p, json.dumps(merged, sort_keys=True).encode("utf-8"))
        except Exception:  # noqa: BLE001 - a cache: never the reason an encode fails
            pass
        self._new = {}


__all__ = ["EncodePlan", "UNIT_KINDS", "Unit", "UnitTimings", "block_of", "timings_path", "unit_memory"]
