"""Gate 1 — row fidelity: cosine of every encoded row, original vs decoded."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from ..checkpoint import Checkpoint
from ..classify.shapes import to_row_matrix
from ..cosine import row_cosines
from ..measure.targets import Thresholds
from ..pack.reader import Pack
from .report import GateResult

# Histogram bins of the JSON report: 400 bins of width 0.005 over [-1, 1].
HIST_EDGES = np.linspace(-1.0, 1.0, 401)
REGIMES = ("argmax", "index")


def cosine_stats(cos: np.ndarray) -> dict[str, Any]:
    """Summary of per-row cosines: ``n``, ``mean``, ``median``, ``p5`` (5th
    percentile, linear interpolation), ``min``, ``max`` and ``hist`` (counts
    over :data:`HIST_EDGES`). All None / zeros for an empty array."""
    cos = np.asarray(cos, dtype=np.float64)
    if cos.size == 0:
        return {"n": 0, "mean": None, "median": None, "p5": None, "min": None, "max": None,
                "hist": [0] * (len(HIST_EDGES) - 1)}
    hist, _ = np.histogram(cos, bins=HIST_EDGES)
    return {
        "n": int(cos.size),
        "mean": float(cos.mean()),
        "median": float(np.median(cos)),
        "p5": float(np.percentile(cos, 5)),
        "min": float(cos.min()),
        "max": float(cos.max()),
        "hist": hist.astype(int).tolist(),
    }


def original_rows(ckpt: Checkpoint, name: str, info: dict) -> np.ndarray:
    """float32 ``(rows, cols)`` row matrix of checkpoint tensor ``name`` laid out
    as the pack encoded it (manifest ``info``: ``shape``, ``row_shape``,
    ``transposed``)."""
    return to_row_matrix(ckpt.read_float(name), info["shape"], info.get("row_shape") or info["shape"],
                         bool(info.get("transposed")))


def measure_rows(ckpt: Checkpoint, pack: Pack, progress: bool = False,
                 on_decoded: Callable[[str, np.ndarray], None] | None = None) -> dict[str, Any]:
    """Cosine of every encoded row of every tensor of ``pack`` against ``ckpt``.

    Returns ``{"regimes": {regime: stats}, "groups": [...], "tensors": [...],
    "cosines": {regime: float64 array}}``; ``on_decoded(name, rows)`` is called
    with each decoded float32 row matrix (so the caller can reuse it).
    """
    from tqdm import tqdm

    names = pack.encoded_names()
    by_regime: dict[str, list[np.ndarray]] = {r: [] for r in REGIMES}
    by_group: dict[int, list[np.ndarray]] = {}
    tensors = []
    for name in tqdm(names, desc="gate 1: rows", unit="tensor", disable=not progress, leave=False, dynamic_ncols=True):
        info = pack.info(name)
        gi = info["group"]
        regime = pack.groups[gi]["regime"]
        dec = pack.rows(name)
        cos = row_cosines(original_rows(ckpt, name, info), dec)
        if on_decoded is not None:
            on_decoded(name, dec)
        by_regime.setdefault(regime, []).append(cos)
        by_group.setdefault(gi, []).append(cos)
        s = cosine_stats(cos)
        del s["hist"]
        tensors.append({"name": name, "group": gi, "regime": regime, **s})
    groups = []
    for gi, g in enumerate(pack.groups):
        k = g["key"]
        cos = np.concatenate(by_group.get(gi, [np.zeros(0)]))
        groups.append({"index": gi, "key": f"{k['component']}/{k['role']}/{k['shape'][0]}x{k['shape'][1]}",
                       "regime": g["regime"], "codec": g["codec"], "stats": cosine_stats(cos)})
    cosines = {r: np.concatenate(v) if v else np.zeros(0) for r, v in by_regime.items()}
    return {
        "hist_edges": [float(HIST_EDGES[0]), float(HIST_EDGES[-1]), len(HIST_EDGES) - 1],
        "regimes": {r: cosine_stats(c) for r, c in cosines.items()},
        "groups": groups,
        "tensors": tensors,
        "cosines": cosines,
    }


def gate_row_fidelity(rows: dict[str, Any], th: Thresholds) -> GateResult:
    """Gate 1: for every regime with encoded rows, median ≥ target and p5 ≥ target."""
    values, targets, measured = [], [], {}
    passed = True
    for regime, s in rows["regimes"].items():
        med_t, p5_t = th.row_targets(regime)
        if s["n"] == 0:
            continue
        ok = s["median"] >= med_t and s["p5"] >= p5_t
        passed &= ok
        values.append(f"{regime} med {s['median']:.3f} p5 {s['p5']:.3f}")
        targets.append(f"{regime} med>={med_t:g} p5>={p5_t:g}")
        measured[regime] = {"n": s["n"], "median": s["median"], "p5": s["p5"], "min": s["min"], "mean": s["mean"],
                            "target_median": med_t, "target_p5": p5_t, "passed": bool(ok)}
    note = ""
    if not values:
        note = "the pack encodes no rows (every tensor is passthrough, byte for byte): nothing can drift"
        values, targets = ["no encoded rows"], ["-"]
    return GateResult(1, "; ".join(values), "; ".join(targets), bool(passed), measured, note)


def worst(tensors: Iterable[dict], n: int = 5) -> list[dict]:
    """The ``n`` tensors with the lowest median row cosine."""
    return sorted(tensors, key=lambda t: t["median"])[:n]
