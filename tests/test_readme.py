"""The README names only what exists: every ``hhtld.X`` it mentions is importable and
every ``--option`` it shows for a command is one that command's parser accepts."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from hhtld.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return out


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _command_lines() -> list[str]:
    """Every line of a README code block that runs ``hhtld COMMAND`` (continuations joined)."""
    lines = []
    for lang, block in re.findall(r"^```([a-z]*)\n(.*?)^```", README, flags=re.S | re.M):
        if lang not in ("", "sh", "console", "bash"):
            continue
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"(?:^|\$ |/)hhtld ([a-z].*)", line)
            if m and not line.lstrip().startswith("#"):
                lines.append(m.group(1).split("#")[0])
    return lines


def test_readme_shows_commands():
    assert len(_command_lines()) >= 8


@pytest.mark.parametrize("line", _command_lines())
def test_every_option_the_readme_shows_exists(line):
    subs = _subparsers(build_parser())
    words = line.split()
    cmd = " ".join(words[:2]) if " ".join(words[:2]) in subs else words[0]
    assert cmd in subs, f"README runs 'hhtld {cmd}', which is not a command"
    known = _options(subs[cmd])
    shown = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))
    assert shown <= known, f"hhtld {cmd}: the README shows {sorted(shown - known)}, which the parser does not take"


def test_every_hhtld_name_in_the_readme_exists():
    names = set(re.findall(r"\bhhtld\.([A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)*)", README))
    assert {"load", "load_sentence_transformer", "load_tokenizer", "weight_memory"} <= names
    for dotted in sorted(names):
        parts = dotted.split(".")
        obj = importlib.import_module("hhtld")
        for i, part in enumerate(parts):
            if hasattr(obj, part):
                obj = getattr(obj, part)
            else:
                obj = importlib.import_module("hhtld." + ".".join(parts[: i + 1]))
        assert obj is not None


def test_public_names_are_exported():
    import hhtld

    assert len(hhtld.__all__) == len(set(hhtld.__all__))
    missing = [n for n in hhtld.__all__ if not hasattr(hhtld, n)]
    assert missing == []
