"""No leftovers: temporary files removed on SIGTERM and errors, swept after SIGKILL;
decodes into one folder never overwrite each other; notes reach stderr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hhtld import OptionsError
from hhtld.pack import decode_pack, encode_checkpoint
from hhtld.cli import main
from hhtld.outputs import sweep_stale, temp_name

ROOT = Path(__file__).resolve().parent.parent
V1 = Path(__file__).resolve().parent / "data" / "v1"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sweep_removes_only_leftovers_of_processes_that_are_gone(tmp_path):
    target = tmp_path / "m.hhtld"
    mine = temp_name(target, ".data")
    host = mine.name.split(".hhtld-")[1].rsplit("-", 2)[0]
    gone = dead_pid()
    stale = [tmp_path / f".m.hhtld.hhtld-{host}-{gone}-0123abcd{s}" for s in (".data", ".tmp", ".round")]
    stale_dir = tmp_path / f".m.hhtld.hhtld-{host}-{gone}-4567abcd.calibration"
    live = [mine, tmp_path / f".m.hhtld.hhtld-{host}-{os.getppid()}-89abcdef.tmp",
            tmp_path / f".m.hhtld.hhtld-otherhost-{gone}-0123abcd.data", tmp_path / ".gitattributes",
            tmp_path / f".m.hhtld.{gone}.data"]
    for p in stale + live:
        p.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "h.npy").write_bytes(b"x")
    assert sorted(sweep_stale(tmp_path)) == sorted(stale + [stale_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in live)


@pytest.fixture
def slow_ckpt(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "model"
    d.mkdir()
    save_file({f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((2048, 256)).astype(np.float32)
               for i in range(4)}, str(d / "model.safetensors"))
    return d / "model.safetensors"


def start_encode(ckpt: Path, out: Path) -> subprocess.Popen:
    """A CLI encode that runs for seconds; returns once its spill file exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.Popen([sys.executable, "-m", "hhtld", "encode", str(ckpt), "-o", str(out), "--codec", "hhtl-vq",
                          "--stages", "4:4096+4:4096", "--threads", "1", "-q"], env=env, stderr=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list(out.parent.glob(f".{out.name}.*.data")):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 60, "the encode never started writing"
        time.sleep(0.02)
    time.sleep(0.3)
    return p


def test_sigterm_unwinds_and_leaves_nothing(slow_ckpt):
    out = slow_ckpt.parent / "m.hhtld"
    p = start_encode(slow_ckpt, out)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "hhtld: terminated"
    assert sorted(f.name for f in slow_ckpt.parent.iterdir()) == ["model.safetensors"]


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(slow_ckpt, tmp_path):
    out = slow_ckpt.parent / "m.hhtld"
    p = start_encode(slow_ckpt, out)
    p.kill()
    p.communicate(timeout=60)
    left = sorted(f.name for f in slow_ckpt.parent.iterdir() if f.name != "model.safetensors")
    assert left and all(n.startswith(".m.hhtld.hhtld-") and n.endswith(".data") for n in left)
    # the next run into the same folder (another target) removes them
    save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "small.safetensors"))
    encode_checkpoint(tmp_path / "small.safetensors", slow_ckpt.parent / "other.hhtld", codec="hhtl-f32")
    assert sorted(f.name for f in slow_ckpt.parent.iterdir()) == ["model.safetensors", "other.hhtld"]


def test_a_decode_never_replaces_a_file_that_appeared_after_its_check(small_ckpt, tmp_path, monkeypatch):
    from hhtld.stfile import SafetensorsWriter

    pack = tmp_path / "m.hhtld"
    encode_checkpoint(small_ckpt, pack, codec="hhtl-f32")
    out = tmp_path / "dec"
    real = SafetensorsWriter.close

    def race(self, check=None, overwrite=True):  # another decode wrote the file meanwhile
        self.path.write_bytes(b"the other decode's file")
        return real(self, check, overwrite)

    monkeypatch.setattr(SafetensorsWriter, "close", race)
    with pytest.raises(OptionsError) as e:
        decode_pack(pack, out)
    assert str(e.value) == f"{out / 'model.safetensors'}: exists; decode into a new folder or pass --force to overwrite"
    assert (out / "model.safetensors").read_bytes() == b"the other decode's file"
    assert sorted(f.name for f in out.iterdir()) == ["model.safetensors"]  # no temporary file left
    decode_pack(pack, out, force=True)  # --force replaces it
    assert (out / "model.safetensors").read_bytes() != b"the other decode's file"


def test_a_failed_decode_leaves_no_temporary_files(small_ckpt, tmp_path, monkeypatch):
    from hhtld.pack.reader import Pack

    pack = tmp_path / "m.hhtld"
    encode_checkpoint(small_ckpt, pack, codec="hhtl-f32")

    def boom(self, name):  # interrupted while an encoded tensor is being written block by block
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(Pack, "tensor_blocks", boom)
    with pytest.raises(KeyboardInterrupt):
        decode_pack(pack, tmp_path / "dec")
    assert list((tmp_path / "dec").iterdir()) == []


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("json_arg", [["--json"], ["--json", "report.json"]])
def test_notes_reach_stderr_with_or_without_json(tmp_path, capsys, json_arg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pack = V1 / "hhtl-f32.hhtld"
    note = (f"hhtld: note: {pack}: pack format version 1: only each array's CRC32 guards it (no digest over the "
            "manifest and header); encode it again for version 2's integrity checks\n")
    for argv in (["inspect", pack], ["decode", pack, "-o", tmp_path / "dec", "-q"], ["inspect", pack, *json_arg],
                 ["decode", pack, "-o", tmp_path / "dec2", "-q", *json_arg]):
        code, out, err = run(capsys, *argv)
        assert code == 0 and err == note, argv
        if argv[-1] == "--json":
            json.loads(out)
