"""The C extension ``hhtld.kernels._lut`` (built at install time), loaded through
ctypes so that numba-compiled loops can call its table sums directly."""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | str:
    """The loaded extension, or why it cannot be loaded (a string)."""
    try:
        spec = importlib.util.find_spec("hhtld.kernels._lut")
    except (ImportError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return "the extension hhtld.kernels._lut was not built (a C compiler is needed at install time)"
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        return f"cannot load {spec.origin}: {e}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.hhtld_lut_tiles.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.hhtld_lut_tiles.restype = None
    lib.hhtld_lut_group.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr]
    lib.hhtld_lut_group.restype = None
    lib.hhtld_lut_gather.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_int, ptr]
    lib.hhtld_lut_gather.restype = None
    lib.hhtld_lut_simd.argtypes = []
    lib.hhtld_lut_simd.restype = ctypes.c_int
    lib.hhtld_lut_set_simd.argtypes = [ctypes.c_int]
    lib.hhtld_lut_set_simd.restype = ctypes.c_int
    return lib


def lut_function():
    """``hhtld_lut_tiles`` as a ctypes function (callable from numba), or None."""
    lib = library()
    return None if isinstance(lib, str) else lib.hhtld_lut_tiles


def table_function():
    """``hhtld_lut_group`` (one group's int16 table rows) as a ctypes function, or None."""
    lib = library()
    return None if isinstance(lib, str) else lib.hhtld_lut_group


def gather_function():
    """``hhtld_lut_gather`` (rows of Q from one-byte tiled twigs) as a ctypes function, or None."""
    lib = library()
    return None if isinstance(lib, str) else lib.hhtld_lut_gather


def simd() -> str:
    """The table-sum path the extension runs: ``avx512`` or ``c`` (none: ``unavailable``)."""
    lib = library()
    if isinstance(lib, str):
        return "unavailable"
    return "avx512" if lib.hhtld_lut_simd() else "c"


def set_simd(on: bool) -> str:
    """Use the vector path when the CPU has it (``on``) or plain C; returns :func:`simd`."""
    lib = library()
    if not isinstance(lib, str):
        lib.hhtld_lut_set_simd(1 if on else 0)
    return simd()


__all__ = ["gather_function", "library", "lut_function", "set_simd", "simd", "table_function"]
