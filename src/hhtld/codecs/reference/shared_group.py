"""SharedPaletteGroup: one palette, one Fisher-z table and (index regime) one
SVD basis for every tensor of a group (docs/design.md §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ...classify.groups import GroupKey
from ...classify.rules import should_use_leaf
from ...format import SLOT_L_LANES
from .fisher_z import FisherZTable
from .hhtl_f32_tensor import HhtlF32Tensor
from .palette import Palette, build_f32_palette, check_k
from .svd_basis import SvdBasis


class GroupAccounting:
    """Byte accounting shared by every group type: ``names`` and ``tensors``
    (each tensor with ``entries_byte_size()`` and ``leaf_byte_size()``)."""

    names: list[str]
    tensors: dict

    @property
    def is_empty(self) -> bool:
        return not self.names

    def slot_l_for(self, name: str) -> int:
        """Leaf bytes of one tensor (0 without a leaf)."""
        return self.tensors[name].leaf_byte_size()

    def slot_l_byte_size(self) -> int:
        return sum(self.slot_l_for(n) for n in self.names)

    def entries_byte_size(self) -> int:
        return sum(t.entries_byte_size() for t in self.tensors.values())


@dataclass
class SharedPaletteGroup(GroupAccounting):
    key: GroupKey
    names: list[str]
    palette: Palette | None
    fisher_z: FisherZTable | None
    basis: SvdBasis | None = None
    tensors: dict[str, HhtlF32Tensor] = field(default_factory=dict)

    def svd_basis_byte_size(self) -> int:
        return 0 if self.basis is None else self.basis.byte_size()

    def palette_byte_size(self) -> int:
        return 0 if self.palette is None else self.palette.byte_size()

    def fisher_z_byte_size(self) -> int:
        return 0 if self.fisher_z is None else self.fisher_z.byte_size()

    def byte_size(self) -> int:
        return (self.palette_byte_size() + self.fisher_z_byte_size() + self.svd_basis_byte_size()
                + self.entries_byte_size() + self.slot_l_byte_size())

    def reconstruct(self, name: str, idx=None) -> np.ndarray:
        """(rows, d) float32 reconstruction of one tensor of the group."""
        return self.tensors[name].reconstruct_rows(self.palette.centroids, self.basis, idx)


def check_group_inputs(names: Sequence[str], rows: Sequence[np.ndarray]) -> None:
    if len(names) != len(rows):
        raise ValueError(f"{len(names)} names but {len(rows)} row arrays")


def build_group_with_fisher_z(key: GroupKey, names: Sequence[str], rows: Sequence[np.ndarray],
                              k: int = 256) -> SharedPaletteGroup:
    """Palette over all rows of the group + Fisher-z table; twig per row, no leaf.

    rows: one (n_i, d) float32 array per name. An empty group gives an empty result.
    """
    check_k(k)
    check_group_inputs(names, rows)
    if not names:
        return SharedPaletteGroup(key, [], None, None)
    allrows = np.concatenate([np.asarray(r, dtype=np.float32) for r in rows])  # (N, d)
    palette, twig, _ = build_f32_palette(allrows, k)
    fz = FisherZTable.build(palette.centroids)  # centroids are real rows
    group = SharedPaletteGroup(key, list(names), palette, fz)
    off = 0
    for name, r in zip(names, rows):
        n = r.shape[0]
        group.tensors[name] = HhtlF32Tensor(twig[off : off + n].astype(np.uint8))
        off += n
    return group


def build_group_with_leaf(key: GroupKey, names: Sequence[str], rows: Sequence[np.ndarray],
                          k: int = 256, lanes: int = SLOT_L_LANES) -> SharedPaletteGroup:
    """Index-regime roles: palette + ONE SVD basis for the group + Slot L per tensor.

    Argmax-regime roles fall back to ``build_group_with_fisher_z``.
    """
    group = build_group_with_fisher_z(key, names, rows, k)
    if group.is_empty or not should_use_leaf(key.role):
        return group
    allrows = np.concatenate([np.asarray(r, dtype=np.float32) for r in rows])
    group.basis = SvdBasis.fit(allrows, lanes)
    for name, r in zip(names, rows):
        t = group.tensors[name]
        group.tensors[name] = HhtlF32Tensor.encode(np.asarray(r, dtype=np.float32), group.palette,
                                                   group.basis, twig=t.twig)
    return group
