"""The codec plug-in interface between the group encoder and the pack.

A codec encodes one group of same-shape float32 row matrices in three steps,
so that a group of any number of layers streams in bounded memory:

1. ``fit_group(key, sample)`` trains the shared parts (palettes, rotation,
   basis) on a bounded sample of the group's rows (``sample_across``);
2. ``encode_tensor(fit, rows)`` encodes one tensor, block by block, read
   through a :class:`~hhtld.checkpoint.rows.RowSource` (blocks may run on a
   thread pool; the bytes never depend on it);
3. ``finish_group(fit)`` gives the group's arrays and parameters (statistics
   gathered over all its tensors, e.g. palette counts, are complete then).

Each step gives named numpy arrays (group parts, shared by all tensors, and
tensor parts) plus small JSON parameters; ``decode_rows`` turns those arrays
back into float32 rows, reading only what it needs. The pack stores the
arrays, the manifest the parameters. Decoding is pure numpy; encoding may
use faiss (k-means, exhaustive nearest-centroid search).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import numpy as np

from ..checkpoint.rows import ArrayRows, RowSource, row_blocks, sample_across
from ..classify.groups import GroupKey
from ..cosine import row_cosines
from ..errors import CodecError, OptionsError
from ..format import DEFAULT_SAMPLE_ROWS, MAX_ENCODE_ABS, CodecId
from .layout import NoParams, Params, Stored, StoredLayout


@dataclass
class EncodedTensor:
    """A tensor's stored arrays and manifest params; ``cosines`` (n,) float32,
    when asked for: the row cosine of every row against what decode gives
    (not stored, used for the rows target and reports); ``stats``: the
    codec's per-tensor statistics for ``finish_group`` (not stored)."""

    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    cosines: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # what finish_group gathers over the tensors


@dataclass
class EncodedGroup:
    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tensors: dict[str, EncodedTensor] = field(default_factory=dict)


class Parts(Protocol):
    """Lazily loaded arrays of one group or tensor, plus its manifest params."""

    params: Mapping[str, Any]

    def __getitem__(self, part: str) -> np.ndarray: ...

    def __contains__(self, part: str) -> bool: ...


@dataclass
class DictParts:
    """In-memory ``Parts`` (an ``EncodedGroup``/``EncodedTensor`` before it is written)."""

    params: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]

    def __getitem__(self, part: str) -> np.ndarray:
        return self.arrays[part]

    def __contains__(self, part: str) -> bool:
        return part in self.arrays

    @classmethod
    def of(cls, enc: EncodedGroup | EncodedTensor) -> "DictParts":
        return cls(enc.params, enc.arrays)


