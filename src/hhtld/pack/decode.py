"""Write a pack back as a dense checkpoint in the layout of its source."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import numpy as np

from ..errors import OptionsError, PackError
from ..format import DTYPE_BYTES, aux_array_name
from ..memory import file_size_limit, format_bytes
from ..outputs import atomic_write_bytes, check_output_file, sweep_stale
from ..stfile import FormatProblem, SafetensorsWriter, as_bytes
from .reader import Pack

# disk a decode leaves free besides what it writes (a full disk breaks more than this decode)
DISK_MARGIN = 64 << 20


@dataclass
class DecodeResult:
    out_dir: Path
    files: list[Path]
    seconds: float
    n_weights: int


def decode_pack(pack: str | os.PathLike | Pack, out_dir: str | os.PathLike, progress: bool = False,
                force: bool = False, memory_limit: int | str | None = None) -> DecodeResult:
    """Single file → ``OUT/<name>.safetensors``; sharded → shards + index;
    model folder → weights + its config/tokenizer files. Each file is written
    atomically; passthrough tensors come back byte for byte.

    Encoded tensors are written block by block (:meth:`Pack.tensor_blocks`),
    never held whole: memory is the blocks in flight (checked against
    ``memory_limit``, by default what the process may really use), whatever
    the tensor's size. The bytes the decode will write are known from the
    manifest and checked against the free disk space before anything is written.

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
    with p.limited(memory_limit):
        return _decode(p, out_dir, progress, force, t0)


def _decode(p: Pack, out_dir, progress: bool, force: bool, t0: float) -> DecodeResult:
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
    _check_disk(p, out, by_file)
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
                        n_weights += _write_blocks(p, name, w)
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


def _tensor_bytes(t: dict) -> int:
    return int(np.prod(t["shape"], dtype=np.int64)) * DTYPE_BYTES[t["dtype"]]


def _check_disk(p: Pack, out: Path, by_file: dict[str, list[str]]) -> None:
    """Refuse, before anything is written, a decode whose files will not fit: the
    file-size limit (``ulimit -f``) against the largest file, and the free disk
    space against every weight file (written once to a spill file, then copied
    after its header: the largest file counts twice) and the side files."""
    sizes = [sum(_tensor_bytes(p.tensors[n]) for n in names) for names in by_file.values()]
    aux_sizes = [p.header.tensors[aux_array_name(rel)].nbytes for rel in p.aux_files()]
    aux = sum(aux_sizes)
    largest = max(sizes + aux_sizes, default=0)
    writes = f"{p.path}: decoding it writes {format_bytes(sum(sizes) + aux)}"
    fsize = file_size_limit()
    if fsize is not None and largest > fsize:
        raise PackError(f"{writes}; its largest file would be {format_bytes(largest)}, but the file-size limit "
                        f"(ulimit -f) is {format_bytes(fsize)}; raise the limit or decode elsewhere")
    need = sum(sizes) + max(sizes, default=0) + aux
    where = out
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need + DISK_MARGIN > free:
        raise PackError(f"{writes} (and needs {format_bytes(need)} while its largest file is copied after its "
                        f"header); {out} has {format_bytes(free)} free; free some space or decode into a folder on a "
                        "larger disk")


def _write_blocks(p: Pack, name: str, w: SafetensorsWriter) -> int:
    """Write encoded tensor ``name`` into ``w`` block by block; returns its weight count."""
    t = p.tensors[name]
    n_rows, n_cols = t["row_shape"]
    item = DTYPE_BYTES[t["dtype"]]
    write_at = w.add_region(name, t["dtype"], t["shape"], n_rows * n_cols * item)
    for s, e, block in p.tensor_blocks(name):
        if t["transposed"]:  # stored as (cols, rows): row j of the file holds column j of the row matrix
            cols = np.ascontiguousarray(block.T)
            for j in range(n_cols):
                write_at((j * n_rows + s) * item, as_bytes(cols[j]))
        else:
            write_at(s * n_cols * item, as_bytes(block))
    return n_rows * n_cols


def _remove(written: list[Path], existed: set[Path]) -> None:
    for f in written:
        if f not in existed:
            f.unlink(missing_ok=True)
