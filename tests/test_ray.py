"""The Ray executor on a local Ray cluster of 2 workers (real Ray, real worker
processes): the pack is the bytes of the local executor's, a unit whose worker
dies is run again elsewhere, a second failure names the unit, and hhtld's own
errors reach the caller unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from hhtld import CheckpointError, encode  # noqa: E402
from hhtld.cli import main  # noqa: E402
from hhtld.pack.plan import Unit  # noqa: E402
from hhtld.pack.ray_executor import WORKER_ENV, ExecutorError, RayExecutor  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of 2 workers for the module (an executor uses a running one)."""
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


UNITS = [Unit("encode", f"t{i}") for i in range(5)]


def run(fn) -> list:
    with RayExecutor(2) as ex:
        assert ex.cluster_width == 2
        return list(ex.map(UNITS, fn))


def test_the_pack_is_the_same_bytes_as_the_local_executors(cluster, small_folder, tmp_path):
    for executor in ("local", "ray"):
        encode(small_folder, tmp_path / f"{executor}.hhtld", codec="hhtl-vq", stages="2", threads=2,
               executor=executor)
    assert (tmp_path / "ray.hhtld").read_bytes() == (tmp_path / "local.hhtld").read_bytes()
    assert main(["encode", str(small_folder), "-o", str(tmp_path / "cli.hhtld"), "--codec", "hhtl-vq", "--stages",
                 "2", "--executor", "ray", "-q"]) == 0
    assert (tmp_path / "cli.hhtld").read_bytes() == (tmp_path / "local.hhtld").read_bytes()


def test_a_unit_whose_worker_dies_runs_again_on_another(cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()

    def fn(i, pool):
        (marks / f"{i}.{os.getpid()}").touch()
        if i == 2 and len(list(marks.glob("2.*"))) == 1:
            os._exit(1)  # the worker process dies in the middle of its unit
        return np.full(3, i)

    got = run(fn)
    assert [i for i, _ in got] == list(range(5)) and [int(r[0]) for _, r in got] == list(range(5))
    tries = sorted(marks.glob("2.*"))
    assert len(tries) == 2 and tries[0].suffix != tries[1].suffix  # two worker processes


def test_a_second_failure_ends_it_naming_the_unit(cluster):
    def fn(i, pool):
        if i == 3:
            os._exit(1)
        return i

    with pytest.raises(ExecutorError) as e:
        run(fn)
    assert str(e.value).startswith("unit 'encode:t3' failed on two workers: its worker was lost (")

    def boom(i, pool):
        if i == 1:
            raise ValueError("no luck")
        return i

    with pytest.raises(ExecutorError) as e:
        run(boom)
    assert str(e.value) == "unit 'encode:t1' failed on two workers: ValueError: no luck"


def test_hhtld_errors_are_not_retried_and_reach_the_caller_as_they_are(cluster, tmp_path):
    def fn(i, pool):
        (tmp_path / f"{i}.{os.getpid()}.{len(list(tmp_path.glob(f'{i}.*')))}").touch()
        if i == 0:
            raise CheckpointError("model.safetensors: tensor 'w': 1 non-finite value(s) (NaN/inf) cannot be encoded")
        return i

    with pytest.raises(CheckpointError) as e:
        run(fn)
    assert str(e.value) == "model.safetensors: tensor 'w': 1 non-finite value(s) (NaN/inf) cannot be encoded"
    assert len(list(tmp_path.glob("0.*"))) == 1


def test_ray_options_are_checked(small_folder, tmp_path, capsys):
    assert main(["encode", str(small_folder), "-o", str(tmp_path / "x.hhtld"), "--ray-address", "auto"]) == 1
    assert capsys.readouterr().err == "hhtld: error: a Ray address is for --executor ray\n"
    assert not Path(tmp_path / "x.hhtld").exists()
