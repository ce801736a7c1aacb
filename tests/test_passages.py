"""The prose passages for causal language models (``heldout_passages`` /
``calibration_passages``): real, disjoint, long enough, reproducible."""

from __future__ import annotations

import re
import sys

import pytest

from hhtld.gates.texts import calibration_passages, heldout_passages

from .conftest import load_script

SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")


def test_passages_are_fixed_disjoint_prose():
    h, c = heldout_passages(), calibration_passages()
    assert len(h) == 256 and len(c) == 128
    assert len(set(h)) == len(h) and len(set(c)) == len(c)
    assert heldout_passages() == h and calibration_passages() == c
    h.append("mutating the returned list does not touch the cache")
    assert heldout_passages() != h
    h.pop()
    assert all(len(p) >= 720 for p in h) and all(len(p) >= 1450 for p in c)
    for p in h + c:
        assert "\n" not in p and (p[0].isupper() or p[0] in "\"“") and p[-1] in ".!?"
        assert ">>>" not in p and "::=" not in p
    # no sentence of one list occurs in the other
    hs = {s for p in h for s in SENTENCE.split(p)}
    cs = {s for p in c for s in SENTENCE.split(p)}
    assert not hs & cs


def test_passages_come_from_cpython_prose():
    from pydoc_data.topics import topics

    # some held-out passages are language-reference prose, word for word (line breaks aside)
    flat = {name: re.sub(r"\s+", " ", t) for name, t in topics.items()}
    first = [s for s in SENTENCE.split(heldout_passages()[0])][0]
    assert any(first in t for t in flat.values())


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the lists were generated on CPython 3.11.7")
def test_generator_reproduces_the_shipped_lists():
    heldout, calibration, _ = load_script("make_passages").build()
    assert heldout == heldout_passages() and calibration == calibration_passages()


@pytest.mark.slow
def test_passages_are_long_enough_in_smollm2_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert min(len(ids) for ids in tok(heldout_passages()).input_ids) >= 128
    assert min(len(ids) for ids in tok(calibration_passages()).input_ids) >= 256
