"""Finished units of an encode, kept next to its target so that ``--resume`` can continue.

While an encode with ``resume`` runs, the outputs of its finished units go into a
folder next to the target, ``<target>.partial/`` (without ``resume``, a calibrated encode
keeps them in a temporary folder, for its second round, removed as every temporary file
is): every encoded tensor (its stored arrays, manifest
params, the statistics its group's finish reads and its row cosines), and on the
calibrated path every analysed block (its tensors' statistics, their Hessians and the
hidden states the next block reads), the Fisher pass, the rung trials and each
round's check. Each is written to a temporary name and renamed, so a unit is either
there whole or not at all, whatever stopped the process.

The folder's ``state.json`` holds the fingerprint of what the encode was asked to do
(the checkpoint's files — names, sizes, modification times —, the config's bytes, every
option that changes the pack, the versions of hhtld and of the libraries that compute)
and the process writing there. A run with ``resume`` reuses the units of a folder whose
fingerprint is its own and refuses one made for another input or other options; a run
without it removes the folder of an earlier, interrupted run and starts afresh. When the
pack is written the folder goes; when a run with ``resume`` is interrupted (Ctrl-C, a
killed process, a full disk) it stays, and the error says so.
Every unit is deterministic (the codecs give the same bytes for the same input, on any
thread count), so a resumed run writes the same pack, byte for byte, as one that was
never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..codecs.base import EncodedTensor
from ..errors import OptionsError
from ..outputs import atomic_write_bytes, held_by_live_process, make_temp_dir, remove_temp, this_process
from ..stfile import FormatProblem, SafetensorsWriter, parse_json, read_array, read_header

PARTIAL_SUFFIX = ".partial"
STATE = "state.json"
_META = "hhtld.unit"


def partial_folder(target: str | os.PathLike) -> Path:
    """The folder an encode of ``target`` keeps its finished units in."""
    t = Path(target)
    return t.with_name(t.name + PARTIAL_SUFFIX)


LIBRARIES = ("numpy", "scipy", "faiss-cpu", "numba", "torch", "transformers")


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def fingerprint(ckpt, options: dict[str, Any], config=None) -> str:
    """SHA-256 of the checkpoint's files (names, sizes, modification times), the bytes
    of ``config`` (a config.json or a folder holding one), the options that change the
    pack and the versions of hhtld and of the libraries that compute it."""
    files = []
    for rel, p in [(f, ckpt.weight_path(f)) for f in ckpt.files] + [(a, ckpt.aux_path(a)) for a in ckpt.aux_files]:
        st = Path(p).stat()
        files.append([str(rel), st.st_size, st.st_mtime_ns])
    cfg = None
    if config is not None:
        c = Path(config)
        c = c / "config.json" if c.is_dir() else c
        cfg = hashlib.sha256(c.read_bytes()).hexdigest() if c.is_file() else str(config)
    text = json.dumps({"hhtld": __version__, "libraries": _versions(), "source": str(ckpt.path.resolve()),
                       "files": files, "config": cfg, "options": options}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unit_file(key: str) -> str:
    """A unit's file name: a readable head and a digest of the whole key."""
    head = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)[:80]
    return f"{head}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]}"


