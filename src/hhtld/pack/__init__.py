"""The ``.hhtld`` pack: writer (encode), lazy reader, dense decode (docs/format.md)."""

from .decode import DecodeResult, decode_pack
from .encode import encode_checkpoint
from .reader import Pack, open_pack
from .writer import EncodeResult, bf16_bytes

__all__ = ["DecodeResult", "EncodeResult", "Pack", "bf16_bytes", "decode_pack", "encode_checkpoint", "open_pack"]
