"""The local executor: runs an encode plan's units here and owns the pack being written.

Chain units run on the calling thread, one after another. Independent units run on a
pool of ``threads`` workers, at most the pool's width in flight, and their results are
taken in plan order — so the writes, which only the executor makes (through its
:class:`~hhtld.pack.writer.PackWriter`), come in the same order on any number of
threads, and the pack is the same bytes. With a :class:`~hhtld.pack.units.UnitStore`
(``--resume``), every finished unit's result is kept as it arrives and a unit whose
result is kept is read back instead of run. The time of every unit that ran goes to
:class:`~hhtld.pack.plan.UnitTimings` (what ``inspect --plan`` predicts from).

The executor is the one place that decides where a unit runs; another executor (a
cluster) runs the same units with the same inputs and must hand results back in the
same order.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..codecs.base import ordered_map
from ..codecs.parallel import check_threads, encode_pool
from .plan import Unit, UnitTimings
from .units import UnitStore
from .writer import PackWriter


class LocalExecutor:
    """Runs units on this machine (module docstring). A context manager: the pool
    opens on entry; on exit after an error the pack being written is aborted (nothing
    partial at the target; what becomes of the kept units is the caller's decision), and
    the measured unit times are saved."""

    def __init__(self, threads: int | None = None, store: UnitStore | None = None,
                 timings: UnitTimings | None = None):
        self.threads = check_threads(threads)
        self.store = store
        self.timings = timings if timings is not None else UnitTimings()
        self.writer = None
        self.pool = None
        self._pool_cm = None

    @property
    def width(self) -> int:
        return self.pool.width if self.pool is not None else 1

    def __enter__(self) -> "LocalExecutor":
        self._pool_cm = encode_pool(self.threads)
        self.pool = self._pool_cm.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.abort_pack()
        finally:
            self._pool_cm.__exit__(exc_type, exc, tb)
            self.pool = None
            self.timings.save()

    # -- the pack --------------------------------------------------------------------------------
    def open_pack(self, out: Path, ckpt, plan) -> PackWriter:
        """The pack this executor writes (one at a time; the previous one must be finished)."""
        self.writer = PackWriter(Path(out), ckpt, plan)
        return self.writer

    def abort_pack(self) -> None:
        """Drop the pack being written (nothing is left at its target)."""
        w, self.writer = self.writer, None
        if w is not None:
            w.abort()

    def close_pack(self, unit: Unit, **finish) -> Path:
        """The ``manifest`` unit: passthrough tensors, side files, the manifest, the checked
        rename (``PackWriter.finish``)."""
        w, self.writer = self.writer, None
        try:
            return self.run(unit, lambda: w.finish(**finish))
        except BaseException:
            w.abort()
            raise

    # -- units -------------------------------------------------------------------------------------
    def run(self, unit: Unit, fn: Callable[[], Any], *, load: Callable[[], Any] | None = None,
            save: Callable[[Any], None] | None = None) -> Any:
        """One chain unit, here: its kept result (``load``) or ``fn()`` (then ``save``)."""
        if self.store is not None and load is not None:
            got = load()
            if got is not None:
                return got
        t0 = time.perf_counter()
        out = fn()
        self.timings.add(unit, time.perf_counter() - t0)
        if self.store is not None and save is not None:
            save(out)
        return out

    def map(self, units: Sequence[Unit], fn: Callable[[int, Any], Any], *, keys: Sequence[str] | None = None,
            threads_inside: bool = False) -> Iterator[tuple[int, Any]]:
        """Independent units: ``(i, fn(i))`` for every unit ``i`` in order, at most the
        pool's width in flight. ``keys``: the keys their results (encoded tensors) are
        kept under with the store. ``fn(i, pool)`` gets None, or with ``threads_inside``
        (a lone unit) the pool for its own blocks, the units then running one by one."""
        store = self.store if keys is not None else None
        todo = [i for i in range(len(units)) if store is None or not store.has(keys[i])]
        pending = iter(zip(todo, self._run_all(units, todo, fn, threads_inside)))
        wanted = set(todo)
        for i in range(len(units)):
            if i not in wanted:
                got = store.tensor(keys[i])  # read when its turn comes: one kept unit in memory at a time
                if got is not None:
                    yield i, got
                    continue
                out, sec = _timed(fn, i, self.pool)  # damaged: done again, here
            else:
                j, (out, sec) = next(pending)
                assert j == i
            self.timings.add(units[i], sec)
            if store is not None:
                store.put_tensor(keys[i], out)
            yield i, out

    def _run_all(self, units: Sequence[Unit], todo: list[int], fn: Callable[[int, Any], Any],
                 threads_inside: bool) -> Iterator[tuple[Any, float]]:
        """``(fn(i, pool), seconds)`` for every ``i`` of ``todo``, in order (what another
        executor replaces to run them elsewhere)."""
        return ordered_map(lambda i: _timed(fn, i, self.pool if threads_inside else None), todo,
                           None if threads_inside else self.pool, window=self.width)


def _timed(fn: Callable[[int, Any], Any], i: int, pool) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(i, pool)
    return out, time.perf_counter() - t0


__all__ = ["LocalExecutor"]
