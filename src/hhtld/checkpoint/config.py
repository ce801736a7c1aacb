"""Which model a checkpoint is: its ``config.json`` and its family.

The encoder (to run the model for a behaviour target), the gates and the
loader all ask the same two questions of a checkpoint — where its
``config.json`` is and whether it is a causal language model or an
embedding model — so the answers live here, below all of them.
``transformers`` is imported only when a config has no ``architectures``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import GateError

FAMILIES = ("embedding", "causal")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def family_of_config(cfg: Mapping[str, Any]) -> str:
    """``causal`` or ``embedding`` from a parsed ``config.json``.

    ``architectures`` decides when present (``*ForCausalLM`` or
    ``*LMHeadModel`` → causal, anything else → embedding); without it a
    decoder-only ``model_type`` (one transformers can load as a causal LM but
    not as a masked LM) or ``is_decoder: true`` means causal.
    """
    archs = cfg.get("architectures") or []
    if archs:
        return "causal" if any(str(a).endswith(CAUSAL_SUFFIXES) for a in archs) else "embedding"
    if cfg.get("is_decoder"):
        return "causal"
    mt = cfg.get("model_type")
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - transformers is a verify dependency
        return "embedding"
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal"
    return "embedding"


def find_config(model: str | os.PathLike, config: str | os.PathLike | None = None) -> Path:
    """The ``config.json`` to build ``model`` from: ``config`` (a file or a
    folder holding one) when given, else the model folder's or the folder next
    to a ``.safetensors`` / index file. Raises :class:`GateError` naming what is missing."""
    if config is not None:
        c = Path(config)
        cfile = c / "config.json" if c.is_dir() else c
        if not cfile.is_file():
            raise GateError(f"{c}: no config.json there; --config takes a config.json or a folder holding one")
        return cfile
    m = Path(model)
    folder = m if m.is_dir() else m.parent
    cfile = folder / "config.json"
    if m.is_dir() or m.name.endswith(".safetensors.index.json"):
        if cfile.is_file():
            return cfile
    elif cfile.is_file():
        return cfile
    raise GateError(
        f"{m}: no config.json next to the weights, so the model cannot be run; "
        f"give --config CONFIG (a config.json or a model folder)"
    )


def load_config_json(path: Path) -> dict:
    """The parsed ``config.json`` at ``path``; :class:`GateError` when it is unreadable or is
    not a transformers config (no ``model_type``)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GateError(f"{path}: not a readable config.json ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise GateError(f"{path}: not a transformers config.json (no 'model_type')")
    return cfg


__all__ = ["CAUSAL_SUFFIXES", "FAMILIES", "family_of_config", "find_config", "load_config_json"]
