"""numpy ↔ torch for the dtypes a pack stores (bfloat16 and friends included)."""

from __future__ import annotations

import numpy as np

from ..stfile import NUMPY_DTYPES

# safetensors dtype name -> torch dtype attribute
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_SAME_WIDTH_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def torch_dtype(st_name: str):
    """The torch dtype of a safetensors dtype name (``"BF16"`` → ``torch.bfloat16``)."""
    import torch

    return getattr(torch, _TORCH_NAMES[st_name])


def st_name_of(dtype: np.dtype) -> str:
    for name, dt in NUMPY_DTYPES.items():
        if dt == dtype:
            return name
    raise KeyError(str(dtype))


def to_torch(a: np.ndarray, copy: bool = False):
    """A torch tensor of the same dtype, shape and values as ``a``.

    Shares memory with ``a`` unless ``copy`` (or ``a`` is read-only, e.g. a
    memory-mapped pack array, or not contiguous: then it is copied). numpy
    dtypes torch cannot take directly (ml_dtypes' bfloat16, float8) go through
    a same-width integer view."""
    import torch

    a = np.asarray(a)
    if copy or not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, copy=True, order="C")
    name = st_name_of(a.dtype)
    if a.dtype.kind == "V" or a.dtype.type.__module__.startswith("ml_dtypes"):
        return torch.from_numpy(a.view(_SAME_WIDTH_INT[a.dtype.itemsize])).view(torch_dtype(name))
    return torch.from_numpy(a)


def to_numpy(t) -> np.ndarray:
    """The inverse of :func:`to_torch` for a CPU tensor (shares memory)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        name = {torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[t.dtype]
        return t.view(getattr(torch, f"int{8 * t.element_size()}")).numpy().view(NUMPY_DTYPES[name])
    return t.numpy()
