"""What may be a tensor name or a file path in a pack.

A pack stores a tensor's parts as ``<name>::<part>``, a group's as
``__group__.<i>::<part>`` and side files as ``__file__::<path>``: tensor
names that could collide with those are refused when encoding. File paths
in a pack (weight files, index, side files) are where ``decode`` writes:
they must stay inside the output folder and name distinct files there.
"""

from __future__ import annotations

import re
from typing import Any

from .format import GROUP_PREFIX, MAX_NAME_CHARS, MAX_PATH_PART_BYTES, SEP
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a tensor name in a pack, or None.

    Names must be printable text (no control characters, valid Unicode), must
    not contain the separator of stored part names (``::``) and must not start
    with the prefix of group arrays: a pack stores a tensor's parts as
    ``<name>::<part>`` (side files as ``__file__::<path>``), so such names
    would collide with them."""
    if not isinstance(name, str) or not name:
        return "is empty or not text"
    if len(name) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate)"
    if CONTROL_CHARS.search(name):
        return "holds a control character (NUL, newline, ...)"
    if SEP in name:
        return f"contains '{SEP}', which separates a tensor from its stored parts in a pack"
    if name.startswith(GROUP_PREFIX):
        return f"starts with '{GROUP_PREFIX}', reserved for the pack's group arrays"
    if name == "__metadata__":
        return "is reserved by safetensors"
    return None


def path_problem(rel: Any) -> str | None:
    """Why ``rel`` cannot be a file path in a pack (it must stay inside the output
    folder and name a file there), or None."""
    if not isinstance(rel, str) or not rel:
        return "is empty or not text"
    if len(rel) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if CONTROL_CHARS.search(rel) or "\\" in rel:
        return "holds a control character or a backslash"
    if rel.startswith("/"):
        return "is absolute"
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            return "has an empty, '.' or '..' component"
        if part.startswith("."):
            return "has a hidden component (starting with '.')"
        if len(part.encode("utf-8")) > MAX_PATH_PART_BYTES:
            return f"has a component longer than {MAX_PATH_PART_BYTES} bytes"
    return None


def path_conflicts(paths: list[str]) -> str | None:
    """Two paths that would be one file, or a file and a folder, in an output folder (or None)."""
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            return f"{p!r} is named twice"
        seen.add(p)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                return f"{'/'.join(parts[:i])!r} is both a file and the folder of {p!r}"
    return None


__all__ = ["CONTROL_CHARS", "MAX_NAME_CHARS", "name_problem", "path_conflicts", "path_problem", "state_dict_candidates"]


def state_dict_candidates(name: str, prefix: str) -> list[str]:
    """The keys of a transformers model a checkpoint tensor name may stand for, in
    order: the name itself, with or without the model's ``base_model_prefix``
    (``bert.``, ``model.``), and the legacy LayerNorm names ``gamma``/``beta`` as
    ``weight``/``bias``."""
    cands = [name]
    if prefix:
        cands += [f"{prefix}.{name}", name.removeprefix(prefix + ".")]
    for c in list(cands):
        if c.endswith(".gamma"):
            cands.append(c[: -len(".gamma")] + ".weight")
        elif c.endswith(".beta"):
            cands.append(c[: -len(".beta")] + ".bias")
    return cands
