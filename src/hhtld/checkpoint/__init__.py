"""Checkpoint reading: one .safetensors file, a sharded index, or a model folder."""

from .reader import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
