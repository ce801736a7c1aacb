"""Group planning: which tensors are encoded, and with whom they share a palette.

A group key is ``(component, role, effective_shape)`` (docs/design.md §1). Planning
only reads headers, so ``hhtld inspect MODEL`` is a free dry run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint import Checkpoint
from .rules import DEFAULT_RULES, RuleTable, regime_of
from .shapes import EncodablePolicy, effective_shape, is_encodable, is_matrix_shape


@dataclass(frozen=True, order=True)
class GroupKey:
    component: str
    role: str
    shape: tuple[int, int]  # effective (rows, cols), rows = output features

    def __str__(self) -> str:
        return f"{self.component}/{self.role}/{self.shape[0]}x{self.shape[1]}"

    def to_json(self) -> dict:
        return {"component": self.component, "role": self.role, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: dict) -> "GroupKey":
        return cls(obj["component"], obj["role"], tuple(obj["shape"]))


@dataclass(frozen=True)
class TensorPlan:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    role: str
    component: str
    transposed: bool  # rows are the stored columns (GPT-2 Conv1D)
    row_shape: tuple[int, ...]  # (rows, cols) as encoded; the stored shape for passthrough
    encoded: bool
    reason: str  # why passthrough ("" when encoded)

    @property
    def key(self) -> GroupKey:
        return GroupKey(self.component, self.role, tuple(self.row_shape))


@dataclass
class GroupPlan:
    index: int
    key: GroupKey
    tensors: list[TensorPlan] = field(default_factory=list)

    @property
    def regime(self) -> str:
        return regime_of(self.key.role)

    @property
    def n_rows(self) -> int:
        return self.key.shape[0] * len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_weights(self) -> int:
        return self.key.shape[0] * self.key.shape[1] * len(self.tensors)


@dataclass
class Plan:
    groups: list[GroupPlan]
    tensors: dict[str, TensorPlan]  # every tensor, checkpoint order

    @property
    def passthrough(self) -> list[TensorPlan]:
        return [t for t in self.tensors.values() if not t.encoded]


def plan_tensor(name: str, file: str, dtype: str, shape, nbytes: int,
                policy: EncodablePolicy, rules: RuleTable) -> TensorPlan:
    role = rules.role(name)
    component = rules.component(name)
    shape = tuple(shape)
    transposed = rules.transposed(name) and len(shape) == 2
    row_shape = effective_shape(shape)
    if transposed:
        row_shape = (row_shape[1], row_shape[0])
    if dtype not in ("F32", "F16", "BF16"):
        reason = f"dtype {dtype}"
    elif not is_matrix_shape(shape):
        reason = f"{len(shape)}-D"
    elif not is_encodable(row_shape, nbytes, policy):
        reason = "below size thresholds"
    else:
        reason = ""
    return TensorPlan(name, file, dtype, shape, nbytes, role, component, transposed,
                      tuple(row_shape), reason == "", reason)


def plan_checkpoint(ckpt: Checkpoint, policy: EncodablePolicy = EncodablePolicy(),
                    rules: RuleTable = DEFAULT_RULES) -> Plan:
    """Classify every tensor and group the encodable ones by key.

    Groups are ordered by first appearance in the checkpoint; tensors inside a
    group keep checkpoint order, so the same checkpoint gives the same plan.
    """
    tensors: dict[str, TensorPlan] = {}
    groups: dict[GroupKey, GroupPlan] = {}
    for info in ckpt.tensors.values():
        tp = plan_tensor(info.name, info.file, info.dtype, info.shape, info.nbytes, policy, rules)
        tensors[info.name] = tp
        if tp.encoded:
            g = groups.get(tp.key)
            if g is None:
                g = groups[tp.key] = GroupPlan(len(groups), tp.key)
            g.tensors.append(tp)
    return Plan(list(groups.values()), tensors)
