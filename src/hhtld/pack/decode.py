"""Write a pack back as a dense checkpoint in the layout of its source."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import OptionsError, PackError
from ..outputs import atomic_write_bytes, check_output_file, sweep_stale
from ..stfile import FormatProblem, SafetensorsWriter
from .reader import Pack


@dataclass
class DecodeResult:
    out_dir: Path
    files: list[Path]
    seconds: float
    n_weights: int


def decode_pack(pack: str | os.PathLike | Pack, out_dir: str | os.PathLike, progress: bool = False,
                force: bool = False) -> DecodeResult:
    """Single file → ``OUT/<name>.safetensors``; sharded → shards + index;
    model folder → weights + its config/tokenizer files. Each file is written
    atomically; passthrough tensors come back byte for byte.

    Every target is checked before anything is written: an existing file is
    only replaced with ``force``; the pack itself, directories and non-regular
    files never are. Without ``force`` a file is never replaced even if it
    appears while decoding (another decode into the same folder): the later
    writer fails instead. If decoding fails, the files this call created are
    removed, and so are its temporary files; temporary files that killed runs
    left in the folder are removed first.
    """
    t0 = time.perf_counter()
    p = pack if isinstance(pack, Pack) else Pack(pack)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptionsError(f"{out}: exists and is not a directory")
    src = p.manifest["source"]
    by_file: dict[str, list[str]] = {f: [] for f in src["files"]}
    for name, t in p.tensors.items():
        by_file[t["file"]].append(name)
    targets = [out / f for f in by_file] + ([out / src["index"]] if src["index"] else [])
    targets += [out / rel for rel in p.aux_files()]
    for t in targets:
        for parent in t.relative_to(out).parents:
            d = out / parent
            if d != out and (d.is_symlink() or (d.exists() and not d.is_dir())):
                raise OptionsError(f"{d}: exists and is not a folder; {t.relative_to(out)} cannot be written there")
        check_output_file(t, [p.path], what="decoded checkpoint")
        if t.exists() and not force:
            raise OptionsError(f"{t}: exists; decode into a new folder or pass --force to overwrite")
    existed = {t for t in targets if t.exists()}
    out.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    written: list[Path] = []
    n_weights = 0
    try:
        bar = tqdm(total=len(p.tensors), unit="tensor", desc="decode", disable=not progress, dynamic_ncols=True)
        weight_map = {}
        total_size = 0
        for f, names in by_file.items():
            meta = src["file_metadata"].get(f) or None
            w = SafetensorsWriter(out / f, meta)
            try:
                for name in names:
                    t = p.tensors[name]
                    if t["kind"] == "passthrough":
                        w.add_raw(name, t["dtype"], t["shape"], p.raw(name))
                    else:
                        a = p.tensor(name)
                        n_weights += a.size
                        w.add(name, a)
                    weight_map[name] = f
                    bar.update(1)
                total_size += w.data_bytes
                w.close(overwrite=force)
            except BaseException:
                w.abort()
                raise
            written.append(out / f)
        bar.close()
        if src["index"]:
            index = {"metadata": {**src["index_metadata"], "total_size": total_size}, "weight_map": weight_map}
            written.append(atomic_write_bytes(out / src["index"], (json.dumps(index, indent=2) + "\n").encode("utf-8"),
                                              overwrite=force))
        for rel in p.aux_files():
            written.append(atomic_write_bytes(out / rel, p.aux_bytes(rel), overwrite=force))
    except FormatProblem as e:  # the validated manifest makes this unreachable
        _remove(written, existed)
        raise PackError(f"{p.path}: damaged hhtld pack ({e})") from None
    except BaseException:
        _remove(written, existed)
        raise
    return DecodeResult(out, written, time.perf_counter() - t0, n_weights)


def _remove(written: list[Path], existed: set[Path]) -> None:
    for f in written:
        if f not in existed:
            f.unlink(missing_ok=True)
