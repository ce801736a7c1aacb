"""HHTL-D, the lookup grade (docs/design.md §2): Base17 palette + one 4-byte HhtlDEntry per row.

``HhtlDEntry`` (4 bytes, little-endian)::

    slot_d u16: bits 15..14 heel basin (QK=0, V=1, Gate=2, FFN=3)
                bits 13..10 hip family (0..15)
                bits  9..2  twig = palette index (0..255)
                bit      1  polarity
                bit      0  reserved, 0
    slot_v u16: bfloat16 residual magnitude = L1(row17, centroid17) / L1 mass of centroid17

* polarity: 1 when the Base17 residual ``row17 - centroid17`` is positive in
  its largest-magnitude dimension (lowest dimension on ties); 0 when it is
  negative or the residual is zero;
* the L1 mass of a centroid is clamped to at least 1 (one fixed-point unit,
  1/256), so an all-zero centroid gives a finite ``slot_v``.

Heel basin from the role: q/k/o and ``lm_head`` (rows scored against a
query/hidden state) → QK; ``v`` and the embeddings (rows carried into the
residual stream) → V; ``gate`` → Gate; ``up``, ``down``, ``projection``,
``other`` → FFN.

Reconstruction: a row decodes to its unfolded centroid (``centroid17 / 256``
replicated to the positions that fed it), unscaled — ``unfold(fold(row))`` is
the orthogonal projection of the row onto the 17-dim periodic subspace, so no
scale does better in the least-squares sense (``slot_v`` carries a magnitude
with no direction and is not used). Index-regime rows add the Slot L leaf
(8 int8 lanes on an SVD basis fitted, once per group, to the residuals
``row - unfolded centroid``). These reconstructions are poor on real weights:
the grade exists for codec-space lookups (``cosine_lookup``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import ml_dtypes
import numpy as np

from ...classify.groups import GroupKey
from ...classify.rules import should_use_leaf
from ...errors import CodecError
from ...format import (
    HHTL_D_ENTRY_BYTES,
    ROUTE_ATTEND_PERCENTILE,
    ROUTE_SKIP_PERCENTILE,
    SLOT_D_BASIN_MASK,
    SLOT_D_BASIN_SHIFT,
    SLOT_D_HIP_MASK,
    SLOT_D_HIP_SHIFT,
    SLOT_D_POLARITY_SHIFT,
    SLOT_D_TWIG_MASK,
    SLOT_D_TWIG_SHIFT,
    SLOT_L_LANES,
    HeelBasin,
)
from .base17_fold import fold, unfold
from .base17_palette import Base17Palette, build_base17_palette, representatives
from .fisher_z_quality import FisherZQuality, fisher_z_quality
from .fisher_z import FisherZTable
from .shared_group import GroupAccounting, check_group_inputs
from .route_cache import HhtlCache
from .hip import hip_families
from .palette import check_k
from .slot_l import decode_slot_l, encode_slot_l, slot_l_byte_size
from .svd_basis import SvdBasis

ENTRY_DTYPE = np.dtype("<u2")  # entries are stored (n, 2) little-endian u16: slot_d, slot_v

ROLE_BASIN: dict[str, HeelBasin] = {
    "qko": HeelBasin.QK,
    "lm_head": HeelBasin.QK,
    "v": HeelBasin.V,
    "embed": HeelBasin.V,
    "gate": HeelBasin.Gate,
    "up": HeelBasin.FFN,
    "down": HeelBasin.FFN,
    "projection": HeelBasin.FFN,
    "other": HeelBasin.FFN,
}


def heel_basin(role: str) -> HeelBasin:
    """The heel basin of a role (unknown roles → FFN)."""
    return ROLE_BASIN.get(role, HeelBasin.FFN)


def bf16_bits(x) -> np.ndarray:
    """float(s) → bfloat16 bit patterns (uint16), round to nearest even."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def bf16_value(bits) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32."""
    return np.asarray(bits, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


# -- one entry -------------------------------------------------------------------------
@dataclass(frozen=True)
class HhtlDEntry:
    """One row's entry. ``residual`` is the float value of ``slot_v`` (rounded to bf16 on packing)."""

    basin: HeelBasin
    hip: int
    twig: int
    polarity: bool = False
    residual: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= int(self.basin) <= SLOT_D_BASIN_MASK:
            raise CodecError(f"heel basin {self.basin} is out of range (0..{SLOT_D_BASIN_MASK})")
        if not 0 <= int(self.hip) <= SLOT_D_HIP_MASK:
            raise CodecError(f"hip family {self.hip} is out of range (0..{SLOT_D_HIP_MASK})")
        if not 0 <= int(self.twig) <= SLOT_D_TWIG_MASK:
            raise CodecError(f"twig {self.twig} is out of range (0..{SLOT_D_TWIG_MASK})")

    @property
    def slot_d(self) -> int:
        return int(pack_slot_d(self.basin, self.hip, self.twig, self.polarity))

    @property
    def slot_v(self) -> int:
        return int(bf16_bits(self.residual))

    def to_bytes(self) -> bytes:
        """The 4 stored bytes: slot_d then slot_v, each little-endian."""
        return np.array([self.slot_d, self.slot_v], dtype=ENTRY_DTYPE).tobytes()

    @classmethod
    def from_slots(cls, slot_d: int, slot_v: int) -> "HhtlDEntry":
        f = unpack_entries(np.array([[slot_d, slot_v]], dtype=ENTRY_DTYPE))
        return cls(HeelBasin(int(f["basin"][0])), int(f["hip"][0]), int(f["twig"][0]),
                   bool(f["polarity"][0]), float(f["residual"][0]))

    @classmethod
    def from_bytes(cls, data: bytes) -> "HhtlDEntry":
        if len(data) != HHTL_D_ENTRY_BYTES:
            raise CodecError(f"an HhtlDEntry is {HHTL_D_ENTRY_BYTES} bytes, got {len(data)}")
        slot_d, slot_v = np.frombuffer(data, dtype=ENTRY_DTYPE)
        return cls.from_slots(int(slot_d), int(slot_v))


# -- many entries (vectorised) ---------------------------------------------------------------
def pack_slot_d(basin, hip, twig, polarity) -> np.ndarray:
    """Scalars or (n,) arrays → slot_d uint16 (bit 0 reserved, always 0)."""
    b = np.asarray(basin, dtype=np.uint32) & SLOT_D_BASIN_MASK
    h = np.asarray(hip, dtype=np.uint32) & SLOT_D_HIP_MASK
    t = np.asarray(twig, dtype=np.uint32) & SLOT_D_TWIG_MASK
    p = np.asarray(polarity, dtype=np.uint32) & 1
    return ((b << SLOT_D_BASIN_SHIFT) | (h << SLOT_D_HIP_SHIFT) | (t << SLOT_D_TWIG_SHIFT)
            | (p << SLOT_D_POLARITY_SHIFT)).astype(np.uint16)


def pack_entries(basin, hip, twig, polarity, residual) -> np.ndarray:
    """(n,) fields → (n, 2) little-endian uint16 entries [slot_d, slot_v].
    ``twig`` must be in 0..255 and ``hip`` in 0..15 (CodecError otherwise)."""
    twig = np.asarray(twig)
    hip = np.asarray(hip)
    if twig.size and (twig.min() < 0 or twig.max() > SLOT_D_TWIG_MASK):
        raise CodecError(f"twig out of range 0..{SLOT_D_TWIG_MASK} (palette larger than 256?)")
    if hip.size and (hip.min() < 0 or hip.max() > SLOT_D_HIP_MASK):
        raise CodecError(f"hip family out of range 0..{SLOT_D_HIP_MASK}")
    n = twig.shape[0]
    out = np.empty((n, 2), dtype=ENTRY_DTYPE)
    out[:, 0] = np.broadcast_to(pack_slot_d(basin, hip, twig, polarity), (n,))
    out[:, 1] = bf16_bits(residual)
    return out


def unpack_entries(entries: np.ndarray) -> dict[str, np.ndarray]:
    """(n, 2) uint16 → fields: basin, hip, twig (int64), polarity (bool), residual (float32), reserved."""
    e = np.asarray(entries, dtype=np.uint16).reshape(-1, 2)
    d = e[:, 0].astype(np.int64)
    return {
        "basin": (d >> SLOT_D_BASIN_SHIFT) & SLOT_D_BASIN_MASK,
        "hip": (d >> SLOT_D_HIP_SHIFT) & SLOT_D_HIP_MASK,
        "twig": (d >> SLOT_D_TWIG_SHIFT) & SLOT_D_TWIG_MASK,
        "polarity": ((d >> SLOT_D_POLARITY_SHIFT) & 1).astype(bool),
        "reserved": d & 1,
        "residual": bf16_value(e[:, 1]),
    }


def entry_twigs(entries: np.ndarray, sel=slice(None)) -> np.ndarray:
    """(m,) int64 twigs of the selected entries (reads only those rows)."""
    d = np.asarray(entries[sel][..., 0], dtype=np.int64)
    return (d >> SLOT_D_TWIG_SHIFT) & SLOT_D_TWIG_MASK


def residual_fields(rows17: np.ndarray, centroids17: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows17, centroids17: (n, 17) int16 (each row with its own centroid) →
    (polarity (n,) bool, slot_v value (n,) float32)."""
    res = np.asarray(rows17, dtype=np.int32) - np.asarray(centroids17, dtype=np.int32)  # (n, 17)
    n = res.shape[0]
    j = np.argmax(np.abs(res), axis=1) if n else np.zeros(0, dtype=np.int64)
    polarity = res[np.arange(n), j] > 0
    mass = np.maximum(np.abs(np.asarray(centroids17, dtype=np.int64)).sum(axis=1), 1)
    value = (np.abs(res).sum(axis=1) / mass).astype(np.float32)
    return polarity, value


def decode_rows17(palette17: np.ndarray, twig: np.ndarray, cols: int) -> np.ndarray:
    """(m, cols) float32: unfolded centroids of ``twig`` (unfolds the k centroids once when
    there are more rows than centroids, else only the rows' own centroids: the same values)."""
    pal = np.asarray(palette17)
    twig = np.asarray(twig, dtype=np.int64)
    if twig.shape[0] < pal.shape[0]:
        return unfold(pal[twig], cols)
    return unfold(pal, cols)[twig]


# -- shared parts of a group ----------------------------------------------------------------
@dataclass
class HhtlDShared:
    """Everything the tensors of one group share.

    palette: Base17Palette (k centroids); hip: (k,) uint8; cache: HhtlCache;
    fisher_z: FisherZTable over the representatives; rep_index: (k,) int64 row
    index of each representative in the group's concatenated rows (-1: the
    unfolded centroid stood in); quality: FisherZQuality; basis: SvdBasis or None.
    """

    cols: int
    palette: Base17Palette
    hip: np.ndarray
    cache: HhtlCache
    fisher_z: FisherZTable
    rep_index: np.ndarray
    quality: FisherZQuality
    basis: SvdBasis | None = None

    @property
    def k(self) -> int:
        return self.palette.k

    def byte_size(self) -> int:
        n = self.palette.byte_size() + self.hip.nbytes + self.cache.byte_size() + self.fisher_z.byte_size()
        return n + (0 if self.basis is None else self.basis.byte_size())


def build_shared(rows: np.ndarray, rows17: np.ndarray, k: int,
                 attend_percentile: float = ROUTE_ATTEND_PERCENTILE,
                 skip_percentile: float = ROUTE_SKIP_PERCENTILE) -> tuple[HhtlDShared, np.ndarray, np.ndarray]:
    """rows (n, d) float32 and their folds (n, 17) → (shared parts, twig (n,), L1 dist (n,))."""
    palette, twig, dist = build_base17_palette(rows17, k)
    dmat = palette.distances()  # (k, k) L1
    hip = hip_families(dmat)
    cache = HhtlCache.build(dmat, hip, attend_percentile, skip_percentile)
    rep = representatives(twig, dist, palette.k)
    d = rows.shape[1]
    rep_rows = palette.unfolded(d)  # (k, d) fallback: the unfolded centroid
    has = rep >= 0
    rep_rows[has] = rows[rep[has]]
    fz = FisherZTable.build(rep_rows)
    return HhtlDShared(d, palette, hip, cache, fz, rep, fisher_z_quality(fz, rep_rows)), twig, dist


# -- one tensor --------------------------------------------------------------------------------
@dataclass
class HhtlDTensor:
    """One tensor in the lookup grade.

    entries: (n, 2) little-endian uint16 [slot_d, slot_v] (4 B/row);
    shared: the group's palette, HIP map, cache and Fisher-z table;
    leaf: (n, lanes) int8 or None (Slot L, 12 B/row with 8 lanes); leaf_scale: f32.
    """

    entries: np.ndarray
    shared: HhtlDShared
    leaf: np.ndarray | None = None
    leaf_scale: float = 1.0
    _twig: np.ndarray | None = field(default=None, repr=False)

    # -- encoding -------------------------------------------------------------
    @classmethod
    def encode(cls, rows: np.ndarray, shared: HhtlDShared | None = None, *, k: int = 256,
               basin: HeelBasin | str = HeelBasin.FFN, twig: np.ndarray | None = None,
               rows17: np.ndarray | None = None) -> "HhtlDTensor":
        """rows (n, d) float32 → 4 B/row entries. Without ``shared`` the tensor gets a
        palette of its own (k centroids); ``basin`` may be a HeelBasin or a role name."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise CodecError(f"HhtlDTensor.encode needs a 2-D row matrix, got shape {list(rows.shape)}")
        if isinstance(basin, str):
            basin = heel_basin(basin)
        if rows17 is None:
            rows17 = fold(rows)
        if shared is None:
            shared, twig, _ = build_shared(rows, rows17, k)
        elif twig is None:
            twig, _ = shared.palette.assign(rows17)
        c17 = shared.palette.centroids[twig]  # (n, 17)
        polarity, value = residual_fields(rows17, c17)
        entries = pack_entries(int(basin), shared.hip[twig], twig, polarity, value)
        return cls(entries, shared, _twig=np.asarray(twig, dtype=np.int64))

    @classmethod
    def encode_with_leaf(cls, rows: np.ndarray, shared: HhtlDShared | None = None, *, k: int = 256,
                         basin: HeelBasin | str = HeelBasin.V, lanes: int = SLOT_L_LANES,
                         twig: np.ndarray | None = None, rows17: np.ndarray | None = None) -> "HhtlDTensor":
        """Entries + Slot L (``lanes`` int8 a row, 12 B/row with 8) on ``shared.basis``; a basis
        is fitted to this tensor's residuals when the shared parts have none."""
        t = cls.encode(rows, shared, k=k, basin=basin, twig=twig, rows17=rows17)
        rows = np.asarray(rows, dtype=np.float32)
        residual = rows - decode_rows17(t.shared.palette.centroids, t.twig, t.cols)  # (n, d)
        if t.shared.basis is None:
            t.shared.basis = SvdBasis.fit(residual, lanes)
        t.leaf, t.leaf_scale = encode_slot_l(residual, t.shared.basis)
        return t

    # -- reading -----------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.entries.shape[0])

    @property
    def cols(self) -> int:
        return self.shared.cols

    @property
    def twig(self) -> np.ndarray:
        if self._twig is None:
            self._twig = entry_twigs(self.entries)
        return self._twig

    def fields(self) -> dict[str, np.ndarray]:
        return unpack_entries(self.entries)

    def entry(self, i: int) -> HhtlDEntry:
        return HhtlDEntry.from_slots(int(self.entries[i, 0]), int(self.entries[i, 1]))

    def reconstruct_rows(self, idx=None) -> np.ndarray:
        """(m, d) float32: unfolded centroid (+ leaf); ``idx`` selects rows (all when None)."""
        sel = slice(None) if idx is None else idx
        out = decode_rows17(self.shared.palette.centroids, self.twig[sel], self.cols)
        if self.leaf is not None and self.shared.basis is not None:
            out += decode_slot_l(self.leaf[sel], self.leaf_scale, self.shared.basis)
        return out

    def reconstruct_row(self, i: int) -> np.ndarray:
        """(d,) float32."""
        return self.reconstruct_rows(np.array([i]))[0]

    def cosine_lookup(self, i, j, other: "HhtlDTensor | None" = None):
        """Cosine between row(s) ``i`` of this tensor and row(s) ``j`` of ``other`` (this
        tensor when None, which must share the group) through the Fisher-z table: O(1)."""
        other = self if other is None else other
        if other.shared is not self.shared:
            raise CodecError("cosine_lookup needs two tensors of the same group (one Fisher-z table)")
        return self.shared.fisher_z.lookup(self.twig[np.asarray(i)], other.twig[np.asarray(j)])

    # -- byte accounting -------------------------------------------------------------
    def entries_byte_size(self) -> int:
        return self.n_rows * HHTL_D_ENTRY_BYTES

    def leaf_byte_size(self) -> int:
        return 0 if self.leaf is None else slot_l_byte_size(self.n_rows, self.leaf.shape[1])

    def byte_size(self) -> int:
        """This tensor's own bytes (entries + leaf), without the shared parts."""
        return self.entries_byte_size() + self.leaf_byte_size()


# -- one group -------------------------------------------------------------------------------
@dataclass
class HhtlDGroup(GroupAccounting):
    key: GroupKey
    names: list[str]
    shared: HhtlDShared | None
    tensors: dict[str, HhtlDTensor] = field(default_factory=dict)

    @property
    def basin(self) -> HeelBasin:
        return heel_basin(self.key.role)

    def svd_basis_byte_size(self) -> int:
        return 0 if self.shared is None or self.shared.basis is None else self.shared.basis.byte_size()

    def byte_size(self) -> int:
        shared = 0 if self.shared is None else self.shared.byte_size()
        return shared + self.entries_byte_size() + self.slot_l_byte_size()

    def reconstruct(self, name: str, idx=None) -> np.ndarray:
        return self.tensors[name].reconstruct_rows(idx)


def build_hhtl_d_group(key: GroupKey, names: Sequence[str], rows: Sequence[np.ndarray], k: int = 256,
                       lanes: int = SLOT_L_LANES, leaf: bool | None = None,
                       attend_percentile: float = ROUTE_ATTEND_PERCENTILE,
                       skip_percentile: float = ROUTE_SKIP_PERCENTILE) -> HhtlDGroup:
    """One Base17 palette, HIP map, HHTL cache and Fisher-z table for all tensors of a group;
    ``leaf`` (default: ``should_use_leaf(key.role)``) adds ONE SVD basis for the group and a
    Slot L per tensor. rows: one (n_i, d) float32 array per name. Empty group → empty result."""
    check_k(k)
    check_group_inputs(names, rows)
    if not names:
        return HhtlDGroup(key, [], None)
    leaf = should_use_leaf(key.role) if leaf is None else leaf
    allrows = np.concatenate([np.asarray(r, dtype=np.float32) for r in rows])  # (N, d)
    all17 = fold(allrows)  # (N, 17)
    shared, twig, _ = build_shared(allrows, all17, k, attend_percentile, skip_percentile)
    basin = heel_basin(key.role)
    group = HhtlDGroup(key, list(names), shared)
    residual = None
    if leaf:
        residual = allrows - decode_rows17(shared.palette.centroids, twig, shared.cols)  # (N, d)
        shared.basis = SvdBasis.fit(residual, lanes)
    off = 0
    for name, r in zip(names, rows):
        n = r.shape[0]
        s = slice(off, off + n)
        t = HhtlDTensor.encode(allrows[s], shared, basin=basin, twig=twig[s], rows17=all17[s])
        if leaf:
            t.leaf, t.leaf_scale = encode_slot_l(residual[s], shared.basis)
        group.tensors[name] = t
        off += n
    return group


__all__ = [
    "ENTRY_DTYPE", "HhtlDEntry", "HhtlDGroup", "HhtlDShared", "HhtlDTensor", "ROLE_BASIN", "bf16_bits",
    "bf16_value", "build_hhtl_d_group", "build_shared", "decode_rows17", "entry_twigs", "heel_basin",
    "pack_entries", "pack_slot_d", "residual_fields", "unpack_entries",
]
