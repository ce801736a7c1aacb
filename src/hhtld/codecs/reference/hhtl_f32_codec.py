"""``--codec hhtl-f32``: the reconstruction-grade reference codec in the pack.

Group parts: palette (k, d) bf16, radius (k,) f32, count (k,) u32,
fisher_z (k, k) i8, gamma (2,) f32; index regime also basis (8, d) bf16 and
singular (8,) f32. Tensor parts: twig (n,) u8; index regime leaf (n, 8) i8
and leaf_scale (1,) f32.

Streaming: the palette (furthest-point cover, real rows), its Fisher-z table
and the basis are built on the group's sample; every tensor is then assigned
block by block, and each centroid's radius and count gather over all of
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from pydantic import Field

from ...classify.groups import GroupKey
from ...classify.rules import should_use_leaf
from ...format import MAX_PALETTE_K, SLOT_L_LANES, CodecId
from ..base import Codec, DictParts, EncodedGroup, EncodedTensor, Parts, map_blocks
from .fisher_z import FisherZTable
from ..layout import PartSpec, Params, Stored, StoredLayout, below, finite, leaf_parts_layout
from .palette import assign_nearest, check_k, furthest_point_sample, to_bf16
from .slot_l import add_stored_leaf, basis_parts, check_leaf_lanes, leaf_parts, quantise_leaf
from .svd_basis import SvdBasis


@dataclass
class _F32Fit:
    key: GroupKey
    centroids: np.ndarray  # (k, d) float32, bf16-exact real rows of the sample
    basis: SvdBasis | None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # what decode needs

    def decode_parts(self) -> DictParts:
        return DictParts({}, self.arrays)


class HhtlF32Params(Params):
    """Group params: palette size ``k`` (rows stored), whether tensors carry a leaf."""

    k: Annotated[int, Field(ge=1, le=MAX_PALETTE_K)]
    leaf: bool
    basis_energy: float | None = None


class HhtlF32Codec(Codec):
    name = "hhtl-f32"
    codec_id = CodecId.HHTL_F32
    defaults = {"k": 256, "leaf_lanes": SLOT_L_LANES}
    params_model = HhtlF32Params
    max_abs = 2.0**50  # squared L2 distances and norms of rows up to MAX_ROW_COLS wide stay finite in float32

    @classmethod
    def stored_layout(cls, params: HhtlF32Params, n_rows: int, n_cols: int, stored: Stored,
                      version: int) -> StoredLayout:
        k = params.k
        out = StoredLayout(
            group={"palette": PartSpec(("BF16",), (k, n_cols), finite), "radius": PartSpec(("F32",), (k,), finite),
                   "count": PartSpec(("U32",), (k,)), "fisher_z": PartSpec(("I8",), (k, k)),
                   "gamma": PartSpec(("F32",), (2,), finite)},
            tensor={"twig": PartSpec(("U8",), (n_rows,), below(k))})
        if params.leaf:
            leaf = leaf_parts_layout(stored, n_rows, n_cols)
            out.group.update(leaf.group)
            out.tensor.update(leaf.tensor)
        return out

    def validate(self) -> None:
        check_k(self.opts["k"])
        check_leaf_lanes(self.name, self.opts["leaf_lanes"])

    def fit_group(self, key: GroupKey, sample: np.ndarray, pool=None) -> _F32Fit:
        self.check_range(sample, key=key)
        d = int(key.shape[1])
        if sample.shape[0] == 0:
            return _F32Fit(key, np.zeros((0, d), np.float32), None)
        picks = furthest_point_sample(sample, self.opts["k"])
        centroids = to_bf16(sample[picks]).astype(np.float32)  # (k', d)
        basis = SvdBasis.fit(sample, self.opts["leaf_lanes"]) if should_use_leaf(key.role) else None
        fit = _F32Fit(key, centroids, basis)
        fit.arrays["palette"] = to_bf16(centroids)
        if basis is not None:
            fit.arrays.update(basis_parts(basis))
        return fit

    def encode_tensor(self, fit: _F32Fit, rows, pool=None, measure: bool = False) -> EncodedTensor:
        k = fit.centroids.shape[0]
        leaf = fit.basis is not None

        def one(x, s, e):
            self.check_range(x, rows)
            twig, dist = assign_nearest(x, fit.centroids)  # (m,), (m,)
            count = np.bincount(twig, minlength=k).astype(np.uint32)
            radius = np.zeros(k, np.float32)
            np.maximum.at(radius, twig, dist)
            coeff = fit.basis.project(x - fit.centroids[twig]) if leaf else None
            return twig.astype(np.uint8), count, radius, coeff

        blocks = map_blocks(one, rows, pool)
        arrays = {"twig": np.concatenate([b[0] for b in blocks])}
        stats = {"count": np.sum([b[1] for b in blocks], axis=0, dtype=np.uint32),
                 "radius": np.max([b[2] for b in blocks], axis=0)}
        if leaf:
            arrays.update(leaf_parts(*quantise_leaf(np.concatenate([b[3] for b in blocks]))))
        out = EncodedTensor({}, arrays, stats=stats)
        if measure:
            out.cosines = self.decoded_cosines(fit.decode_parts(), arrays, rows, pool)
        return out

    def finish_group(self, fit: _F32Fit, stats) -> EncodedGroup:
        k = fit.centroids.shape[0]
        out = EncodedGroup(params={"k": k, "leaf": fit.basis is not None})
        if k == 0:
            return out
        count = np.sum([s["count"] for s in stats], axis=0, dtype=np.uint32) if stats else np.zeros(k, np.uint32)
        radius = np.max([s["radius"] for s in stats], axis=0) if stats else np.zeros(k, np.float32)
        fz = FisherZTable.build(fit.centroids)  # centroids are real rows
        out.arrays = {
            "palette": fit.arrays["palette"],
            "radius": radius,
            "count": count,
            "fisher_z": fz.table,
            "gamma": fz.gamma.to_array(),
        }
        if fit.basis is not None:
            out.arrays.update(basis_parts(fit.basis))
            out.params["basis_energy"] = round(fit.basis.energy(), 6)
        return out

    @classmethod
    def decode_rows(cls, group: Parts, tensor: Parts, idx=None) -> np.ndarray:
        sel = slice(None) if idx is None else idx
        palette = np.asarray(group["palette"], dtype=np.float32)  # (k, d)
        twig = np.asarray(tensor["twig"][sel], dtype=np.int64)
        out = palette[twig]
        return add_stored_leaf(out, group, tensor, sel)


__all__ = ["HhtlF32Codec", "should_use_leaf"]