def _plain(v: Any) -> Any:
    """JSON-ready copy of a params/stats value (numpy scalars as Python numbers)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


class UnitStore:
    """The ``<target>.partial/`` folder of one encode (module docstring).

    ``open()`` makes it (or, with ``resume``, checks and reuses it); ``tensor``/``put_tensor``,
    ``arrays``/``put_arrays`` and ``json``/``put_json`` read and write finished units by key;
    ``done()`` removes the folder once the pack is written; ``keep()`` leaves it for
    ``--resume`` after an interruption. ``reused`` counts the units read back."""

    def __init__(self, target: str | os.PathLike, fingerprint: str):
        self.target = Path(target)
        self.folder = partial_folder(target)
        self.fingerprint = fingerprint
        self.reused = 0
        self.kept = False  # the folder is the visible one --resume reads

    @staticmethod
    def discard_earlier(target: str | os.PathLike) -> bool:
        """Remove the units an interrupted encode of ``target`` kept (not those of a run
        still going: OptionsError); whether there were any."""
        f = partial_folder(target)
        if not f.exists() and not f.is_symlink():
            return False
        _check_folder(f)
        shutil.rmtree(f)
        return True

    def open(self, resume: bool) -> "UnitStore":
        """With ``resume`` the visible folder (reused when its fingerprint is this run's);
        without it a temporary folder next to the target."""
        if not resume:
            self.folder = make_temp_dir(self.target, ".units")
            return self
        f = self.folder
        self.kept = True
        if f.exists() or f.is_symlink():
            old = _check_folder(f)
            if old.get("fingerprint") != self.fingerprint:
                raise OptionsError(f"{f}: the interrupted encode kept there was made from another checkpoint, "
                                   "other options or another hhtld version; run without --resume to start over")
        else:
            f.mkdir(parents=True)
        self._write_state()
        return self

    def _write_state(self) -> None:
        atomic_write_bytes(self.folder / STATE, json.dumps({"fingerprint": self.fingerprint, "hhtld": __version__,
                                                            **this_process()}).encode("utf-8"))

    def path(self, key: str, suffix: str) -> Path:
        return self.folder / (unit_file(key) + suffix)

    # -- encoded tensors --------------------------------------------------------------------
    def put_tensor(self, key: str, et: EncodedTensor) -> None:
        """Keep one encoded tensor (arrays, params, stats, cosines) under ``key``."""
        stats = {k: v for k, v in et.stats.items() if not isinstance(v, np.ndarray)}
        arrays = {f"array.{k}": v for k, v in et.arrays.items()}
        arrays.update({f"stats.{k}": v for k, v in et.stats.items() if isinstance(v, np.ndarray)})
        if et.cosines is not None:
            arrays["cosines"] = et.cosines
        meta = {"key": key, "params": _plain(et.params), "stats": _plain(stats), "order": list(et.arrays)}
        self._write(key, arrays, meta)

    def has(self, key: str) -> bool:
        """Whether a unit is kept under ``key`` (read, and checked, only when its turn comes)."""
        return self.path(key, ".safetensors").is_file()

    def tensor(self, key: str) -> EncodedTensor | None:
        """The encoded tensor kept under ``key``, or None."""
        got = self._read(key)
        if got is None:
            return None
        arrays, meta = got
        stats = dict(meta["stats"])
        stats.update({k.removeprefix("stats."): v for k, v in arrays.items() if k.startswith("stats.")})
        return EncodedTensor(meta["params"], {k: arrays[f"array.{k}"] for k in meta["order"]}, arrays.get("cosines"),
                             stats)

    # -- other results -------------------------------------------------------------------------
    def put_arrays(self, key: str, arrays: dict[str, np.ndarray], meta: Any = None) -> None:
        self._write(key, arrays, {"key": key, "meta": _plain(meta)})

    def arrays(self, key: str) -> tuple[dict[str, np.ndarray], Any] | None:
        got = self._read(key)
        return None if got is None else (got[0], got[1].get("meta"))

    def put_json(self, key: str, obj: Any) -> None:
        atomic_write_bytes(self.path(key, ".json"), json.dumps({"key": key, "value": _plain(obj)}).encode("utf-8"))

    def json(self, key: str) -> Any:
        p = self.path(key, ".json")
        if not p.is_file():
            return None
        try:
            obj = parse_json(p.read_bytes(), str(p))
            if not isinstance(obj, dict) or obj.get("key") != key:
                return None
            value = obj["value"]
        except (FormatProblem, OSError, KeyError):
            return None  # a damaged unit is done again
        self.reused += 1
        return value

    # -- the folder ------------------------------------------------------------------------------
    def done(self) -> None:
        if self.kept:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            remove_temp(self.folder)

    def keep(self) -> str:
        """What an interrupted run says about the units it kept."""
        n = sum(1 for p in self.folder.glob("*") if p.is_file() and p.name != STATE)
        return (f"{n} finished unit{'s' if n != 1 else ''} kept in {self.folder}; the same command with --resume "
                "continues from them")

    def _write(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        w = SafetensorsWriter(self.path(key, ".safetensors"), {_META: json.dumps(meta)})
        try:
            for name, a in arrays.items():
                w.add(name, np.asarray(a))
            w.close()
        except BaseException:
            w.abort()
            raise

    def _read(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        p = self.path(key, ".safetensors")
        if not p.is_file():
            return None
        try:
            h = read_header(p)
            meta = parse_json(h.metadata[_META], str(p))
            if not isinstance(meta, dict) or meta.get("key") != key:
                return None
            arrays = {n: np.array(read_array(h, e)) for n, e in h.tensors.items()}  # in memory: no file held open
        except (FormatProblem, KeyError, OSError, ValueError, AttributeError):
            return None  # a damaged unit is done again
        self.reused += 1
        return arrays, meta


def _check_folder(f: Path) -> dict:
    """The state of a units' folder, refused (OptionsError) when it is not one, or when the
    process writing it is still running."""
    if f.is_symlink() or not f.is_dir():
        raise OptionsError(f"{f}: exists and is not the folder of an interrupted encode; move it away")
    state = f / STATE
    if not state.is_file():
        raise OptionsError(f"{f}: exists but is not the folder of an interrupted hhtld encode (no {STATE}); "
                           "move it away")
    try:
        old = parse_json(state.read_bytes(), str(state))
    except (OSError, FormatProblem) as e:
        raise OptionsError(f"{state}: cannot be read ({e}); remove {f} to start over") from None
    old = old if isinstance(old, dict) else {}
    host, pid = old.get("host"), old.get("pid")
    if isinstance(host, str) and isinstance(pid, int) and held_by_live_process(host, pid):
        raise OptionsError(f"{f}: another hhtld encode of this target is running (process {pid} on {host}); "
                           "wait for it, or write to another file (if that process is gone, remove the folder)")
    return old


__all__ = ["PARTIAL_SUFFIX", "UnitStore", "fingerprint", "partial_folder"]
