"""Which executor an encode runs its units on: the local one, or a Ray cluster.

:func:`hhtld.encode` sets the choice for the encode (:func:`executor_choice`); every path
then makes its executor with :func:`make_executor`, so the paths do not carry the choice
through their arguments.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

from .executor import LocalExecutor
from .plan import UnitTimings
from .units import UnitStore


@dataclass(frozen=True)
class ExecutorChoice:
    """Where an encode runs its units: ``local`` (threads here) or ``ray`` (a Ray cluster at
    ``address``, or a local one of the encode's ``threads`` workers when None); ``memory``:
    bytes the units in flight here may hold together (None: the room when it starts)."""

    kind: str = "local"
    address: str | None = None
    memory: int | None = None
    stats: dict = field(default_factory=dict, compare=False)  # what the executors of an encode counted


EXECUTORS = ("local", "ray")
_CHOICE: ContextVar[ExecutorChoice] = ContextVar("hhtld_executor", default=ExecutorChoice())


@contextmanager
def executor_choice(choice: ExecutorChoice) -> Iterator[None]:
    """Within it, :func:`make_executor` makes executors of ``choice``."""
    token = _CHOICE.set(choice)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def make_executor(threads: int | None = None, store: UnitStore | None = None,
                  timings: UnitTimings | None = None) -> LocalExecutor:
    """The executor an encode runs on: the local one, or within :func:`executor_choice` of
    ``ray`` a :class:`~hhtld.pack.ray_executor.RayExecutor` (``threads``: its width)."""
    choice = _CHOICE.get()
    if choice.kind == "local":
        return LocalExecutor(threads, store, timings, memory=choice.memory)
    from .ray_executor import RayExecutor

    return RayExecutor(threads, store, timings, address=choice.address, stats=choice.stats, memory=choice.memory)


__all__ = ["EXECUTORS", "ExecutorChoice", "executor_choice", "make_executor"]
