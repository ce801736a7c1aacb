"""The local executor's admission of independent units: no more than the pool's width
and the memory room in flight, results in plan order, and the pack the same bytes under
any memory limit."""

from __future__ import annotations

import threading
import time

import pytest

from hhtld import OptionsError, encode
from hhtld.cli import main
from hhtld.memory import memory_room
from hhtld.pack.executor import LocalExecutor, in_order
from hhtld.pack.plan import Unit


def test_units_in_flight_stay_within_the_width_and_the_memory_room():
    memory = [1, 1, 1, 3, 9, 1, 2, 2, 3]
    units = [Unit("encode", f"t{i}", memory=m) for i, m in enumerate(memory)]
    lock = threading.Lock()
    now = {"units": 0, "memory": 0}
    seen = []

    def fn(i, pool):
        with lock:
            now["units"] += 1
            now["memory"] += memory[i]
            seen.append((now["units"], now["memory"], i))
        time.sleep(0.3 if i < 3 else 0.05)  # the first three overlap for certain
        with lock:
            now["units"] -= 1
            now["memory"] -= memory[i]
        return i * 10

    with LocalExecutor(3, memory=4) as ex:
        got = list(ex.map(units, fn))
    assert got == [(i, i * 10) for i in range(len(units))]
    for n, held, i in seen:
        assert n <= 3
        assert held <= 4 or (n == 1 and memory[i] == 9)  # the unit larger than the room runs alone
    assert max(n for n, _, _ in seen) == 3  # the 1-byte units did run three at a time


def test_in_order_cancels_what_is_in_flight_when_the_caller_stops():
    started, cancelled = [], []
    it = in_order(range(6), lambda i: started.append(i) or i, lambda i, h: h, lambda i, h: cancelled.append(i),
                  width=3, memory=lambda i: 0, room=None)
    assert next(it) == 0
    it.close()
    assert started == [0, 1, 2, 3] and cancelled == [1, 2, 3]


def test_a_failing_unit_cancels_those_in_flight_and_reaches_the_caller():
    cancelled = []

    def take(i, h):
        if i == 1:
            raise ValueError("unit 1 failed")
        return h

    with pytest.raises(ValueError, match="unit 1 failed"):
        list(in_order(range(6), lambda i: i, take, lambda i, h: cancelled.append(i), width=3, memory=lambda i: 0,
                      room=None))
    assert cancelled == [1, 2, 3]  # the failed one (finished) and the two started after it


def test_the_pack_is_the_same_bytes_under_any_memory_limit(small_folder, tmp_path):
    encode(small_folder, tmp_path / "room.hhtld", codec="hhtl-vq", stages="2", threads=2)
    encode(small_folder, tmp_path / "tight.hhtld", codec="hhtl-vq", stages="2", threads=2, memory_limit=1)
    assert (tmp_path / "tight.hhtld").read_bytes() == (tmp_path / "room.hhtld").read_bytes()
    assert main(["encode", str(small_folder), "-o", str(tmp_path / "cli.hhtld"), "--codec", "hhtl-vq", "--stages",
                 "2", "--memory-limit", "64MiB", "-q"]) == 0
    assert (tmp_path / "cli.hhtld").read_bytes() == (tmp_path / "room.hhtld").read_bytes()
    assert memory_room().source != "--memory-limit"  # the command's limit lasted for the command


def test_a_memory_limit_that_is_not_a_size_is_refused(small_folder, tmp_path, capsys):
    assert main(["encode", str(small_folder), "-o", str(tmp_path / "x.hhtld"), "--memory-limit", "lots"]) == 1
    assert capsys.readouterr().err == ("hhtld: error: memory limit 'lots' is not a size (examples: 4G, 512MiB, "
                                       "1.5GB, 1073741824)\n")
    with pytest.raises(OptionsError, match="must be more than 0 bytes"):
        encode(small_folder, tmp_path / "x.hhtld", memory_limit=0)
    assert not (tmp_path / "x.hhtld").exists()
