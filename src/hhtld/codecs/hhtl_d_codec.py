"""``--codec hhtl-d``: the lookup-grade HHTL-D codec in the pack.

Group parts: palette17 (k, 17) i16, radius (k,) u32 (largest L1), count (k,) u32,
hip (k,) u8, distance (k, k) u16, route (k, k) u8, fisher_z (k, k) i8,
gamma (2,) f32; index regime also basis (lanes, d) bf16 (fitted to the
residuals ``row - unfolded centroid``) and singular (r,) f32.
Tensor parts: entry (n, 2) u16 little-endian [slot_d, slot_v] (4 B/row);
index regime leaf (n, lanes) i8 and leaf_scale (1,) f32 (12 B/row with 8 lanes).

Group params (manifest, shown by ``hhtld inspect --json``): k, cols, leaf,
basin, the route thresholds and action mix, and ``fisher_z_quality``
(Spearman ρ and restore error of the table against the exact cosines of the
representative rows). A row decodes to its unfolded Base17 centroid (+ leaf).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..classify.groups import GroupKey
from ..errors import CodecError
from ..format import ROUTE_ATTEND_PERCENTILE, ROUTE_SKIP_PERCENTILE, SLOT_L_LANES, CodecId
from .base import Codec, EncodedGroup, EncodedTensor, Parts
from .hhtl_cache import check_percentiles
from .hhtl_d import build_hhtl_d_group, decode_rows17, entry_twigs
from .slot_l import add_stored_leaf, basis_parts, leaf_parts
from .palette import check_k


class HhtlDCodec(Codec):
    name = "hhtl-d"
    codec_id = CodecId.HHTL_D
    defaults = {"k": 256, "leaf_lanes": SLOT_L_LANES, "attend_percentile": ROUTE_ATTEND_PERCENTILE,
                "skip_percentile": ROUTE_SKIP_PERCENTILE}

    def validate(self) -> None:
        check_k(self.opts["k"])
        lanes = self.opts["leaf_lanes"]
        if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= 64:
            raise CodecError(f"codec {self.name}: leaf_lanes={lanes} is out of range (1..64)")
        check_percentiles(self.opts["attend_percentile"], self.opts["skip_percentile"])

    def encode_group(self, key: GroupKey, names: Sequence[str], rows: Sequence[np.ndarray]) -> EncodedGroup:
        o = self.opts
        g = build_hhtl_d_group(key, names, rows, o["k"], o["leaf_lanes"],
                               attend_percentile=o["attend_percentile"], skip_percentile=o["skip_percentile"])
        out = EncodedGroup(params={"k": 0 if g.shared is None else g.shared.k, "leaf": False})
        if g.is_empty:
            return out
        s = g.shared
        out.params.update({
            "cols": s.cols,
            "leaf": s.basis is not None,
            "basin": g.basin.name,
            "route": s.cache.params(),
            "fisher_z_quality": s.quality.to_json(),
            "reconstruction": "unfolded Base17 centroid" + (" + Slot L" if s.basis is not None else ""),
        })
        out.arrays = {
            "palette17": s.palette.centroids,
            "radius": s.palette.radius,
            "count": s.palette.count,
            "hip": s.hip,
            "distance": s.cache.distance,
            "route": s.cache.route,
            "fisher_z": s.fisher_z.table,
            "gamma": s.fisher_z.gamma.to_array(),
        }
        if s.basis is not None:
            out.arrays.update(basis_parts(s.basis))
            out.params["basis_energy"] = round(s.basis.energy(), 6)
        for name in names:
            t = g.tensors[name]
            out.tensors[name] = EncodedTensor({}, {"entry": t.entries, **leaf_parts(t.leaf, t.leaf_scale)})
        return out

    @classmethod
    def decode_rows(cls, group: Parts, tensor: Parts, idx=None) -> np.ndarray:
        sel = slice(None) if idx is None else idx
        cols = int(group.params["cols"])
        twig = entry_twigs(tensor["entry"], sel)  # (m,)
        out = decode_rows17(group["palette17"], twig, cols)  # (m, cols)
        return add_stored_leaf(out, group, tensor, sel)


__all__ = ["HhtlDCodec"]
