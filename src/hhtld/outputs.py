"""Output files: written atomically, never over an input, never over a non-file.

Every file hhtld writes (packs, decoded checkpoints, JSON reports) goes to a
temporary file in the target's folder and is renamed over the target only
when complete. A target that is an input of the same command, a directory,
or not a regular file (a device, a FIFO, a symlink) is refused up front.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import OptionsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: str | os.PathLike) -> None:
    """Give a ``mkstemp`` file (0600) the permissions a plain ``open`` would."""
    os.chmod(path, 0o666 & ~_umask())


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      what: str = "output") -> Path:
    """Refuse a file target that is an input, a directory, or not a regular file."""
    p = Path(path)
    for i in inputs:
        if same_file(p, i):
            raise OptionsError(f"{p}: is an input of this command; refusing to overwrite it with the {what}")
    if p.is_dir():
        raise OptionsError(f"{p}: is a directory; the {what} needs a file name")
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise OptionsError(f"{p}: exists and is not a regular file; refusing to replace it")
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        make_public(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Pretty JSON (2-space indent, trailing newline), written atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))
