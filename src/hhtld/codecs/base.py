"""The codec plug-in interface between the group encoder and the pack.

A codec turns one group of same-shape float32 row matrices into named numpy
arrays (group parts, shared by all tensors, and tensor parts) plus small
JSON parameters; and turns those arrays back into float32 rows, reading only
what it needs. The pack stores the arrays, the manifest the parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import numpy as np

from ..classify.groups import GroupKey
from ..errors import OptionsError
from ..format import CodecId


@dataclass
class EncodedTensor:
    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


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

    def options(self) -> dict[str, Any]:
        return dict(self.opts)

    @abstractmethod
    def encode_group(self, key: GroupKey, names: Sequence[str], rows: Sequence[np.ndarray]) -> EncodedGroup:
        """rows: one (n_rows, n_cols) float32 array per name, all of ``key.shape``."""

    @classmethod
    @abstractmethod
    def decode_rows(cls, group: Parts, tensor: Parts, idx: np.ndarray | None = None) -> np.ndarray:
        """(m, n_cols) float32: the rows ``idx`` (all when None) of one tensor."""
