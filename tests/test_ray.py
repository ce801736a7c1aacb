"""The Ray executor on a local Ray cluster of 2 workers (real Ray, real worker
processes): the pack is the bytes of the local executor's (data-free and calibrated),
a unit whose worker dies is run again elsewhere — inside the executor and inside a
whole encode, its worker process killed —, a second failure names the unit, hhtld's
own errors reach the caller unchanged, and a killed driver or Ctrl-C leaves no pack
and the units that ``--resume`` finishes from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from hhtld import CheckpointError, encode  # noqa: E402
from hhtld import open as hhtld_open  # noqa: E402
from hhtld.encoding import plan  # noqa: E402
from hhtld.cli import main  # noqa: E402
from hhtld.pack.units import partial_folder  # noqa: E402
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


def test_a_calibrated_encode_is_the_same_bytes_with_fits_and_encodes_on_the_cluster(cluster, tmp_path):
    from .test_verify_causal import make_tiny_llama

    model = make_tiny_llama(tmp_path / "llama", hidden=64, layers=2)
    got = {}
    for executor in ("local", "ray"):
        got[executor] = encode(model, tmp_path / f"{executor}.hhtld", calibration_texts=8, max_rounds=1, threads=2,
                               executor=executor)
    assert (tmp_path / "ray.hhtld").read_bytes() == (tmp_path / "local.hhtld").read_bytes()
    ran = got["ray"].info["executor"]
    manifest = hhtld_open(tmp_path / "ray.hhtld").manifest
    encoded = sum(1 for t in manifest["tensors"].values() if t["kind"] == "encoded")
    trials = sum(1 for u in plan(model, calibration_texts=8, max_rounds=1).units if u.kind == "trials")
    # every group's rung trials, every fit (one per group of the pack: one round) and every tensor's
    # encode ran on the cluster
    assert ran["kind"] == "ray" and ran["workers"] == 2
    assert trials > 0 and ran["tasks"] == trials + len(manifest["groups"]) + encoded


SLOW = ["--stages", "4:4096+4:4096", "--encode-all", "-q"]  # about a second a tensor


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> tuple[Path, bytes]:
    """Six tensors of a slow setting, and their pack from the local executor."""
    folder = tmp_path_factory.mktemp("slow")
    rng = np.random.default_rng(0)
    model = folder / "slow.safetensors"
    save_file({f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((1024, 256)).astype(np.float32)
               for i in range(6)}, str(model))
    assert main(["encode", str(model), "-o", str(folder / "local.hhtld"), *SLOW]) == 0
    return model, (folder / "local.hhtld").read_bytes()


def test_a_worker_killed_in_the_middle_of_an_encode_changes_nothing(cluster, slow, tmp_path):
    model, local = slow
    killed: list[str] = []
    done = threading.Event()

    def kill_one_worker() -> None:  # SIGKILL the first worker process seen running a tensor's encode
        while not done.is_set() and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                title = (p.info["cmdline"] or [""])[0]
                if title.startswith("ray::encode:"):
                    try:
                        os.kill(p.info["pid"], signal.SIGKILL)
                    except ProcessLookupError:  # it ended between the look and the kill: try the next
                        continue
                    killed.append(title)
                    break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    try:
        assert main(["encode", str(model), "-o", str(tmp_path / "ray.hhtld"), *SLOW, "--executor", "ray"]) == 0
    finally:
        done.set()
        killer.join()
    assert killed and killed[0].startswith("ray::encode:model.layers.")
    assert (tmp_path / "ray.hhtld").read_bytes() == local


def _kept(out: Path) -> int:
    return len(list(partial_folder(out).glob("*.safetensors")))


def _stop_after_more_kept(p: subprocess.Popen, out: Path, sig: int) -> tuple[int, str]:
    """Send ``sig`` once one more unit than now is kept in the working folder; the exit and stderr."""
    before, t0 = _kept(out), time.monotonic()
    while _kept(out) <= before:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 120, "no unit was kept"
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    return p.returncode, err


def test_a_lost_driver_or_ctrl_c_leaves_no_pack_and_resume_finishes_it_on_a_running_cluster(cluster, slow,
                                                                                               tmp_path):
    """The driver killed (SIGKILL), then the resumed run interrupted (Ctrl-C), then resumed to the end,
    all on one running cluster: no pack until the end, and the end is the uninterrupted bytes."""
    model, local = slow
    out = tmp_path / "m.hhtld"
    cmd = [sys.executable, "-m", "hhtld", "encode", str(model), "-o", str(out), *SLOW, "--resume",
           "--executor", "ray", "--ray-address", ray.get_runtime_context().gcs_address]
    # with Ctrl-C's default action (a test run started in the background inherits SIGINT ignored),
    # set by a small Python that then becomes the encode (no code between fork and exec here)
    reset = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", reset, *cmd[1:]], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    code, err = _stop_after_more_kept(start(), out, signal.SIGKILL)
    assert code == -signal.SIGKILL, err
    assert not out.exists()  # no pack (its temporary file is left to the next run, which sweeps it)
    killed_with = _kept(out)
    code, err = _stop_after_more_kept(start(), out, signal.SIGINT)
    assert code == 130 and "hhtld: interrupted" in err, err
    # no pack, and no temporary file: the killed run's was swept, the interrupted run's removed
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.hhtld.partial"]
    assert _kept(out) > killed_with  # the resumed run kept what the killed one had, and more
    p = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["resumed_units"] >= 2 and info["executor"]["kind"] == "ray"
    assert out.read_bytes() == local
    assert not partial_folder(out).exists()


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


def test_a_unit_larger_than_every_node_still_runs(cluster):
    units = [Unit("encode", "huge", memory=1 << 60), Unit("encode", "small", memory=1 << 20)]
    with RayExecutor(2) as ex:  # the task asks for the largest node's memory, not for more than any has
        assert [(i, out) for i, out in ex.map(units, lambda i, pool: i * 7)] == [(0, 0), (1, 7)]


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
