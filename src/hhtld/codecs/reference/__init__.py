"""The reference codec family: palettes of real rows, one-byte twigs.

Building blocks (one module each): f32 palettes (``palette``), the Slot L leaf
on a shared SVD basis (``slot_l``, ``svd_basis``), the Fisher-z cosine table
(``fisher_z``, measured by ``fisher_z_quality``), the Base17 fold and its L1
palettes (``base17_fold``, ``base17_palette``), HIP families (``hip``), the
distance/route cache (``route_cache``) and the group sharing them
(``shared_group``). Tensor-level structures (``hhtl_f32_tensor``,
``hhtl_d_tensor``) are what one tensor encodes to; the pack codecs
(``hhtl_f32_codec``, ``hhtl_d_codec``) put them in a pack.
"""

from .base17_fold import GOLDEN_POS, fold, l1_cdist, l1_distance, nearest_l1, unfold
from .base17_palette import Base17Palette, build_base17_palette
from .fisher_z import FamilyGamma, FisherZTable
from .fisher_z_quality import FisherZQuality, fisher_z_quality
from .hhtl_d_codec import HhtlDCodec
from .hhtl_d_tensor import HhtlDEntry, HhtlDGroup, HhtlDShared, HhtlDTensor, build_hhtl_d_group, heel_basin
from .hhtl_f32_codec import HhtlF32Codec
from .hhtl_f32_tensor import HhtlF32Tensor
from .hip import hip_families
from .palette import Palette, assign_nearest, build_f32_palette, check_k, furthest_point_sample
from .route_cache import HhtlCache
from .shared_group import SharedPaletteGroup, build_group_with_fisher_z, build_group_with_leaf
from .slot_l import decode_slot_l, encode_slot_l, slot_l_byte_size
from .svd_basis import SvdBasis, svd_basis_byte_size

__all__ = [
    "Base17Palette", "FamilyGamma", "FisherZQuality", "FisherZTable", "GOLDEN_POS", "HhtlCache", "HhtlDCodec",
    "HhtlDEntry", "HhtlDGroup", "HhtlDShared", "HhtlDTensor", "HhtlF32Codec", "HhtlF32Tensor", "Palette",
    "SharedPaletteGroup", "SvdBasis", "assign_nearest", "build_base17_palette", "build_f32_palette",
    "build_group_with_fisher_z", "build_group_with_leaf", "build_hhtl_d_group", "check_k", "decode_slot_l",
    "encode_slot_l", "fisher_z_quality", "fold", "furthest_point_sample", "heel_basin", "hip_families",
    "l1_cdist", "l1_distance", "nearest_l1", "slot_l_byte_size", "svd_basis_byte_size", "unfold",
]
