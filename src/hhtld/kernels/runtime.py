"""Which kernel backend runs codec-space products: numba when it imports, else numpy.

numba is a dependency of hhtld; it can still be missing or broken (a platform
without wheels, an llvmlite that does not load) or be switched off with
``HHTLD_KERNELS=numpy``. Then the numpy path runs — the same products,
several times slower for token-by-token generation — and hhtld says so once
on stderr, never silently.
"""

from __future__ import annotations

import os
import sys
import threading
from functools import lru_cache

ENV = "HHTLD_KERNELS"  # "numba" (default) or "numpy"
BACKENDS = ("numba", "numpy")

_said: set[str] = set()


def _note(msg: str) -> None:
    """Say ``msg`` on stderr, once per process."""
    if msg not in _said:
        _said.add(msg)
        print(f"hhtld: note: {msg}", file=sys.stderr)


@lru_cache(maxsize=1)
def _numba_module():
    """The compiled kernels module, or the reason it cannot be used (a string)."""
    try:
        from . import compiled  # noqa: PLC0415 - imports numba
    except Exception as e:  # ImportError, or llvmlite failing to load its library
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return compiled


_chosen: dict[str, object] = {}


def backend() -> str:
    """``"numba"`` or ``"numpy"``: the backend codec-space products use (decided once
    per process from ``HHTLD_KERNELS`` and whether numba imports; :func:`reset` decides again)."""
    got = _chosen.get("backend")
    if got is None:
        got = _chosen["backend"] = _decide()
    return got  # type: ignore[return-value]


def reset() -> None:
    """Forget the decisions of :func:`backend` and :func:`int16_tables` (after changing ``HHTLD_KERNELS``)."""
    _chosen.clear()


def _decide() -> str:
    want = os.environ.get(ENV, "numba").strip().lower() or "numba"
    if want not in BACKENDS:
        _note(f"{ENV}={want!r} is not one of {', '.join(BACKENDS)}; using numba when it is available")
        want = "numba"
    if want == "numpy":
        return "numpy"
    mod = _numba_module()
    if isinstance(mod, str):
        _note(f"the compiled kernels are unavailable ({mod}); compressed weights run on the numpy path, "
              f"several times slower (pip install numba to fix)")
        return "numpy"
    return "numba"


def int16_tables() -> bool:
    """Whether int16 tables can run: numba and the C extension ``_lut``. Without the
    extension float32 tables run instead (about four times slower), said once on stderr."""
    got = _chosen.get("int16")
    if got is None:
        got = _chosen["int16"] = _decide_int16()
    return bool(got)


def _decide_int16() -> bool:
    if backend() != "numba":
        return False
    from .native import library  # noqa: PLC0415

    lib = library()
    if isinstance(lib, str):
        _note(f"the table-sum extension is unavailable ({lib}); float32 tables run instead, "
              f"about four times slower (reinstall hhtld with a C compiler to fix)")
        return False
    return True


def compiled_kernels():
    """The numba kernels module (only when :func:`backend` is ``"numba"``)."""
    mod = _numba_module()
    if isinstance(mod, str):  # pragma: no cover - callers ask backend() first
        raise RuntimeError(mod)
    return mod


def decode_ops():
    """The compiled ops of one decoded token (:mod:`.decode_ops`), or None on the numpy path."""
    if backend() != "numba":
        return None
    from . import decode_ops as ops  # noqa: PLC0415

    return ops


def threads() -> int:
    """Threads the compiled kernels use: numba's current setting (follows ``torch.set_num_threads``
    when the loader syncs it), 1 on the numpy path."""
    if backend() != "numba":
        return 1
    import numba  # noqa: PLC0415

    return int(numba.get_num_threads())


