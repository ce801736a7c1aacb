"""What a codec stores, declared: the parts it needs, their dtypes and shapes.

Every codec declares, next to its ``decode_rows``, the manifest parameters
of a group (a pydantic model, :attr:`Codec.params_model`) and, given them,
the shape of the group's rows and the group parts actually stored, the
exact parts of the group and of each of its tensors
(:meth:`Codec.stored_layout`). A pack reader checks every stored array
against that declaration when the pack is opened, before anything is
allocated, and runs each part's value check (``PartSpec.values``: twig
indices inside their palette, floats finite, ...) the first time the part
is read. What a codec does not declare cannot be in a pack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Callable, Mapping

import ml_dtypes
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..format import MAX_JSON_INT

# a count in a manifest: a JSON integer (never a boolean), 0 .. 2**53
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_JSON_INT)]


class Params(BaseModel):
    """Base of the codecs' parameter models: strict types, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class NoParams(Params):
    """A tensor's params: empty for every codec so far."""


class LayoutProblem(Exception):
    """Raised by ``stored_layout`` for parameters that contradict the shape or
    the stored parts; the message names the parameter (``params.cols ...``)."""


Dim = int | tuple[int, int]  # an exact size, or an inclusive range


@dataclass(frozen=True)
class PartSpec:
    """One stored part: allowed dtype names, shape (an exact size or an inclusive
    range per axis) and an optional check of the values, run on first read
    (returns a problem, or None)."""

    dtype: tuple[str, ...]
    shape: tuple[Dim, ...]
    values: Callable[[np.ndarray], str | None] | None = field(default=None, compare=False)

    def problem(self, dtype: str, shape: tuple[int, ...]) -> str | None:
        """What is wrong with a stored array of ``dtype`` and ``shape``, or None."""
        if dtype not in self.dtype:
            return f"dtype {dtype}, expected {' or '.join(self.dtype)}"
        if len(shape) != len(self.shape) or not all(_fits(d, want) for d, want in zip(shape, self.shape)):
            return f"shape {list(shape)}, expected {_shape_str(self.shape)}"
        return None


def _fits(d: int, want: Dim) -> bool:
    return want[0] <= d <= want[1] if isinstance(want, tuple) else d == want


def _shape_str(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join(f"{d[0]}..{d[1]}" if isinstance(d, tuple) else str(d) for d in shape) + "]"


@dataclass
class StoredLayout:
    """The parts of one group (``group``) and of each of its tensors (``tensor``)."""

    group: dict[str, PartSpec] = field(default_factory=dict)
    tensor: dict[str, PartSpec] = field(default_factory=dict)


Stored = Mapping[str, tuple[str, tuple[int, ...]]]  # group part -> (dtype, shape) as stored


# --- value checks ----------------------------------------------------------------------------
def _float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype == ml_dtypes.bfloat16 else a


def finite(a: np.ndarray) -> str | None:
    """Every value finite (NaN/inf never come out of an encoder)."""
    if a.size and not np.isfinite(_float32(np.asarray(a))).all():
        return "holds non-finite values (NaN/inf)"
    return None


def below(k: int, limit: str = "its palette has {k} rows") -> Callable[[np.ndarray], str | None]:
    """Every value an index in ``0 .. k-1``; ``limit`` says what k counts."""

    def check(a: np.ndarray) -> str | None:
        if a.size and int(np.max(a)) >= k:
            return f"holds index {int(np.max(a))}, but {limit.format(k=k)}"
        return None

    return check


def below_by_position(ks: tuple[int, ...]) -> Callable[[np.ndarray], str | None]:
    """An (n, periods * len(ks)) twig array: column j indexes the palette of
    pattern position ``j % len(ks)``, which has ``ks[j % len(ks)]`` rows."""

    def check(a: np.ndarray) -> str | None:
        if not a.size:
            return None
        top = np.asarray(a).reshape(a.shape[0], -1, len(ks)).max(axis=(0, 1))
        for j, (t, k) in enumerate(zip(top.tolist(), ks)):
            if t >= k:
                return f"holds index {t} at pattern position {j}, but that palette has {k} rows"
        return None

    return check


def signs(a: np.ndarray) -> str | None:
    """Every value -1 or +1."""
    if a.size and not (np.abs(np.asarray(a, dtype=np.int16)) == 1).all():
        return "holds values other than -1 and +1"
    return None


def all_of(*checks: Callable[[np.ndarray], str | None] | None) -> Callable[[np.ndarray], str | None]:
    def check(a: np.ndarray) -> str | None:
        for c in checks:
            if c is not None:
                p = c(a)
                if p:
                    return p
        return None

    return check


def leaf_parts_layout(stored: Stored, n_rows: int, n_cols: int, lanes: int | None = None) -> StoredLayout:
    """The Slot L parts every codec with a leaf stores: group basis (L, cols) bf16 and
    singular (L,) f32; tensor leaf (rows, L) i8 and leaf_scale (1,) f32. ``lanes``
    when the params fix L, else L is read from the stored basis (1..64)."""
    if lanes is None:
        b = stored.get("basis")
        lanes = b[1][0] if b is not None and len(b[1]) == 2 and 1 <= b[1][0] <= 64 else 1
    return StoredLayout(
        group={"basis": PartSpec(("BF16",), (lanes, n_cols), finite), "singular": PartSpec(("F32",), (lanes,), finite)},
        tensor={"leaf": PartSpec(("I8",), (n_rows, lanes)), "leaf_scale": PartSpec(("F32",), (1,), finite)},
    )


__all__ = [
    "Count", "LayoutProblem", "NoParams", "PartSpec", "Params", "StoredLayout", "all_of", "below",
    "below_by_position", "finite", "leaf_parts_layout", "signs",
]
