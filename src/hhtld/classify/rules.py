"""Role and component classification as data: ordered pattern tables.

A rule is a regular expression searched in the tensor name; the first rule
that matches wins. A new architecture is a table entry, not new code, and a
user can put rules of their own in front (``RuleTable.with_overrides``, or
``hhtld encode --rule 'PATTERN=ROLE'`` / ``--rules FILE.json``).

``--group-by input`` (:meth:`RuleTable.sharing_inputs`) puts matrices that read
the same input and have the same shape into one group — Llama's gate with up,
k with v; BERT's key with value — and ties each such pair to one setting, so
that the pair shares its palettes and the codec-space kernels build one
lookup table for both (docs/design.md §7).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionsError

ROLES = ("qko", "v", "gate", "up", "down", "embed", "lm_head", "projection", "other")
INDEX_ROLES = frozenset({"embed", "lm_head"})


@dataclass(frozen=True)
class RoleRule:
    """``pattern`` (regex, searched) → ``role``. ``transposed``: the tensor stores
    [in, out] (GPT-2 ``Conv1D``), so its rows are its columns."""

    pattern: str
    role: str
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise OptionsError(f"rule '{self.pattern}': unknown role '{self.role}' (roles: {', '.join(ROLES)})")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise OptionsError(f"rule '{self.pattern}': not a valid regular expression ({e})") from None


@dataclass(frozen=True)
class ComponentRule:
    pattern: str
    component: str


# Order matters: specific names before generic ones.
DEFAULT_ROLE_RULES: tuple[RoleRule, ...] = (
    # --- index regime: lookup tables and heads ------------------------------
    RoleRule(r"(^|\.)(lm_head|codec_head)(\.|$)", "lm_head"),
    RoleRule(r"(^|\.)(embed_tokens|codec_embedding|text_embedding|embed_positions)(\.|$)", "embed"),
    RoleRule(r"(^|\.)(wte|wpe)(\.|$)", "embed"),
    RoleRule(r"_embeddings?\.weight$", "embed"),  # BERT word/position/token_type
    RoleRule(r"(^|\.)(embeddings?|tok_embeddings)\.weight$", "embed"),
    # --- GPT-2 Conv1D: stored [in, out] -------------------------------------
    RoleRule(r"(^|\.)attn\.c_attn\.weight$", "qko", transposed=True),
    RoleRule(r"(^|\.)attn\.c_proj\.weight$", "qko", transposed=True),
    RoleRule(r"(^|\.)mlp\.c_fc\.weight$", "up", transposed=True),
    RoleRule(r"(^|\.)mlp\.c_proj\.weight$", "down", transposed=True),
    RoleRule(r"(^|\.)c_attn(\.|$)", "qko"),
    RoleRule(r"(^|\.)c_fc(\.|$)", "up"),
    # --- Llama / Qwen / Mistral / Qwen3-TTS talker --------------------------
    RoleRule(r"(^|\.)(q_proj|k_proj|o_proj|qkv_proj|out_proj|query_key_value)(\.|$)", "qko"),
    RoleRule(r"(^|\.)v_proj(\.|$)", "v"),
    RoleRule(r"(^|\.)gate_proj(\.|$)", "gate"),
    RoleRule(r"(^|\.)(up_proj|gate_up_proj|dense_h_to_4h|fc1|w1|w3)(\.|$)", "up"),
    RoleRule(r"(^|\.)(down_proj|dense_4h_to_h|fc2|w2)(\.|$)", "down"),
    # --- BERT ------------------------------------------------------------------
    RoleRule(r"attention\.self\.(query|key)(\.|$)", "qko"),
    RoleRule(r"attention\.self\.value(\.|$)", "v"),
    RoleRule(r"attention\.output\.dense(\.|$)", "qko"),
    RoleRule(r"(^|\.)intermediate\.dense(\.|$)", "up"),
    RoleRule(r"(^|\.)output\.dense(\.|$)", "down"),
    # --- projections -----------------------------------------------------------
    RoleRule(r"(^|\.)(pooler\.dense|[a-z_]*projection|[a-z_]*projector|proj|linear_fc\d)(\.|$)", "projection"),
)

DEFAULT_COMPONENT_RULES: tuple[ComponentRule, ...] = (
    ComponentRule(r"(^|\.)code_predictor\.", "code_predictor"),
    ComponentRule(r"(^|\.)speaker_encoder\.", "speaker_encoder"),
    ComponentRule(r"(^|\.)talker\.", "talker"),
    ComponentRule(r"(^|\.)(vision_tower|vision_model|visual|vision)\.", "vision"),
    ComponentRule(r"(^|\.)(audio_tower|audio_encoder|audio)\.", "audio"),
    ComponentRule(r"(^|\.)encoder\.", "encoder"),
    ComponentRule(r"(^|\.)decoder\.", "decoder"),
)


@dataclass(frozen=True)
class SharedInput:
    """Two matrices of one module that read the same input: the tensor named with
    ``first`` (a module name between dots) and the one named with ``second`` in its
    place; grouped under ``role`` (the second's)."""

    first: str
    second: str
    role: str

    @property
    def pattern(self) -> str:
        """The regular expression of the first's names."""
        return rf"(^|\.){re.escape(self.first)}(\.|$)"

    def partner(self, name: str) -> str | None:
        """The second's name for a name of the first, else None."""
        if not re.search(self.pattern, name):
            return None
        return re.sub(self.pattern, lambda m: f"{m.group(1)}{self.second}{m.group(2)}", name, count=1)


# matrices that read the same input and share a shape in the families hhtld knows
SHARED_INPUTS: tuple[SharedInput, ...] = (
    SharedInput("gate_proj", "up_proj", "up"),
    SharedInput("k_proj", "v_proj", "v"),
    SharedInput("attention.self.key", "attention.self.value", "v"),
)
GROUP_BY = ("role", "input")


@dataclass(frozen=True)
class RuleTable:
    """Ordered role and component rules; the first match wins. ``shared``: the
    pairs that read one input, grouped and tied (:meth:`sharing_inputs`)."""

    roles: tuple[RoleRule, ...] = DEFAULT_ROLE_RULES
    components: tuple[ComponentRule, ...] = DEFAULT_COMPONENT_RULES
    shared: tuple[SharedInput, ...] = ()

    def match_role(self, name: str) -> RoleRule | None:
        for rule in self.roles:
            if re.search(rule.pattern, name):
                return rule
        return None

    def role(self, name: str) -> str:
        rule = self.match_role(name)
        return rule.role if rule else "other"

    def transposed(self, name: str) -> bool:
        rule = self.match_role(name)
        return bool(rule and rule.transposed)

    def component(self, name: str) -> str:
        for rule in self.components:
            if re.search(rule.pattern, name):
                return rule.component
        return "other"

    def with_overrides(self, roles=(), components=()) -> "RuleTable":
        """A new table with the given rules in front of these."""
        return RuleTable(tuple(roles) + self.roles, tuple(components) + self.components, self.shared)

    def sharing_inputs(self, pairs: tuple[SharedInput, ...] = SHARED_INPUTS) -> "RuleTable":
        """This table with each pair's first matrix classified as its second's role
        (after any user rules, before the built-in ones) and the pairs tied."""
        n_user = len(self.roles) - len(DEFAULT_ROLE_RULES) if self.roles[-len(DEFAULT_ROLE_RULES):] == \
            DEFAULT_ROLE_RULES else len(self.roles)
        mine = tuple(RoleRule(p.pattern, p.role) for p in pairs)
        return RuleTable(self.roles[:n_user] + mine + self.roles[n_user:], self.components, self.shared + tuple(pairs))

    def group_by(self, how: str) -> "RuleTable":
        """``role`` (this table) or ``input`` (:meth:`sharing_inputs`)."""
        if how not in GROUP_BY:
            raise OptionsError(f"group-by '{how}': expected one of {', '.join(GROUP_BY)}")
        return self.sharing_inputs() if how == "input" and not self.shared else self

    def tie(self, name: str) -> str:
        """The name of the unit ``name`` is allocated with: its partner's name for the
        first matrix of a shared pair, else its own."""
        for p in self.shared:
            other = p.partner(name)
            if other is not None:
                return other
        return name

    def to_json(self) -> list[dict]:
        return [{"pattern": r.pattern, "role": r.role, "transposed": r.transposed} for r in self.roles]


def parse_rule(text: str) -> RoleRule:
    """``'PATTERN=ROLE'`` or ``'PATTERN=ROLE:transposed'`` (the CLI's ``--rule``)."""
    pattern, sep, role = text.rpartition("=")
    if not sep or not pattern:
        raise OptionsError(f"--rule '{text}': expected PATTERN=ROLE (roles: {', '.join(ROLES)})")
    transposed = role.endswith(":transposed")
    return RoleRule(pattern, role.removesuffix(":transposed"), transposed)


def load_rules_file(path: str | Path) -> list[RoleRule]:
    """A JSON list of ``{"pattern": ..., "role": ..., "transposed": false}``."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionsError(f"{path}: no such rules file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OptionsError(f"{path}: rules file is not valid JSON ({e})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "pattern" in i and "role" in i for i in items):
        raise OptionsError(f"{path}: rules file must be a JSON list of {{\"pattern\", \"role\"}} objects")
    return [RoleRule(str(i["pattern"]), str(i["role"]), bool(i.get("transposed", False))) for i in items]


DEFAULT_RULES = RuleTable()


def classify_role(name: str, rules: RuleTable = DEFAULT_RULES) -> str:
    """The role of a tensor: one of ``ROLES``."""
    return rules.role(name)


def classify_component(name: str, rules: RuleTable = DEFAULT_RULES) -> str:
    """The sub-model a tensor belongs to (``talker``, ``encoder``, …, else ``other``)."""
    return rules.component(name)


def should_use_leaf(role: str) -> bool:
    """True exactly for the index-regime roles (``embed``, ``lm_head``)."""
    return role in INDEX_ROLES


def regime_of(role: str) -> str:
    return "index" if should_use_leaf(role) else "argmax"
