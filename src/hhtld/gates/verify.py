"""``verify(model, pack)``: the four gates of docs/design.md §5 for one pack."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.config import family_of_config, find_config, load_config_json
from ..errors import GateError, OptionsError
from ..measure.compare import compare_embeddings_by_kind, compare_outputs
from ..measure.targets import Thresholds
from ..measure.texts import EMBEDDING_KINDS, HELDOUT_MODULES, USE_KINDS, heldout_sentences, passages, render
from ..pack.reader import Pack
from .behaviour import gate_behaviour, gate_output
from .causal import compare_causal
from .report import VerifyReport
from .rows import gate_row_fidelity, measure_rows
from .runner import ModelRunner
from .sources import PackSource
from .storage import gate_storage, measure_storage

DEFAULT_GREEDY_TOKENS = 32
DEFAULT_GREEDY_TEXTS = 32


def check_match(ckpt: Checkpoint, pack: Pack) -> None:
    """Raise :class:`GateError` unless ``pack`` holds exactly the tensors of
    ``ckpt`` (same names, same shapes)."""
    where = f"{pack.path}: does not match {ckpt.path}"
    for name, t in ckpt.tensors.items():
        if name not in pack.tensors:
            raise GateError(f"{where}: tensor '{name}' is in the model but not in the pack")
        shape = list(pack.tensors[name]["shape"])
        if shape != list(t.shape):
            raise GateError(f"{where}: tensor '{name}' has shape {shape} in the pack but {list(t.shape)} in the model")
    extra = [n for n in pack.tensors if n not in ckpt.tensors]
    if extra:
        raise GateError(f"{where}: the pack has tensor '{extra[0]}' that the model lacks"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _pick_texts(texts: int | Sequence[str] | None, family: str) -> tuple[list, list[str] | None, str]:
    """(texts or passages, their kinds or None, where they come from)."""
    if texts is None or isinstance(texts, (int, np.integer)):
        if family == "causal":  # passages; retrieval (embedding models) needs two texts of a kind
            per_kind, least, what = {k: passages("heldout", k) for k in USE_KINDS["heldout"]}, 1, "passages"
            source = (f"held-out passages of {len(per_kind)} kinds ({', '.join(per_kind)}; hhtld.measure.texts, "
                      "scripts/make_passages.py)")
        else:
            per_kind, least, what = {k: heldout_sentences(k) for k in EMBEDDING_KINDS}, 2, "sentences"
            source = (f"held-out sentences of {len(per_kind)} kinds: docstrings of Python standard-library modules "
                      f"({', '.join(HELDOUT_MODULES)}) and turns of held-out conversations (hhtld.measure.texts)")
        if texts is not None:
            most = min(len(v) for v in per_kind.values())
            if isinstance(texts, bool) or not least <= texts <= most:
                raise OptionsError(f"--texts must be between {least} and {most} (held-out {what} of each kind), "
                                   f"got {texts}")
            per_kind = {k: v[:texts] for k, v in per_kind.items()}
        return [t for v in per_kind.values() for t in v], [k for k, v in per_kind.items() for _ in v], source
    out = [str(t) for t in texts]
    if len(out) < 2:
        raise OptionsError("verify needs at least 2 texts")
    return out, None, "given by the caller"


def verify(
    model: str | os.PathLike,
    pack: str | os.PathLike | Pack,
    config: str | os.PathLike | None = None,
    *,
    texts: int | Sequence[str] | None = None,
    thresholds: Thresholds = Thresholds(),
    greedy_tokens: int = DEFAULT_GREEDY_TOKENS,
    greedy_texts: int = DEFAULT_GREEDY_TEXTS,
    batch_size: int = 32,
    progress: bool = False,
    runner: ModelRunner | None = None,
    tokenizer=None,
) -> VerifyReport:
    """Measure the four gates of ``pack`` against the ``model`` it was made from.

    ``model``: folder, ``.safetensors`` file or index; a bare file needs
    ``config`` (a config.json or a folder holding one, with the tokenizer).
    ``texts``: how many held-out texts (default all: the 256 sentences of
    :func:`~hhtld.measure.texts.heldout_texts` for embedding models; for causal
    LMs the held-out passages of every kind, :data:`~hhtld.measure.texts.KINDS`,
    64 each, and ``texts`` counts passages per kind), or a list of texts.
    Causal LMs are reported per kind (``behaviour["kinds"]``), and gates 2
    and 4 hold on the worst kind. Causal models also compare ``greedy_tokens``-token
    greedy continuations of the first ``greedy_texts`` texts (0 turns it off).
    ``runner``: an already built :class:`ModelRunner` of ``model`` to reuse.

    Memory: the decoded weights are never held as a second model. They are
    decoded from the pack tensor by tensor into the model's parameters
    (:class:`~hhtld.gates.sources.PackSource`), and causal models are compared
    batch by batch (:func:`~hhtld.gates.causal.compare_causal`), never keeping
    full-vocabulary log-probabilities for all positions.

    Raises :class:`GateError` when the pack does not match the model or the
    model cannot be run; gate failures are results, not errors.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if greedy_tokens < 0 or greedy_texts < 0:
        raise OptionsError(f"--greedy-tokens and --greedy-texts must be >= 0, got {greedy_tokens} and {greedy_texts}")
    p = pack if isinstance(pack, Pack) else Pack(pack)
    ckpt = runner.checkpoint if runner is not None else open_checkpoint(model)
    check_match(ckpt, p)
    cfile = runner.config_path if runner is not None else find_config(model, config)
    family = runner.family if runner is not None else family_of_config(load_config_json(cfile))
    chosen, kinds, source = _pick_texts(texts, family)

    t = time.perf_counter()
    storage = measure_storage(p)
    g3 = gate_storage(storage, thresholds)
    timings["storage"] = time.perf_counter() - t

    t = time.perf_counter()
    if runner is None:
        runner = ModelRunner.from_model(model, config, tokenizer=tokenizer, batch_size=batch_size,
                                        progress=progress, family=family)
    timings["load_model"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = measure_rows(ckpt, p, progress=progress)
    g1 = gate_row_fidelity(rows, thresholds)
    timings["rows"] = time.perf_counter() - t

    t = time.perf_counter()
    decoded = PackSource(p, ckpt)  # tensor by tensor, on demand; identical passthrough tensors skipped
    if runner.family == "causal":
        chosen = [render(x, runner.tokenizer) for x in chosen]  # dialogue through the model's chat template
        cmp = compare_causal(runner, chosen, None, decoded, batch_size=batch_size, greedy_tokens=greedy_tokens,
                             greedy_texts=greedy_texts, desc="original vs decoded", kinds=kinds)
    else:
        ref = runner.run(chosen, None, desc="original")
        new = runner.run(chosen, decoded, desc="decoded")
        cmp = compare_outputs(ref, new)
        if kinds is not None:  # retrieval among the texts of each kind, and the cosine of each kind
            cmp["kinds"] = compare_embeddings_by_kind(ref.embeddings, new.embeddings, kinds)
    runner.set_weights(None)
    timings["behaviour"] = time.perf_counter() - t
    figures = [v for v in cmp.values() if isinstance(v, (int, float, np.number))]
    figures += [x for kind in (cmp.get("kinds") or {}).values() for x in kind.values() if isinstance(x, (int, float))]
    if not all(np.isfinite(v) for v in figures):
        raise GateError(f"{p.path}: the decoded model produces non-finite outputs")
    g2 = gate_behaviour(cmp, runner.family, thresholds)
    g4 = gate_output(cmp, runner.family, thresholds)

    behaviour = {"n_texts": len(chosen), "texts_source": source, **cmp}
    cosines = rows.pop("cosines")
    return VerifyReport(
        model=str(model), pack=str(p.path), config=str(cfile), family=runner.family,
        gates=[g1, g2, g3, g4], rows=rows, storage=storage, behaviour=behaviour,
        thresholds=thresholds.to_json(), seconds=time.perf_counter() - t0, timings=timings,
        row_cosines=cosines,
    )


def write_json(report: VerifyReport, path: str | os.PathLike) -> Path:
    """Write the report's JSON to ``path`` (atomically, parents created)."""
    from ..outputs import write_json as _write

    return _write(report.to_json(), path)
