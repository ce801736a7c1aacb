"""Regenerate the fixed held-out and calibration sentence lists of ``hhtld.measure.texts``.

The lists are data shipped with hhtld (``src/hhtld/measure/data/*.txt``), so
every run of ``verify`` and of the encoder's calibration sees the same
sentences whatever was imported before and whatever Python runs it. They
were made with this script, on CPython 3.11, in a fresh interpreter:

    python scripts/make_texts.py

Extraction: modules in the fixed order of ``HELDOUT_MODULES`` /
``CALIBRATION_MODULES``; inside a module the module docstring, then its
classes and functions sorted by name (a class's own methods sorted by name
after the class), counting only objects defined in that module
(``__module__`` matches). Paragraphs containing code (``>>>``, indented
blocks, ``::``) are skipped; the rest is split into sentences and filtered to
plain prose (6-60 words, starts with a capital letter, ends with
``.``/``!``/``?``, mostly letters). Duplicates keep their first occurrence;
the pick is spread evenly over all sentences found; no calibration sentence
occurs anywhere in the held-out modules.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path

from hhtld.measure.texts import CALIBRATION_MODULES, HELDOUT_MODULES

DATA = Path(__file__).resolve().parent.parent / "src" / "hhtld" / "measure" / "data"

HELDOUT_COUNT = 256
CALIBRATION_COUNT = 256
MIN_WORDS, MAX_WORDS = 6, 60

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEISH = re.compile(r"(>>>|::|\{|\}|==|\w\(\)|\[\d|__\w+__|\\)")


def _docstrings(module_name: str) -> list[str]:
    """Docstrings of one module, in the documented deterministic order."""
    with warnings.catch_warnings():  # e.g. typing.io's deprecation on access
        warnings.simplefilter("ignore")
        return _docstrings_of(module_name)


def _docstrings_of(module_name: str) -> list[str]:
    try:
        mod = importlib.import_module(module_name)
    except ImportError:  # a trimmed Python build; the list is documented, the set shrinks
        return []
    out = [mod.__doc__ or ""]
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        out.append(obj.__doc__ or "")
        if inspect.isclass(obj):
            for mname, m in sorted(vars(obj).items()):
                if mname.startswith("_") and mname != "__init__":
                    continue
                f = m.__func__ if isinstance(m, (classmethod, staticmethod)) else m
                if inspect.isfunction(f) or isinstance(f, property):
                    out.append(f.__doc__ or "")
    return [inspect.cleandoc(d) for d in out if d and d.strip()]


def _sentences(doc: str) -> list[str]:
    found = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(ln.startswith((" ", "\t", ">>>", "...")) for ln in lines):
            continue  # indented block, doctest or continuation: code, not prose
        text = " ".join(ln.strip() for ln in lines)
        for s in _SENTENCE_SPLIT.split(text):
            s = s.strip()
            words = s.split()
            if not (MIN_WORDS <= len(words) <= MAX_WORDS):
                continue
            if not (s[0].isupper() and s[-1] in ".!?"):
                continue
            if _CODEISH.search(s):
                continue
            letters = sum(c.isalpha() or c == " " for c in s)
            if letters < 0.85 * len(s):
                continue
            found.append(s)
    return found


def _collect(modules: tuple[str, ...], limit: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    seen: set[str] = set(exclude)
    out: list[str] = []
    for m in modules:
        for doc in _docstrings(m):
            for s in _sentences(doc):
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    if len(out) < limit:
        return out
    # Spread the pick over every module rather than taking the first modules only.
    step = len(out) / limit
    return [out[int(i * step)] for i in range(limit)]



def main() -> None:
    heldout = _collect(HELDOUT_MODULES, HELDOUT_COUNT)
    every_heldout = frozenset(_collect(HELDOUT_MODULES, 10**9))
    calibration = _collect(CALIBRATION_MODULES, CALIBRATION_COUNT, exclude=every_heldout)
    for name, texts in (("heldout.txt", heldout), ("calibration.txt", calibration)):
        assert all("\n" not in t for t in texts)
        (DATA / name).write_text("\n".join(texts) + "\n", encoding="utf-8")
        print(f"wrote {len(texts)} sentences to {DATA / name}")


if __name__ == "__main__":
    main()
