"""Gate results and the verify report: terminal table and JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..display import format_table, human_bytes

GATE_NAMES = {1: "row fidelity", 2: "behaviour parity", 3: "storage", 4: "output agreement"}


@dataclass
class GateResult:
    """One gate: a human ``value`` and ``target``, ``passed``, and the numbers
    behind them in ``measured`` (JSON-ready)."""

    gate: int
    value: str
    target: str
    passed: bool
    measured: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def name(self) -> str:
        return GATE_NAMES[self.gate]

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.gate, "name": self.name, "value": self.value, "target": self.target,
                "status": "PASS" if self.passed else "FAIL", "passed": self.passed,
                "measured": self.measured, "note": self.note}


@dataclass
class VerifyReport:
    """Everything ``verify`` measured. ``row_cosines`` (regime → float64
    per-row cosines of every encoded row) feeds the plots and stays out of the
    JSON, which carries percentiles and histograms instead."""

    model: str
    pack: str
    config: str
    family: str
    gates: list[GateResult]
    rows: dict[str, Any]
    storage: dict[str, Any]
    behaviour: dict[str, Any]
    thresholds: dict[str, float]
    seconds: float
    timings: dict[str, float]
    row_cosines: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def gate(self, n: int) -> GateResult:
        return next(g for g in self.gates if g.gate == n)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "pack": self.pack, "config": self.config, "family": self.family,
            "passed": self.passed,
            "gates": [g.to_json() for g in self.gates],
            "thresholds": self.thresholds,
            "rows": self.rows,
            "storage": self.storage,
            "behaviour": self.behaviour,
            "seconds": self.seconds,
            "timings": self.timings,
        }

    def format(self, details: bool = True) -> str:
        """The terminal report: a per-group row-fidelity table and byte table
        (``details``), then one line per gate with value, target and PASS/FAIL."""
        out = [f"verify {self.pack} against {self.model} ({self.family} model, "
               f"{self.behaviour.get('n_texts', 0)} held-out texts)"]
        if details and self.rows.get("groups"):
            rows = []
            for g in self.rows["groups"]:
                s = g["stats"]
                rows.append([g["key"], g["regime"], s["n"], f"{s['median']:.4f}", f"{s['p5']:.4f}",
                             f"{s['min']:.4f}", f"{s['mean']:.4f}"])
            out += ["", "row cosine per group (original vs decoded):",
                    format_table(rows, ["group", "regime", "rows", "median", "p5", "min", "mean"], {2, 3, 4, 5, 6})]
        if details and self.storage.get("groups"):
            rows = [[g["key"], g["codec"], human_bytes(g["bytes"]), f"{g['bits_per_weight']:.2f}"]
                    for g in self.storage["groups"]]
            t = self.storage["total"]
            rows.append(["(passthrough tensors)", "-", human_bytes(t["passthrough"]), "-"])
            rows.append(["(header + manifest)", "-", human_bytes(t["manifest"]), "-"])
            out += ["", "bytes per group:", format_table(rows, ["group", "codec", "bytes", "bits/weight"], {2, 3})]
            if self.storage.get("aux_bytes"):
                out.append(self.storage["aux_note"])
        kinds = self.behaviour.get("kinds")
        if kinds and self.family == "embedding":
            rows = [[k, v["texts"], f"{100 * v['top1']:.1f}%", f"{100 * v['top10']:.1f}%", f"{v['cos_mean']:.4f}",
                     f"{v['cos_min']:.4f}"] for k, v in kinds.items()]
            out += ["", "per kind of held-out text (gates 2 and 4 hold on the worst):",
                    format_table(rows, ["kind", "texts", "top-1", "top-10", "cos mean", "cos min"], {1, 2, 3, 4, 5})]
        elif kinds:
            rows = [[k, v["texts"], v["positions"], f"{v['kl_mean']:.4f}", f"{v['kl_p99']:.4f}", f"{v['ppl_ratio']:.4f}",
                     f"{100 * v['top1']:.1f}%"] for k, v in kinds.items()]
            out += ["", "per kind of held-out text (gates 2 and 4 hold on the worst):",
                    format_table(rows, ["kind", "texts", "positions", "KL mean", "KL p99", "ppl ratio", "top-1"],
                                 {1, 2, 3, 4, 5, 6})]
        table = [[f"{g.gate} {g.name}", g.value, g.target, "PASS" if g.passed else "FAIL"] for g in self.gates]
        out += ["", format_table(table, ["gate", "value", "target", "result"])]
        for g in self.gates:
            if g.note:
                out.append(f"  gate {g.gate}: {g.note}")
        verdict = "all gates PASS" if self.passed else \
            f"{sum(not g.passed for g in self.gates)} of {len(self.gates)} gates FAIL"
        out.append(f"{verdict} ({self.seconds:.1f} s)")
        return "\n".join(out)
