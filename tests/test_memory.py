"""A small pack that declares a huge tensor: every decode path knows what it will
allocate before allocating it, refuses clearly when that does not fit, and
``hhtld decode`` streams; thread pools never hang; ``inspect --check`` reads
every stored array.

The packs are crafted as an attacker would (bench/fuzz.py ``widen``): an hhtl-d
group without a leaf stores 4 bytes a row whatever its width, so its declared
shape is widened and its entries repeated, then the array table and the
manifest digest are recomputed. Limits are real: children run under
``resource.setrlimit(RLIMIT_AS)`` (and ``RLIMIT_FSIZE``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hhtld import PackError
from hhtld.classify import EncodablePolicy
from hhtld.pack import decode_pack, encode_checkpoint, open_pack
from hhtld.errors import OptionsError
from hhtld.memory import format_bytes, memory_room, parse_size, set_memory_limit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import fuzz  # noqa: E402

GIB = 1 << 30
THREE = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
ONE = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory) -> Path:
    """hhtl-d, groups without a leaf: three 512 x 64 tensors, and one 512 x 96 (22 kB)."""
    d = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    t = {n: rng.standard_normal((512, 64)).astype(np.float32) for n in THREE}
    t[ONE] = rng.standard_normal((512, 96)).astype(np.float32)
    save_file(t, str(d / "m.safetensors"))
    return encode_checkpoint(d / "m.safetensors", d / "small.hhtld", codec="hhtl-d", codec_options={"k": 16},
                             policy=EncodablePolicy(encode_all=True)).path


def wide(small: Path, shape: tuple[int, int], where: Path, tensors: int = 1) -> Path:
    """``small`` with its group of ``tensors`` (1 or 3) tensors widened to ``shape``."""
    groups = open_pack(small).groups
    gi = next(i for i, g in enumerate(groups) if len(g["tensors"]) == tensors)
    out = where / f"wide-{tensors}x{shape[0]}x{shape[1]}.hhtld"
    out.write_bytes(fuzz.widen(random.Random(0), small.read_bytes(), shape, gi))
    return out


def test_sizes_parse_and_print():
    assert [parse_size(s) for s in ("4G", "512MiB", "1.5GB", "1073741824", "2k", 7)] == [
        4 * GIB, 512 << 20, 1_500_000_000, GIB, 2048, 7]
    assert format_bytes(16 * GIB) == "16.0 GiB" and format_bytes(600 * 1024) == "600.0 KiB" and format_bytes(12) == "12 B"
    with pytest.raises(OptionsError, match=r"^memory limit 'lots' is not a size \(examples: 4G, 512MiB, 1.5GB, "
                                           r"1073741824\)$"):
        parse_size("lots")
    with pytest.raises(OptionsError, match=r"^memory limit '0' must be more than 0 bytes$"):
        parse_size("0")


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_cgroup_room_leaves_out_the_inactive_file_cache(tmp_path):
    """Limit less usage less the inactive file cache, the tightest from the process's cgroup up
    (v2 and v1 trees written here, the layouts the kernel shows)."""
    from hhtld.memory import _cgroup_room

    v2, v1, proc = tmp_path / "v2", tmp_path / "v1", tmp_path / "cgroup"
    _tree(v2, {"app/job/memory.max": f"{8 * GIB}\n", "app/job/memory.current": f"{6 * GIB}\n",
               "app/job/memory.stat": f"anon {2 * GIB}\nactive_file {GIB}\ninactive_file {3 * GIB}\n",
               "app/memory.max": "max\n", "app/memory.current": f"{7 * GIB}\n"})
    proc.write_text("0::/app/job\n")
    assert _cgroup_room(proc, v2) == 8 * GIB - 3 * GIB  # the 3 GiB of inactive file pages are room
    (v2 / "app/memory.max").write_text(f"{9 * GIB}\n")  # the parent's limit, with no memory.stat: all counted
    assert _cgroup_room(proc, v2) == 2 * GIB
    _tree(v1, {"memory/docker/c1/memory.limit_in_bytes": f"{4 * GIB}\n",
               "memory/docker/c1/memory.usage_in_bytes": f"{3 * GIB}\n",
               "memory/docker/c1/memory.stat": f"inactive_file {GIB // 2}\ntotal_inactive_file {2 * GIB}\n",
               "memory/docker/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
               "memory/docker/memory.usage_in_bytes": f"{3 * GIB}\n"})
    proc.write_text("4:memory:/docker/c1\n3:cpu,cpuacct:/docker/c1\n")
    assert _cgroup_room(proc, v1) == 4 * GIB - GIB  # v1 counts the hierarchy's total_inactive_file
    (v1 / "memory/docker/c1/memory.usage_in_bytes").write_text(f"{9 * GIB}\n")
    assert _cgroup_room(proc, v1) == 0  # over the limit: no room, never negative
    assert _cgroup_room(tmp_path / "missing", v1) is None


def test_a_wide_pack_opens_small_and_is_refused_before_allocating(small_pack, tmp_path):
    path = wide(small_pack, (65536, 65536), tmp_path)
    assert path.stat().st_size < 700_000
    p = open_pack(path, memory_limit="1G")  # the shape is not a lie in itself: the pack opens
    name = ONE
    assert p.info(name)["shape"] == [65536, 65536]
    with pytest.raises(PackError) as e:
        p.tensor(name)
    # 16 GiB of output and the blocks in flight (their number follows the decode threads)
    msg = str(e.value).replace("16.1 GiB", "16.0 GiB")
    assert msg == (
        f"{path}: tensor '{name}' declares shape [65536, 65536] (F32): decoding it whole needs 16.0 GiB, more than "
        "the 1.0 GiB (the limit given) this process may use; decode it to disk with `hhtld decode` (it writes block "
        "by block), read it in row blocks with Pack.rows(name, idx), or raise the limit (--memory-limit, "
        "HHTLD_MEMORY_LIMIT) where the memory is there")
    with pytest.raises(PackError, match=r"decoding its rows needs 16\.[01] GiB"):
        p.rows(name)
    rows = p.rows(name, np.array([0, 512, 65535]))  # a few rows of it are fine
    assert rows.shape == (3, 65536) and np.array_equal(rows[0], rows[1])  # entries repeated every 512 rows


def test_the_limit_comes_from_the_environment_and_the_api(small_pack, tmp_path, monkeypatch):
    p = open_pack(wide(small_pack, (4096, 4096), tmp_path))
    monkeypatch.setenv("HHTLD_MEMORY_LIMIT", "16M")
    assert memory_room().source == "HHTLD_MEMORY_LIMIT"
    with pytest.raises(PackError, match=r"decoding it whole needs \d+\.\d MiB, more than the 16\.0 MiB \(HHTLD_MEMORY_LIMIT\)"):
        p.tensor(ONE)
    set_memory_limit("1G")  # the command line's --memory-limit
    try:
        assert p.tensor(ONE).shape == (4096, 4096)
    finally:
        set_memory_limit(None)
    monkeypatch.setenv("HHTLD_MEMORY_LIMIT", "a lot")
    with pytest.raises(OptionsError, match=r"^HHTLD_MEMORY_LIMIT= 'a lot' is not a size"):
        p.tensor(ONE)


def _child(code: str, as_limit: str | None = None, fsize: int | None = None, env: dict | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose address space is capped after its
    imports: ``as_limit`` "N" = N bytes in all, "+N" = N bytes above what it maps by then."""
    prelude = textwrap.dedent(f"""
        import os, resource, signal, sys
        import hhtld, hhtld.cli, numpy, faiss
        def _vm():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        _as = {as_limit!r}
        if _as is not None:
            cap = _vm() + int(_as[1:]) if _as.startswith("+") else int(_as)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        _fsize = {fsize!r}
        if _fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# the three packs that broke the reader: (shape, address-space limit)
THREE_CASES = [((65536, 65536), 4 * 10**9), ((65536, 65536), 4 * 10**9), ((4096, 131072), 2 * 10**9)]


@pytest.mark.parametrize("case", range(3), ids=["16GiB-tensor-4GB", "48GiB-group-4GB", "2GiB-tensor-2GB"])
def test_the_three_crafted_packs_end_in_one_clear_line_under_address_space_limits(small_pack, tmp_path, case):
    shape, limit = THREE_CASES[case]
    names = THREE if case == 1 else [ONE]
    path = wide(small_pack, shape, tmp_path, len(names))
    # the library: one PackError per tensor, before any allocation
    r = _child(f"""
        from hhtld import PackError, open as open_pack
        p = open_pack({str(path)!r})
        for n in {names!r}:
            try:
                p.tensor(n)
                print("decoded", n)
            except PackError as e:
                print(str(e).splitlines()[0])
    """, as_limit=str(limit), timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == len(names)
    for n, line in zip(names, lines):
        assert line.startswith(f"{path}: tensor '{n}' declares shape {list(shape)} (F32): decoding it whole needs ")
        assert "RLIMIT_AS address-space limit, less a margin" in line
    # the command line: decode streams, so under a file-size limit it is the disk that refuses, at once
    out = tmp_path / "out"
    r = _child(f"""
        sys.exit(hhtld.cli.main(["decode", {str(path)!r}, "-o", {str(out)!r}, "-q"]))
    """, as_limit=str(limit), fsize=256 << 20, timeout=60)
    assert r.returncode == 1 and r.stdout == "", r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    declared = len(names) * shape[0] * shape[1] * 4 + (0 if case == 1 else 3 * 512 * 64 * 4)
    assert r.stderr.startswith(f"hhtld: error: {path}: decoding it writes {format_bytes(declared)}")
    assert "its largest file would be" in r.stderr and "the file-size limit (ulimit -f) is 256.0 MiB" in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_decode_streams_a_tensor_larger_than_the_process_may_hold(small_pack, tmp_path):
    path = wide(small_pack, (2048, 65536), tmp_path)  # 512 MiB as float32, from 21 kB
    out = tmp_path / "out"
    code = f"""
        from hhtld import PackError, open as open_pack
        try:
            open_pack({str(path)!r}).tensor({ONE!r})
        except PackError as e:
            print("refused:", "decoding it whole needs" in str(e))
        sys.exit(hhtld.cli.main(["decode", {str(path)!r}, "-o", {str(out)!r}, "-q", "--json"]))
    """
    r = _child(code, as_limit=f"+{400 << 20}", env={"HHTLD_DECODE_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == "refused: True"
    assert json.loads("\n".join(r.stdout.splitlines()[1:]))["weights_decoded"] == 2048 * 65536 + 3 * 512 * 64
    from safetensors import safe_open

    p = open_pack(path)
    with safe_open(str(out / "m.safetensors"), "numpy") as f:
        for n in [ONE]:
            got = f.get_slice(n)
            for s, e, block in p.tensor_blocks(n):
                if s % 1000 < 500:  # a sample of the blocks, against the same decode held in memory
                    assert np.array_equal(got[s:e], block), (n, s)


def test_streamed_decode_equals_the_whole_tensor_for_every_layout(tmp_path):
    """Transposed GPT-2 Conv1D, 3-D kernels and 16-bit dtypes across several blocks, on more than one thread."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    t = {"transformer.h.0.mlp.c_fc.weight": rng.standard_normal((256, 6000)).astype(np.float32),  # transposed
         "transformer.h.0.mlp.c_proj.weight": rng.standard_normal((6000, 256)).astype(np.float16),
         "encoder.conv.weight": rng.standard_normal((5000, 256, 1)).astype(ml_dtypes.bfloat16),
         "encoder.norm.weight": rng.standard_normal(256).astype(np.float32)}
    save_file(t, str(tmp_path / "m.safetensors"))
    for codec, opts in (("hhtl-vq", {"stages": "2"}), ("hhtl-f32", {})):
        pack = encode_checkpoint(tmp_path / "m.safetensors", tmp_path / f"{codec}.hhtld", codec=codec,
                                 codec_options=opts, policy=EncodablePolicy(encode_all=True)).path
        out = tmp_path / f"out-{codec}"
        decode_pack(pack, out)
        p = open_pack(pack)
        assert p.info("transformer.h.0.mlp.c_fc.weight")["transposed"]
        raw = (out / "m.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for name in t:
            a, z = header[name]["data_offsets"]
            whole = p.tensor(name)
            assert raw[8 + n + a:8 + n + z] == np.ascontiguousarray(whole).tobytes(), (codec, name)


def test_thread_pools_never_hang_where_threads_cannot_start(small_pack, tmp_path):
    r = _child("""
        from hhtld.pack.reader import _DecodePool
        try:
            _DecodePool(64)  # 64 threads do not fit 512 MiB of address space
            print("started")
        except RuntimeError as e:
            print("refused:", e)
    """, as_limit=f"+{512 << 20}", timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("refused: can't start new thread"), r.stderr[-2000:]
    path = wide(small_pack, (2048, 4096), tmp_path)
    ref = open_pack(path).tensor(ONE).tobytes()
    (tmp_path / "ref.bin").write_bytes(ref)
    r = _child(f"""
        from hhtld import open as open_pack
        a = open_pack({str(path)!r}).tensor({ONE!r})  # 8 threads asked for: decodes on those that fit
        print("same:", a.tobytes() == open({str(tmp_path / 'ref.bin')!r}, "rb").read())
    """, as_limit=f"+{512 << 20}", env={"HHTLD_DECODE_THREADS": "8"}, timeout=60)
    assert r.returncode == 0 and r.stdout == "same: True\n", r.stderr[-2000:]


def test_memory_errors_while_decoding_are_pack_errors(small_pack, tmp_path):
    path = wide(small_pack, (65536, 16384), tmp_path)  # 4 GiB: the limit says yes, the address space says no
    r = _child(f"""
        from hhtld import PackError, open as open_pack
        try:
            open_pack({str(path)!r}, memory_limit="64G").tensor({ONE!r})
        except PackError as e:
            print(str(e))
    """, as_limit=f"+{1 << 30}", timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    assert r.stdout.startswith(f"{path}: tensor '{ONE}': out of memory during decoding it whole (MemoryError: ")


def _flip(path: Path, array: str, out: Path) -> None:
    """One byte of a stored array changed, its hash left as it was (an accident)."""
    blob = bytearray(path.read_bytes())
    header, _ = fuzz.split(bytes(blob))
    n = int.from_bytes(blob[:8], "little")
    a, _ = header[array]["data_offsets"]
    blob[8 + n + a] ^= 0x40
    out.write_bytes(bytes(blob))


def test_inspect_check_reads_every_array_and_names_each_that_fails(small_pack, tmp_path, capsys):
    from hhtld.cli import main

    bad = tmp_path / "bad.hhtld"
    _flip(small_pack, "__group__.0000::fisher_z", bad)
    _flip(bad, "__group__.0000::route", bad)
    assert main(["inspect", str(bad)]) == 0  # arrays a decode never reads: only the check sees them
    assert main(["decode", str(bad), "-o", str(tmp_path / "out"), "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(bad), "--check"]) == 1
    err = capsys.readouterr().err
    assert err == (f"hhtld: error: {bad}: 2 stored arrays fail their checks: damaged hhtld pack (checksum mismatch in "
                   "'__group__.0000::route'); damaged hhtld pack (checksum mismatch in '__group__.0000::fisher_z')\n")
    assert main(["inspect", str(small_pack), "--check"]) == 0
    n_arrays = len(open_pack(small_pack).header.tensors)
    assert f"check: all {n_arrays} stored arrays match their hashes and declared values" in capsys.readouterr().out
    assert main(["inspect", str(small_pack), "--check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checked_arrays"] == n_arrays
