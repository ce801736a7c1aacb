"""The encode as a plan: its units, the executor's byte-identical packs, --resume after an
interruption (in process and after a kill at a random moment), and inspect --plan."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hhtld import OptionsError, encode
from hhtld.classify import EncodablePolicy
from hhtld.cli import main
from hhtld.pack.units import partial_folder

ROOT = Path(__file__).resolve().parent.parent
ALL = EncodablePolicy(encode_all=True)
FIXED = dict(stages="2:256+4:4096", policy=ALL)


@pytest.fixture
def layers_ckpt(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "model"
    d.mkdir()
    t = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((512, 64)).astype(np.float32) for i in range(3)}
    t.update({f"model.layers.{i}.self_attn.q_proj.weight": rng.standard_normal((64, 64)).astype(np.float32)
              for i in range(3)})
    t["model.norm.weight"] = np.ones(64, np.float32)
    save_file(t, str(d / "model.safetensors"))
    return d / "model.safetensors"


def interrupt_after(monkeypatch, n: int, codec: str = "hhtl-vq") -> list[str]:
    """Make the n+1-th tensor encode of ``codec`` raise KeyboardInterrupt (Ctrl-C)."""
    from hhtld.codecs.registry import make_codec

    cls = type(make_codec(codec))
    seen: list[str] = []
    real = cls.encode_tensor

    def encode_tensor(self, fit, rows, *a, **k):
        if len(seen) >= n:
            raise KeyboardInterrupt
        seen.append(rows.name)
        return real(self, fit, rows, *a, **k)

    monkeypatch.setattr(cls, "encode_tensor", encode_tensor)
    return seen


@pytest.mark.parametrize("options", [FIXED, dict(codec="hhtl-f32", policy=ALL), dict(codec="hhtl-d", policy=ALL),
                                     dict(target="rows", policy=ALL)], ids=["vq", "f32", "hhtl-d", "rows"])
def test_an_interrupted_encode_with_resume_continues_to_the_same_pack(options, layers_ckpt, tmp_path, monkeypatch):
    whole = encode(layers_ckpt, tmp_path / "whole.hhtld", threads=1, **options)
    assert whole.info["resumed_units"] == 0 and not partial_folder(whole.path).exists()
    out = tmp_path / "m.hhtld"
    seen = interrupt_after(monkeypatch, 4, options.get("codec", "hhtl-vq"))
    with pytest.warns(UserWarning, match=r"4 finished units kept in .*m\.hhtld\.partial; the same command with "
                                         r"--resume continues from them"):
        with pytest.raises(KeyboardInterrupt):
            encode(layers_ckpt, out, threads=1, resume=True, **options)
    assert not out.exists() and len(seen) == 4
    kept = partial_folder(out)
    assert len([p for p in kept.iterdir() if p.suffix == ".safetensors"]) == 4
    monkeypatch.undo()
    rep = encode(layers_ckpt, out, threads=2, resume=True, **options)  # another thread count: the same units
    assert out.read_bytes() == whole.path.read_bytes()
    assert rep.info["resumed_units"] == 4
    assert f"resumed: 4 finished units of an interrupted encode read back from {kept}" in rep.notes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.hhtld", "model", "whole.hhtld"]


def test_without_resume_an_interruption_leaves_nothing_and_old_units_are_removed(layers_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m.hhtld"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        encode(layers_ckpt, out, threads=1, **FIXED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        encode(layers_ckpt, out, threads=1, resume=True, **FIXED)
    assert partial_folder(out).is_dir()
    monkeypatch.undo()
    rep = encode(layers_ckpt, out, threads=1, **FIXED)  # no --resume: start over
    assert rep.info["resumed_units"] == 0
    assert rep.notes[0] == (f"removed the units an interrupted encode of {out} kept in {partial_folder(out)} "
                            "(--resume would have continued from them)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.hhtld", "model"]


def test_resume_refuses_units_made_with_other_options_or_a_folder_it_did_not_make(layers_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m.hhtld"
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        encode(layers_ckpt, out, threads=1, resume=True, **FIXED)
    monkeypatch.undo()
    with pytest.raises(OptionsError) as e:
        encode(layers_ckpt, out, resume=True, stages="4", policy=ALL)
    assert str(e.value) == (f"{partial_folder(out)}: the interrupted encode kept there was made from another "
                            "checkpoint, other options or another hhtld version; run without --resume to start over")
    assert partial_folder(out).is_dir()  # still there for the right command
    other = tmp_path / "n.hhtld"
    partial_folder(other).mkdir()
    (partial_folder(other) / "notes.txt").write_text("mine")
    with pytest.raises(OptionsError) as e:
        encode(layers_ckpt, other, **FIXED)
    assert str(e.value) == (f"{partial_folder(other)}: exists but is not the folder of an interrupted hhtld encode "
                            "(no state.json); move it away")
    assert (partial_folder(other) / "notes.txt").read_text() == "mine"


def test_an_error_in_the_input_removes_the_units(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((512, 64)).astype(np.float32)
    bad = w.copy()
    bad[7, 3] = np.nan
    save_file({"model.layers.0.mlp.up_proj.weight": w, "model.layers.1.mlp.up_proj.weight": bad},
              str(tmp_path / "m.safetensors"))
    with pytest.raises(Exception) as e:
        encode(tmp_path / "m.safetensors", tmp_path / "m.hhtld", resume=True, **FIXED)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def run_cli(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hhtld", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_units(p: subprocess.Popen, out: Path) -> float:
    """When the encode writing ``out`` has made its folder of units (its work begins)."""
    t0 = time.monotonic()
    while not (partial_folder(out) / "state.json").is_file():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 300, "the encode never started"
        time.sleep(0.01)
    return time.monotonic()


@pytest.mark.parametrize("how", ["fixed", "calibrated"])
def test_resume_after_a_kill_at_a_random_moment_gives_the_same_pack(how, tmp_path):
    """SIGKILL at a random moment of the run (seeded, between 10 % and 90 % of its duration):
    the kept units and the same command with --resume give the uninterrupted pack."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HHTLD_CACHE": str(tmp_path / "cache")}
    if how == "fixed":  # seconds of work: tensors of a slow setting
        rng = np.random.default_rng(0)
        model = tmp_path / "six.safetensors"
        save_file({f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((1024, 256)).astype(np.float32)
                   for i in range(4)}, str(model))
        opts = ["--stages", "4:4096+4:4096", "--encode-all", "--threads", "1"]
    else:
        from .test_verify_causal import make_tiny_llama

        model = make_tiny_llama(tmp_path / "llama", hidden=64, layers=2)
        opts = ["--calibration-texts", "8", "--max-rounds", "2", "--max-kl", "1e-9"]  # two rounds, both encoded
    whole = tmp_path / "whole.hhtld"
    p = run_cli(["encode", model, "-o", whole, "-q", "--resume", *opts], env)  # uninterrupted
    started = wait_for_units(p, whole)
    while not whole.exists() and p.poll() is None:
        time.sleep(0.01)
    work = time.monotonic() - started  # from its folder of units to the written pack
    _, err = p.communicate(timeout=600)
    assert p.returncode in (0, 3), err
    out = tmp_path / "m.hhtld"
    p = run_cli(["encode", model, "-o", out, "-q", "--resume", *opts], env)
    wait_for_units(p, out)
    time.sleep(random.Random(f"{how}-{work:.1f}").uniform(0.1, 0.9) * work)
    p.kill()
    p.communicate(timeout=60)
    if not out.exists():  # killed before the end (else it finished first: nothing to resume)
        assert (partial_folder(out) / "state.json").is_file()
        p = run_cli(["encode", model, "-o", out, "-q", "--resume", *opts, "--json"], env)
        got, err = p.communicate(timeout=600)
        assert p.returncode in (0, 3), err
        assert json.loads(got)["resumed_units"] >= 0
    assert out.read_bytes() == whole.read_bytes()
    assert not partial_folder(out).exists()


