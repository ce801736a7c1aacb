"""The thread pool an encode runs its blocks on.

Blocks of one tensor are encoded side by side on ``threads`` worker threads
(numpy's BLAS and faiss release the GIL). Inside the pool BLAS and faiss run
single-threaded, so two workers do not fight over the cores, and every
block's bytes are the same whatever the thread count: the block boundaries
depend on the tensor's shape only, and each block is computed on its own.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

from threadpoolctl import threadpool_limits

from ..errors import OptionsError


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int:
    """``threads`` or, when None, :func:`available_cpus`; a clear error unless >= 1."""
    if threads is None:
        return available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise OptionsError(f"threads must be a positive integer, got {threads!r}")
    return threads


def _single_threaded_faiss() -> None:
    try:
        import faiss  # noqa: PLC0415

        faiss.omp_set_num_threads(1)
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        pass


class EncodePool(ThreadPoolExecutor):
    """A thread pool that knows its width (how many tasks to keep in flight)."""

    def __init__(self, width: int):
        super().__init__(max_workers=width, thread_name_prefix="hhtld-encode", initializer=_single_threaded_faiss)
        self.width = width


@contextmanager
def encode_pool(threads: int | None = None) -> Iterator[EncodePool | None]:
    """A pool of ``threads`` workers (None when 1), with BLAS on one thread while it is open."""
    n = check_threads(threads)
    with threadpool_limits(limits=1, user_api="blas"):
        if n == 1:
            yield None
            return
        with EncodePool(n) as pool:
            yield pool


__all__ = ["EncodePool", "available_cpus", "check_threads", "encode_pool"]
