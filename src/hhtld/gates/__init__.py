"""The four gates of ``hhtld verify`` (docs/design.md §5) and the pieces they are built from.

* :mod:`hhtld.measure` (below the gates, shared with the calibrated encode) — the
  held-out, check and calibration texts, the thresholds, the comparison of two runs;
* :mod:`.runner` — run a model with original or swapped weights;
* :mod:`.sources` — weight sources the runner loads tensor by tensor (arrays,
  a pack, another checkpoint); :mod:`.causal` — causal LMs compared batch by
  batch in bounded memory (perplexity ratio, KL, top-1);
* :mod:`.rows` — gate 1, row fidelity; :mod:`.behaviour` — gates 2 and 4;
  :mod:`.storage` — gate 3;
* :mod:`.report` — results, terminal table, JSON; :mod:`.plots` — PNGs;
* :mod:`.verify` — ``verify(model, pack)`` ties them together.

torch, transformers and matplotlib are imported only when a model is run or
a plot is drawn.
"""

from ..checkpoint.config import family_of_config
from ..measure import (RunOutputs, Thresholds, calibration_passages, calibration_texts, compare_outputs,
                       heldout_passages, heldout_texts)
from .behaviour import gate_behaviour, gate_output
from .causal import compare_causal, compare_causal_many
from .plots import write_plots
from .report import GateResult, VerifyReport
from .rows import cosine_stats, gate_row_fidelity, measure_rows, row_cosines
from .runner import ModelRunner
from .sources import ORIGINAL, CheckpointSource, DictSource, FunctionSource, PackSource, WeightSource
from .storage import gate_storage, measure_storage
from .verify import check_match, verify, write_json


__all__ = [
    "CheckpointSource", "DictSource", "FunctionSource", "GateResult", "ModelRunner", "ORIGINAL", "PackSource",
    "RunOutputs", "Thresholds", "VerifyReport", "WeightSource", "calibration_passages", "calibration_texts",
    "check_match", "compare_causal", "compare_causal_many", "compare_outputs", "cosine_stats", "family_of_config", "gate_behaviour",
    "gate_output", "gate_row_fidelity", "gate_storage", "heldout_passages", "heldout_texts", "measure_rows",
    "measure_storage", "row_cosines", "verify", "write_json", "write_plots",
]
