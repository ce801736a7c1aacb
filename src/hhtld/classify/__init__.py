"""Classification: role, component, effective shape, encodability, groups (docs/design.md §1)."""

from .groups import GroupKey, GroupPlan, Plan, TensorPlan, plan_checkpoint, plan_tensor
from .rules import (
    DEFAULT_RULES,
    GROUP_BY,
    INDEX_ROLES,
    ROLES,
    ComponentRule,
    RoleRule,
    RuleTable,
    SHARED_INPUTS,
    SharedInput,
    classify_component,
    classify_role,
    load_rules_file,
    parse_rule,
    regime_of,
    should_use_leaf,
)
from .shapes import (
    EncodablePolicy,
    effective_shape,
    from_row_matrix,
    is_encodable,
    is_matrix_shape,
    to_row_matrix,
)

__all__ = [
    "DEFAULT_RULES", "GROUP_BY", "INDEX_ROLES", "ROLES", "SHARED_INPUTS", "ComponentRule", "EncodablePolicy",
    "GroupKey", "GroupPlan", "Plan", "RoleRule", "RuleTable", "SharedInput", "TensorPlan", "classify_component",
    "classify_role", "effective_shape", "from_row_matrix", "is_encodable", "is_matrix_shape", "load_rules_file",
    "parse_rule", "plan_checkpoint", "plan_tensor", "regime_of", "should_use_leaf", "to_row_matrix",
]
