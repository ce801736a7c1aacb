"""Which weights of a model ``load(..., keep_compressed=True)`` keeps compressed, and the swap.

A parameter is kept compressed when its pack tensor is encoded and every
module that owns it (tied parameters have several) is a plain ``nn.Linear``,
``nn.Embedding`` (no ``max_norm``) or GPT-2 ``Conv1D`` whose weight has the
shape the row matrix implies. Subclasses that change ``forward`` (e.g. an
embedding that scales its output) keep a dense weight.
"""

from __future__ import annotations

import torch
from torch import nn

from ..codecs.vq.codec import HhtlVqCodec
from ..pack.reader import DECODE_WORK, Pack
from .compressed import CompressedEmbedding, CompressedLinear, CompressedWeight, DecodeCache, StoredParts
from .tensors import torch_dtype


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is required by hhtld.load
        return None
    return Conv1D


def module_kind(mod: nn.Module) -> str | None:
    """``linear``, ``embedding``, ``conv1d`` or None (not replaceable)."""
    if isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward:
        return "linear"
    if isinstance(mod, nn.Embedding) and type(mod).forward is nn.Embedding.forward and mod.max_norm is None:
        return "embedding"
    conv1d = _conv1d_class()
    if conv1d is not None and type(mod) is conv1d:
        return "conv1d"
    return None


class CompressPlan:
    """Collects the compressed weights while ``load`` fills the model, then swaps the modules."""

    def __init__(self, pack: Pack, model: nn.Module, dtype, cache_layers: int, device, codec_space: bool = True,
                 tables: str = "int16"):
        self.pack = pack
        self.model = model
        self.dtype = dtype
        self.device = device
        self.codec_space = codec_space
        self.tables = tables
        self.cache = DecodeCache(cache_layers)
        self.groups: dict[int, StoredParts] = {}
        self.swaps: dict[int, tuple[nn.Module, str, CompressedWeight]] = {}  # id(old module) -> (old, kind, weight)

    def _group(self, gi: int) -> StoredParts:
        if gi not in self.groups:
            gp = self.pack.group_parts(gi)
            g = StoredParts(gp.params, {part: gp[part] for part in self.pack.groups[gi]["parts"]})
            self.groups[gi] = g if self.device is None else g.to(self.device)
        return self.groups[gi]

    def take(self, slot) -> bool:
        """Keep ``slot`` (a parameter to fill) compressed if it qualifies; True when taken."""
        if not slot.is_param:
            return False
        t = self.pack.info(slot.source)
        if t["kind"] != "encoded":
            return False
        n_rows, n_cols = (t.get("row_shape") or t["shape"])[:2]
        transposed = bool(t.get("transposed"))
        owners = []
        for key in slot.keys:
            mod_name, _, leaf = key.rpartition(".")
            mod = self.model.get_submodule(mod_name) if mod_name else self.model
            kind = module_kind(mod) if leaf == "weight" else None
            if kind is None:
                return False
            shape = tuple(mod.weight.shape)
            ok = (shape == (n_cols, n_rows) and transposed) if kind == "conv1d" else (
                shape == (n_rows, n_cols) and not transposed)
            if not ok:
                return False
            owners.append((mod, kind))
        # on use the whole weight may be decoded in one call: refuse now what could never fit
        self.pack.reserve(slot.source, n_rows * n_cols * 4 * DECODE_WORK, "decoding it on use (keep_compressed)")
        tp = self.pack.tensor_parts(slot.source)
        tensor = StoredParts(tp.params, {part: tp[part] for part in t.get("parts", [])})
        if self.device is not None:
            tensor = tensor.to(self.device)
        stored = torch_dtype(t["dtype"])
        codec = self.pack.codec_of(slot.source)
        if codec is HhtlVqCodec and self.codec_space and (self.device is None or torch.device(self.device).type == "cpu"):
            tensor.tile_twigs()  # the CPU kernels' layout, the only copy of the twigs kept
        weight = CompressedWeight(slot.source, codec, self._group(t["group"]), tensor, (n_rows, n_cols), stored,
                                  self.dtype or stored, self.cache, self.codec_space, self.tables)
        for mod, kind in owners:
            self.swaps[id(mod)] = (mod, kind, weight)
        return True

    def install(self) -> None:
        """Replace every collected module (at every path it is reachable by) with its compressed stand-in."""
        new: dict[int, nn.Module] = {}
        for key, (mod, kind, weight) in self.swaps.items():
            if kind == "embedding":
                new[key] = CompressedEmbedding(weight, mod.padding_idx)
            else:
                new[key] = CompressedLinear(weight, mod.bias)
        for _, parent in list(self.model.named_modules(remove_duplicate=False)):
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in new:
                    parent._modules[child_name] = new[id(child)]
        self.swaps.clear()


__all__ = ["CompressPlan", "module_kind"]
