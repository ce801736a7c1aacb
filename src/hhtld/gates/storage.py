"""Gate 3 — storage: the pack against the original stored at bfloat16.

Every byte of the pack file is counted — entries, leaves, palettes, bases,
tables, the safetensors header with the JSON manifest, and passthrough
tensors — except the model folder's side files (config.json, tokenizer
files, ...). Those are carried verbatim so a decoded folder loads again;
they are not weights and are not counted on the original side either (its
size is the checkpoint's tensors with every float tensor at bf16), so they
are left out of both sides of the ratio. This is the same rule as
:meth:`hhtld.pack.Pack.storage_ratio`.
"""

from __future__ import annotations

from typing import Any

from ..display import human_bytes
from ..measure.targets import Thresholds
from ..pack.reader import Pack
from .report import GateResult


def measure_storage(pack: Pack) -> dict[str, Any]:
    """Byte accounting of ``pack``: totals per category, per group, and the ratio."""
    b = pack.byte_breakdown()
    aux = b["total"]["aux_files"]
    counted = b["file_bytes"] - aux
    src = pack.source_bf16_bytes
    groups = []
    n_encoded_weights = 0
    for gi, g in enumerate(pack.groups):
        rows, cols = g["key"]["shape"]
        weights = rows * cols * len(g["tensors"])
        n_encoded_weights += weights
        per = b["groups"][gi]
        total = sum(per.values())
        groups.append({
            "index": gi,
            "key": f"{g['key']['component']}/{g['key']['role']}/{rows}x{cols}",
            "regime": g["regime"],
            "codec": g["codec"],
            "weights": weights,
            "bytes": total,
            "bytes_by_category": per,
            "bits_per_weight": 8 * total / max(1, weights),
        })
    return {
        "file_bytes": b["file_bytes"],
        "aux_bytes": aux,
        "counted_bytes": counted,
        "source_bf16_bytes": src,
        "ratio": src / max(1, counted),
        "total": b["total"],
        # bytes of the file no stored array or header claims (padding, gaps); counted in the ratio
        "unaccounted_bytes": b["file_bytes"] - sum(b["total"].values()),
        "groups": groups,
        "encoded_weights": n_encoded_weights,
        "aux_files": pack.aux_files(),
        "aux_note": _aux_note(pack.aux_files(), aux),
    }


def _aux_note(files: list[str], nbytes: int) -> str:
    if not files:
        return ""
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return (f"{len(files)} side file(s) ({shown}; {human_bytes(nbytes)}) are carried verbatim "
            f"and excluded from both sides of the ratio")


def gate_storage(st: dict[str, Any], th: Thresholds) -> GateResult:
    """Gate 3: original at bf16 / pack (without side files) ≥ ``min_ratio``."""
    value = f"{st['ratio']:.2f}:1 ({human_bytes(st['counted_bytes'])} vs {human_bytes(st['source_bf16_bytes'])} bf16)"
    measured = {k: st[k] for k in ("ratio", "file_bytes", "aux_bytes", "counted_bytes", "source_bf16_bytes")}
    return GateResult(3, value, f">={th.min_ratio:g}:1", st["ratio"] >= th.min_ratio, measured,
                      "side files excluded on both sides" if st["aux_bytes"] else "")
