"""Weights kept compressed in memory (``hhtld.load(pack, keep_compressed=True)``).

An encoded ``nn.Linear`` / ``nn.Embedding`` (or GPT-2 ``Conv1D``) weight is
replaced by a module that holds the pack's stored parts — twigs, gains,
palettes, rotation signs, leaf — as torch buffers in their stored dtypes
(uint8/uint16 twigs, bfloat16 palettes and gains, int8 signs and leaf) and
decodes on use:

* :class:`CompressedEmbedding` decodes only the rows it looks up;
* :class:`CompressedLinear` applies an hhtl-vq weight in the codec's space
  with the kernels of :mod:`hhtld.kernels` (lookup tables for a few input
  rows, decode-then-GEMM block by block for many; never the whole weight),
  and otherwise decodes its whole weight per forward (a shared LRU of
  decoded weights, ``cache_layers=N``, keeps the last N).

On the CPU every codec decodes with its own numpy ``Codec.decode_rows`` on
zero-copy views of the buffers (exactly the bits of a dense load; hhtl-vq
twigs are held in the kernels' tiled layout and read back as rows); on
other devices hhtl-vq decodes in torch (:mod:`.torch_vq`) where the buffers
live.
Group parts (palettes, signs, basis) are one :class:`StoredParts` module
shared by every weight of the group.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..codecs.vq.codec import HhtlVqCodec, rotation_block
from ..kernels import TiledTwig, VqKernel, stage_palettes, sync_threads, tile_twigs, vq_kernel
from ..kernels.runtime import numpy_blas_on_one_thread
from .tensors import to_numpy, to_torch
from .torch_vq import decode_rows_vq, gather_stages, rotate_inputs


class StoredParts(nn.Module):
    """The stored arrays of one group or one tensor as buffers, in their pack
    dtypes, plus the manifest ``params``. Indexing by part name (``"twig.0"``)
    gives the buffer. ``.to(device)`` moves them; dtype casts of the model
    (``.half()``, ``.to(torch.bfloat16)``) leave them as stored."""

    def __init__(self, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]):
        super().__init__()
        self.params = dict(params)
        self.kernel_palettes = None  # the CPU kernels' float32 palettes, made on first use
        self.tiled: dict[str, int] = {}  # twig parts held tiled -> their row count
        self._part_buffer: dict[str, str] = {}
        for part, a in arrays.items():
            bname = part.replace(".", "_")
            self.register_buffer(bname, to_torch(a, copy=True))
            self._part_buffer[part] = bname

    def __getitem__(self, part: str) -> torch.Tensor:
        return self._buffers[self._part_buffer[part]]

    def tile_twigs(self) -> None:
        """Hold the twig arrays in the kernels' tiled layout (:func:`hhtld.kernels.tile_twigs`)
        instead of rows: the only copy kept, read back as rows by :class:`_NumpyParts`.
        CPU only (a move to another device puts them back in rows)."""
        for part, bname in self._part_buffer.items():
            if part.startswith("twig.") and part not in self.tiled:
                b = self._buffers[bname]
                self.tiled[part] = int(b.shape[0])
                self._buffers[bname] = to_torch(tile_twigs(to_numpy(b)), copy=False)

    def _untile(self) -> None:
        for part, n in list(self.tiled.items()):
            bname = self._part_buffer[part]
            self._buffers[bname] = to_torch(TiledTwig(to_numpy(self._buffers[bname]), n)[:], copy=False)
        self.tiled.clear()

    def __contains__(self, part: str) -> bool:
        return part in self._part_buffer

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _apply(self, fn, recurse=True):
        if self.tiled and fn(torch.empty(0, dtype=torch.uint8)).device.type != "cpu":
            self._untile()
        self.kernel_palettes = None
        for k, b in self._buffers.items():
            nb = fn(b)
            if nb.dtype != b.dtype:  # keep the stored dtype, follow the device
                nb = b.to(nb.device)
            self._buffers[k] = nb
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{p}: {tuple(self[p].shape)} {str(self[p].dtype).removeprefix('torch.')}"
                         for p in self._part_buffer)


class _NumpyParts:
    """``Parts`` (the codecs' protocol) over a :class:`StoredParts`, for numpy decoders."""

    def __init__(self, stored: StoredParts):
        self.stored = stored
        self.params = stored.params

    def __getitem__(self, part: str) -> np.ndarray:
        a = to_numpy(self.stored[part])
        n = self.stored.tiled.get(part)
        return a if n is None else TiledTwig(a, n)

    def __contains__(self, part: str) -> bool:
        return part in self.stored


class DecodeCache:
    """LRU of decoded weights shared by the compressed modules of one model;
    ``max_layers`` 0 keeps nothing."""

    def __init__(self, max_layers: int = 0):
        self.max_layers = int(max_layers)
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()

    def get(self, key: int) -> torch.Tensor | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: int, value: torch.Tensor) -> None:
        if self.max_layers <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_layers:
            self._items.popitem(last=False)

    def drop(self, key: int) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class CompressedWeight(nn.Module):
    """One encoded weight: the row matrix ``(n_rows, n_cols)`` of pack tensor
    ``pack_name``, decoded on demand to ``dtype`` (through ``stored_dtype``,
    the checkpoint's dtype, exactly as a dense load rounds it)."""

    def __init__(self, pack_name: str, codec, group: StoredParts, tensor: StoredParts, row_shape,
                 stored_dtype: torch.dtype, dtype: torch.dtype, cache: DecodeCache, codec_space: bool = True,
                 tables: str = "int16"):
        super().__init__()
        self.pack_name = pack_name
        self.codec = codec
        self.group = group  # shared with the other weights of the group
        self.tensor = tensor
        self.n_rows, self.n_cols = (int(d) for d in row_shape)
        self.stored_dtype = stored_dtype
        self.dtype = dtype
        self.cache = cache
        self.codec_space = codec_space  # may apply the weight without decoding it (matmul_t)
        self.tables = tables  # the kernels' lookup tables: "int16" or "float32"
        self.rows_decoded = 0  # rows decoded so far (a full decode counts n_rows)
        self._kernel: VqKernel | None = None  # made on first use on the CPU

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensor._buffers.values())).device

    def _decode(self, idx: torch.Tensor | None) -> torch.Tensor:
        self.rows_decoded += self.n_rows if idx is None else int(idx.shape[0])
        if self.device.type == "cpu" or self.codec is not HhtlVqCodec:
            sel = None if idx is None else idx.detach().cpu().numpy().astype(np.int64)
            with numpy_blas_on_one_thread():
                rows = to_torch(self.codec.decode_rows(_NumpyParts(self.group), _NumpyParts(self.tensor), sel))
            rows = rows.to(self.device)
        else:
            rows = decode_rows_vq(self.group.params, self.group, self.tensor, idx)
        return rows.to(self.stored_dtype).to(self.dtype)

    def codec_space_ok(self, x: torch.Tensor) -> bool:
        """Whether ``x @ W.T`` may be computed without decoding ``W``: allowed
        (``codec_space``), an hhtl-vq weight and inputs in the weight's dtype.
        On the CPU any number of input rows (the kernels choose lookup tables
        or decode-then-GEMM block by block; float32 inside, the result cast to
        the inputs' dtype); on other devices float32 only and fewer input rows
        than weight rows. The weight used is the codec's float32
        reconstruction, not rounded to the checkpoint's dtype as a dense load
        of a bfloat16 checkpoint rounds it (``codec_space=False`` for that)."""
        if not (self.codec_space and self.codec is HhtlVqCodec and x.dtype == self.dtype):
            return False
        if self._kernel is not None or self.device.type == "cpu":
            return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return (x.dtype == torch.float32 and self.stored_dtype == torch.float32
                and x.numel() // max(1, self.n_cols) < self.n_rows)

    def kernel(self) -> VqKernel:
        """The weight prepared for the CPU kernels (views of the stored buffers; the
        group's float32 palettes made once and shared by its weights)."""
        if self._kernel is None:
            g = self.group
            if g.kernel_palettes is None:
                g.kernel_palettes = stage_palettes(g.params, _NumpyParts(g))
            self._kernel = vq_kernel(g.params, _NumpyParts(g), _NumpyParts(self.tensor), g.kernel_palettes)
        return self._kernel

    def matmul_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` (t, n_cols) in the codec's space: the
        inputs rotated (``H`` is symmetric and orthonormal, so ``x @ (Q H S).T =
        (x S H) @ Q.T``), then the rows ``Q`` applied — on the CPU by the kernels
        of :mod:`hhtld.kernels` (lookup tables for few rows, decode-then-GEMM
        block by block for many), elsewhere by gathering ``Q`` in torch — times
        the gains, plus the leaf as ``(x @ basis.T) @ (leaf * scale).T``. Equals
        the product with the decoded weight up to float32 rounding."""
        g, t = self.group, self.tensor
        self.rows_decoded += self.n_rows
        if self._kernel is not None or self.device.type == "cpu":
            sync_threads(torch.get_num_threads())
            xn = x.detach().to(torch.float32).contiguous().numpy()
            return torch.from_numpy(self.kernel().matmul_t(xn, self.tables)).to(x.dtype)
        q = gather_stages(g.params, g, t)
        xr = rotate_inputs(x, g["rotation"], rotation_block(self.group.params)) if "rotation" in g else x
        y = xr @ q.t()
        if "gain" in t:
            y *= t["gain"].to(torch.float32)
        if "leaf" in t:
            c = (x @ g["basis"].to(torch.float32).t()) * t["leaf_scale"][0].to(torch.float32)
            y += c @ t["leaf"].to(torch.float32).t()
        return y

    def rows(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``(m, n_cols)`` in ``dtype``: rows ``idx`` (1-D integer tensor), all when None."""
        full = self.cache.get(id(self))
        if full is not None:
            return full if idx is None else full.index_select(0, idx)
        if idx is None:
            return self.dense()
        return self._decode(idx.to(device=self.device, dtype=torch.int64))

    def dense(self) -> torch.Tensor:
        """The whole weight ``(n_rows, n_cols)`` in ``dtype`` (from the cache when it holds it)."""
        full = self.cache.get(id(self))
        if full is None:
            full = self._decode(None)
            self.cache.put(id(self), full)
        return full

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        self.cache.drop(id(self))
        self._kernel = None  # the buffers may move: views of them are made again on use
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"'{self.pack_name}', ({self.n_rows}, {self.n_cols}), codec={self.codec.name}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}")


class CompressedLinear(nn.Module):
    """``y = x @ W.T + b`` from the stored parts of ``W``. Stands in for
    ``nn.Linear`` (and GPT-2's ``Conv1D``, whose weight is the transposed row
    matrix: the same product).

    A weight in the cache is used as is. With a cache (``cache_layers`` > 0)
    the weight is decoded (exactly as a dense load decodes it) and cached.
    Without one, an hhtl-vq weight is applied in the codec's space when
    :meth:`CompressedWeight.codec_space_ok` allows it
    (:meth:`CompressedWeight.matmul_t`: no weight is decoded whole);
    otherwise it is decoded per forward. ``weight`` decodes the dense weight
    on access."""

    def __init__(self, source: CompressedWeight, bias: nn.Parameter | None):
        super().__init__()
        self.source = source
        self.in_features = source.n_cols
        self.out_features = source.n_rows
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        return self.source.dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.source
        w = src.cache.get(id(src))
        if w is None and src.cache.max_layers == 0 and src.codec_space_ok(x):
            y = src.matmul_t(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y = y.add_(self.bias) if y.dtype == self.bias.dtype else y + self.bias  # a fresh tensor: in place
            return y
        if w is None:
            w = src.dense()
        if x.is_floating_point() and w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CompressedEmbedding(nn.Module):
    """Stands in for ``nn.Embedding``: decodes only the rows it looks up
    (each distinct id once). ``weight`` decodes the whole table on access."""

    def __init__(self, source: CompressedWeight, padding_idx: int | None = None):
        super().__init__()
        self.source = source
        self.num_embeddings = source.n_rows
        self.embedding_dim = source.n_cols
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.source.dense()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= self.num_embeddings):
            raise IndexError(f"index out of range in self (ids must be in 0..{self.num_embeddings - 1})")
        rows = self.source.rows(uniq)
        return rows.index_select(0, inverse).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (
            "" if self.padding_idx is None else f", padding_idx={self.padding_idx}")


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights as held in memory, each tensor counted once:
    ``compressed`` (stored parts of compressed weights), ``dense`` (every other
    parameter and buffer), ``total``, and ``decoded_cache`` (decoded weights
    the LRU holds now)."""
    seen: set[int] = set()
    out = {"compressed": 0, "dense": 0, "decoded_cache": 0}
    caches = {}
    for mod in model.modules():
        kind = "compressed" if isinstance(mod, StoredParts) else "dense"
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is None or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            out[kind] += t.untyped_storage().nbytes()
        if isinstance(mod, CompressedWeight):
            caches[id(mod.cache)] = mod.cache
    for c in caches.values():
        out["decoded_cache"] += sum(t.numel() * t.element_size() for t in c._items.values())
    out["total"] = out["compressed"] + out["dense"]
    return out
