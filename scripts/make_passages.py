"""Regenerate the fixed passages of ``hhtld.measure.texts`` for causal language models.

docs/design.md §5: a causal LM is measured on held-out passages of at least 128
tokens drawn from several kinds of text, and an encoder calibrates and checks
itself on other passages. This script writes every list as data shipped with
hhtld (``src/hhtld/measure/data/passages/<use>-<kind>.jsonl``: one passage per
line, a JSON string, or for dialogue a JSON list of turns, user first). They
were made with it, on CPython 3.11.7, in a fresh interpreter:

    python scripts/make_passages.py [--cache .cache]

Kinds, and where they come from (files of the running Python, never imported,
so what was imported before cannot change the result; and one PyPI package):

* ``prose`` — the docstrings of the standard library's own ``.py`` files, read
  with ``ast``, kept when they are plain running text (below);
* ``code`` — the same files' source code, as written (comments, docstrings);
* ``reference`` — the language reference as ``pydoc`` ships it
  (``pydoc_data.topics``), as written: prose, grammar and examples;
* ``notes`` — the release notes, history, readme, credits and licence texts
  CPython installs (``idlelib/NEWS.txt``, ``NEWS2x.txt``, ``HISTORY.txt``,
  ``README.txt``, ``TODO.txt``, ``extend.txt``, ``CREDITS.txt``, ``LICENSE.txt``);
* ``dialogue`` — the English conversations of the PyPI package
  ``chatterbot-corpus`` 1.3.3 (BSD licence; downloaded with pip into the cache
  folder and checked against its sha256), consecutive conversations of one
  topic file joined into one chat, turns alternating user / assistant.

Uses (``hhtld.measure.texts.USES``): ``calibration`` (what the encoder's
analysis runs on), ``check`` (what the calibrated encode checks its pack on)
and ``heldout`` (what ``verify`` measures). A standard-library file goes to
one use only, by its position in sorted order (0 held-out, 1 calibration, 2
check, again and again), with its docstrings and its code; language-reference
topics alternate between held-out and check; the notes files are held-out
only; chats are dealt to the three uses in turn. So no two uses share a
document (or, for dialogue, a chat), and:

* calibration: prose, code, dialogue;
* check: those three and reference (a kind calibration never sees);
* held-out: all five, notes being a kind neither calibration nor the check sees.

For embedding models it also writes ``heldout-utterances.jsonl`` and
``calibration-utterances.jsonl``: 128 single turns of 6 to 40 words each, from
the held-out conversations and from the calibration and check ones (no turn
on both sides), a second kind of short text next to the docstring sentences
of ``scripts/make_texts.py``.

Prose only, for ``prose``: a paragraph is kept when it is plain running text —
no indented/literal block, no doctest (``>>>``), grammar (``::=``), table
(``+--``, ``|``) or braces; it starts with a capital letter or a quote and
ends with ``.``/``!``/``?`` (a closing sentence that introduces an example with
``:`` is dropped); at least 8 words; at least 85 % letters and spaces; at most
a quarter of its characters inside quoted code spans. Bullets, footnotes,
"Changed in version"/"New in version"/"Deprecated since" notes and "See also"
lines are dropped; ``*emphasis*`` marks are removed. A sentence seen before is
dropped. Sentences of one document are joined into a passage until it has
the use's minimum length; other kinds are cut at line ends (turn ends for
dialogue) once a passage has it; a passage never crosses documents and the
incomplete remainder of a document is dropped. Conversations of a topic file
are dealt to the uses in turn (held-out, calibration, held-out, check,
held-out, again and again: held-out needs the most) before they are joined
into chats; a conversation that repeats a turn of over 40 characters of an
earlier one is left out. Finally each list's count of passages is picked,
spread evenly over all the passages found.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "src" / "hhtld" / "measure" / "data" / "passages"

# passages per (use, kind); minimum characters per (use, kind): held-out and check passages
# have at least 128 SmolLM2 tokens, calibration passages at least 256 (tests/test_passages.py)
COUNTS = {"calibration": 16, "check": 12, "heldout": 64}
MIN_CHARS = {
    "calibration": {"prose": 1450, "code": 1300, "dialogue": 750},
    "check": {"prose": 720, "code": 680, "dialogue": 420, "reference": 720},
    "heldout": {"prose": 720, "code": 680, "dialogue": 420, "reference": 720, "notes": 720},
}
MIN_WORDS = 8
UTTERANCES = 128


def count(use: str, kind: str) -> int:
    """Passages of one list: COUNTS of the use; the dialogue corpus is smaller."""
    return min(COUNTS[use], 12) if (use, kind) == ("calibration", "dialogue") else COUNTS[use]
NOTES = ("idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt", "idlelib/README.txt", "idlelib/TODO.txt",
         "idlelib/extend.txt", "idlelib/CREDITS.txt", "LICENSE.txt")
CHAT_PACKAGE, CHAT_VERSION = "chatterbot-corpus", "1.3.3"
CHAT_WHEEL = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
CHAT_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo"}
SKIP_STARTS = ("*", "-", "[", "Changed in version", "New in version", "Added in version", "Deprecated since",
               "See also", "Note:", "Warning:")
_UNDERLINE = re.compile(r"^\s*[*=\-~^\"#+]{3,}\s*$")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
_NOT_PROSE = (">>>", "::=", "+--", "|", "{", "}", "==", "...")
_QUOTED = re.compile(r"\"[^\"]*\"")
_EMPHASIS = re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])")


# -- documents ------------------------------------------------------------------------
def topic_documents() -> list[tuple[str, str]]:
    """(``topic:<name>``, text) for every pydoc topic, sorted by name."""
    from pydoc_data.topics import topics

    return [(f"topic:{name}", topics[name]) for name in sorted(topics)]


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (relative paths, sorted), tests and the skipped folders left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if any(p in SKIP_DIRS or p.startswith(("lib-dynload", "config-")) for p in rel.parts):
            dirnames[:] = []
            continue
        found += [rel / f for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.as_posix())


def docstrings_of(path: Path) -> list[str]:
    """Cleaned docstrings of one source file: module, then classes/functions/methods in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    out = []

    def visit(node) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return out


