"""The budget codec family ``hhtl-vq``: segment product quantiser with residual
stages, per-row gains and a Hadamard rotation (``quantiser``), GPTQ-style error
feedback on calibration Hessians (``feedback``), and the pack codec (``codec``)."""

from .codec import HhtlVqCodec

__all__ = ["HhtlVqCodec"]