def test_inspect_plan_lists_units_dependencies_memory_and_measured_time(layers_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HHTLD_CACHE", str(tmp_path / "cache"))
    args = ["inspect", str(layers_ckpt), "--plan", "--stages", "2:256+4:4096", "--encode-all", "--json"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    kinds = [u["kind"] for u in plan["units"]]
    assert plan["path"] == "fixed" and plan["counts"] == {"fit": 2, "encode": 6, "finish": 2, "manifest": 1}
    assert kinds == ["fit", "encode", "encode", "encode", "finish", "fit", "encode", "encode", "encode", "finish",
                     "manifest"]
    by_id = {u["id"]: u for u in plan["units"]}
    for u in plan["units"]:
        assert all(a in by_id for a in u["after"])  # every dependency is a unit of the plan
        if u["kind"] == "encode":
            assert by_id[u["after"][0]]["kind"] == "fit" and u["dependency"] == "independent"
            assert u["memory_bytes"] >= 2 * 4 * u["weights"]
    assert plan["seconds"]["encode"] is None and plan["total_seconds"] is None  # nothing measured here yet
    encode(layers_ckpt, tmp_path / "m.hhtld", **FIXED)
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_seconds"] is not None and plan["seconds"]["encode"] > 0
    assert main(args[:-1]) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan of the fixed encode: 11 units, at most ")
    assert "predicted time: " in text and "fitted to what earlier encodes measured on this machine" in text


def test_inspect_plan_of_the_calibrated_encode_is_a_chain_of_blocks(tmp_path, capsys):
    from .test_verify_causal import make_tiny_llama

    model = make_tiny_llama(tmp_path / "llama", hidden=64, layers=3)
    assert main(["inspect", str(model), "--plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["path"] == "calibrated"
    blocks = [u for u in plan["units"] if u["kind"] == "analyse"]
    assert [u["id"] for u in blocks] == ["analyse:block 0", "analyse:block 1", "analyse:block 2", "analyse:head"]
    assert [u["after"] for u in blocks] == [[], ["analyse:block 0"], ["analyse:block 1"], ["analyse:block 2"]]
    assert plan["dependencies"]["analyse"] == "chain" and plan["dependencies"]["trials"] == "independent"
    assert plan["counts"]["encode"] == 3 * 7 + 2 and plan["counts"]["check"] == 1
    with pytest.raises(SystemExit):
        main(["inspect", str(model), "--plan", "--target", "nonsense"])
    assert main(["inspect", str(model), "--stages", "4"]) == 1
    assert capsys.readouterr().err.strip().endswith("hhtld: error: --stages applies to --plan")


def test_a_damaged_kept_unit_is_done_again(layers_ckpt, tmp_path, monkeypatch):
    whole = encode(layers_ckpt, tmp_path / "whole.hhtld", threads=1, **FIXED)
    out = tmp_path / "m.hhtld"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        encode(layers_ckpt, out, threads=1, resume=True, **FIXED)
    monkeypatch.undo()
    units = sorted(p for p in partial_folder(out).iterdir() if p.suffix == ".safetensors")
    units[0].write_bytes(units[0].read_bytes()[:100])  # cut short, as by a full disk
    rep = encode(layers_ckpt, out, threads=1, resume=True, **FIXED)
    assert rep.info["resumed_units"] == 2 and out.read_bytes() == whole.path.read_bytes()


def test_a_full_disk_keeps_the_units_for_resume(layers_ckpt, tmp_path, monkeypatch, capsys):
    import errno

    from hhtld.pack.writer import PackWriter

    whole = encode(layers_ckpt, tmp_path / "whole.hhtld", threads=1, **FIXED)
    out = tmp_path / "m.hhtld"
    real, calls = PackWriter.write_tensor, []

    def write_tensor(self, t, et):
        calls.append(t.name)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, t, et)

    monkeypatch.setattr(PackWriter, "write_tensor", write_tensor)
    args = ["encode", str(layers_ckpt), "-o", str(out), "--stages", "2:256+4:4096", "--encode-all", "--threads", "1",
            "-q", "--resume"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("hhtld: note: 5 finished units kept in ") and err[-2].endswith(
        "m.hhtld.partial; the same command with --resume continues from them")
    assert err[-1] == "hhtld: error: No space left on device"
    monkeypatch.undo()
    assert main(args) == 0 and out.read_bytes() == whole.path.read_bytes()


def test_two_encodes_of_one_target_at_once_are_refused(layers_ckpt, tmp_path):
    from hhtld.outputs import this_process

    out = tmp_path / "m.hhtld"
    partial_folder(out).mkdir()
    running = {**this_process(), "pid": os.getppid(), "fingerprint": "x"}  # a live process, not this one
    (partial_folder(out) / "state.json").write_text(json.dumps(running))
    for resume in (False, True):
        with pytest.raises(OptionsError) as e:
            encode(layers_ckpt, out, resume=resume, **FIXED)
        assert str(e.value) == (f"{partial_folder(out)}: another hhtld encode of this target is running (process "
                                f"{os.getppid()} on {running['host']}); wait for it, or write to another file "
                                "(if that process is gone, remove the folder)")
    assert json.loads((partial_folder(out) / "state.json").read_text()) == running  # untouched


def test_a_damaged_timing_cache_never_fails_an_encode(layers_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HHTLD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "unit-seconds.json").write_text('{"fit": [["x", 1], [100, 0.5]], "encode": 3}')
    encode(layers_ckpt, tmp_path / "m.hhtld", **FIXED)
    assert main(["inspect", str(layers_ckpt), "--plan", "--stages", "2:256+4:4096", "--encode-all", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_seconds"] is not None
    kept = json.loads((tmp_path / "cache" / "unit-seconds.json").read_text())
    assert kept["fit"][0] == [100.0, 0.5] and "encode" in kept  # the damaged entries dropped
