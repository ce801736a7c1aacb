"""The data-free encode: one codec setting per group, its units run by the local executor.

:func:`encode_checkpoint` is the writer's driver under :func:`hhtld.encode` for a fixed
setting and for the data-free (rows) allocation: it plans the units
(:func:`data_free_plan`), runs them on a :class:`~hhtld.pack.executor.LocalExecutor`
(which owns the :class:`~hhtld.pack.writer.PackWriter`) and returns what each group
gave. Memory follows the largest tensor, never the number of layers: a group's shared
parts are trained on a bounded sample of its rows (drawn evenly across all of its
tensors), then its tensors are encoded block by block and written as they arrive.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from tqdm import tqdm

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.rows import TensorRows, row_blocks, sample_across
from ..classify import DEFAULT_RULES, EncodablePolicy, GroupPlan, Plan, RuleTable, plan_checkpoint
from ..codecs.base import Codec
from ..codecs.parallel import check_threads
from ..codecs.registry import make_codec
from ..errors import OptionsError
from ..format import DEFAULT_SAMPLE_ROWS
from ..outputs import check_output_file
from .choice import make_executor
from .executor import LocalExecutor
from .plan import EncodePlan, Unit, unit_memory
from .units import UnitStore
from .writer import MIN_SAMPLE_ROWS, EncodeResult, GroupResult, check_storable, row_stats

# A group callback: given the encoded group (cosines measured), return None to
# keep it or new codec options to encode it again (the writer rolls back).
GroupCheck = Callable[[GroupResult], "dict[str, Any] | None"]
NOT_FITTED = object()  # encode_group fits the group itself


def encode_checkpoint(
    model: str | os.PathLike,
    out: str | os.PathLike,
    codec: str,
    codec_options: dict[str, Any] | None = None,
    policy: EncodablePolicy = EncodablePolicy(),
    rules: RuleTable = DEFAULT_RULES,
    include_aux: bool = True,
    progress: bool = False,
    group_options: Mapping[str, dict[str, Any]] | None = None,
    reuse=None,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    threads: int | None = None,
    measure: bool = False,
    check_group: GroupCheck | None = None,
    store: UnitStore | None = None,
) -> EncodeResult:
    """Read ``model`` (file, index or folder), encode every group with ``codec`` (one fixed
    setting, ``codec_options``), write ``out``. This is the writer under :func:`hhtld.encode`,
    which chooses the codec (default hhtl-vq), its rate allocation and every default.

    ``group_options`` maps a group key string (``str(GroupKey)``, e.g.
    ``"encoder/qko/384x384"``) to codec options that override
    ``codec_options`` for that group (rate allocation chooses them).
    ``reuse``: an earlier pack (:class:`~hhtld.pack.Pack` or path) of the same
    model and sample size; a group it holds with the same codec, options and
    tensors is copied from it byte for byte instead of encoded again (codecs
    are deterministic, so the bytes are the same).
    ``sample_rows``: rows each group's shared parts are trained on.
    ``threads``: worker threads for the row blocks (default: the usable
    cores); the pack's bytes do not depend on it.
    ``measure``: give each group's row cosines (``EncodeResult.groups``);
    ``check_group`` (implies ``measure``) may ask for a group to be encoded
    again with other options. ``store``: where finished units are kept and
    read back (:class:`~hhtld.pack.units.UnitStore`, ``--resume``).

    The units (:func:`data_free_plan`): per group, fit its shared parts, encode
    each tensor (independent units, written in plan order), finish the group;
    then the passthrough tensors and the manifest. :class:`LocalExecutor` runs
    them and owns the writer.

    The pack is written to a temporary file next to ``out``, checked, and
    renamed over it only when complete; the input is only ever read.
    """
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model)
    out = Path(out)
    check_output_file(out, [ckpt.weight_path(f) for f in ckpt.files] + [ckpt.aux_path(a) for a in ckpt.aux_files],
                      what="pack")
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < MIN_SAMPLE_ROWS:
        raise OptionsError(f"sample_rows must be an integer >= {MIN_SAMPLE_ROWS}, got {sample_rows!r}")
    threads = check_threads(threads)
    base = make_codec(codec, **(codec_options or {}))
    group_options = dict(group_options or {})
    plan = plan_checkpoint(ckpt, policy, rules)
    check_storable(ckpt, plan, include_aux)
    measure = measure or check_group is not None
    if reuse is not None and not hasattr(reuse, "manifest"):
        from .reader import Pack

        reuse = Pack(reuse)
    if measure:
        reuse = None  # cosines are measured while encoding

    eplan = data_free_plan(plan, sample_rows, threads, codec, codec_options, group_options,
                           "rows" if check_group is not None else "fixed")
    results: list[GroupResult] = []
    n_encoded = 0
    with make_executor(threads, store) as ex:
        pw = ex.open_pack(out, ckpt, plan)
        bar = tqdm(total=len(plan.tensors), unit="tensor", desc="encode", disable=not progress,
                   dynamic_ncols=True, leave=True)
        fitted: dict[str, Any] = {}
        if reuse is None:  # every group's first fit, as independent units (side by side on a cluster)
            bar.set_postfix_str("fitting the groups' shared parts", refresh=True)
            first = [(g, make_codec(codec, **{**(codec_options or {}), **group_options.get(str(g.key), {})}))
                     for g in plan.groups]
            for j, fit in ex.map([eplan.group_units(g)[0] for g, _ in first],
                                 lambda j, pool: fit_group(ckpt, *first[j], sample_rows, pool), threads_inside=True):
                fitted[str(first[j][0].key)] = fit
        for g in plan.groups:
            bar.set_postfix_str(str(g.key), refresh=True)
            opts = {**(codec_options or {}), **group_options.get(str(g.key), {})}
            while True:
                genc = make_codec(codec, **opts)
                mark = pw.mark()
                res = pw.copy_group(reuse, g, genc) if reuse is not None else None
                if res is None:
                    res = encode_group(ex, ckpt, g, genc, sample_rows, measure, eplan.group_units(g),
                                       fitted.pop(str(g.key), NOT_FITTED))
                new = check_group(res) if check_group is not None else None
                if new is None:
                    break
                pw.rollback(mark)
                opts = {**opts, **new}
            results.append(res)
            n_encoded += g.n_weights
            bar.update(len(g.tensors))
        bar.set_postfix_str("passthrough", refresh=True)
        ex.close_pack(eplan.unit("manifest:manifest"), codec=base, policy=policy, sample_rows=sample_rows,
                      include_aux=include_aux, on_tensor=lambda: bar.update(1))
        bar.close()
    return EncodeResult(out, ckpt.path, time.perf_counter() - t0, n_encoded, plan, results)


def tensor_unit_key(t, genc: Codec, measure: bool, feedback: bool = False) -> str:
    """What an encoded tensor depends on besides the checkpoint: its name, the codec and
    its options (its group's fit follows from them and the group's sample), whether row
    cosines were measured and whether error feedback was used."""
    return json.dumps([t.name, genc.name, genc.options(), bool(measure), bool(feedback)], sort_keys=True,
                      default=repr)


def fit_group(ckpt: Checkpoint, g: GroupPlan, genc: Codec, sample_rows: int, pool=None) -> Any:
    """A group's shared parts, trained on ``sample_rows`` rows drawn evenly across its
    tensors (a value out of the codec's range is reported with the tensor that holds it)."""
    sources = [TensorRows(ckpt, t) for t in g.tensors]
    sample = sample_across(sources, sample_rows)
    if sample.size and float(np.max(np.abs(sample))) > genc.max_abs:  # name the tensor, not only the group
        for src in sources:
            for s, e in row_blocks(*src.shape):
                genc.check_range(src.block(s, e), src)
    return genc.fit_group(g.key, sample, pool)


def encode_group(ex: LocalExecutor, ckpt: Checkpoint, g: GroupPlan, genc: Codec, sample_rows: int, measure: bool,
                 units: tuple[Unit, list[Unit], Unit], fitted: Any = NOT_FITTED) -> GroupResult:
    """One group's units on ``ex``: fit its shared parts on a row sample (unless ``fitted``
    is given, made by :func:`fit_group` with ``genc``), encode its tensors (several at
    once, each on one thread, or a lone tensor's blocks side by side), written in order
    as they arrive, then its shared arrays and manifest entry."""
    t0 = time.perf_counter()
    fit_unit, enc_units, finish_unit = units
    sources = [TensorRows(ckpt, t) for t in g.tensors]
    if fitted is NOT_FITTED:
        fitted = ex.run(fit_unit, lambda: fit_group(ckpt, g, genc, sample_rows, ex.pool))
    pw = ex.writer
    nbytes = 0
    cosines: dict[str, np.ndarray] = {}
    stats = []
    keys = [tensor_unit_key(t, genc, measure) for t in g.tensors]
    encoded = ex.map(enc_units, lambda i, pool: genc.encode_tensor(fitted, sources[i], pool, measure=measure),
                     keys=keys, threads_inside=len(sources) == 1)
    for i, et in encoded:
        t = g.tensors[i]
        nbytes += pw.write_tensor(t, et)
        stats.append(et.stats)
        if measure:
            cosines[t.name] = et.cosines
    eg = genc.finish_group(fitted, stats)
    res = GroupResult(g, genc.name, genc.options(), eg.params, 0, 0.0, cosines)
    extra = {"row_cosine": row_stats(res.all_cosines())} if measure else None
    nbytes += ex.run(finish_unit, lambda: pw.write_group(g, genc, eg, extra))
    res.nbytes, res.seconds = nbytes, time.perf_counter() - t0
    return res


def setting_label(codec: str, options: Mapping[str, Any]) -> str:
    """A short name of a codec setting (what unit times are kept by)."""
    if options.get("stages"):
        return f"{codec} {options['stages']}"
    return codec


def data_free_plan(plan: Plan, sample_rows: int, width: int, codec: str, codec_options: Mapping[str, Any] | None,
                   group_options: Mapping[str, dict[str, Any]] | None = None, path: str = "fixed") -> EncodePlan:
    """The units of a data-free encode (fixed setting or rows allocation): per group a
    fit on its row sample, an encode per tensor and the group's finish; then the
    manifest (with the passthrough tensors)."""
    units: list[Unit] = []
    for g in plan.groups:
        rows, cols = g.key.shape
        opts = {**(codec_options or {}), **(group_options or {}).get(str(g.key), {})}
        label = setting_label(codec, opts)
        m = min(sample_rows, g.n_rows)
        fit = Unit("fit", str(g.key), (), m * cols, unit_memory("fit", cols=cols, sample_rows=m), label)
        enc = [Unit("encode", t.name, (fit.id,), rows * cols, unit_memory("encode", rows, cols), label)
               for t in g.tensors]
        units += [fit, *enc, Unit("finish", str(g.key), tuple(u.id for u in enc))]
    total = sum(int(np.prod(t.shape)) for t in plan.tensors.values())
    units.append(Unit("manifest", "manifest", tuple(u.id for u in units if u.kind == "finish"), total))
    return EncodePlan(path, units, check_threads(width))


__all__ = ["data_free_plan", "encode_checkpoint", "encode_group", "fit_group", "tensor_unit_key"]
