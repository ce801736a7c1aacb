"""The side files a pack carries (config, tokenizer, sentence-transformers
modules), read from the pack, and written to a private temporary folder only
for the calls of transformers that want a path."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import LoadError, NoConfigError
from ..pack.reader import Pack


def open_pack_arg(pack: str | os.PathLike | Pack) -> Pack:
    """A :class:`Pack` from a path or an open pack."""
    return pack if isinstance(pack, Pack) else Pack(pack)


def dominant_float_dtype(pack: Pack) -> str | None:
    """The safetensors dtype (``F32``, ``BF16``, ...) holding most float elements of the
    pack's tensors, None when it has none."""
    count: dict[str, int] = {}
    for t in pack.tensors.values():
        if t["dtype"] in ("F32", "F16", "BF16", "F64"):
            count[t["dtype"]] = count.get(t["dtype"], 0) + math.prod(int(d) for d in t["shape"])
    return max(count, key=count.get) if count else None


def has_file(pack: Pack, rel: str) -> bool:
    return rel in pack.aux_files()


def read_json(pack: Pack, rel: str) -> Any:
    """A carried JSON side file, parsed; a damaged one is a :class:`LoadError` naming it."""
    try:
        return json.loads(pack.aux_bytes(rel).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{pack.path}: the carried side file {rel} is not valid JSON ({e})") from None


def carried_config(pack: Pack) -> dict:
    """The pack's ``config.json`` as a dict; :class:`NoConfigError` when it carries none."""
    if not has_file(pack, "config.json"):
        raise NoConfigError(
            f"{pack.path}: the pack carries no config.json (it was made from a bare .safetensors file or with "
            f"--no-aux-files); pass config= (a config.json, a folder holding one, or a transformers config)"
        )
    cfg = read_json(pack, "config.json")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise LoadError(f"{pack.path}: the carried config.json is not a transformers config (no 'model_type')")
    return cfg


@contextmanager
def side_files(pack: Pack, only: list[str] | None = None) -> Iterator[Path]:
    """A private temporary folder (mode 0700, in the system's temp dir, never
    next to the pack) holding the pack's side files (``only`` these when
    given), removed on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="hhtld-side-"))
    try:
        for rel in pack.aux_files() if only is None else [r for r in only if has_file(pack, r)]:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(pack.aux_bytes(rel))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
