"""``--codec hhtl-f32``: the reconstruction-grade reference codec in the pack.

Group parts: palette (k, d) bf16, radius (k,) f32, count (k,) u32,
fisher_z (k, k) i8, gamma (2,) f32; index regime also basis (8, d) bf16 and
singular (r,) f32. Tensor parts: twig (n,) u8; index regime leaf (n, 8) i8
and leaf_scale (1,) f32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..classify.groups import GroupKey
from ..classify.rules import should_use_leaf
from ..errors import CodecError
from ..format import SLOT_L_LANES, CodecId
from .base import Codec, EncodedGroup, EncodedTensor, Parts
from .group import build_group_with_leaf
from .palette import check_k, to_bf16
from .slot_l import add_stored_leaf, basis_parts, leaf_parts


class HhtlF32Codec(Codec):
    name = "hhtl-f32"
    codec_id = CodecId.HHTL_F32
    defaults = {"k": 256, "leaf_lanes": SLOT_L_LANES}

    def validate(self) -> None:
        check_k(self.opts["k"])
        lanes = self.opts["leaf_lanes"]
        if not isinstance(lanes, int) or not 1 <= lanes <= 64:
            raise CodecError(f"codec {self.name}: leaf_lanes={lanes} is out of range (1..64)")

    def encode_group(self, key: GroupKey, names: Sequence[str], rows: Sequence[np.ndarray]) -> EncodedGroup:
        g = build_group_with_leaf(key, names, rows, self.opts["k"], self.opts["leaf_lanes"])
        out = EncodedGroup(params={"k": g.palette.k if g.palette else 0, "leaf": g.basis is not None})
        if g.is_empty:
            return out
        out.arrays = {
            "palette": to_bf16(g.palette.centroids),
            "radius": g.palette.radius,
            "count": g.palette.count,
            "fisher_z": g.fisher_z.table,
            "gamma": g.fisher_z.gamma.to_array(),
        }
        if g.basis is not None:
            out.arrays.update(basis_parts(g.basis))
            out.params["basis_energy"] = round(g.basis.energy(), 6)
        for name in names:
            t = g.tensors[name]
            out.tensors[name] = EncodedTensor({}, {"twig": t.twig, **leaf_parts(t.leaf, t.leaf_scale)})
        return out

    @classmethod
    def decode_rows(cls, group: Parts, tensor: Parts, idx=None) -> np.ndarray:
        sel = slice(None) if idx is None else idx
        palette = np.asarray(group["palette"], dtype=np.float32)  # (k, d)
        twig = np.asarray(tensor["twig"][sel], dtype=np.int64)
        out = palette[twig]
        return add_stored_leaf(out, group, tensor, sel)


__all__ = ["HhtlF32Codec", "should_use_leaf"]
