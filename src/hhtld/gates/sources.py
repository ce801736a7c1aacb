"""Weight sources: what a :class:`~hhtld.gates.runner.ModelRunner` loads into its model.

A source is a set of *replacements* over the runner's checkpoint: the names
of the tensors it replaces (original checkpoint names) and a way to read each
one on demand, in the checkpoint's shape (float32 for float tensors). Every
tensor a source does not name keeps the checkpoint's original value. Sources
never materialise a whole model: the runner reads one tensor, copies it into
the model's parameter and drops it, so comparing two weight sets needs one
copy of the weights (the model's), not two.

* :data:`ORIGINAL` — no replacement: the checkpoint itself.
* :class:`DictSource` — arrays already in memory (``{name: array}``).
* :class:`PackSource` — the decoded tensors of an ``.hhtld`` pack, decoded
  tensor by tensor when read (through the original dtype, exactly as
  ``hhtld decode`` writes them); passthrough tensors whose bytes equal the
  checkpoint's are not replacements at all.
* :class:`CheckpointSource` — the tensors of another checkpoint (e.g. a
  decoded folder) whose bytes differ from the runner's.
* :class:`FunctionSource` — ``fn(name) -> array`` for the given names (e.g.
  a quantiser applied on demand).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..checkpoint import Checkpoint
from ..classify.shapes import from_row_matrix
from ..errors import GateError
from ..stfile import NUMPY_DTYPES


class WeightSource:
    """Replacement tensors over a checkpoint, read one at a time.

    Subclasses set ``label`` and implement :meth:`names` (the replaced
    tensors, original names) and :meth:`read` (one tensor as a numpy array
    in the checkpoint's shape; float tensors as float32).
    """

    label: str = "weights"

    def names(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}: {len(self.names())} tensors>"


class _Original(WeightSource):
    label = "original"

    def names(self) -> list[str]:
        return []

    def read(self, name: str) -> np.ndarray:  # pragma: no cover - never called: names() is empty
        raise GateError(f"the original weights replace no tensor ('{name}')")


ORIGINAL: WeightSource = _Original()


class DictSource(WeightSource):
    """Arrays in memory: ``{original name: array in the original shape}``."""

    def __init__(self, weights: Mapping[str, Any], label: str = "given weights"):
        self.weights = dict(weights)
        self.label = label

    def names(self) -> list[str]:
        return list(self.weights)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.weights[name])


class FunctionSource(WeightSource):
    """``fn(name)`` computes each replacement on demand (float32, original shape)."""

    def __init__(self, names: Iterable[str], fn: Callable[[str], np.ndarray], label: str = "computed weights"):
        self._names = list(names)
        self.fn = fn
        self.label = label

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.fn(name))


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.nbytes == b.nbytes and np.array_equal(np.asarray(a).reshape(-1).view(np.uint8),
                                                     np.asarray(b).reshape(-1).view(np.uint8))


class PackSource(WeightSource):
    """The weights an ``.hhtld`` pack decodes to, read tensor by tensor.

    Encoded tensors are decoded when read and rounded through their original
    dtype (what ``hhtld decode`` writes), returned as float32. With ``ckpt``
    (the checkpoint the pack was made from), passthrough tensors whose stored
    bytes equal the checkpoint's are left out of :meth:`names` (checked once,
    here, one tensor at a time); without it every tensor is a replacement.
    """

    def __init__(self, pack, ckpt: Checkpoint | None = None, label: str | None = None):
        from ..pack.reader import Pack

        self.pack = pack if isinstance(pack, Pack) else Pack(pack)
        self.label = label or f"decoded {self.pack.path.name}"
        names = []
        for name, t in self.pack.tensors.items():
            if t["kind"] == "passthrough" and ckpt is not None and name in ckpt.tensors:
                if t["dtype"] == ckpt.tensors[name].dtype and _same_bytes(self.pack.array(name), ckpt.read_raw(name)):
                    continue
            names.append(name)
        self._names = names

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> np.ndarray:
        p = self.pack
        info = p.info(name)
        if info["kind"] == "passthrough":
            a = p.tensor(name)
            return a.astype(np.float32) if info["dtype"] in ("F32", "F16", "BF16", "F64") else np.array(a)
        a = from_row_matrix(p.rows(name), info["shape"], bool(info.get("transposed")))
        return a.astype(NUMPY_DTYPES[info["dtype"]]).astype(np.float32)


class CheckpointSource(WeightSource):
    """The tensors of checkpoint ``other`` (file, index or folder); with
    ``reference`` (the runner's checkpoint) only those whose bytes differ."""

    def __init__(self, other, reference: Checkpoint | None = None, label: str | None = None):
        from ..checkpoint import open_checkpoint

        self.checkpoint = other if isinstance(other, Checkpoint) else open_checkpoint(other)
        self.label = label or str(self.checkpoint.path)
        names = []
        for name, info in self.checkpoint.tensors.items():
            if reference is not None and name in reference.tensors:
                r = reference.tensors[name]
                if r.dtype == info.dtype and r.shape == info.shape and \
                        _same_bytes(self.checkpoint.read_raw(name), reference.read_raw(name)):
                    continue
            names.append(name)
        self._names = names

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> np.ndarray:
        info = self.checkpoint.tensors[name]
        return self.checkpoint.read_float(name) if info.is_float else np.array(self.checkpoint.read(name))


def as_source(weights) -> WeightSource:
    """``None`` → :data:`ORIGINAL`; a mapping → :class:`DictSource`; a
    :class:`WeightSource` → itself."""
    if weights is None:
        return ORIGINAL
    if isinstance(weights, WeightSource):
        return weights
    if isinstance(weights, Mapping):
        return DictSource(weights)
    raise GateError(f"weights must be None, a mapping of name -> array or a WeightSource, got {type(weights).__name__}")
