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
           "sync_threads", "threads"]
