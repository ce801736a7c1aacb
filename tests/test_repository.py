"""The repository as a fresh clone sees it: nothing tracked points outside it.

A tracked symbolic link or an absolute path of the machine that made a file
works there and nowhere else, so a clone on another machine breaks (a link
that dangles) or tells its reader about a folder they do not have. These
tests read the project's own tracked files (``git ls-files``); raw benchmark
results (``bench/*.json``) keep what their run recorded.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# a home, temporary, work or scratch folder of some machine, at the start of a path
MACHINE_PATH = re.compile(rb"(?<![A-Za-z0-9_.~$-])/(?:home|root|tmp|work|Users|scratch|mnt|private/var|var/folders)/")
RAW_RESULTS = "bench/*.json"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def tracked() -> list[tuple[str, str]]:
    """(mode, path) of every tracked file; skipped outside a git checkout (an unpacked sdist)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    rows = []
    for line in _git("ls-files", "-s", "-z").split("\0"):
        if line:
            meta, path = line.split("\t", 1)
            rows.append((meta.split()[0], path))
    return rows


def test_no_symbolic_link_is_tracked(tracked):
    assert [p for mode, p in tracked if mode == "120000"] == []


def test_no_tracked_text_names_a_folder_of_a_build_machine(tracked):
    bad = []
    for mode, path in tracked:
        if mode == "120000" or fnmatch.fnmatch(path, RAW_RESULTS):
            continue
        data = (ROOT / path).read_bytes()
        if b"\0" in data[:8192]:  # binary: packs, pictures
            continue
        for i, line in enumerate(data.splitlines(), 1):
            if MACHINE_PATH.search(line):
                bad.append(f"{path}:{i}: {line.decode('utf-8', 'replace').strip()[:120]}")
    assert bad == []


def test_the_pattern_finds_machine_paths_and_leaves_others():
    # spelt with %s so that this file does not hold the paths it tests for
    hits = [h % b"/" for h in (b"--dir %swork/packs/scale", b"see %shome/ann/x.py", b'"%stmp/tmpab12/pack.hhtld"',
                              b"cd %sroot/proj", b"%sUsers/bob/models")]
    misses = [m.replace(b"%s", b"/") for m in (b'--dir "$SCRATCH"', b"bench/out%swork/x", b"~/models",
                                               b"docs/design.md", b"%susr/bin/python3", b"a.b%stmp/c", b"$TMPDIR/x")]
    assert all(MACHINE_PATH.search(h) for h in hits)
    assert not any(MACHINE_PATH.search(m) for m in misses)


@pytest.mark.parametrize("path", [".cache", ".venv"])
def test_cache_and_venv_are_ignored_as_folder_file_or_link(tracked, path):
    # without a trailing slash git tests the path as a file or a link; with it, as a folder
    for p in (path, path + "/"):
        assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", p]).returncode == 0, p


def _run_script(cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2.py"), "--cache", str(cache)],
                          capture_output=True, text=True, timeout=120)


def test_make_llm_refuses_a_dangling_cache_link_in_one_line(tmp_path):
    cache = tmp_path / ".cache"
    cache.symlink_to(tmp_path / "gone")
    r = _run_script(cache)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"smollm2: error: {cache} is a link to {tmp_path / 'gone'}, which does not exist; "
                        f"remove the link (rm {cache}) or make its target folder, then run again\n")


def test_make_llm_refuses_a_cache_that_is_a_file_in_one_line(tmp_path):
    cache = tmp_path / ".cache"
    cache.write_text("not a folder")
    r = _run_script(cache)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"smollm2: error: {cache} exists but is not a folder; "
                        "move or remove it, or pass --cache FOLDER\n")
