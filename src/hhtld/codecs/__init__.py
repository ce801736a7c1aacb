"""Codecs: pure numpy, arrays in, arrays out (SPEC §3, §4)."""

from .base import Codec, DictParts, EncodedGroup, EncodedTensor
from .base17 import GOLDEN_POS, fold, l1_cdist, l1_distance, nearest_l1, unfold
from .base17_palette import Base17Palette, build_base17_palette
from .fisher_quality import FisherZQuality, fisher_z_quality
from .hhtl_cache import HhtlCache
from .hhtl_d import HhtlDEntry, HhtlDGroup, HhtlDShared, HhtlDTensor, build_hhtl_d_group, heel_basin
from .hip import hip_families
from .fisher_z import FamilyGamma, FisherZTable
from .group import SharedPaletteGroup, build_group_with_fisher_z, build_group_with_leaf
from .hhtl_f32 import HhtlF32Tensor
from .palette import Palette, assign_nearest, build_f32_palette, check_k, furthest_point_sample
from .registry import CODECS, DEFAULT_CODEC, codec_by_id, codec_class, make_codec
from .slot_l import decode_slot_l, encode_slot_l, slot_l_byte_size
from .svd_basis import SvdBasis, svd_basis_byte_size

__all__ = [
    "CODECS", "Codec", "DEFAULT_CODEC", "DictParts", "EncodedGroup", "EncodedTensor", "FamilyGamma",
    "FisherZTable", "HhtlF32Tensor", "Palette", "SharedPaletteGroup", "SvdBasis", "assign_nearest",
    "build_f32_palette", "build_group_with_fisher_z", "build_group_with_leaf", "check_k",
    "codec_by_id", "codec_class", "decode_slot_l", "encode_slot_l", "furthest_point_sample",
    "make_codec", "slot_l_byte_size", "svd_basis_byte_size",
]
__all__ += [  # HHTL-D lookup grade
    "Base17Palette", "FisherZQuality", "GOLDEN_POS", "HhtlCache", "HhtlDEntry", "HhtlDGroup", "HhtlDShared",
    "HhtlDTensor", "build_base17_palette", "build_hhtl_d_group", "fisher_z_quality", "fold", "heel_basin",
    "hip_families", "l1_cdist", "l1_distance", "nearest_l1", "unfold",
]
