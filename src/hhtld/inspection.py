"""``hhtld inspect``: the group table of a model (dry run) or of a pack."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .checkpoint import open_checkpoint
from .classify import DEFAULT_RULES, EncodablePolicy, RuleTable, plan_checkpoint
from .display import format_table, human_bytes
from .errors import OptionsError
from .format import FORMAT_NAME, META_FORMAT
from .pack.reader import Pack
from .pack.writer import bf16_bytes
from .stfile import FormatProblem, read_header


def is_pack(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    try:
        return read_header(p).metadata.get(META_FORMAT) == FORMAT_NAME
    except (FormatProblem, OSError):
        return p.suffix == ".hhtld"  # let Pack() name the problem


def inspect_model(path, policy: EncodablePolicy = EncodablePolicy(), rules: RuleTable = DEFAULT_RULES) -> dict[str, Any]:
    """Dry run of the grouping: nothing is encoded, only headers are read."""
    ckpt = open_checkpoint(path)
    plan = plan_checkpoint(ckpt, policy, rules)
    groups = [{
        "index": g.index,
        "key": str(g.key),
        "component": g.key.component,
        "role": g.key.role,
        "shape": list(g.key.shape),
        "regime": g.regime,
        "tensors": len(g.tensors),
        "rows": g.n_rows,
        "weights": g.n_weights,
        "bytes": g.nbytes,
    } for g in plan.groups]
    pt = plan.passthrough
    reasons: dict[str, int] = {}
    for t in pt:
        reasons[t.reason] = reasons.get(t.reason, 0) + 1
    return {
        "kind": "model",
        "path": str(path),
        "layout": ckpt.kind,
        "files": ckpt.files,
        "tensors": len(plan.tensors),
        "bytes": ckpt.total_bytes,
        "bf16_bytes": bf16_bytes(ckpt),
        "policy": policy.to_json(),
        "groups": groups,
        "passthrough": {"tensors": len(pt), "bytes": sum(t.nbytes for t in pt), "reasons": reasons},
    }


def inspect_pack(path, check: bool = False) -> dict[str, Any]:
    """The group table of a pack; ``check``: first verify the hash (and values) of
    every stored array, read by a decode or not (:meth:`Pack.verify`)."""
    p = Pack(path)
    checked = p.verify() if check else None
    b = p.byte_breakdown()
    groups = []
    for gi, g in enumerate(p.groups):
        rows, cols = g["key"]["shape"]
        per = b["groups"][gi]
        groups.append({
            "index": gi,
            "key": f"{g['key']['component']}/{g['key']['role']}/{rows}x{cols}",
            "component": g["key"]["component"],
            "role": g["key"]["role"],
            "shape": [rows, cols],
            "regime": g["regime"],
            "codec": g["codec"],
            "params": g["params"],
            "tensors": len(g["tensors"]),
            "rows": rows * len(g["tensors"]),
            "weights": rows * cols * len(g["tensors"]),
            "bytes": sum(per.values()),
            "bytes_by_category": per,
            "bits_per_weight": 8 * sum(per.values()) / max(1, rows * cols * len(g["tensors"])),
        })
    pt = p.passthrough_names()
    return {
        "kind": "pack",
        "path": str(path),
        "format_version": p.version,
        "codec": p.manifest.get("codec"),
        "codec_options": p.manifest.get("codec_options"),
        "source": {k: p.manifest["source"][k] for k in ("kind", "name", "files", "bytes", "bf16_bytes")},
        "tensors": len(p.tensors),
        "file_bytes": b["file_bytes"],
        "bytes_by_category": b["total"],
        "ratio_vs_bf16": p.storage_ratio(),
        "groups": groups,
        "passthrough": {"tensors": len(pt), "bytes": b["total"]["passthrough"]},
        "aux_files": p.aux_files(),
        **({"calibration": p.manifest["calibration"]} if isinstance(p.manifest.get("calibration"), dict) else {}),
        **({"checked_arrays": checked} if check else {}),
    }


def inspect_path(path, policy: EncodablePolicy = EncodablePolicy(), rules: RuleTable = DEFAULT_RULES,
                 check: bool = False) -> dict[str, Any]:
    """The group table of a model (dry run) or of a pack; ``check``: a pack's every
    stored array is verified first (a model has nothing to check: OptionsError)."""
    if is_pack(path) or Path(path).suffix == ".hhtld":
        return inspect_pack(path, check)  # Pack() names the problem: missing, not a pack, damaged
    if check:
        raise OptionsError(f"{path}: --check verifies a .hhtld pack; this is a model")
    return inspect_model(path, policy, rules)


def _setting(params: dict[str, Any]) -> str:
    """The codec setting of a group in a few characters: ladder rung and stages, or palette size."""
    if "stages" in params:
        rung = params.get("setting")
        return f"{rung} ({params['stages']})" if rung else str(params["stages"])
    return f"k={params['k']}" if "k" in params else "-"


def format_inspect(info: dict[str, Any]) -> str:
    out = []
    if info["kind"] == "model":
        out.append(f"{info['path']}: {info['layout']} checkpoint, {info['tensors']} tensors, "
                   f"{human_bytes(info['bytes'])} ({human_bytes(info['bf16_bytes'])} at bf16) — dry run of the grouping")
        rows = [[g["index"], g["key"], g["regime"], g["tensors"], g["rows"], human_bytes(g["bytes"])] for g in info["groups"]]
        out.append(format_table(rows, ["#", "group (component/role/shape)", "regime", "tensors", "rows", "bytes"], {0, 3, 4, 5}))
        p = info["passthrough"]
        why = ", ".join(f"{n} {r}" for r, n in sorted(p["reasons"].items()))
        out.append(f"passthrough: {p['tensors']} tensors, {human_bytes(p['bytes'])}" + (f" ({why})" if why else ""))
    else:
        out.append(f"{info['path']}: hhtld pack v{info['format_version']}, codec {info['codec']}, "
                   f"{info['tensors']} tensors from {info['source']['name']}")
        rows = [[g["index"], g["key"], g["regime"], g["codec"], _setting(g["params"]), g["tensors"], g["rows"],
                 human_bytes(g["bytes"]), f"{g['bits_per_weight']:.3f}"] for g in info["groups"]]
        out.append(format_table(rows, ["#", "group (component/role/shape)", "regime", "codec", "setting", "tensors",
                                       "rows", "bytes", "bits/w"], {0, 5, 6, 7, 8}))
        fzq = [(g["key"], g["params"]["fisher_z_quality"]) for g in info["groups"]
               if g["params"].get("fisher_z_quality") is not None]
        if fzq:
            rows = [[k, "n/a" if q["spearman"] is None else f"{q['spearman']:.5f}", f"{q['mean_abs_error']:.5f}",
                     f"{q['max_abs_error']:.5f}", q["pairs"]] for k, q in fzq]
            out.append("Fisher-z table quality (table cosines vs exact cosines of the representative rows):")
            out.append(format_table(rows, ["group", "spearman", "mean |err|", "max |err|", "pairs"], {1, 2, 3, 4}))
        cats = ", ".join(f"{c} {human_bytes(n)}" for c, n in info["bytes_by_category"].items() if n)
        out.append(f"bytes: {cats}")
        if info.get("calibration"):
            out.append(_calibration_line(info["calibration"]))
        if "checked_arrays" in info:
            out.append(f"check: all {info['checked_arrays']} stored arrays match their hashes and declared values")
        out.append(f"pack {human_bytes(info['file_bytes'])}; source {human_bytes(info['source']['bf16_bytes'])} at bf16 "
                   f"→ ratio {info['ratio_vs_bf16']:.2f}:1 (weights only, side files excluded)")
    return "\n".join(out)


def _calibration_line(cal: dict[str, Any]) -> str:
    """How a calibrated pack was made, in one line: tokens, error feedback, the block step."""
    tokens = cal.get("tokens")
    line = (f"calibrated on {tokens} tokens of {cal.get('texts')} texts" if tokens else "calibrated") + \
        (", error feedback" if cal.get("feedback") else ", no error feedback")
    tune = cal.get("tuning")
    if isinstance(tune, dict):
        parts = "/".join(tune.get("parts") or [])
        line += (f"; block step: the {parts} of {tune.get('blocks_tuned')} of {tune.get('blocks')} blocks tuned to the "
                 f"original blocks' outputs (summed block loss {tune.get('loss_before', 0):.4g} → "
                 f"{tune.get('loss_after', 0):.4g}); norms and biases as in the checkpoint")
    else:
        line += "; no block step"
    return line


def format_plan(info: dict[str, Any]) -> str:
    """An encode plan (:meth:`hhtld.pack.plan.EncodePlan.to_json`) as text: the units per
    kind with their dependency, predicted memory and time, and what each kind does."""
    from .pack.plan import UNIT_KINDS

    units = info["units"]
    sec = info.get("seconds") or {}
    basis = info.get("time_basis") or {}
    rows = []
    for kind, n in info["counts"].items():
        mine = [u for u in units if u["kind"] == kind]
        s = sec.get(kind)
        b = basis.get(kind, {})
        far = b.get("largest_weights", 0) and b.get("planned_largest_weights", 0) > 10 * b["largest_weights"]
        rows.append([kind, n, info["dependencies"][kind], human_bytes(max(u["memory_bytes"] for u in mine)),
                     "not measured yet" if s is None else f"{s:.1f} s",
                     f"{b['measured']} units" + (f" up to {b['largest_weights']:,} weights (extrapolated)" if far
                                                 else "") if b.get("measured") else "-"])
    out = [f"plan of the {info['path']} encode: {len(units)} units, at most {info['width']} independent units at once"]
    out.append(format_table(rows, ["kind", "units", "dependency", "largest (memory)", "predicted time",
                                   "measured here"], {1, 3, 4}))
    total = info.get("total_seconds")
    out.append(f"predicted peak of the arrays held at once: {human_bytes(info['peak_memory_bytes'])} (from array "
               "sizes; the libraries' own memory - torch, numba, faiss - comes on top)")
    out.append("predicted time: " + (
        f"{total:.0f} s (a fixed cost and a cost per weight for each kind of unit, fitted to what earlier encodes "
        "measured on this machine)" if total is not None else "unknown until a unit of every kind has run here"))
    out.append("units: " + "; ".join(f"{k} - {UNIT_KINDS[k][1]}" for k in info["counts"]))
    out.extend(f"note: {n}" for n in info["notes"])
    return "\n".join(out)
