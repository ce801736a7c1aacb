"""The Ray executor: an encode plan's independent units on a Ray cluster.

``hhtld encode ... --executor ray [--ray-address ADDR]`` (extra ``ray``). The driver —
this process — plans, runs the chain units (the calibrated analysis, Fisher pass, block
step and checks; group finishes; the manifest) and is the only writer of the pack; the
independent units (rung trials, group fits, tensor encodes) go to Ray tasks, at most twice the
cluster's width in flight, each asking Ray for the memory it is predicted to hold
(``Unit.memory``), so that a node runs only the units that fit it together. A lone
unit (a group of one tensor, one fit) runs here instead, its blocks on this process's
pool, where one task would run them on one core.

A task gets the unit's function, which holds the checkpoint's *path and headers* and
the group's fitted parts, never weights: each worker reads its own rows of the
checkpoint, and an encode with error feedback its Hessian from the encode's working
folder (both must be reachable at the same path on every node, as a model folder on
shared storage is), and hands back the encoded parts. Results are taken in
plan order, so the writes — and the pack's bytes — are those of the local executor,
whatever the number of workers (tested). Without ``address`` a local cluster of
``threads`` workers (default: the usable cores) is started and stopped with the encode.

Faults: a task whose worker is lost, or that raises anything but an
:class:`~hhtld.errors.HhtldError`, is run once more on another worker
(``RETRIES``); a second failure ends the encode with one :class:`ExecutorError`
naming the unit. An ``HhtldError`` (a bad tensor, a bad option) would fail again
the same way: it is not retried and reaches the caller as it is. On an interrupt
or an error the driver stops taking results and the pack is aborted as with the
local executor (nothing partial at the target; ``--resume`` continues from the
units kept so far, which the driver keeps as results arrive).

The tasks in flight then are *not* cancelled with ``ray.cancel``: a cancel that crosses
the reply of a task just finishing ends the driver in a Ray check failure ("Tried to
complete task that was not pending"; 4 of 20 runs of the second-failure test, on Ray
2.60). The driver drops their results and disconnects (``ray.shutdown``; Ray ends a
finished job's workers, on a local cluster or at ``--ray-address``); when the caller
had connected to Ray before the encode, those tasks (at most twice the cluster's
width) run to their end and their results are dropped.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

from ..errors import HhtldError, MissingDependencyError, first_line
from .executor import LocalExecutor, in_order
from .plan import Unit, UnitTimings
from .units import UnitStore

RETRIES = 1  # a failed or lost unit runs once more, on another worker
IN_FLIGHT = 2  # tasks in flight per worker: the next one waits on a worker, not on the driver
# tasks run on one thread each (the cluster's width is the parallelism); faiss's OpenMP
# pool would otherwise take every core of the node in every worker
WORKER_ENV = {"OMP_NUM_THREADS": "1", "HHTLD_DECODE_THREADS": "1"}


class ExecutorError(HhtldError):
    """A unit of an encode failed on the cluster twice (the message names the unit)."""


def _ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError as e:
        raise MissingDependencyError(f"--executor ray needs ray, which is not installed ({e}); install it with "
                                     "pip install 'hhtld[ray]'") from None
    return ray


def _unit_task(fn: Callable[[int, Any], Any], i: int) -> tuple[str, Any, float]:
    """What a Ray task runs: ``("ok", fn(i, None), seconds)``, or ``("error", e, 0)`` for an
    HhtldError (returned, not raised: Ray retries what is raised)."""
    t0 = time.perf_counter()
    try:
        out = fn(i, None)
    except HhtldError as e:
        return "error", e, 0.0
    return "ok", out, time.perf_counter() - t0


class RayExecutor(LocalExecutor):
    """Runs the independent units on Ray (module docstring); chain units and the writes
    stay here. ``threads``: the width of a local cluster (and of this process's pool for
    the chain units); ``address``: an existing cluster's; ``stats``: where it adds what it
    counted (workers, tasks, bytes handed back)."""

    def __init__(self, threads: int | None = None, store: UnitStore | None = None,
                 timings: UnitTimings | None = None, address: str | None = None, stats: dict | None = None,
                 memory: int | None = None):
        super().__init__(threads, store, timings, memory)
        self.address = address
        self.bytes_back = 0  # what the tasks handed back (encoded parts), for the benchmarks
        self.tasks = 0
        self.stats = stats if stats is not None else {}
        self._started = False
        self._task = None
        self._cluster_width = 1

    def __enter__(self) -> "RayExecutor":
        ray = _ray()
        if not ray.is_initialized():
            env = {"env_vars": dict(WORKER_ENV)}
            try:
                if self.address:
                    ray.init(address=self.address, runtime_env=env, log_to_driver=False, configure_logging=False)
                else:
                    ray.init(num_cpus=self.threads, include_dashboard=False, runtime_env=env, log_to_driver=False,
                             configure_logging=False)
            except Exception as e:  # ray's own errors: a wrong address, a cluster that does not answer
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
                raise ExecutorError(f"cannot start or reach {where}: {type(e).__name__}: {first_line(e)}") from None
            self._started = True
        self._cluster_width = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=True)(_unit_task)
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb) -> None:
        st = self.stats
        st["workers"] = self._cluster_width
        st["tasks"] = st.get("tasks", 0) + self.tasks
        st["bytes_back"] = st.get("bytes_back", 0) + self.bytes_back
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            if self._started:
                _ray().shutdown()
                self._started = False

    @property
    def cluster_width(self) -> int:
        return self._cluster_width

    def _run_all(self, units: Sequence[Unit], todo: list[int], fn: Callable[[int, Any], Any],
                 threads_inside: bool) -> Iterator[tuple[Any, float]]:
        if threads_inside and len(todo) == 1:
            # a lone unit (a group of one tensor: an embedding, a head): its row blocks on this
            # process's pool, where one task would run them on one core of one worker
            return super()._run_all(units, todo, fn, threads_inside)
        return self._run_on_cluster(units, todo, fn)

    def _run_on_cluster(self, units: Sequence[Unit], todo: list[int],
                        fn: Callable[[int, Any], Any]) -> Iterator[tuple[Any, float]]:
        ray = _ray()
        fn_ref = ray.put(fn)  # once per call: the function and what it holds (a group's fit, the tensors' plans)
        node_memory = self._node_memory(ray)

        def start(j: int):
            # Ray places a task where its memory is free: the units a node runs at once fit it
            # (a unit larger than every node asks for the largest node's, and runs there alone)
            memory = min(units[j].memory, node_memory) if units[j].memory and node_memory else None
            return self._task.options(name=units[j].id, memory=memory).remote(fn_ref, j)

        def take(j: int, ref) -> tuple[Any, float]:
            status, out, sec = self._result(ray, units[j], ref)
            if status == "error":
                raise out
            self.bytes_back += _nbytes(out)
            self.tasks += 1
            return out, sec

        # on an error or an interrupt the tasks in flight are dropped, not cancelled (module
        # docstring: ray.cancel races with a finishing task's reply and can end the driver)
        return in_order(todo, start, take, lambda j, ref: None, IN_FLIGHT * self._cluster_width,
                        lambda j: 0, None)

    @staticmethod
    def _node_memory(ray) -> int:
        """The largest memory a node that runs tasks (one with a CPU) offers them (Ray's
        ``memory`` resource): a task asking for more would wait for ever."""
        res = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
        return int(max((r.get("memory", 0) for r in res if r.get("CPU", 0) >= 1), default=0))

    @staticmethod
    def _result(ray, unit: Unit, ref) -> tuple[str, Any, float]:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            raise ExecutorError(f"unit '{unit.id}' failed on two workers: {type(cause).__name__}: "
                                f"{first_line(cause)}") from None
        except ray.exceptions.RayError as e:  # the worker (or its node) was lost, twice
            raise ExecutorError(f"unit '{unit.id}' failed on two workers: its worker was lost "
                                f"({type(e).__name__}: {first_line(e)})") from None


def _nbytes(out: Any) -> int:
    """Bytes of the numpy arrays in a unit's result (an encoded tensor)."""
    import numpy as np

    seen = 0
    stack = [out]
    while stack:
        x = stack.pop()
        if isinstance(x, np.ndarray):
            seen += x.nbytes
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif hasattr(x, "__dict__"):
            stack.extend(vars(x).values())
    return seen


__all__ = ["IN_FLIGHT", "RETRIES", "ExecutorError", "RayExecutor"]
