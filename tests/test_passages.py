"""The passages for causal language models (``hhtld.measure.texts``): several kinds of
real text, three disjoint uses, long enough, reproducible."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from hhtld.measure.texts import (EMBEDDING_KINDS, KINDS, USE_KINDS, USES, calibration_passages, calibration_sentences,
                               heldout_passages,
                               heldout_sentences, heldout_texts, passages, render, rendered)

from .conftest import load_script

REPO = Path(__file__).resolve().parent.parent

SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
COUNTS = {"calibration": 16, "check": 12, "heldout": 64}
COUNT = {("calibration", "dialogue"): 12}


def _hash(p) -> str:
    return hashlib.sha256(json.dumps(p, ensure_ascii=False).encode()).hexdigest()


def test_each_use_has_its_kinds_and_they_play_their_parts():
    assert set(KINDS) >= {"prose", "code", "reference", "dialogue"} and USES == ("calibration", "check", "heldout")
    cal, chk, held = (set(USE_KINDS[u]) for u in USES)
    assert len(cal) >= 2 and cal < chk  # the check has the calibration kinds and more
    assert chk - cal == {"reference"}  # a kind calibration never sees
    assert held == set(KINDS) and held - chk == {"notes"}  # a kind neither calibration nor the check sees
    for use in USES:
        for kind in USE_KINDS[use]:
            got = passages(use, kind)
            assert len(got) == COUNT.get((use, kind), COUNTS[use]) and len({_hash(p) for p in got}) == len(got), (use, kind)
            assert passages(use, kind) == got
            got.append("mutating the returned list does not touch the cache")
            assert passages(use, kind) != got
    with pytest.raises(ValueError, match="no 'notes' passages for 'calibration'"):
        passages("calibration", "notes")


def test_the_three_uses_share_no_passage():
    hashes = {u: {_hash(p) for k in USE_KINDS[u] for p in passages(u, k)} for u in USES}
    assert not hashes["calibration"] & hashes["check"]
    assert not hashes["calibration"] & hashes["heldout"]
    assert not hashes["check"] & hashes["heldout"]
    # no prose sentence and no dialogue turn of one use occurs in another
    for kind, parts in (("prose", lambda p: SENTENCE.split(p)), ("dialogue", lambda p: list(p))):
        seen = {u: {s for p in passages(u, kind) for s in parts(p) if len(s) > 40} for u in USES}
        assert not seen["calibration"] & seen["check"] and not seen["calibration"] & seen["heldout"]
        assert not seen["check"] & seen["heldout"]


def test_kinds_are_what_they_say():
    from pydoc_data.topics import topics

    for p in passages("heldout", "prose"):
        assert "\n" not in p and (p[0].isupper() or p[0] in "\"“") and p[-1] in ".!?" and ">>>" not in p
    flat = "\n".join(topics.values())
    assert all(p.splitlines()[0] in flat for p in passages("heldout", "reference"))
    code = passages("heldout", "code")
    assert sum(bool(re.search(r"^\s*(def|class|import|from|return|if) ", p, re.M)) for p in code) > 0.75 * len(code)
    notes = passages("heldout", "notes")
    assert any("IDLE" in p for p in notes) and any("PSF" in p or "PYTHON SOFTWARE FOUNDATION" in p for p in notes)
    for d in passages("heldout", "dialogue"):
        assert isinstance(d, tuple) and len(d) >= 2 and len(d) % 2 == 0
    assert render(("Hi", "Hello.")) == "User: Hi\nAssistant: Hello."
    assert [k for k, _ in rendered("check")][::12] == list(USE_KINDS["check"])
    assert len(heldout_passages()) == 5 * 64 and len(calibration_passages()) == 16 + 16 + 12


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the lists were generated on CPython 3.11.7")
def test_generator_reproduces_the_shipped_lists():
    lists, _ = load_script("make_passages").build(REPO / ".cache")
    assert lists.pop(("heldout", "utterances")) == heldout_sentences("dialogue")  # embedding models' second kind
    assert lists.pop(("calibration", "utterances")) == calibration_sentences("dialogue")
    assert set(lists) == {(u, k) for u in USES for k in USE_KINDS[u]}
    for (use, kind), items in lists.items():
        want = [list(p) if isinstance(p, tuple) else p for p in passages(use, kind)]
        assert items == want, (use, kind)


@pytest.mark.slow
def test_passages_are_long_enough_in_smollm2_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template  # an instruct model: dialogue goes through its chat template
    for use in USES:
        need = 256 if use == "calibration" else 128
        for kind, text in rendered(use, tok):
            assert len(tok(text).input_ids) >= need, (use, kind, text[:80])
    chat = render(passages("heldout", "dialogue")[0], tok)
    assert chat.count("<|im_start|>user") >= 1 and chat.count("<|im_start|>assistant") >= 1


def test_embedding_models_have_two_kinds_of_short_text():
    assert EMBEDDING_KINDS == ("prose", "dialogue")
    prose, chat = heldout_sentences("prose"), heldout_sentences("dialogue")
    assert prose == heldout_texts() and len(chat) == 128 and len(set(chat)) == 128
    assert all(6 <= len(t.split()) <= 40 for t in chat)
    held_turns = {t for d in passages("heldout", "dialogue") for t in d}
    other = {t for u in ("calibration", "check") for d in passages(u, "dialogue") for t in d}
    assert not set(chat) & other  # no turn of a calibration or check conversation
    cal = calibration_sentences("dialogue")
    assert len(cal) == 128 and not set(cal) & held_turns and not set(cal) & set(chat)
    assert len(set(chat) & held_turns) > 64  # turns of held-out conversations (the rest did not fit a chat)