class Codec(ABC):
    """Base of every codec. Options are validated in ``__init__``; decoding needs
    only what was stored (``decode_rows`` is a classmethod)."""

    name: ClassVar[str]
    codec_id: ClassVar[CodecId]
    defaults: ClassVar[dict[str, Any]] = {}
    params_model: ClassVar[type[Params]]  # a group's manifest params (codecs/layout.py)
    tensor_params_model: ClassVar[type[Params]] = NoParams  # a tensor's manifest params
    # largest |weight| the codec encodes without overflow in float32 (its encode and decode
    # arithmetic, measured); larger finite weights are refused with the tensor named
    max_abs: ClassVar[float] = MAX_ENCODE_ABS

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise OptionsError(
                f"codec {self.name}: unknown option(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(self.defaults)) or 'none'})"
            )
        self.opts = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        self.validate()

    def validate(self) -> None:
        """Raise CodecError/OptionsError for options out of range."""

    def check_range(self, x: np.ndarray, rows: RowSource | None = None, key: GroupKey | None = None) -> None:
        """Refuse weights beyond :attr:`max_abs` (CodecError naming the tensor of ``rows``,
        or the group ``key`` for a training sample): encoding them would give inf/NaN,
        never a silent saturation."""
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > self.max_abs:
            who = f"{source_where(rows)}tensor '{rows.name}'" if rows is not None else f"group {key}"
            raise CodecError(f"{who}: weights up to {peak:.3g} in magnitude are beyond what codec {self.name} "
                             f"encodes (|w| <= {self.max_abs:.3g}); scale the tensor down or keep it dense")

    def options(self) -> dict[str, Any]:
        return dict(self.opts)

    # -- streaming encode ----------------------------------------------------------------
    @abstractmethod
    def fit_group(self, key: GroupKey, sample: np.ndarray, pool: Executor | None = None) -> Any:
        """Train the group's shared parts on ``sample`` (m, n_cols) float32, rows
        drawn across all of its tensors. Returns the codec's fit state."""

    @abstractmethod
    def encode_tensor(self, fit: Any, rows: RowSource, pool: Executor | None = None,
                      measure: bool = False) -> EncodedTensor:
        """Encode one tensor of the group, read block by block from ``rows``;
        ``measure``: fill ``EncodedTensor.cosines``. Never changes ``fit``, so
        several tensors of a group may be encoded at once."""

    @abstractmethod
    def finish_group(self, fit: Any, stats: Sequence[Mapping[str, Any]]) -> EncodedGroup:
        """The group's arrays and params from the fit and the ``stats`` of every
        encoded tensor, in tensor order (``EncodedGroup.tensors`` stays empty)."""

    def decoded_cosines(self, group: Parts, arrays: Mapping[str, np.ndarray], rows: RowSource,
                        pool: Executor | None = None) -> np.ndarray:
        """(n,) float32 row cosines of ``rows`` against the decode of a tensor's
        ``arrays`` (what a reader will get), block by block."""
        tensor = DictParts({}, arrays)

        def one(x, s, e):
            return row_cosines(x, self.decode_rows(group, tensor, slice(s, e)))

        return np.concatenate(map_blocks(one, rows, pool)).astype(np.float32)

    def encode_group(self, key: GroupKey, names: Sequence[str], rows: Sequence[np.ndarray],
                     sample_rows: int = DEFAULT_SAMPLE_ROWS, pool: Executor | None = None) -> EncodedGroup:
        """All tensors of a group given in memory: one (n_rows, n_cols) float32
        array per name, all of ``key.shape``; the same steps and bytes as the
        streaming encoder with the same sample size."""
        if len(names) != len(rows):
            raise CodecError(f"{len(names)} names but {len(rows)} row arrays")
        sources = [ArrayRows(r, n) for n, r in zip(names, rows)]
        if not sources:
            return self.finish_group(self.fit_group(key, np.zeros((0, int(key.shape[1])), np.float32), pool), [])
        fit = self.fit_group(key, sample_across(sources, sample_rows), pool)
        tensors = {n: self.encode_tensor(fit, s, pool) for n, s in zip(names, sources)}
        out = self.finish_group(fit, [t.stats for t in tensors.values()])
        out.tensors = tensors
        return out

    @classmethod
    @abstractmethod
    def decode_rows(cls, group: Parts, tensor: Parts, idx: np.ndarray | None = None) -> np.ndarray:
        """(m, n_cols) float32: the rows ``idx`` (all when None) of one tensor."""

    @classmethod
    @abstractmethod
    def stored_layout(cls, params: Params, n_rows: int, n_cols: int, stored: Stored, version: int) -> StoredLayout:
        """The exact parts a group with these (validated) ``params`` stores, and
        those of each of its tensors (``n_rows`` x ``n_cols`` row matrices):
        dtypes, shapes and value checks. ``stored``: the group parts as stored
        (dtype, shape), for sizes the params do not fix (e.g. a palette smaller
        than k). ``version``: the pack's format version. Raises LayoutProblem
        naming the parameter that contradicts the shape."""


def source_where(rows: RowSource) -> str:
    """``"<weight file>: "`` of a checkpoint tensor's rows, for messages ("" for in-memory rows)."""
    ckpt, plan = getattr(rows, "ckpt", None), getattr(rows, "plan", None)
    return f"{ckpt.weight_path(plan.file)}: " if ckpt is not None and plan is not None else ""


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], pool: Executor | None, window: int):
    """``fn(item)`` for every item, results yielded in order, at most ``window``
    items in flight (the pool's tasks never submit to the pool themselves)."""
    if pool is None:
        for it in items:
            yield fn(it)
        return
    pending = []
    for it in items:
        pending.append(pool.submit(fn, it))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for f in pending:
        yield f.result()


def map_blocks(fn: Callable[[np.ndarray, int, int], Any], rows: RowSource, pool: Executor | None = None) -> list:
    """``[fn(block, start, stop), ...]`` over the row blocks of ``rows``, in order.

    Blocks are read inside ``fn``'s task, so at most the pool's width of
    blocks is in memory at once; the block boundaries depend on the shape only."""
    spans = row_blocks(*rows.shape)

    def run(span):
        s, e = span
        return fn(rows.block(s, e), s, e)

    if pool is None or len(spans) <= 1:
        return [run(sp) for sp in spans]
    return list(pool.map(run, spans))
