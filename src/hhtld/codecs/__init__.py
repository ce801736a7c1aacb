"""Codecs: pure numpy, arrays in, arrays out.

The interface every codec implements (``base``), the declaration of what a
codec stores (``layout``), the registry of pack codecs by name and id
(``registry``) and the encode thread pool (``parallel``) live here; each codec
family has its own subpackage: ``reference`` (hhtl-f32, hhtl-d and their
building blocks) and ``vq`` (the budget codec hhtl-vq).
"""

from .base import Codec, DictParts, EncodedGroup, EncodedTensor
from .reference import (
    Base17Palette,
    FamilyGamma,
    FisherZQuality,
    FisherZTable,
    HhtlCache,
    HhtlDEntry,
    HhtlDTensor,
    HhtlF32Tensor,
    Palette,
    SharedPaletteGroup,
    SvdBasis,
    build_group_with_fisher_z,
    build_group_with_leaf,
    build_hhtl_d_group,
    fisher_z_quality,
    slot_l_byte_size,
    svd_basis_byte_size,
)
from .registry import CODECS, DEFAULT_CODEC, codec_by_id, codec_class, make_codec
from .vq import HhtlVqCodec

__all__ = [
    "Base17Palette", "CODECS", "Codec", "DEFAULT_CODEC", "DictParts", "EncodedGroup", "EncodedTensor",
    "FamilyGamma", "FisherZQuality", "FisherZTable", "HhtlCache", "HhtlDEntry", "HhtlDTensor", "HhtlF32Tensor",
    "HhtlVqCodec", "Palette", "SharedPaletteGroup", "SvdBasis", "build_group_with_fisher_z",
    "build_group_with_leaf", "build_hhtl_d_group", "codec_by_id", "codec_class", "fisher_z_quality",
    "make_codec", "slot_l_byte_size", "svd_basis_byte_size",
]
