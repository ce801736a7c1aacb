"""A few hundred cases of the fuzzer (``make fuzz`` runs 10,000): no mutated pack of any
codec decodes silently to something else, raises a traceback, hangs or blows up memory."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fuzz  # noqa: E402


def test_mutated_packs_are_refused_or_decode_exactly(tmp_path):
    res = fuzz.run(cases=320, minilm_cases=0, seed=20261126, work=tmp_path, log=lambda *a: None)
    totals = res.totals
    assert res.cases == 320 and sum(totals.values()) == 320
    assert {o: totals.get(o, 0) for o in fuzz.FAILURES} == dict.fromkeys(fuzz.FAILURES, 0), res.failures[:5]
    assert totals["refused"] >= 250
    assert set(res.by_base) == {b["name"] for b in res.bases} and len(res.bases) == 4
    assert {f.split(" (")[0] for f in res.by_family} >= {"flip", "truncate", "header", "manifest", "data"}
