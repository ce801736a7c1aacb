"""Regenerate the fixed prose passages of ``hhtld.gates.texts`` (causal language models).

docs/design.md §4–5: a causal LM is verified on held-out prose passages of at least
128 tokens, and an encoder calibrates on other passages, disjoint from them.
This script writes both lists as data shipped with hhtld
(``src/hhtld/gates/data/heldout_passages.txt`` and
``calibration_passages.txt``, one passage per line). They were made with it,
on CPython 3.11.7, in a fresh interpreter:

    python scripts/make_passages.py

Sources: real English prose written by CPython's authors, read from files of
the running Python, never by importing the modules (so what was imported
before cannot change the result):

* the language reference as ``pydoc`` ships it (``pydoc_data.topics``: one
  document per topic, e.g. ``execmodel``, ``customization``);
* the docstrings of the standard library's own ``.py`` files, read with
  ``ast`` (module, then classes, functions and methods in source order; one
  document per file). Test folders, ``site-packages``, ``lib2to3``,
  ``ensurepip``, ``turtledemo`` and ``idlelib``'s tests are left out.

Prose only: a paragraph is kept when it is plain running text — no
indented/literal block, no doctest (``>>>``), grammar (``::=``), table
(``+--``, ``|``) or braces; it starts with a capital letter or a quote and
ends with ``.``/``!``/``?`` (a closing sentence that introduces an example with
``:`` is dropped); at least 8 words; at least 85 % letters and spaces; at most
a quarter of its characters inside quoted code spans. Bullets, footnotes,
"Changed in version"/"New in version"/"Deprecated since" notes and "See also"
lines are dropped; ``*emphasis*`` marks are removed. Paragraphs are cut into
sentences; a sentence seen before anywhere (any document, either list) is
dropped, so the two lists share no sentence.

Split: documents are sorted by name within each source (topics, then files)
and dealt alternately to the held-out and the calibration side (even
positions held-out, odd calibration), so the two lists share no document and
both mix both sources. Within a document, consecutive sentences are joined
into a passage until it reaches :data:`HELDOUT_MIN_CHARS` (held-out, ≥ 128
SmolLM2 tokens; about 4.7 characters per token here) or
:data:`CALIBRATION_MIN_CHARS` (calibration, ≥ 256 tokens); a passage never
crosses documents, and the incomplete remainder of a document is dropped.
Finally :data:`HELDOUT_COUNT` / :data:`CALIBRATION_COUNT` passages are picked,
spread evenly over all the passages found (so over many documents).
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "src" / "hhtld" / "gates" / "data"

HELDOUT_COUNT = 256
CALIBRATION_COUNT = 128
HELDOUT_MIN_CHARS = 720
CALIBRATION_MIN_CHARS = 1450
MIN_WORDS = 8

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


def build() -> tuple[list[str], list[str], dict]:
    """(held-out passages, calibration passages, summary)."""
    seen: set[str] = set()
    heldout, calibration = [], []
    sides = {"heldout": [], "calibration": []}
    for source in (topic_documents(), docstring_documents()):
        for i, (name, text) in enumerate(source):
            side = "heldout" if i % 2 == 0 else "calibration"
            sides[side].append(name)
            sents = sentences(text, seen)
            if side == "heldout":
                heldout += passages(sents, HELDOUT_MIN_CHARS)
            else:
                calibration += passages(sents, CALIBRATION_MIN_CHARS)
    summary = {"heldout_found": len(heldout), "calibration_found": len(calibration),
               "heldout_documents": len(sides["heldout"]), "calibration_documents": len(sides["calibration"])}
    return spread(heldout, HELDOUT_COUNT), spread(calibration, CALIBRATION_COUNT), summary


def main() -> None:
    heldout, calibration, summary = build()
    if len(heldout) < HELDOUT_COUNT or len(calibration) < CALIBRATION_COUNT:
        raise SystemExit(f"too few passages: {summary}")
    for name, texts in (("heldout_passages.txt", heldout), ("calibration_passages.txt", calibration)):
        if any("\n" in t for t in texts):
            raise SystemExit(f"{name}: a passage holds a line break")
        (DATA / name).write_text("\n".join(texts) + "\n", encoding="utf-8")
        print(f"wrote {len(texts)} passages to {DATA / name}")
    print(summary)


if __name__ == "__main__":
    main()
