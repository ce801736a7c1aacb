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
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from ...classify.groups import GroupKey
from ...classify.rules import should_use_leaf
from ...errors import CodecError
from ...format import (
    BASE17_DIMS,
    BASE17_SCALE,
    HIP_FAMILIES,
    MAX_PALETTE_K,
    ROUTE_ATTEND_PERCENTILE,
    ROUTE_SKIP_PERCENTILE,
    SLOT_D_BASIN_MASK,
    SLOT_D_BASIN_SHIFT,
    SLOT_D_TWIG_MASK,
    SLOT_D_TWIG_SHIFT,
    SLOT_L_LANES,
    CodecId,
    HeelBasin,
    RouteAction,
)
from ..base import Codec, DictParts, EncodedGroup, EncodedTensor, Parts, map_blocks, source_where
from .base17_fold import MAX_FOLD_MEAN, fold, fold_from_means, fold_means
from .base17_palette import palette_stats
from .route_cache import check_percentiles
from .hhtl_d_tensor import HhtlDShared, build_shared, decode_rows17, entry_twigs, heel_basin, pack_entries, residual_fields
from ..layout import Count, LayoutProblem, PartSpec, Params, Stored, StoredLayout, below, finite, leaf_parts_layout
from .palette import check_k
from .slot_l import add_stored_leaf, basis_parts, check_leaf_lanes, leaf_parts, quantise_leaf
from .svd_basis import SvdBasis


@dataclass
class _DFit:
    key: GroupKey
    shared: HhtlDShared | None

    def decode_parts(self) -> DictParts:
        s = self.shared
        arrays = {"palette17": s.palette.centroids, **(basis_parts(s.basis) if s.basis is not None else {})}
        return DictParts({"cols": s.cols}, arrays)


class FisherZQualityParams(Params):
    """What ``hhtld inspect`` shows of a group's Fisher-z table."""

    spearman: float | None
    mean_abs_error: float
    max_abs_error: float
    pairs: Count


class HhtlDParams(Params):
    """Group params: palette size ``k``, row width ``cols``, leaf, heel basin; the
    rest is what the encoder measured (route thresholds and mix, Fisher-z quality)."""

    k: Annotated[int, Field(ge=1, le=MAX_PALETTE_K)]
    leaf: bool
    cols: Count
    basin: Literal["QK", "V", "Gate", "FFN"] | None = None
    route: dict[str, Any] | None = None
    fisher_z_quality: FisherZQualityParams | None = None
    reconstruction: str | None = None
    basis_energy: float | None = None


def _entries_check(k: int, basin: str | None):
    """Entries (n, 2) u16: twig bits inside the palette, reserved bit 0, the group's basin."""

    def check(a: np.ndarray) -> str | None:
        if not a.size:
            return None
        d = np.asarray(a[:, 0])
        twig = (d >> SLOT_D_TWIG_SHIFT) & SLOT_D_TWIG_MASK
        if int(twig.max()) >= k:
            return f"holds twig {int(twig.max())}, but its palette has {k} rows"
        if (d & 1).any():
            return "has the reserved bit 0 of slot_d set"
        if basin is not None:
            want = int(HeelBasin[basin])
            got = (d >> SLOT_D_BASIN_SHIFT) & SLOT_D_BASIN_MASK
            if (got != want).any():
                return f"holds heel basin {int(got[got != want][0])}, but the group's basin is {basin} ({want})"
        return None

    return check


class HhtlDCodec(Codec):
    name = "hhtl-d"
    codec_id = CodecId.HHTL_D
    defaults = {"k": 256, "leaf_lanes": SLOT_L_LANES, "attend_percentile": ROUTE_ATTEND_PERCENTILE,
                "skip_percentile": ROUTE_SKIP_PERCENTILE}
    params_model = HhtlDParams
    max_abs = 2.0**50  # squared L2 distances and norms of rows up to MAX_ROW_COLS wide stay finite in float32

    @classmethod
    def stored_layout(cls, params: HhtlDParams, n_rows: int, n_cols: int, stored: Stored,
                      version: int) -> StoredLayout:
        if params.cols != n_cols:
            raise LayoutProblem(f"params.cols is {params.cols}, but the group's rows have {n_cols} columns")
        k = params.k
        out = StoredLayout(
            group={"palette17": PartSpec(("I16",), (k, BASE17_DIMS)), "radius": PartSpec(("U32",), (k,)),
                   "count": PartSpec(("U32",), (k,)), "hip": PartSpec(("U8",), (k,), below(HIP_FAMILIES, "there are {k} HIP families")),
                   "distance": PartSpec(("U16",), (k, k)),
                   "route": PartSpec(("U8",), (k, k), below(len(RouteAction), "there are {k} route actions")),
                   "fisher_z": PartSpec(("I8",), (k, k)), "gamma": PartSpec(("F32",), (2,), finite)},
            tensor={"entry": PartSpec(("U16",), (n_rows, 2), _entries_check(k, params.basin))})
        if params.leaf:
            leaf = leaf_parts_layout(stored, n_rows, n_cols)
            out.group.update(leaf.group)
            out.tensor.update(leaf.tensor)
        return out

    def validate(self) -> None:
        check_k(self.opts["k"])
        check_leaf_lanes(self.name, self.opts["leaf_lanes"])
        check_percentiles(self.opts["attend_percentile"], self.opts["skip_percentile"])

    def fit_group(self, key: GroupKey, sample: np.ndarray, pool=None) -> _DFit:
        """Palette, HIP map, cache, Fisher-z table (representatives: sample rows) and,
        for index-regime roles, the basis of the residuals, all on the sample."""
        self.check_range(sample, key=key)
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
            self.check_range(x, rows)
            means = fold_means(x)
            peak = float(np.max(np.abs(means))) if means.size else 0.0
            if peak > MAX_FOLD_MEAN:
                raise CodecError(f"{source_where(rows)}tensor '{rows.name}': row means up to {peak:.4g} are beyond what "
                                 f"the Base17 fold stores (|mean| <= {MAX_FOLD_MEAN:.4g}, int16 in units of "
                                 f"1/{BASE17_SCALE}); hhtl-d would saturate them: use hhtl-vq or hhtl-f32")
            x17 = fold_from_means(means)
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
