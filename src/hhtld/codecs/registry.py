"""Codec registry: name → class, id → class. Add a codec by adding it here."""

from __future__ import annotations

from ..errors import OptionsError, PackError
from .base import Codec
from .reference.hhtl_d_codec import HhtlDCodec
from .reference.hhtl_f32_codec import HhtlF32Codec
from .vq.codec import HhtlVqCodec

CODECS: dict[str, type[Codec]] = {c.name: c for c in (HhtlF32Codec, HhtlDCodec, HhtlVqCodec)}
DEFAULT_CODEC = "hhtl-vq"  # the budget codec, whose rungs the rate allocation chooses


def codec_class(name: str) -> type[Codec]:
    try:
        return CODECS[name]
    except KeyError:
        raise OptionsError(f"unknown codec '{name}' (known: {', '.join(CODECS)})") from None


def codec_by_id(codec_id: int) -> type[Codec]:
    for c in CODECS.values():
        if int(c.codec_id) == int(codec_id):
            return c
    raise PackError(f"codec id {codec_id} is not known to this hhtld")


def make_codec(name: str, **options) -> Codec:
    return codec_class(name)(**options)
