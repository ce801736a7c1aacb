"""Write a pack back as a dense checkpoint in the layout of its source."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import OptionsError
from ..stfile import SafetensorsWriter, make_public
from .reader import Pack


@dataclass
class DecodeResult:
    out_dir: Path
    files: list[Path]
    seconds: float
    n_weights: int


def _atomic_write_bytes(path: Path, data: bytes) -> None:
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


def decode_pack(pack: str | os.PathLike | Pack, out_dir: str | os.PathLike, progress: bool = False) -> DecodeResult:
    """Single file → ``OUT/<name>.safetensors``; sharded → shards + index;
    model folder → weights + its config/tokenizer files. Each file is written
    atomically; passthrough tensors come back byte for byte."""
    t0 = time.perf_counter()
    p = pack if isinstance(pack, Pack) else Pack(pack)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptionsError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    src = p.manifest["source"]
    written: list[Path] = []
    n_weights = 0
    by_file: dict[str, list[str]] = {f: [] for f in src["files"]}
    for name, t in p.tensors.items():
        by_file.setdefault(t["file"], []).append(name)
    bar = tqdm(total=len(p.tensors), unit="tensor", desc="decode", disable=not progress, dynamic_ncols=True)
    weight_map = {}
    total_size = 0
    for f, names in by_file.items():
        meta = src.get("file_metadata", {}).get(f) or None
        with SafetensorsWriter(out / f, meta) as w:
            for name in names:
                t = p.tensors[name]
                if t["kind"] == "passthrough":
                    raw = p.array(name)
                    w.add_raw(name, t["dtype"], t["shape"], raw)
                else:
                    a = p.tensor(name)
                    n_weights += a.size
                    w.add(name, a)
                weight_map[name] = f
                bar.update(1)
            total_size += w.data_bytes
        written.append(out / f)
    bar.close()
    if src.get("index"):
        index = {"metadata": {**(src.get("index_metadata") or {}), "total_size": total_size},
                 "weight_map": weight_map}
        ip = out / src["index"]
        _atomic_write_bytes(ip, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
        written.append(ip)
    for rel in p.aux_files():
        ap = out / rel
        _atomic_write_bytes(ap, p.aux_bytes(rel))
        written.append(ap)
    return DecodeResult(out, written, time.perf_counter() - t0, n_weights)
