"""Real English sentences this project did not write, for running models.

Two disjoint sources, both taken from the docstrings of the Python standard
library that runs hhtld (so they are on every machine, need no download and
are fixed for a given Python version):

* :func:`heldout_texts` — the held-out set ``verify`` measures behaviour on
  (gates 2 and 4). Nothing in the encoder may look at it.
* :func:`calibration_texts` — the set an encoder may use to steer its bit
  allocation by measured behaviour (SPEC §6). It comes from *other*
  modules, and any sentence that also occurs in the held-out set is dropped,
  so the two never overlap.

Extraction is deterministic: modules in the fixed order below; inside a
module the module docstring, then its classes and functions sorted by name
(a class's own methods sorted by name after the class), counting only
objects defined in that module (``__module__`` matches), so an imported or
inherited docstring is never counted twice. Paragraphs containing code
(``>>>``, indented blocks, ``::``) are skipped; the rest is split into
sentences and filtered to plain prose (6–60 words, starts with a capital
letter, ends with ``.``/``!``/``?``, mostly letters). Duplicates keep their
first occurrence.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from functools import lru_cache

# Fixed, documented lists; the two lists share no module.
HELDOUT_MODULES: tuple[str, ...] = (
    "argparse", "textwrap", "difflib", "fractions", "statistics", "heapq",
    "shutil", "tarfile", "zipfile", "pathlib", "subprocess", "threading",
    "logging", "smtplib", "ftplib", "calendar", "pickle", "inspect",
)
CALIBRATION_MODULES: tuple[str, ...] = (
    "configparser", "csv", "functools", "gettext", "http.client", "http.cookiejar",
    "ipaddress", "optparse", "pdb", "pydoc", "random", "sched", "selectors",
    "tempfile", "tokenize", "typing", "unittest.case", "urllib.parse", "uuid",
    "weakref", "imaplib", "mailbox", "email.message", "xml.dom.minidom",
)

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


@lru_cache(maxsize=1)
def _heldout() -> tuple[str, ...]:
    return tuple(_collect(HELDOUT_MODULES, HELDOUT_COUNT))


@lru_cache(maxsize=1)
def _calibration() -> tuple[str, ...]:
    every_heldout = frozenset(_collect(HELDOUT_MODULES, 10**9))
    return tuple(_collect(CALIBRATION_MODULES, CALIBRATION_COUNT, exclude=every_heldout))


def heldout_texts() -> list[str]:
    """The held-out sentences ``verify`` runs models on (gates 2 and 4): 256
    sentences from the docstrings of :data:`HELDOUT_MODULES`. Cached; a new list
    each call. Never use them for encoder calibration."""
    return list(_heldout())


def calibration_texts() -> list[str]:
    """Sentences for encoder calibration only: 256 sentences from the docstrings
    of :data:`CALIBRATION_MODULES`, none of which is in the held-out set (nor in
    any sentence of the held-out modules). Cached; a new list each call."""
    return list(_calibration())
