"""``--codec hhtl-vq``: the budget codec (docs/design.md §2).

Same architecture as the reference codecs — group-shared palettes, twig
indices, a leaf on a group-shared SVD basis — with the budget as options:
segments (several twigs per row), residual stages, 8/16-bit twigs, per-row
gain, optional randomised Hadamard rotation, leaf lanes for index-regime
groups. See ``codecs/vq/quantiser.py`` for the quantiser.

Group parts: ``palette.<stage>.<position>`` (k, w) bf16; ``rotation`` (c,)
int8 (when rotate; its Hadamard block is ``params.rotation_block``); index
regime with a leaf: ``basis`` (lanes, c) bf16 and ``singular`` (lanes,) f32.
Tensor parts: ``twig.<stage>`` (n, segments) u8/u16; ``gain`` (n,) bf16
(when gain); leaf: ``leaf`` (n, lanes) i8 and ``leaf_scale`` (1,) f32.

Every stored byte is counted by :func:`stored_bytes` (exact, tested): the
``bpw`` param of each group is (group parts + tensor parts) × 8 / weights;
the pack's safetensors header and JSON manifest are not in it (they are in
the whole-file ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from ...checkpoint.rows import ArrayRows
from ...classify.groups import GroupKey
from ...classify.rules import should_use_leaf
from ...errors import CodecError, OptionsError
from ...format import BF16_BYTES, F32_BYTES, LEGACY_ROTATION_MAX_BLOCK, MAX_PALETTE_K, SLOT_L_SCALE_BYTES, CodecId
from ..base import Codec, DictParts, EncodedGroup, EncodedTensor, Parts, map_blocks
from ..layout import (
    Count,
    LayoutProblem,
    PartSpec,
    Params,
    Stored,
    StoredLayout,
    below_by_position,
    finite,
    leaf_parts_layout,
    signs,
)
from ..reference.palette import to_bf16
from ..reference.slot_l import add_stored_leaf, basis_parts, leaf_parts, quantise_leaf
from ..reference.svd_basis import SvdBasis
from .feedback import FeedbackPlan, encode_block_feedback
from .quantiser import (
    Layout,
    VqModel,
    decode_rows as vq_decode_rows,
    encode_block,
    fit_model,
    hadamard_block,
    palette_bytes,
    parse_stages,
    stages_str,
)


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        return v.lower() in ("1", "true", "yes", "on")
    raise OptionsError(f"codec hhtl-vq: option {name} must be a boolean, got {v!r}")


def stored_bytes(stages: str, n_tensors: int, n_rows: int, n_cols: int, gain: bool = True,
                 rotate: bool = False, leaf_lanes: int = 0, index_regime: bool = False) -> dict[str, int]:
    """Exact stored bytes of one group encoded with these options.

    n_rows: rows per tensor. Palettes hold min(k, training segments) rows
    (fewer only when a tiny group has fewer distinct segments than k).
    Returns {"group": ..., "tensors": ..., "total": ..., "weights": ...}."""
    st = parse_stages(stages)
    total_rows = n_tensors * n_rows
    group = palette_bytes(st, n_cols, total_rows)
    if rotate:
        group += n_cols  # int8 signs
    per_row = sum(Layout(s, n_cols).row_bytes() for s in st)
    if gain:
        per_row += BF16_BYTES
    per_tensor = n_rows * per_row
    if leaf_lanes and index_regime:
        group += leaf_lanes * n_cols * BF16_BYTES + leaf_lanes * F32_BYTES  # basis + its singular values
        per_tensor += n_rows * leaf_lanes + SLOT_L_SCALE_BYTES
    tensors = n_tensors * per_tensor
    return {"group": group, "tensors": tensors, "total": group + tensors, "weights": total_rows * n_cols}


def rotation_block(params) -> int:
    """The Hadamard block of a group's rotation: ``params.rotation_block``, or for
    packs written before it was stored the largest power of two dividing the
    column count, at most ``LEGACY_ROTATION_MAX_BLOCK``."""
    if "rotation_block" in params:
        return int(params["rotation_block"])
    return hadamard_block(int(params["n_cols"]), LEGACY_ROTATION_MAX_BLOCK)


def bits_per_weight(stages: str, n_tensors: int, n_rows: int, n_cols: int, **kw) -> float:
    b = stored_bytes(stages, n_tensors, n_rows, n_cols, **kw)
    return 8.0 * b["total"] / max(1, b["weights"])


class HhtlVqParams(Params):
    """Group params: the stage specification, row width, gain/rotation/leaf switches,
    the rotation's Hadamard block, the leaf's lanes; the rest is informational."""

    stages: str
    n_cols: Count
    gain: bool
    rotate: bool
    leaf: bool
    rotation_block: Count | None = None  # always written since format version 2
    leaf_lanes: Annotated[int, Field(ge=1, le=64)] | None = None
    setting: str | None = None
    basis_energy: float | None = None
    bytes: Count | None = None
    bpw: float | None = None


class HhtlVqCodec(Codec):
    name = "hhtl-vq"
    codec_id = CodecId.HHTL_VQ
    params_model = HhtlVqParams
    defaults = {
        "stages": "3",  # segment widths per residual stage (see codecs/vq/quantiser.py)
        "gain": True,  # per-row bf16 gain
        "rotate": True,  # randomised block-Hadamard rotation (undone at decode): whitens the error
        "leaf_lanes": 0,  # Slot L lanes for index-regime groups (0 = no leaf)
        "iters": 10,  # k-means iterations per palette
        "per_centroid": 64,  # training segments per centroid (sampled)
        "seed": 0,
        "setting": None,  # name of the ladder rung (informational, set by the allocator)
    }

    def validate(self) -> None:
        o = self.opts
        self._stages = parse_stages(o["stages"])
        o["stages"] = stages_str(self._stages)
        o["gain"] = _as_bool("gain", o["gain"])
        o["rotate"] = _as_bool("rotate", o["rotate"])
        if o["setting"] is not None and not isinstance(o["setting"], str):
            raise OptionsError(f"codec {self.name}: setting must be a rung name, got {o['setting']!r}")
        for name, lo, hi in (("leaf_lanes", 0, 64), ("iters", 0, 100), ("per_centroid", 1, 100000),
                             ("seed", 0, 2**31 - 1)):
            v = o[name]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise CodecError(f"codec {self.name}: {name}={v!r} is out of range ({lo}..{hi})")
            o[name] = int(v)

    # -- streaming encode ---------------------------------------------------------------
    def fit_group(self, key: GroupKey, sample: np.ndarray, pool=None) -> "_VqFit":
        o = self.opts
        n_cols = int(key.shape[1])
        params = {"stages": o["stages"], "n_cols": n_cols, "gain": o["gain"], "rotate": o["rotate"], "leaf": False}
        if o.get("setting"):
            params["setting"] = o["setting"]
        self.check_range(sample, key=key)
        fit = _VqFit(key, params)
        if sample.shape[0] == 0:
            return fit
        fit.model = fit_model(sample, self._stages, o["gain"], o["rotate"], o["seed"], o["iters"], o["per_centroid"],
                              block=hadamard_block(n_cols), pool=pool)
        for si, pals in enumerate(fit.model.palettes):
            for j, p in enumerate(pals):
                fit.arrays[f"palette.{si}.{j}"] = to_bf16(p)
        if fit.model.signs is not None:
            fit.arrays["rotation"] = fit.model.signs
            params["rotation_block"] = fit.model.block
        if o["leaf_lanes"] and should_use_leaf(key.role):
            rec = np.concatenate(map_blocks(lambda x, s, e: encode_block(fit.model, x, rec=True).rec,
                                            ArrayRows(sample, "sample"), pool))
            fit.basis = SvdBasis.fit(sample - rec, o["leaf_lanes"])
            fit.arrays.update(basis_parts(fit.basis))
            params.update({"leaf": True, "leaf_lanes": o["leaf_lanes"], "basis_energy": round(fit.basis.energy(), 6)})
        return fit

    def encode_tensor(self, fit: "_VqFit", rows, pool=None, measure: bool = False,
                      hessian: np.ndarray | None = None, overwrite_hessian: bool = False) -> EncodedTensor:
        """``hessian`` (cols, cols): the inputs' ``XᵀX`` on calibration tokens; the
        rows are then quantised with error feedback (``codecs/vq/feedback.py``) and
        ``stats["output_error"]`` is the predicted ``tr(ΔW H ΔWᵀ)``. With
        ``overwrite_hessian`` a float32 ``hessian`` is rotated in place (its contents lost),
        which saves a copy of it."""
        leaf = fit.basis is not None
        plan = FeedbackPlan.build(fit.model, hessian, overwrite=overwrite_hessian) if hessian is not None else None

        def one(x, s, e):
            self.check_range(x, rows)
            if plan is None:
                b = encode_block(fit.model, x, rec=leaf, cosines=measure and not leaf)
            else:
                b = encode_block_feedback(plan, x, cosines=measure and not leaf)
                if leaf:
                    b.rec = vq_decode_rows(fit.model.palettes, b.twigs, fit.model.n_cols, b.gain, fit.model.signs,
                                           fit.model.block)
            coeff = fit.basis.project(x - b.rec) if leaf else None  # (m, lanes)
            return b.twigs, b.gain, coeff, b.cosines, b.output_error

        blocks = map_blocks(one, rows, pool)
        arrays = {f"twig.{si}": np.concatenate([b[0][si] for b in blocks]) for si in range(len(self._stages))}
        if self.opts["gain"]:
            arrays["gain"] = to_bf16(np.concatenate([b[1] for b in blocks]))
        if leaf:
            arrays.update(leaf_parts(*quantise_leaf(np.concatenate([b[2] for b in blocks]))))
        out = EncodedTensor({}, arrays, stats={"bytes": sum(a.nbytes for a in arrays.values()),
                                               "weights": rows.shape[0] * rows.shape[1]})
        if plan is not None:
            out.stats["output_error"] = float(sum(b[4] for b in blocks))
        if measure:
            out.cosines = (self.decoded_cosines(fit.decode_parts(), arrays, rows, pool) if leaf
                           else np.concatenate([b[3] for b in blocks]).astype(np.float32))
        return out

    def finish_group(self, fit: "_VqFit", stats) -> EncodedGroup:
        out = EncodedGroup(params=dict(fit.params), arrays=dict(fit.arrays))
        weights = sum(t["weights"] for t in stats)
        if weights == 0:
            out.params["bpw"] = 0.0
            return out
        nbytes = sum(t["bytes"] for t in stats) + sum(a.nbytes for a in fit.arrays.values())
        out.params["bytes"] = int(nbytes)
        out.params["bpw"] = round(8.0 * nbytes / weights, 6)
        return out

    @classmethod
    def stored_layout(cls, params: HhtlVqParams, n_rows: int, n_cols: int, stored: Stored,
                      version: int) -> StoredLayout:
        try:
            stages = parse_stages(params.stages)
        except CodecError as e:
            raise LayoutProblem(f"params.stages: {e}") from None
        if params.n_cols != n_cols:
            raise LayoutProblem(f"params.n_cols is {params.n_cols}, but the group's rows have {n_cols} columns")
        out = StoredLayout()
        for si, st in enumerate(stages):
            ks = []
            for j, (w, k) in enumerate(zip(st.widths, st.ks)):
                name = f"palette.{si}.{j}"
                out.group[name] = PartSpec(("BF16",), ((1, k), w), finite)
                have = stored.get(name)
                ks.append(have[1][0] if have is not None and len(have[1]) == 2 and 1 <= have[1][0] <= k else k)
            twig = "U8" if max(st.ks) <= MAX_PALETTE_K else "U16"
            out.tensor[f"twig.{si}"] = PartSpec((twig,), (n_rows, Layout(st, n_cols).n_segments),
                                                below_by_position(tuple(ks)))
        if params.gain:
            out.tensor["gain"] = PartSpec(("BF16",), (n_rows,), finite)
        if params.rotate:
            if params.rotation_block is None and version >= 2:
                raise LayoutProblem("params.rotation_block is missing (the rotation's Hadamard block)")
            b = params.rotation_block
            if b is None:
                b = hadamard_block(n_cols, LEGACY_ROTATION_MAX_BLOCK)
            if b < 1 or b & (b - 1) or n_cols % b:
                raise LayoutProblem(f"params.rotation_block is {b}: it must be a power of two dividing the "
                                    f"{n_cols} columns")
            out.group["rotation"] = PartSpec(("I8",), (n_cols,), signs)
        if params.leaf:
            if params.leaf_lanes is None:
                raise LayoutProblem("params.leaf_lanes is missing (the leaf's lanes)")
            leaf = leaf_parts_layout(stored, n_rows, n_cols, params.leaf_lanes)
            out.group.update(leaf.group)
            out.tensor.update(leaf.tensor)
        return out

    @classmethod
    def decode_rows(cls, group: Parts, tensor: Parts, idx=None) -> np.ndarray:
        sel = slice(None) if idx is None else idx
        p = group.params
        n_cols = int(p["n_cols"])
        stages = parse_stages(p["stages"])
        palettes = []
        twigs = []
        for si, st in enumerate(stages):
            palettes.append([np.asarray(group[f"palette.{si}.{j}"], dtype=np.float32) for j in range(len(st.widths))])
            twigs.append(np.asarray(tensor[f"twig.{si}"][sel]))
        gain = np.asarray(tensor["gain"][sel], dtype=np.float32) if "gain" in tensor else None
        signs = np.asarray(group["rotation"]) if "rotation" in group else None
        out = vq_decode_rows(palettes, twigs, n_cols, gain, signs, rotation_block(p))
        return add_stored_leaf(out, group, tensor, sel)


@dataclass
class _VqFit:
    """Fit state of one group: the shared model, its stored arrays and params."""

    key: GroupKey
    params: dict[str, Any]
    arrays: dict[str, np.ndarray] = None  # type: ignore[assignment]
    model: VqModel | None = None
    basis: SvdBasis | None = None

    def __post_init__(self) -> None:
        if self.arrays is None:
            self.arrays = {}

    def decode_parts(self) -> DictParts:
        return DictParts(self.params, self.arrays)


__all__ = ["HhtlVqCodec", "bits_per_weight", "rotation_block", "stored_bytes"]
