"""``--codec hhtl-vq``: the budget codec (SPEC §4).

Same architecture as the reference codecs — group-shared palettes, twig
indices, a leaf on a group-shared SVD basis — with the budget as options:
segments (several twigs per row), residual stages, 8/16-bit twigs, per-row
gain, optional randomised Hadamard rotation, leaf lanes for index-regime
groups. See ``codecs/vq.py`` for the quantiser.

Group parts: ``palette.<stage>.<position>`` (k, w) bf16; ``rotation`` (c,)
int8 (when rotate); index regime with a leaf: ``basis`` (lanes, c) bf16 and
``singular`` (r,) f32.
Tensor parts: ``twig.<stage>`` (n, segments) u8/u16; ``gain`` (n,) bf16
(when gain); leaf: ``leaf`` (n, lanes) i8 and ``leaf_scale`` (1,) f32.

Every stored byte is counted by :func:`stored_bytes` (exact, tested): the
``bpw`` param of each group is (group parts + tensor parts) × 8 / weights;
the pack's safetensors header and JSON manifest are not in it (they are in
the whole-file ratio).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..classify.groups import GroupKey
from ..classify.rules import should_use_leaf
from ..errors import CodecError, OptionsError
from ..format import BF16_BYTES, F32_BYTES, SLOT_L_SCALE_BYTES, CodecId
from .base import Codec, EncodedGroup, EncodedTensor, Parts
from .palette import to_bf16
from .slot_l import add_stored_leaf, basis_parts, encode_slot_l, leaf_parts
from .svd_basis import SvdBasis
from .vq import Layout, decode_rows as vq_decode_rows, encode_rows, palette_bytes, parse_stages, stages_str


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
        r = min(total_rows if total_rows <= 4096 else 4096, n_cols)
        group += leaf_lanes * n_cols * BF16_BYTES + r * F32_BYTES  # basis + singular values
        per_tensor += n_rows * leaf_lanes + SLOT_L_SCALE_BYTES
    tensors = n_tensors * per_tensor
    return {"group": group, "tensors": tensors, "total": group + tensors, "weights": total_rows * n_cols}


def bits_per_weight(stages: str, n_tensors: int, n_rows: int, n_cols: int, **kw) -> float:
    b = stored_bytes(stages, n_tensors, n_rows, n_cols, **kw)
    return 8.0 * b["total"] / max(1, b["weights"])


class HhtlVqCodec(Codec):
    name = "hhtl-vq"
    codec_id = CodecId.HHTL_VQ
    defaults = {
        "stages": "3",  # segment widths per residual stage (see codecs/vq.py)
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

    def encode_group(self, key: GroupKey, names: Sequence[str], rows: Sequence[np.ndarray]) -> EncodedGroup:
        o = self.opts
        n_cols = int(key.shape[1])
        out = EncodedGroup(params={"stages": o["stages"], "n_cols": n_cols, "gain": o["gain"],
                                   "rotate": o["rotate"], "leaf": False})
        if o.get("setting"):
            out.params["setting"] = o["setting"]
        if not names:
            out.params["bpw"] = 0.0
            return out
        x = np.concatenate([np.asarray(r, dtype=np.float32).reshape(-1, n_cols) for r in rows]) \
            if len(rows) > 1 else np.asarray(rows[0], dtype=np.float32)
        res, rec = encode_rows(x, self._stages, o["gain"], o["rotate"], o["seed"], o["iters"], o["per_centroid"])
        for si, pals in enumerate(res.palettes):
            for j, p in enumerate(pals):
                out.arrays[f"palette.{si}.{j}"] = to_bf16(p)
        if res.signs is not None:
            out.arrays["rotation"] = res.signs
        basis = None
        if o["leaf_lanes"] and should_use_leaf(key.role):
            basis = SvdBasis.fit(x - rec, o["leaf_lanes"])
            out.arrays.update(basis_parts(basis))
            out.params["leaf"] = True
            out.params["leaf_lanes"] = o["leaf_lanes"]
            out.params["basis_energy"] = round(basis.energy(), 6)
        start = 0
        for name, r in zip(names, rows):
            n = int(np.asarray(r).shape[0])
            sl = slice(start, start + n)
            start += n
            arrays = {f"twig.{si}": np.ascontiguousarray(tw[sl]) for si, tw in enumerate(res.twigs)}
            if res.gain is not None:
                arrays["gain"] = to_bf16(res.gain[sl])
            if basis is not None:
                arrays.update(leaf_parts(*encode_slot_l(x[sl] - rec[sl], basis)))
            out.tensors[name] = EncodedTensor({}, arrays)
        nbytes = sum(a.nbytes for a in out.arrays.values()) + sum(
            a.nbytes for t in out.tensors.values() for a in t.arrays.values())
        out.params["bytes"] = int(nbytes)
        out.params["bpw"] = round(8.0 * nbytes / x.size, 6)
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
        out = vq_decode_rows(palettes, twigs, n_cols, gain, signs)
        return add_stored_leaf(out, group, tensor, sel)


__all__ = ["HhtlVqCodec", "bits_per_weight", "stored_bytes"]