def docstring_documents() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for rel in stdlib_files():
        text = "\n\n".join(docstrings_of(root / rel))
        if text:
            docs.append((f"stdlib:{rel.as_posix()}", text))
    return docs


# -- prose --------------------------------------------------------------------------------
def _paragraphs(text: str) -> list[list[str]]:
    """Blank-line separated blocks of lines; reST/pydoc heading lines (a line and its underline) removed."""
    kept: list[str] = []
    for line in text.splitlines():
        if _UNDERLINE.match(line):
            if kept and kept[-1].strip():
                kept.pop()  # the heading above the underline
            kept.append("")
            continue
        kept.append(line)
    paras, cur = [], []
    for line in kept:
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    return paras


def prose_paragraph(lines: list[str]) -> str | None:
    """The paragraph as one line of prose, or None when it is not plain running text."""
    indents = {len(ln) - len(ln.lstrip()) for ln in lines}
    if len(indents) > 1:  # a hanging indent or an indented block inside: a list, a signature, code
        return None
    text = re.sub(r"\s+", " ", " ".join(ln.strip() for ln in lines)).strip()
    if text.startswith(SKIP_STARTS) or re.match(r"^\(?\d+[.)]", text):
        return None
    if not re.match(r"^[A-Z\"“]", text) or any(x in text for x in _NOT_PROSE):
        return None
    if text.endswith(":"):  # "... for example:" introduces code that was dropped
        text = " ".join(_SENTENCE_SPLIT.split(text)[:-1])
    text = _EMPHASIS.sub(r"\1", text)
    if not text.endswith((".", "!", "?")) or len(text.split()) < MIN_WORDS:
        return None
    if sum(len(m) for m in _QUOTED.findall(text)) > 0.25 * len(text):
        return None
    if sum(c.isalpha() or c == " " for c in text) < 0.85 * len(text):
        return None
    return text


def sentences(text: str, seen: set[str]) -> list[str]:
    """Prose sentences of one document in order; sentences in ``seen`` are dropped, new ones added to it."""
    out = []
    for para in _paragraphs(text):
        p = prose_paragraph(para)
        if p is None:
            continue
        for s in _SENTENCE_SPLIT.split(p):
            s = s.strip()
            if s and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def passages(sents: list[str], min_chars: int) -> list[str]:
    """Consecutive sentences joined until each passage has ``min_chars``; the remainder is dropped."""
    out, cur = [], ""
    for s in sents:
        cur = f"{cur} {s}" if cur else s
        if len(cur) >= min_chars:
            out.append(cur)
            cur = ""
    return out


