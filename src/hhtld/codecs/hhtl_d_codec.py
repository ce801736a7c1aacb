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

from dataclasses import dataclass

import numpy as np

from ..classify.groups import GroupKey
from ..classify.rules import should_use_leaf
from ..errors import CodecError
from ..format import ROUTE_ATTEND_PERCENTILE, ROUTE_SKIP_PERCENTILE, SLOT_L_LANES, CodecId
from .base import Codec, DictParts, EncodedGroup, EncodedTensor, Parts, map_blocks
from .base17 import fold
from .base17_palette import palette_stats
from .hhtl_cache import check_percentiles
from .hhtl_d import HhtlDShared, build_shared, decode_rows17, entry_twigs, heel_basin, pack_entries, residual_fields
from .palette import check_k
from .slot_l import add_stored_leaf, basis_parts, leaf_parts, quantise_leaf
from .svd_basis import SvdBasis


@dataclass
class _DFit:
    key: GroupKey
    shared: HhtlDShared | None

    def decode_parts(self) -> DictParts:
        s = self.shared
        arrays = {"palette17": s.palette.centroids, **(basis_parts(s.basis) if s.basis is not None else {})}
        return DictParts({"cols": s.cols}, arrays)


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

    def fit_group(self, key: GroupKey, sample: np.ndarray, pool=None) -> _DFit:
        """Palette, HIP map, cache, Fisher-z table (representatives: sample rows) and,
        for index-regime roles, the basis of the residuals, all on the sample."""
        o = self.opts
        if sample.shape[0] == 0:
            return _DFit(key, None)
        shared, twig, _ = build_shared(sample, fold(sample), o["k"], o["attend_percentile"], o["skip_percentile"])
        if should_use_leaf(key.role):
            residual = sample - decode_rows17(shared.palette.centroids, twig, shared.cols)  # (m, d)
            shared.basis = SvdBasis.fit(residual, o["leaf_lanes"])
        return _DFit(key, shared)

    def encode_tensor(self, fit: _DFit, rows, pool=None, measure: bool = False) -> EncodedTensor:
        s = fit.shared
        basin = int(heel_basin(fit.key.role))
        unfolded = s.palette.unfolded(s.cols)  # (k, d)

        def one(x, a, b):
            x17 = fold(x)
            twig, dist = s.palette.assign(x17)
            polarity, value = residual_fields(x17, s.palette.centroids[twig])
            entries = pack_entries(basin, s.hip[twig], twig, polarity, value)
            radius, count = palette_stats(twig, dist, s.k)
            coeff = s.basis.project(x - unfolded[twig]) if s.basis is not None else None
            return entries, radius, count, coeff

        blocks = map_blocks(one, rows, pool)
        arrays = {"entry": np.concatenate([b[0] for b in blocks])}
        stats = {"radius": np.max([b[1] for b in blocks], axis=0),
                 "count": np.sum([b[2] for b in blocks], axis=0, dtype=np.uint32)}
        if s.basis is not None:
            arrays.update(leaf_parts(*quantise_leaf(np.concatenate([b[3] for b in blocks]))))
        out = EncodedTensor({}, arrays, stats=stats)
        if measure:
            out.cosines = self.decoded_cosines(fit.decode_parts(), arrays, rows, pool)
        return out

    def finish_group(self, fit: _DFit, stats) -> EncodedGroup:
        s = fit.shared
        out = EncodedGroup(params={"k": 0 if s is None else s.k, "leaf": False})
        if s is None:
            return out
        radius = np.max([t["radius"] for t in stats], axis=0) if stats else np.zeros(s.k, np.uint32)
        count = np.sum([t["count"] for t in stats], axis=0, dtype=np.uint32) if stats else np.zeros(s.k, np.uint32)
        out.params.update({
            "cols": s.cols,
            "leaf": s.basis is not None,
            "basin": heel_basin(fit.key.role).name,
            "route": s.cache.params(),
            "fisher_z_quality": s.quality.to_json(),
            "reconstruction": "unfolded Base17 centroid" + (" + Slot L" if s.basis is not None else ""),
        })
        out.arrays = {
            "palette17": s.palette.centroids,
            "radius": radius,
            "count": count,
            "hip": s.hip,
            "distance": s.cache.distance,
            "route": s.cache.route,
            "fisher_z": s.fisher_z.table,
            "gamma": s.fisher_z.gamma.to_array(),
        }
        if s.basis is not None:
            out.arrays.update(basis_parts(s.basis))
            out.params["basis_energy"] = round(s.basis.energy(), 6)
        return out

    @classmethod
    def decode_rows(cls, group: Parts, tensor: Parts, idx=None) -> np.ndarray:
        sel = slice(None) if idx is None else idx
        cols = int(group.params["cols"])
        twig = entry_twigs(tensor["entry"], sel)  # (m,)
        out = decode_rows17(group["palette17"], twig, cols)  # (m, cols)
        return add_stored_leaf(out, group, tensor, sel)


__all__ = ["HhtlDCodec"]
