"""Real English sentences this project did not write, for running models.

Two fixed, disjoint lists shipped with hhtld as data (``data/heldout.txt``,
``data/calibration.txt``), both taken from the docstrings of the Python
standard library (CPython 3.11) by ``scripts/make_texts.py``, which documents
the extraction:

* :func:`heldout_texts` — the held-out set ``verify`` measures behaviour on
  (gates 2 and 4), 256 sentences from the modules in :data:`HELDOUT_MODULES`.
  Nothing in the encoder may look at it.
* :func:`calibration_texts` — the set an encoder may use to steer its bit
  allocation by measured behaviour (docs/design.md §5), 256 sentences from the *other*
  modules in :data:`CALIBRATION_MODULES`; no sentence of the held-out modules
  is in it.

They are data rather than extracted at run time because introspecting
modules depends on what was imported before (importing torch first changed
which docstrings a module exposes, and so the held-out set).

Causal language models are measured on prose passages instead (docs/design.md §5:
passages of at least 128 tokens), two more fixed lists made by
``scripts/make_passages.py`` from CPython 3.11's language reference
(``pydoc_data.topics``) and the docstrings of its standard-library source
files, one document (a topic or a file) going to one side only:

* :func:`heldout_passages` — 256 passages of 720+ characters (137 to 327
  SmolLM2-135M tokens), what ``verify`` runs causal models on;
* :func:`calibration_passages` — 128 passages of 1450+ characters (271 to 435
  SmolLM2 tokens, enough for 256-token calibration windows), for encoder
  calibration only. No sentence of one list occurs in the other.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

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


def _read(name: str) -> tuple[str, ...]:
    text = resources.files("hhtld.gates").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


@lru_cache(maxsize=None)
def _read_cached(name: str) -> tuple[str, ...]:
    return _read(name)


@lru_cache(maxsize=1)
def _heldout() -> tuple[str, ...]:
    return _read("heldout.txt")


@lru_cache(maxsize=1)
def _calibration() -> tuple[str, ...]:
    return _read("calibration.txt")


def heldout_texts() -> list[str]:
    """The 256 held-out sentences ``verify`` runs models on (gates 2 and 4).
    A new list each call. Never use them for encoder calibration."""
    return list(_heldout())


def calibration_texts() -> list[str]:
    """The 256 sentences for encoder calibration only (disjoint from the
    held-out set). A new list each call."""
    return list(_calibration())


def heldout_passages() -> list[str]:
    """The 256 held-out prose passages (one string each, 720+ characters,
    at least 128 tokens for SmolLM2's tokenizer) that ``verify`` runs causal
    language models on. A new list each call. Never use them for calibration."""
    return list(_read_cached("heldout_passages.txt"))


def calibration_passages() -> list[str]:
    """The 128 calibration prose passages (1450+ characters, at least 256
    SmolLM2 tokens each) for encoder calibration of causal language models;
    they share no document and no sentence with :func:`heldout_passages`.
    A new list each call."""
    return list(_read_cached("calibration_passages.txt"))
