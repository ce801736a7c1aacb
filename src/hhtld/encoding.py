"""One entry for every encode: :func:`encode` (``hhtld encode`` maps its flags onto it).

It decides, once, what the options ask for:

* **calibrated** — the default: the hhtl-vq codec, no fixed ``stages``, and
  either no ``target``/``bpw`` or ``target="behaviour"``: the model is run on
  calibration text, rungs are chosen per tensor by predicted output change,
  error feedback encodes the blocks in order and the written pack is checked
  against the behaviour thresholds (:mod:`hhtld.calibrate`). Every matrix is
  encoded unless a ``policy`` says otherwise. A model that cannot be run here
  (no ``config.json``, no torch) falls back to ``rows`` with a note.
* **data-free allocation** — hhtl-vq with ``target="rows"`` or a ``bpw``
  budget (alone): a rung per group from row statistics
  (:func:`hhtld.budget.encode_rows`).
* **fixed** — a fixed hhtl-vq ``stages`` setting, or another codec: one
  setting for every group (:func:`hhtld.pack.encode_checkpoint`).

Options that do not apply to the chosen path are refused with an
:class:`~hhtld.errors.OptionsError` rather than ignored. The result,
:class:`EncodeReport`, is what the command line prints (``to_json()`` is its
``--json``).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .budget.allocate import TARGETS, Allocation, check_budget_options, check_pack_output, encode_rows
from .checkpoint import open_checkpoint
from .calibrate.distill import DistillOptions
from .calibrate.tuning import TuneOptions
from .calibrate.units import calibrated_plan
from .classify import DEFAULT_RULES, EncodablePolicy, RuleTable, plan_checkpoint
from .codecs.parallel import check_threads
from .pack.choice import EXECUTORS, ExecutorChoice, executor_choice
from .codecs.registry import CODECS, DEFAULT_CODEC
from .errors import CheckpointError, CodecError, GateError, HhtldNote, OptionsError
from .format import DEFAULT_SAMPLE_ROWS
from .memory import parse_size
from .pack.encode import data_free_plan, encode_checkpoint
from .pack.plan import EncodePlan
from .pack.units import UnitStore, fingerprint, partial_folder
from .pack.writer import EncodeResult

PATHS = ("calibrated", "rows", "fixed")
FLAGS = {"thresholds": "--max-kl/--max-ppl-ratio/--min-top1/--min-cosine"}  # the command's names of API options


@dataclass
class EncodeReport:
    """What :func:`encode` wrote and measured: ``path`` (the pack), ``path_kind`` (one of
    :data:`PATHS`), ``result`` (the writer's :class:`~hhtld.pack.writer.EncodeResult`),
    ``allocation`` (the rate allocation and its check, None on the fixed path),
    ``info`` (:func:`hhtld.inspection.inspect_pack` of the pack plus the encode's
    seconds, weights and allocation: the ``--json`` of ``hhtld encode``) and ``notes``."""

    path: os.PathLike
    path_kind: str
    result: EncodeResult
    allocation: Allocation | None
    info: dict[str, Any]
    policy: EncodablePolicy
    notes: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        """Whether the allocation's target was met (None when there was no target)."""
        return None if self.allocation is None else self.allocation.met

    @property
    def seconds(self) -> float:
        return float(self.info["encode_seconds"])

    def to_json(self) -> dict[str, Any]:
        return dict(self.info)


@dataclass
class _Resolved:
    path: str
    codec: str
    opts: dict[str, Any]
    target: str | None
    policy: EncodablePolicy
    rules: RuleTable
    max_rounds: int
    tune_steps: int | None  # None: by family (default_tune_steps)
    global_steps: int | None


def _resolve(target, bpw, codec, codec_options, policy, rules, group_by, config, thresholds, calibration_texts,
             max_rounds, tune_steps=None, global_steps=None, **named) -> _Resolved:
    """The path the options choose, every option checked (:class:`OptionsError`) and every
    default filled in, before anything is read or written."""
    codec = DEFAULT_CODEC if codec is None else codec
    if codec not in CODECS:
        raise OptionsError(f"unknown codec '{codec}' (known: {', '.join(sorted(CODECS))})")
    opts = dict(codec_options or {})
    for n, v in named.items():
        if v is not None:
            if n in opts and opts[n] != v:
                raise OptionsError(f"{n} given twice: {v!r} and codec_options[{n!r}] = {opts[n]!r}")
            opts[n] = v
    stages = opts.get("stages")
    wrong = [n for n in opts if n not in CODECS[codec].defaults]
    if wrong:
        raise OptionsError(f"--{wrong[0].replace('_', '-')} is not an option of codec {codec}")
    rules = (DEFAULT_RULES if rules is None else rules).group_by(group_by)
    # the path and every option checked before anything is touched
    if codec == "hhtl-vq" and stages is None:
        fixed = [n for n in ("rotate", "gain", "leaf_lanes") if n in opts]
        if fixed:
            raise OptionsError(f"--{fixed[0].replace('_', '-')} applies to a fixed --stages setting; "
                               "the allocation's ladder sets it per rung")
        if target is None:
            target = "rows" if bpw is not None else "behaviour"
        if target not in TARGETS:
            raise OptionsError(f"unknown target '{target}' (known: {', '.join(TARGETS)})")
        path_kind = "calibrated" if target == "behaviour" else "rows"
    else:
        if target is not None or bpw is not None:
            raise OptionsError("--target/--bpw allocate the hhtl-vq codec; they do not apply to "
                               f"{'a fixed --stages setting' if codec == 'hhtl-vq' else 'codec ' + codec}")
        path_kind = "fixed"
    behaviour_only = {"config": config, "calibration_texts": calibration_texts, "max_rounds": max_rounds,
                      "tune_steps": tune_steps, "global_steps": global_steps}
    if path_kind == "fixed" and thresholds is not None:
        behaviour_only["thresholds"] = thresholds
    unused = [n for n, v in behaviour_only.items() if v is not None]
    if path_kind != "calibrated" and unused:
        what = "a fixed setting" if path_kind == "fixed" else "the data-free target"
        flag = FLAGS.get(unused[0], "--" + unused[0].replace("_", "-"))
        raise OptionsError(f"{flag} applies to --target behaviour, not to {what}")
    max_rounds = 2 if max_rounds is None else max_rounds
    check_budget_options(bpw, max_rounds)
    if tune_steps is not None:
        TuneOptions(steps=tune_steps)  # refuses a bad count
    if global_steps is not None:
        DistillOptions(steps=global_steps)
    if policy is None:
        policy = EncodablePolicy(encode_all=True) if path_kind == "calibrated" else EncodablePolicy()
    return _Resolved(path_kind, codec, opts, target, policy, rules, max_rounds, tune_steps, global_steps)


def plan(model, *, target: str | None = None, bpw: float | None = None, codec: str | None = None,
         stages: str | None = None, policy: EncodablePolicy | None = None, rules: RuleTable | None = None,
         group_by: str = "role", config=None, calibration_texts: int | None = None, max_rounds: int | None = None,
         sample_rows: int = DEFAULT_SAMPLE_ROWS, threads: int | None = None,
         tune_steps: int | None = None, global_steps: int | None = None) -> EncodePlan:
    """The units :func:`encode` would run with these options (:mod:`hhtld.pack.plan`), read
    from the checkpoint's headers and config only: nothing is run or written. The
    calibrated path's rungs are chosen after its analysis, so its plan holds one fit and
    one finish per group and says so; a second round is not planned."""
    c = _resolve(target, bpw, codec, None, policy, rules, group_by, config, None, calibration_texts, max_rounds,
                 tune_steps, global_steps, stages=stages)
    ckpt = open_checkpoint(model)
    groups = plan_checkpoint(ckpt, c.policy, c.rules)
    width = check_threads(threads)
    if c.path == "calibrated":
        from .calibrate.pipeline import CHECK_SEQ_LEN, CHECK_TEXTS, DEFAULT_SEQ_LEN, FISHER_BATCH, FISHER_TEXTS, TEXTS
        from .measure.texts import USE_KINDS

        try:
            from .checkpoint.config import family_of_config, find_config, load_config_json

            family = family_of_config(load_config_json(find_config(config or model)))
        except GateError as e:
            p = data_free_plan(groups, sample_rows, width, "hhtl-vq", {}, path="rows")
            p.notes.append(f"target behaviour needs a runnable model ({e}); the encode falls back to --target rows")
            return p
        texts = calibration_texts or TEXTS[family]
        seq = DEFAULT_SEQ_LEN if family == "causal" else 32  # embedding models: short sentences
        head = next((t.name for t in groups.tensors.values() if t.role == "lm_head"), None)
        return calibrated_plan(groups, width=width, sample_rows=sample_rows, tokens=texts * seq, head=head,
                               fisher_tokens=min(texts, FISHER_TEXTS[family]) * seq,
                               logit_rows=FISHER_BATCH[family] * seq if family == "causal" else 0,
                               check_tokens=(CHECK_TEXTS[family] * len(USE_KINDS["check"]) * CHECK_SEQ_LEN
                                             if family == "causal" else texts * seq),
                               tune_steps=default_tune_steps(family) if c.tune_steps is None else c.tune_steps,
                               texts=texts,
                               global_steps=c.global_steps or 0)
    p = data_free_plan(groups, sample_rows, width, c.codec, c.opts, path=c.path)
    if c.path == "rows":
        p.notes.append("the rows target's rungs are chosen from row trials before the encode; a group whose "
                       "decoded rows miss gate 1 is encoded again one rung higher")
    return p


def encode(model, output, *, target: str | None = None, bpw: float | None = None, codec: str | None = None,
           stages: str | None = None, k: int | None = None, leaf_lanes: int | None = None,
           rotate: bool | None = None, gain: bool | None = None, seed: int | None = None,
           policy: EncodablePolicy | None = None, rules: RuleTable | None = None, group_by: str = "role",
           config=None, thresholds=None, calibration_texts: int | None = None, max_rounds: int | None = None,
           sample_rows: int = DEFAULT_SAMPLE_ROWS, threads: int | None = None, include_aux: bool = True,
           progress: bool = False, log: Callable[[str], None] | None = None,
           codec_options: dict[str, Any] | None = None, resume: bool = False,
           tune_steps: int | None = None, global_steps: int | None = None, executor: str = "local",
           ray_address: str | None = None, memory_limit: int | str | None = None) -> EncodeReport:
    """Encode ``model`` (a ``.safetensors`` file, a sharded index or a model folder) into the
    pack ``output``, written atomically; see the module for the paths the options choose.

    ``target`` (``behaviour`` or ``rows``) and ``bpw`` (bits per encoded weight) choose
    the allocation of the hhtl-vq codec; ``codec`` (default hhtl-vq) and its options
    (``stages``, ``k``, ``leaf_lanes``, ``rotate``, ``gain``, ``seed``) a fixed setting;
    ``policy`` what is encoded (default: every matrix on the calibrated path, else the
    size thresholds of :class:`~hhtld.classify.EncodablePolicy`); ``rules`` and
    ``group_by`` (``role`` or ``input``) the grouping; ``thresholds``
    (:class:`hhtld.gates.Thresholds`), ``config``, ``calibration_texts`` and
    ``max_rounds`` (default 2) the behaviour target (``thresholds`` the rows target's row
    gates too; given on another path they are refused); ``tune_steps`` the block step's
    Adam steps per block after each round's encode (default 10 for causal LMs, 0 — none —
    for embedding models: :func:`default_tune_steps`;
    :mod:`hhtld.calibrate.tuning`) and ``global_steps`` those of the global step after it
    (:mod:`hhtld.calibrate.distill`; default none), behaviour target only; ``threads`` the worker threads (the pack is
    the same for any number); ``codec_options`` any other option of the codec (its
    ``defaults``), beside the named ones. ``executor``: ``local`` (threads here) or
    ``ray`` (a Ray cluster at ``ray_address``, or a local one of ``threads`` workers;
    :mod:`hhtld.pack.ray_executor`). ``memory_limit`` (bytes or ``"8G"``): what the tensor
    encodes in flight in this process may hold together — fewer run at once when they
    would not fit (default: the limit set by :func:`hhtld.memory.set_memory_limit` or
    ``HHTLD_MEMORY_LIMIT``, else the memory available as each batch of units starts; on
    Ray each task asks the cluster for its own memory instead); the pack is the same
    bytes under any limit.

    While it runs, the finished units of the encode (:mod:`hhtld.pack.plan`) are kept in
    ``<output>.partial/``; they go when the pack is written. ``resume``: continue from the
    units an interrupted encode with the same input and options kept there (the same pack,
    byte for byte), and keep them if this run is interrupted too; without it, an
    interrupted run leaves nothing and an earlier run's units are removed."""
    t0 = time.perf_counter()
    choice = _executor_choice(executor, ray_address, memory_limit)
    c = _resolve(target, bpw, codec, codec_options, policy, rules, group_by, config, thresholds, calibration_texts,
                 max_rounds, tune_steps, global_steps, k=k, leaf_lanes=leaf_lanes, stages=stages, rotate=rotate,
                 gain=gain, seed=seed)
    path_kind, codec, opts, target, policy, rules, max_rounds = (c.path, c.codec, c.opts, c.target, c.policy,
                                                                 c.rules, c.max_rounds)
    ckpt = open_checkpoint(model)
    output = check_pack_output(output, ckpt)  # a bad output path ends it here, before any work
    options = {"path": path_kind, "codec": codec, "codec_options": opts, "target": target, "bpw": bpw,
               "policy": policy.to_json(), "rules": rules, "thresholds": thresholds, "config": config,
               "calibration_texts": calibration_texts, "max_rounds": max_rounds, "sample_rows": sample_rows,
               "include_aux": include_aux, "tune_steps": c.tune_steps if path_kind == "calibrated" else None,
               "global_steps": c.global_steps}
    notes: list[str] = []
    store = None
    try:
        if not resume and UnitStore.discard_earlier(output):
            notes.append(f"removed the units an interrupted encode of {output} kept in {partial_folder(output)} "
                         "(--resume would have continued from them)")
        # units are kept to resume, and on the calibrated path for its second round
        if resume or path_kind == "calibrated":
            store = UnitStore(output, fingerprint(ckpt, options, config)).open(resume)
        with executor_choice(choice):
            res, allocation, path_kind = _run(model, output, path_kind, codec, opts, bpw, policy, rules, config,
                                              thresholds, calibration_texts, max_rounds, sample_rows, threads,
                                              include_aux, progress, log, notes, store, c.tune_steps,
                                              c.global_steps)
    except (CheckpointError, CodecError, OptionsError):
        if store is not None:  # an error of the input or the options: a second run would meet it again
            store.done()
        raise
    except BaseException:
        if store is not None and store.kept:
            warnings.warn(store.keep(), HhtldNote, stacklevel=2)
        elif store is not None:
            store.done()
        raise
    reused = store.reused if store is not None else 0
    if reused and store.kept:
        notes.append(f"resumed: {reused} finished unit{'s' if reused != 1 else ''} of an interrupted "
                     f"encode read back from {store.folder}")
    if store is not None:
        store.done()
    rep = _report(res, allocation, policy, path_kind, time.perf_counter() - t0)
    rep.notes = notes + [n for n in rep.notes if n not in notes]
    rep.info["resumed_units"] = reused if store is not None and store.kept else 0
    rep.info["executor"] = {"kind": choice.kind, **({"address": choice.address} if choice.address else {}),
                            **choice.stats}
    return rep


def _executor_choice(executor: str, ray_address: str | None, memory_limit: int | str | None) -> ExecutorChoice:
    if executor not in EXECUTORS:
        raise OptionsError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if ray_address is not None and executor != "ray":
        raise OptionsError("a Ray address is for --executor ray")
    memory = None if memory_limit is None else parse_size(memory_limit)
    return ExecutorChoice(executor, ray_address, memory)


def _run(model, output, path_kind, codec, opts, bpw, policy, rules, config, thresholds, calibration_texts,
         max_rounds, sample_rows, threads, include_aux, progress, log, notes, store, tune_steps, global_steps):
    """The chosen path: (the writer's result, the allocation or None, the path taken)."""
    if path_kind == "fixed":
        res = encode_checkpoint(model, output, codec=codec, codec_options=opts, policy=policy, rules=rules,
                                include_aux=include_aux, progress=progress, sample_rows=sample_rows,
                                threads=threads, store=store)
        return res, None, path_kind
    kw = dict(policy=policy, rules=rules, codec_options=opts, include_aux=include_aux, sample_rows=sample_rows,
              threads=threads, log=log, store=store)
    if path_kind == "calibrated":
        done = _calibrated(model, output, bpw, config, thresholds, calibration_texts, max_rounds, notes,
                           tune_steps=tune_steps, global_steps=global_steps, **kw)
        if done is not None:
            return (*done, path_kind)
    res, allocation = encode_rows(model, output, bpw=bpw, thresholds=thresholds, progress=progress,
                                  notes=notes, **kw)
    return res, allocation, "rows"


def _calibrated(model, output, bpw, config, thresholds, texts, max_rounds, notes, *, policy, rules, codec_options,
                include_aux, sample_rows, threads, log, store, tune_steps, global_steps):
    """The calibrated encode (:mod:`hhtld.calibrate`) as (result, allocation), or None (with a
    note) when the model cannot be run here."""
    from .measure.targets import Thresholds

    try:
        from .calibrate.layerwise import build_empty
        from .calibrate.pipeline import Target, encode_calibrated

        family = build_empty(model, config)[2]  # fails fast (no config, no tokenizer, no torch) before any work
    except GateError as e:
        notes.append(f"target behaviour needs a runnable model ({e}); falling back to --target rows")
        return None
    except ImportError as e:
        notes.append(f"target behaviour needs torch, transformers and accelerate ({e}); "
                     "falling back to --target rows")
        return None
    th = thresholds or Thresholds()
    tgt = Target(max_kl=th.max_kl, max_ppl_ratio=th.max_ppl_ratio, min_top1=th.min_top1, min_cosine=th.min_cosine)
    res, report = encode_calibrated(model, output, target=tgt, bpw=bpw, config=config, policy=policy, rules=rules,
                                    codec_options=codec_options, texts=texts, sample_rows=sample_rows,
                                    threads=threads, include_aux=include_aux, max_rounds=max_rounds, log=log,
                                    store=store, tune=_block_step(tune_steps, family),
                                    distill=_global_step(model, global_steps, notes))
    alloc = Allocation("behaviour", {}, notes + report.notes, calibration=report, met=report.met,
                       checks=[r["check"] for r in report.rounds], seconds=report.seconds)
    alloc.predicted = {"output_change": report.allocation.predicted}
    return res, alloc


def default_tune_steps(family: str) -> int:
    """The block step's default by family: on for causal LMs; off for embedding models, whose
    check ranks the calibration sentences themselves (a pack tuned on them would be checked
    on the text it was fitted to: MiniLM's tuned round passed its check at 95.3 % top-1 and
    kept 93.0 % on held-out dialogue)."""
    return TuneOptions().steps if family == "causal" else 0


def _block_step(steps: int | None, family: str) -> TuneOptions | None:
    steps = default_tune_steps(family) if steps is None else steps
    return TuneOptions(steps=steps) if steps else None


def _global_step(model, steps: int | None, notes: list[str]) -> DistillOptions | None:
    """The global step's options: ``steps`` as given (None or 0: none); a note says what it
    holds for a model above its memory bound."""
    from .calibrate.distill import MAX_BYTES

    if not steps:
        return None
    ckpt = open_checkpoint(model)
    size = 4 * sum(int(np.prod(t.shape)) for t in ckpt.tensors.values())
    if size > MAX_BYTES:
        notes.append(f"the global step holds the whole model in float32 ({size / 2**30:.1f} GiB) and one batch's "
                     "activations")
    return DistillOptions(steps=steps)


def _report(res: EncodeResult, allocation: Allocation | None, policy: EncodablePolicy, path_kind: str,
            seconds: float) -> EncodeReport:
    from .inspection import inspect_pack

    info = inspect_pack(res.path)
    info["encode_seconds"] = res.seconds if allocation is None else allocation.seconds.get("total", seconds)
    info["weights_encoded"] = res.n_weights_encoded
    if allocation is not None:
        info["allocation"] = allocation.to_json()
    notes = list(allocation.notes) if allocation is not None else []
    return EncodeReport(res.path, path_kind, res, allocation, info, policy, notes)


def encode_budget(model, out, target: str | None = None, bpw: float | None = None, config=None,
                  policy: EncodablePolicy = EncodablePolicy(), rules: RuleTable = DEFAULT_RULES,
                  codec_options: dict[str, Any] | None = None, include_aux: bool = True, progress: bool = False,
                  thresholds=None, log: Callable[[str], None] | None = None, calibration: int | None = None,
                  max_rounds: int = 2, sample_rows: int = DEFAULT_SAMPLE_ROWS,
                  threads: int | None = None) -> tuple[EncodeResult, Allocation | None]:
    """Deprecated: :func:`encode` (``(report.result, report.allocation)`` is what this returned). Its
    options follow :func:`encode`'s rules (codec options that only a fixed setting takes are refused)."""
    warnings.warn("hhtld.encode_budget is deprecated and will be removed in the next release; use "
                  "hhtld.encode(model, output, target=..., bpw=...) (its .result and .allocation)",
                  DeprecationWarning, stacklevel=2)
    behaviour = target == "behaviour" or (target is None and bpw is None)  # what it ignored elsewhere
    rep = encode(model, out, target=target, bpw=bpw, config=config if behaviour else None, policy=policy,
                 rules=rules, codec_options=codec_options, include_aux=include_aux, progress=progress,
                 thresholds=thresholds, log=log, calibration_texts=calibration if behaviour else None,
                 max_rounds=max_rounds if behaviour else None, sample_rows=sample_rows, threads=threads)
    return rep.result, rep.allocation


__all__ = ["PATHS", "EncodeReport", "encode", "encode_budget", "plan"]
