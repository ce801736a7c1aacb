"""The ladder of hhtl-vq settings and their exact bits per weight (docs/design.md §2).

A rung is a set of codec options; its rate for a given group is exact: every
stored byte of the group (palettes, rotation signs, basis) and of its tensors
(twigs, gains, leaf) — see :func:`hhtld.codecs.vq.codec.stored_bytes`.
Only the pack's safetensors header and JSON manifest are not counted here
(they are counted in the whole-file ratio of ``Pack.storage_ratio``).

Nominal rates (384 columns, gain included): a stage of segments of width w
with k = 256 costs 8/w bits per weight; ``"4,3"`` alternates widths (8 bits
per 3.5 weights); ``"2+4"`` is a residual stage of 4-wide segments on top of
2-wide ones. The per-row bf16 gain costs 16 / n_cols bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..classify.groups import GroupKey
from ..classify.rules import should_use_leaf
from ..codecs.vq.codec import stored_bytes
from ..errors import OptionsError


@dataclass(frozen=True)
class Setting:
    name: str
    stages: str
    gain: bool = True
    rotate: bool = True
    leaf_lanes: int = 0

    def options(self) -> dict[str, Any]:
        return {"stages": self.stages, "gain": self.gain, "rotate": self.rotate,
                "leaf_lanes": self.leaf_lanes, "setting": self.name}

    def nbytes(self, n_tensors: int, n_rows: int, n_cols: int, role: str = "other") -> dict[str, int]:
        return stored_bytes(self.stages, n_tensors, n_rows, n_cols, gain=self.gain, rotate=self.rotate,
                            leaf_lanes=self.leaf_lanes, index_regime=should_use_leaf(role))

    def bits(self, n_tensors: int, n_rows: int, n_cols: int, role: str = "other") -> int:
        """Exact stored bits of a group of ``n_tensors`` tensors of ``n_rows x n_cols``."""
        return 8 * self.nbytes(n_tensors, n_rows, n_cols, role)["total"]

    def bpw(self, n_tensors: int, n_rows: int, n_cols: int, role: str = "other") -> float:
        b = self.nbytes(n_tensors, n_rows, n_cols, role)
        return 8.0 * b["total"] / max(1, b["weights"])

    def group_bits(self, key: GroupKey, n_tensors: int) -> int:
        return self.bits(n_tensors, key.shape[0], key.shape[1], key.role)


# Cheapest first. Names carry the nominal bits per weight of the twigs.
LADDER: tuple[Setting, ...] = (
    Setting("vq1.0", "8"),
    Setting("vq1.6", "5"),
    Setting("vq2.0", "4"),
    Setting("vq2.1", "4,4,4,3"),
    Setting("vq2.3", "4,3"),
    Setting("vq2.7", "3"),
    Setting("vq2.9", "3,3,3,2"),
    Setting("vq3.2", "3,2"),
    Setting("vq4.0", "2"),
    Setting("vq4.5", "2+16"),
    Setting("vq5.0", "2+8"),
    Setting("vq5.3", "2+6"),
    Setting("vq6.0", "2+4"),
    Setting("vq6.7", "2+3"),
    Setting("vq8.0", "2+2"),
    Setting("vq10", "2+2+4"),
)
BY_NAME = {s.name: s for s in LADDER}


def setting(name: str) -> Setting:
    try:
        return BY_NAME[name]
    except KeyError:
        raise OptionsError(f"unknown setting '{name}' (known: {', '.join(BY_NAME)})") from None


__all__ = ["BY_NAME", "LADDER", "Setting", "setting"]
