"""The CLI: encode / decode / inspect, one-line errors with non-zero exit status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hhtld.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_encode_decode_inspect(small_folder, tmp_path, capsys):
    pack = tmp_path / "m.hhtld"
    code, out, err = run(capsys, "encode", small_folder, "-o", pack, "-q")
    assert code == 0 and out.startswith(f"wrote {pack}: ")
    assert "against bf16" in out and "M weights/s" in out
    code, out, _ = run(capsys, "decode", pack, "-o", tmp_path / "dec", "-q")
    assert code == 0 and (tmp_path / "dec" / "model.safetensors").is_file()
    code, out, _ = run(capsys, "inspect", pack)
    assert code == 0
    assert "other/embed/600x64" in out and "encoder/up/600x64" in out and "ratio" in out


def test_inspect_model_is_a_dry_run_json(small_ckpt, capsys):
    code, out, _ = run(capsys, "inspect", small_ckpt, "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "model"
    assert [(g["key"], g["regime"], g["tensors"], g["rows"]) for g in info["groups"]] == [
        ("other/embed/600x64", "index", 1, 600), ("encoder/up/600x64", "argmax", 2, 1200)]
    code, out, _ = run(capsys, "inspect", small_ckpt, "--json", "--encode-all")
    assert "encoder/qko/64x64" in [g["key"] for g in json.loads(out)["groups"]]
    code, out, _ = run(capsys, "inspect", small_ckpt, "--json", "--min-rows", "64", "--min-bytes", "0")
    assert "encoder/qko/64x64" in [g["key"] for g in json.loads(out)["groups"]]


def test_group_by_input_puts_gate_with_up_and_k_with_v(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    names = {"mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128),
             "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64)}
    f = tmp_path / "model.safetensors"
    save_file({f"model.layers.{i}.{n}.weight": rng.standard_normal(s).astype(np.float32)
               for i in range(2) for n, s in names.items()}, str(f))
    groups = {}
    for how in ("role", "input"):
        code, out, _ = run(capsys, "inspect", f, "--json", "--encode-all", "--group-by", how)
        assert code == 0
        groups[how] = {g["key"]: g["tensors"] for g in json.loads(out)["groups"]}
    assert groups["role"] == {"other/down/64x128": 2, "other/gate/128x64": 2, "other/qko/32x64": 2,
                              "other/qko/64x64": 2, "other/up/128x64": 2, "other/v/32x64": 2}
    assert groups["input"] == {"other/down/64x128": 2, "other/qko/64x64": 2, "other/up/128x64": 4,
                               "other/v/32x64": 4}


@pytest.mark.parametrize("flags, message", [
    (["--codec", "hhtl-f32", "--max-kl", "0.01"],
     "--max-kl/--max-ppl-ratio/--min-top1/--min-cosine applies to --target behaviour, not to a fixed setting"),
    (["--stages", "2", "--calibration-texts", "4"], "--calibration-texts applies to --target behaviour, not to a fixed setting"),
    (["--target", "rows", "--max-rounds", "3"], "--max-rounds applies to --target behaviour, not to the data-free target"),
    (["--bpw", "4", "--config", "x.json"], "--config applies to --target behaviour, not to the data-free target"),
    (["--target", "rows", "--tune-steps", "5"], "--tune-steps applies to --target behaviour, not to the data-free target"),
    (["--stages", "2", "--global-steps", "5"], "--global-steps applies to --target behaviour, not to a fixed setting"),
    (["--tune-steps", "-1"], "tuning: steps must be an integer ≥ 0, got -1"),
    (["--global-steps", "-2"], "global step: steps must be an integer ≥ 0, got -2"),
    (["--rotate", "false"], "--rotate applies to a fixed --stages setting; the allocation's ladder sets it per rung"),
    (["--bpw", "20"], "--bpw must lie in [0.5, 16], got 20.0"),
    (["--codec", "hhtl-f32", "--bpw", "3"], "--target/--bpw allocate the hhtl-vq codec; they do not apply to codec hhtl-f32"),
])
def test_options_of_another_path_are_refused_before_anything_is_written(small_ckpt, tmp_path, capsys, flags, message):
    code, out, err = run(capsys, "encode", small_ckpt, "-o", tmp_path / "sub" / "m.hhtld", "-q", *flags)
    assert (code, out, err) == (1, "", f"hhtld: error: {message}\n")
    assert not (tmp_path / "sub").exists()  # not even the output's folder


def test_encode_json_and_options(small_ckpt, tmp_path, capsys):
    code, out, _ = run(capsys, "encode", small_ckpt, "-o", tmp_path / "a.hhtld", "--codec", "hhtl-f32", "--k", "16",
                       "--json", "-q",
                       "--rule", r"query=embed")
    info = json.loads(out)
    assert code == 0 and info["codec_options"]["k"] == 16
    assert all(g["params"]["k"] == 16 for g in info["groups"])


@pytest.mark.parametrize("argv,message", [
    (["encode", "{tmp}/missing.safetensors", "-o", "{tmp}/x.hhtld"], "{tmp}/missing.safetensors: no such file or directory"),
    (["encode", "{ckpt}", "-o", "{tmp}/x.hhtld", "--codec", "hhtl-f32", "--k", "257"],
     "palette size k=257 is out of range: it must satisfy 0 < k <= 256"),
    (["encode", "{ckpt}", "-o", "{tmp}/x.hhtld", "--codec", "hhtl-f32", "--k", "0"],
     "palette size k=0 is out of range: it must satisfy 0 < k <= 256"),
    (["encode", "{text}", "-o", "{tmp}/x.hhtld"], "{text}: not a safetensors file (header length out of range)"),
    (["decode", "{ckpt}", "-o", "{tmp}/d"],
     "{ckpt}: not an hhtld pack (a safetensors file without 'format = hhtld' metadata)"),
    (["inspect", "{tmp}/nothing"], "{tmp}/nothing: no such file or directory"),
    (["encode", "{ckpt}", "-o", "{tmp}/x.hhtld", "--rule", "x=bogus"],
     "rule 'x': unknown role 'bogus' (roles: qko, v, gate, up, down, embed, lm_head, projection, other)"),
])
def test_bad_input_is_one_line_and_nonzero(small_ckpt, tmp_path, capsys, argv, message):
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, definitely not a checkpoint")
    fill = {"tmp": tmp_path, "ckpt": small_ckpt, "text": text}
    code, out, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == 1
    assert err == f"hhtld: error: {message.format(**fill)}\n"
    assert not (tmp_path / "x.hhtld").exists()


def test_truncated_checkpoint_from_a_subprocess_has_no_traceback(small_ckpt, tmp_path):
    data = small_ckpt.read_bytes()
    small_ckpt.write_bytes(data[:1000])
    r = subprocess.run([sys.executable, "-m", "hhtld", "encode", str(small_ckpt), "-o", str(tmp_path / "x.hhtld")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == f"hhtld: error: {small_ckpt}: truncated: data needs {len(data)} bytes, file has 1000\n"
    assert "Traceback" not in r.stderr


def test_json_report_never_overwrites_an_input(small_ckpt, capsys):
    before = small_ckpt.read_bytes()
    code, out, err = run(capsys, "inspect", small_ckpt, "--json", small_ckpt)
    assert code == 1
    assert err == (f"hhtld: error: {small_ckpt}: is an input of this command; refusing to overwrite it "
                   "with the JSON report\n")
    assert small_ckpt.read_bytes() == before


def test_json_into_a_directory_is_refused_before_any_work(small_ckpt, tmp_path, capsys):
    code, _, err = run(capsys, "encode", small_ckpt, "-o", tmp_path / "x.hhtld", "--codec", "hhtl-f32",
                       "--json", tmp_path)
    assert code == 1 and err == f"hhtld: error: {tmp_path}: is a directory; the JSON report needs a file name\n"
    assert not (tmp_path / "x.hhtld").exists()


def test_decode_force_flag(small_folder, tmp_path, capsys):
    pack = tmp_path / "m.hhtld"
    assert run(capsys, "encode", small_folder, "-o", pack, "--codec", "hhtl-f32", "-q")[0] == 0
    assert run(capsys, "decode", pack, "-o", tmp_path / "d", "-q")[0] == 0
    code, _, err = run(capsys, "decode", pack, "-o", tmp_path / "d", "-q")
    assert code == 1 and "exists; decode into a new folder or pass --force to overwrite" in err
    assert run(capsys, "decode", pack, "-o", tmp_path / "d", "-q", "--force")[0] == 0


def test_vq_boolean_options_are_checked(small_ckpt, tmp_path, capsys):
    code, _, err = run(capsys, "encode", small_ckpt, "-o", tmp_path / "x.hhtld", "--stages", "4", "--rotate", "maybe")
    assert code == 1 and err == "hhtld: error: codec hhtl-vq: option rotate must be a boolean, got 'maybe'\n"


def test_inspect_of_a_missing_pack_says_it_is_missing(tmp_path, capsys):
    code, _, err = run(capsys, "inspect", tmp_path / "nothing.hhtld")
    assert code == 1 and err == f"hhtld: error: {tmp_path / 'nothing.hhtld'}: no such file or directory\n"
    (tmp_path / "text.hhtld").write_text("plain text, not a pack at all")
    code, _, err = run(capsys, "inspect", tmp_path / "text.hhtld")
    assert code == 1 and err == (f"hhtld: error: {tmp_path / 'text.hhtld'}: not an hhtld pack "
                                 "(not a safetensors file (header length out of range))\n")


def test_encode_notes_matrices_kept_dense_by_the_thresholds(small_ckpt, tmp_path, capsys):
    code, _, err = run(capsys, "encode", small_ckpt, "-o", tmp_path / "x.hhtld", "--codec", "hhtl-f32", "-q")
    assert code == 0
    assert err == ("hhtld: note: 1 float matrices (16.38 kB) are kept dense by the size thresholds "
                   "(--min-rows 512, --min-bytes 100000); --encode-all encodes them too\n")
    code, _, err = run(capsys, "encode", small_ckpt, "-o", tmp_path / "y.hhtld", "--codec", "hhtl-f32", "-q",
                       "--encode-all")
    assert code == 0 and err == ""
