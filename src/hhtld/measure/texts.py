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

Causal language models are measured on passages of several kinds of text
instead (docs/design.md §5: passages of at least 128 tokens), made by
``scripts/make_passages.py`` (which documents the sources) and shipped as
``data/passages/<use>-<kind>.jsonl``. :data:`KINDS`: ``prose`` (standard-library
docstrings), ``code`` (standard-library source), ``reference`` (the language
reference), ``notes`` (CPython's release notes, readme and licence texts) and
``dialogue`` (English conversations, rendered with the model's chat template
for instruct models). Three uses share no document and no passage
(:data:`USE_KINDS` says which kinds each has):

* ``calibration`` — what the calibrated encoder analyses the model on
  (prose, code, dialogue; 256+ SmolLM2 tokens a passage);
* ``check`` — what the calibrated encode checks its pack on: other passages of
  the calibration kinds plus ``reference``, which calibration never sees;
* ``heldout`` — what ``verify`` measures: every kind, including ``notes``,
  which neither calibration nor the check ever sees.

:func:`passages` gives one list, :func:`render` a passage as the text a
tokenizer reads. :func:`heldout_passages` / :func:`calibration_passages` give
all kinds of a use as rendered text (dialogue in a plain ``User:`` /
``Assistant:`` form).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Sequence

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
    text = resources.files("hhtld.measure").joinpath("data", name).read_text(encoding="utf-8")
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


# Kinds of short held-out text for embedding models: the docstring sentences above, and single
# turns of the held-out conversations (data/passages/heldout-utterances.jsonl).
EMBEDDING_KINDS: tuple[str, ...] = ("prose", "dialogue")


def heldout_sentences(kind: str) -> list[str]:
    """The held-out short texts of one :data:`EMBEDDING_KINDS` kind for embedding
    models: ``prose`` (:func:`heldout_texts`, 256) or ``dialogue`` (128 turns of
    6 to 40 words). A new list each call."""
    if kind == "prose":
        return heldout_texts()
    if kind == "dialogue":
        return list(_passages("heldout", "utterances"))
    raise ValueError(f"no {kind!r} sentences (kinds: {', '.join(EMBEDDING_KINDS)})")


def calibration_sentences(kind: str) -> list[str]:
    """The calibration short texts of one :data:`EMBEDDING_KINDS` kind for embedding
    models: ``prose`` (:func:`calibration_texts`, 256) or ``dialogue`` (128 turns of
    calibration and check conversations, none of a held-out one). A new list each call."""
    if kind == "prose":
        return calibration_texts()
    if kind == "dialogue":
        return list(_passages("calibration", "utterances"))
    raise ValueError(f"no {kind!r} sentences (kinds: {', '.join(EMBEDDING_KINDS)})")


def heldout_texts() -> list[str]:
    """The 256 held-out sentences ``verify`` runs models on (gates 2 and 4).
    A new list each call. Never use them for encoder calibration."""
    return list(_heldout())


def calibration_texts() -> list[str]:
    """The 256 sentences for encoder calibration only (disjoint from the
    held-out set). A new list each call."""
    return list(_calibration())


# -- passages of several kinds, for causal language models ----------------------------------
KINDS: tuple[str, ...] = ("prose", "code", "reference", "notes", "dialogue")
USES: tuple[str, ...] = ("calibration", "check", "heldout")
USE_KINDS: dict[str, tuple[str, ...]] = {
    "calibration": ("prose", "code", "dialogue"),
    "check": ("prose", "code", "dialogue", "reference"),
    "heldout": KINDS,
}
# A passage: a text, or a dialogue as its turns (user first, then alternating with the assistant).
Passage = str | tuple[str, ...]


@lru_cache(maxsize=None)
def _passages(use: str, kind: str) -> tuple[Passage, ...]:
    text = resources.files("hhtld.measure").joinpath("data", "passages", f"{use}-{kind}.jsonl").read_text(
        encoding="utf-8")
    out = []
    for line in text.splitlines():
        x = json.loads(line)
        out.append(tuple(x) if isinstance(x, list) else x)
    return tuple(out)


def passages(use: str, kind: str) -> list[Passage]:
    """The passages of one ``kind`` for one ``use`` (``calibration``, ``check`` or
    ``heldout``); a new list each call. An unknown pair is a ValueError."""
    if use not in USE_KINDS or kind not in USE_KINDS[use]:
        raise ValueError(f"no {kind!r} passages for {use!r} (kinds by use: {USE_KINDS})")
    return list(_passages(use, kind))


def dialogue_messages(turns: Sequence[str]) -> list[dict[str, str]]:
    """A dialogue's turns as chat messages (user first, then alternating with the assistant)."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def render(passage: Passage, tokenizer=None) -> str:
    """The text a model reads for a passage: a text as it is; a dialogue through the
    tokenizer's chat template when it has one (instruct models), else as
    ``User: ...`` / ``Assistant: ...`` lines."""
    if isinstance(passage, str):
        return passage
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(dialogue_messages(passage), tokenize=False)
    return "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                     for m in dialogue_messages(passage))


def rendered(use: str, tokenizer=None, kinds: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``(kind, text)`` of every passage of ``use`` (all its kinds, or ``kinds``), in kind order."""
    return [(k, render(p, tokenizer)) for k in (kinds or USE_KINDS[use]) for p in _passages(use, k)]


def heldout_passages() -> list[str]:
    """Every held-out passage (all kinds, dialogue in plain form), what ``verify``
    runs causal language models on. A new list each call. Never use them for
    calibration or for the encoder's check."""
    return [t for _, t in rendered("heldout")]


def calibration_passages() -> list[str]:
    """Every calibration passage (all calibration kinds, dialogue in plain form),
    for encoder calibration of causal language models; they share no document
    with the check and held-out passages. A new list each call."""
    return [t for _, t in rendered("calibration")]
