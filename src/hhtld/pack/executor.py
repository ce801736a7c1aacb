"""The local executor: runs an encode plan's units here and owns the pack being written.

Chain units run on the calling thread, one after another. Independent units run on a
pool of ``threads`` workers, at most the pool's width in flight, and their results are
taken in plan order — so the writes, which only the executor makes (through its
:class:`~hhtld.pack.writer.PackWriter`), come in the same order on any number of
threads, and the pack is the same bytes. With a :class:`~hhtld.pack.units.UnitStore`
(``--resume``), every finished unit's result is kept as it arrives and a unit whose
result is kept is read back instead of run. The time of every unit that ran goes to
:class:`~hhtld.pack.plan.UnitTimings` (what ``inspect --plan`` predicts from).

Memory: independent units are admitted while the memory they are predicted to hold
(``Unit.memory``) fits the room — the limit set by ``--memory-limit`` /
``HHTLD_MEMORY_LIMIT``, else what the system has available when each batch of units
starts (:func:`~hhtld.memory.memory_room`, read then: what the process already holds —
a model being calibrated — is not in it). A unit larger than the room runs alone. So the
peak follows the largest units, a few at a time, and never the width of the pool times
them: a 7B down projection with error feedback holds about 2.4 GB while its Hessian is
factored, and sixteen of them at once would not fit a 24 GB machine.

The executor is the one place that decides where a unit runs; another executor (a
cluster) runs the same units with the same inputs and must hand results back in the
same order.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..codecs.parallel import check_threads, encode_pool
from ..memory import memory_room
from .plan import Unit, UnitTimings
from .units import UnitStore
from .writer import PackWriter


class LocalExecutor:
    """Runs units on this machine (module docstring). A context manager: the pool
    opens on entry; on exit after an error the pack being written is aborted (nothing
    partial at the target; what becomes of the kept units is the caller's decision), and
    the measured unit times are saved. ``memory``: bytes the independent units in flight
    may hold together (default: :func:`~hhtld.memory.memory_room` as each batch starts)."""

    def __init__(self, threads: int | None = None, store: UnitStore | None = None,
                 timings: UnitTimings | None = None, memory: int | None = None):
        self.threads = check_threads(threads)
        self.store = store
        self.timings = timings if timings is not None else UnitTimings()
        self.memory = memory
        self._running: set = set()  # the batches of units in flight (closed on exit: their units cancelled)
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
            for batch in list(self._running):  # an error in the caller: nothing more of them runs
                batch.close()
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
        pool's width in flight and, together, no more predicted memory than the room
        (module docstring; one unit always runs). ``keys``: the keys their results (encoded tensors) are
        kept under with the store. ``fn(i, pool)`` gets None, or with ``threads_inside``
        (a lone unit) the pool for its own blocks, the units then running one by one."""
        store = self.store if keys is not None else None
        todo = [i for i in range(len(units)) if store is None or not store.has(keys[i])]
        batch = self._run_all(units, todo, fn, threads_inside) if todo else (x for x in ())
        self._running.add(batch)
        try:
            yield from self._in_plan_order(units, fn, keys, store, todo, batch)
        finally:
            batch.close()  # a caller that stopped early or failed: the units in flight are cancelled
            self._running.discard(batch)

    def _in_plan_order(self, units, fn, keys, store, todo, batch) -> Iterator[tuple[int, Any]]:
        pending = iter(zip(todo, batch))
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
        if threads_inside or self.pool is None:
            pool = self.pool if threads_inside else None
            return (_timed(fn, i, pool) for i in todo)
        room = self.memory if self.memory is not None else memory_room().bytes  # None: no known limit
        return in_order(todo, lambda i: self.pool.submit(_timed, fn, i, None), lambda i, f: f.result(),
                        lambda i, f: f.cancel(), self.width, lambda i: units[i].memory, room)


def in_order(todo: Sequence[int], start: Callable[[int], Any], take: Callable[[int, Any], Any],
             cancel: Callable[[int, Any], Any], width: int, memory: Callable[[int], int],
             room: int | None) -> Iterator[Any]:
    """``take(i, start(i))`` for every ``i`` of ``todo``, in order, with units started ahead
    while fewer than ``width`` are in flight and their ``memory`` together stays within
    ``room`` (None: no limit; one unit is always let in, however large). The next units
    start before a result is handed on, so they run while the caller writes it. On an
    error or when the caller stops early, the units still in flight are cancelled (``cancel``)."""
    waiting = iter(todo)
    nxt = next(waiting, None)
    flight: collections.deque = collections.deque()
    held = 0

    def fill() -> None:
        nonlocal nxt, held
        while nxt is not None and (not flight or (len(flight) < width and (
                room is None or held + memory(nxt) <= room))):
            flight.append((nxt, start(nxt)))
            held += memory(nxt)
            nxt = next(waiting, None)

    try:
        fill()
        while flight:
            i, handle = flight[0]
            out = take(i, handle)
            flight.popleft()
            held -= memory(i)
            fill()
            yield out
    finally:
        for i, handle in flight:
            cancel(i, handle)


def _timed(fn: Callable[[int, Any], Any], i: int, pool) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(i, pool)
    return out, time.perf_counter() - t0


__all__ = ["LocalExecutor", "in_order"]