def spread(items: list[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def stdlib_uses() -> dict[str, str]:
    """Use of every standard-library file (relative path → use): 0 held-out, 1 calibration, 2 check, ..."""
    order = ("heldout", "calibration", "check")
    return {rel.as_posix(): order[i % 3] for i, rel in enumerate(stdlib_files())}


def cut_lines(text: str, min_chars: int) -> list[str]:
    """Consecutive lines joined until a passage has ``min_chars`` (cut at a line end);
    runs of blank lines become one, trailing spaces go; the remainder is dropped."""
    lines = [ln.rstrip() for ln in text.replace("\t", "    ").splitlines()]
    out, cur, blank = [], [], False
    for ln in lines:
        if not ln:
            if cur and not blank:
                cur.append("")
            blank = True
            continue
        blank = False
        cur.append(ln)
        if sum(len(x) + 1 for x in cur) >= min_chars:
            out.append("\n".join(cur).strip("\n"))
            cur = []
    return out


def chat_wheel(cache: Path) -> Path:
    """The chatterbot-corpus wheel in ``cache`` (downloaded with pip when missing), sha256-checked."""
    wheel = cache / CHAT_WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{CHAT_PACKAGE}=={CHAT_VERSION}", "-d", str(cache)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not wheel.is_file():
            raise SystemExit(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != CHAT_SHA256:
        raise SystemExit(f"{wheel}: not the expected sha256 {CHAT_SHA256}; delete it and run again")
    return wheel


def conversations(wheel: Path) -> list[list[list[str]]]:
    """The English conversations per topic file (sorted), in order, each as turns
    (whitespace made single, an odd last turn dropped so turns pair up). The
    corpus repeats some conversations and answers across files: a conversation
    with a turn of over 40 characters seen before is left out."""
    import yaml

    seen: set[str] = set()
    out = []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(r"chatterbot_corpus/data/english/[a-z_]+\.yml", n))
        for name in names:
            doc = yaml.safe_load(z.read(name).decode("utf-8"))
            kept = []
            for conv in doc.get("conversations") or []:
                turns = [re.sub(r"\s+", " ", str(t)).strip() for t in conv if str(t).strip()]
                turns = turns[: len(turns) // 2 * 2]
                long = {t for t in turns if len(t) > 40}
                if not turns or long & seen:
                    continue
                seen |= long
                kept.append(turns)
            out.append(kept)
    return out


# the use of the j-th conversation of a topic file is CHAT_DEAL[j % 5]: held-out needs the most
CHAT_DEAL = ("heldout", "calibration", "heldout", "check", "heldout")


def chats(files: list[list[list[str]]], use: str, min_chars: int) -> list[list[str]]:
    """Chats of ``use``'s conversations of each topic file (:data:`CHAT_DEAL`):
    consecutive ones joined until a chat has ``min_chars``; turns alternate
    user / assistant."""
    out = []
    for convs in files:
        cur: list[str] = []
        for turns in (c for j, c in enumerate(convs) if CHAT_DEAL[j % len(CHAT_DEAL)] == use):
            cur += turns
            if sum(len(t) + 1 for t in cur) >= min_chars:
                out.append(cur)
                cur = []
    return out


def utterances(files: list[list[list[str]]], heldout: bool) -> list[str]:
    """UTTERANCES single turns of 6 to 40 words, each once, spread evenly: from the
    held-out conversations (``heldout``), or from the calibration and check ones, and
    none that a conversation of the other side holds. The second kind of short text
    for embedding models (verify; calibration)."""
    def mine(j: int) -> bool:
        return (CHAT_DEAL[j % len(CHAT_DEAL)] == "heldout") == heldout

    # a turn that also occurs in a conversation of the other side is left out
    seen = {t for convs in files for j, conv in enumerate(convs) if not mine(j) for t in conv}
    out = []
    for convs in files:
        for j, conv in enumerate(convs):
            if mine(j):
                for t in conv:
                    if 6 <= len(t.split()) <= 40 and t not in seen:
                        seen.add(t)
                        out.append(t)
    return spread(out, UTTERANCES)


def build(cache: Path) -> tuple[dict[tuple[str, str], list], dict]:
    """{(use, kind): passages} and a summary."""
    root = Path(sysconfig.get_paths()["stdlib"])
    uses = stdlib_uses()
    found: dict[tuple[str, str], list] = {(u, k): [] for u in MIN_CHARS for k in MIN_CHARS[u]}
    seen: set[str] = set()
    for rel, use in uses.items():
        path = root / rel
        mins = MIN_CHARS[use]
        text = "\n\n".join(docstrings_of(path))
        if text:
            found[(use, "prose")] += passages(sentences(text, seen), mins["prose"])
        try:
            code = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found[(use, "code")] += cut_lines(code, mins["code"])
    for i, (name, text) in enumerate(topic_documents()):
        use = "heldout" if i % 2 == 0 else "check"
        found[(use, "reference")] += cut_lines(text, MIN_CHARS[use]["reference"])
    for rel in NOTES:
        found[("heldout", "notes")] += cut_lines((root / rel).read_text(encoding="utf-8"), MIN_CHARS["heldout"]["notes"])
    files = conversations(chat_wheel(cache))
    for use in MIN_CHARS:  # conversations dealt to the uses, joined into chats of the use's length
        found[(use, "dialogue")] = chats(files, use, MIN_CHARS[use]["dialogue"])
    out = {key: spread(items, count(*key)) for key, items in found.items()}
    out[("heldout", "utterances")] = utterances(files, heldout=True)
    out[("calibration", "utterances")] = utterances(files, heldout=False)
    summary = {f"{u}-{k}": f"{len(out[(u, k)])} of {len(v)}" for (u, k), v in found.items()}
    return out, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=REPO / ".cache", help="where the dialogue wheel is kept")
    args = ap.parse_args()
    lists, summary = build(args.cache)
    short = {k: len(v) for k, v in lists.items() if len(v) < (UTTERANCES if k[1] == "utterances" else count(*k))}
    if short:
        raise SystemExit(f"too few passages: {short}")
    DATA.mkdir(parents=True, exist_ok=True)
    for (use, kind), items in sorted(lists.items()):
        path = DATA / f"{use}-{kind}.jsonl"
        path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), encoding="utf-8")
        print(f"wrote {len(items)} passages to {path.relative_to(REPO)}")
    print(summary)


if __name__ == "__main__":
    main()