def warm_up() -> None:
    """Import the compiled kernels and run each once on a tiny weight, so that numba's
    compilation (or its cache load) happens now, not in the first product."""
    if _chosen.get("warm") or backend() != "numba":
        return
    import numpy as np  # noqa: PLC0415

    from .vq import StageArrays, VqKernel, tile_twigs  # noqa: PLC0415

    palt = np.zeros((1, 2, 4), dtype=np.float32)
    st = StageArrays(palt, np.zeros(1, dtype=np.int64), np.full(1, 2, dtype=np.int64),
                     tile_twigs(np.zeros((3, 2), dtype=np.uint8)))
    k = VqKernel(3, 4, [st, st], np.ones(3, dtype=np.float32), np.ones(4, dtype=np.int8), 4, None, None, 0.0)
    x = np.ones((1, 4), dtype=np.float32)
    for tables in ("int16", "float32"):
        k.matmul_t(x, tables)
    k.matmul_t(np.ones((9, 4), dtype=np.float32))
    ops = decode_ops()
    v = np.ones(4, dtype=np.float32)
    ops.rms_norm(v, v, np.float32(1e-6), v.copy())
    ops.add_rms_norm(v.copy(), v, v, np.float32(1e-6), v.copy())
    ops.silu_mul(v, v, v.copy())
    cache = np.zeros((1, 2, 4), dtype=np.float32)
    ops.attend(v, v, v, v, v, cache, cache.copy(), 0, np.float32(0.5), np.zeros(2, dtype=np.float32), v.copy())
    _chosen["warm"] = True


def warm_up_pairs() -> None:
    """Compile the two-weight product of :class:`hhtld.kernels.KernelPair` now (a loop that
    pairs weights calls it first; others never compile it)."""
    if _chosen.get("warm_pairs") or not int16_tables():
        return
    import numpy as np  # noqa: PLC0415

    from .vq import KernelPair, StageArrays, VqKernel, tile_twigs  # noqa: PLC0415

    st = StageArrays(np.zeros((1, 2, 4), dtype=np.float32), np.zeros(1, dtype=np.int64), np.full(1, 2, dtype=np.int64),
                     tile_twigs(np.zeros((3, 2), dtype=np.uint8)))
    k = VqKernel(3, 4, [st, st], np.ones(3, dtype=np.float32), np.ones(4, dtype=np.int8), 4, None, None, 0.0)
    KernelPair(k, k).matmul_t(np.ones((1, 4), dtype=np.float32))
    _chosen["warm_pairs"] = True


_asked = threading.local()  # the last count each thread asked for (numba's setting is per thread)


_BLAS = None


def numpy_blas_on_one_thread():
    """A context in which numpy's BLAS runs on one thread (threadpoolctl). Numpy work that runs
    between torch's parallel ops (the codecs' decodes, the lean loop's small products) would
    otherwise leave numpy's BLAS threads spinning on the cores torch's threads need (measured:
    MiniLM one sentence at a time on 2 threads, 0.20x dense with them, 0.36x without)."""
    global _BLAS
    if _BLAS is None:
        from pathlib import Path

        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController()
        # numpy's BLAS only: a BLAS that torch carries runs torch's products, on torch's threads
        mine = [i["filepath"] for i in ctl.info() if i["user_api"] == "blas" and "torch" not in Path(i["filepath"]).parts]
        _BLAS = ctl.select(filepath=mine)
    return _BLAS.limit(limits=1)


def sync_threads(n: int) -> None:
    """Let the compiled kernels use ``n`` threads (at most numba's pool; e.g. torch's
    ``get_num_threads()``, so both libraries use the same cores). No-op on numpy."""
    if getattr(_asked, "n", None) == n or backend() != "numba":
        return
    import numba  # noqa: PLC0415

    numba.set_num_threads(max(1, min(int(n), int(numba.config.NUMBA_NUM_THREADS))))
    _asked.n = n


__all__ = ["BACKENDS", "ENV", "backend", "compiled_kernels", "decode_ops", "int16_tables", "numpy_blas_on_one_thread", "reset",
           "sync_threads", "threads",
           "warm_up"]
