"""``hhtld.load``: a ready transformers model from a pack, without dense files.

The architecture comes from the pack's carried ``config.json`` (or
``config=``); the model is built empty — every parameter on the ``meta``
device, buffers real — and every weight is then decoded tensor by tensor
(large ones in blocks of rows) straight into its parameter, so the process
never holds a second full copy of the weights. Tied parameters (a causal LM
whose ``lm_head`` is its embedding) stay one tensor. Side files go to a
private temporary folder only for the transformers calls that want a path,
and the folder is removed afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArchitectureError, LoadError, NoConfigError, PackError, TensorMismatchError, first_line
from ..checkpoint.config import FAMILIES, family_of_config
from ..names import state_dict_candidates
from ..kernels.vq import TABLES
from ..pack.reader import DECODE_WORK, Pack
from .deps import require, torch_and_transformers
from .sidefiles import carried_config, dominant_float_dtype, has_file, open_pack_arg, read_json, side_files
from .tensors import torch_dtype, to_torch

BLOCK_BYTES = 8 << 20  # encoded tensors are decoded in blocks of rows of about this many float32 bytes
_NAMED = 5  # names listed in a mismatch message


@dataclass
class LoadInfo:
    """What :func:`load` did, kept on the model as ``model.hhtld_info``.

    ``decoded``: pack tensors decoded (or copied) into dense parameters or
    buffers; ``compressed``: pack tensors kept compressed (``keep_compressed``);
    ``tied``: pack tensors skipped because their parameter is tied to one
    already filled; ``ignored``: pack tensors left out (non-persistent
    buffers the model computes itself, e.g. ``position_ids``; extras with
    ``strict=False``)."""

    pack: Path
    family: str | None
    model_class: str
    decoded: list[str] = field(default_factory=list)
    compressed: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# -- config, family, auto class ------------------------------------------------------
def _config_files(pack: Pack) -> list[str]:
    """Side files ``AutoConfig`` may read: the config and custom model code."""
    return ["config.json"] + [f for f in pack.aux_files() if f.endswith(".py")]


def resolve_config(pack: Pack, config, trust_remote_code: bool = False):
    """``(PretrainedConfig, config dict)`` from ``config`` (None = the pack's
    carried config.json; a path to a config.json or a folder holding one; a
    dict; or a transformers ``PretrainedConfig``)."""
    _, transformers = torch_and_transformers("hhtld.load")
    try:
        if config is None:
            cfg_dict = carried_config(pack)
            with side_files(pack, only=_config_files(pack)) as tmp:
                cfg = transformers.AutoConfig.from_pretrained(str(tmp), trust_remote_code=trust_remote_code)
            return cfg, cfg_dict
        if isinstance(config, transformers.PretrainedConfig):
            return config, config.to_dict()
        if isinstance(config, dict):
            if "model_type" not in config:
                raise LoadError("config= is a dict without 'model_type'; it must be a transformers config")
            d = dict(config)
            return transformers.AutoConfig.for_model(d.pop("model_type"), **d), dict(config)
        c = Path(config)
        cfile = c / "config.json" if c.is_dir() else c
        if not cfile.is_file():
            raise NoConfigError(f"{c}: no config.json there; config= takes a config.json or a folder holding one")
        import json

        try:
            cfg_dict = json.loads(cfile.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(f"{cfile}: not a readable config.json ({e})") from None
        if not isinstance(cfg_dict, dict) or "model_type" not in cfg_dict:
            raise LoadError(f"{cfile}: not a transformers config.json (no 'model_type')")
        src = str(cfile.parent) if cfile.name == "config.json" else str(cfile)
        return transformers.AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code), cfg_dict
    except LoadError:
        raise
    except Exception as e:  # transformers raises many types for a config it cannot use
        where = pack.path if config is None else config
        raise ArchitectureError(
            f"{where}: transformers cannot read this config ({type(e).__name__}: {first_line(e)})") from None


def resolve_auto_class(cfg_dict: dict, family: str | None, auto_class) -> tuple[Any, str | None]:
    """The transformers class to build and the family (``embedding``/``causal``,
    None when ``auto_class`` was given and the family is unknown)."""
    _, transformers = torch_and_transformers("hhtld.load")
    if family is not None and family not in FAMILIES:
        raise LoadError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if auto_class is not None:
        if isinstance(auto_class, str):
            cls = getattr(transformers, auto_class, None)
            if cls is None:
                raise LoadError(f"auto_class={auto_class!r} is not a class of transformers")
            auto_class = cls
        return auto_class, family
    fam = family or family_of_config(cfg_dict)
    return (transformers.AutoModelForCausalLM if fam == "causal" else transformers.AutoModel), fam


def family_of(pack, config=None) -> str:
    """``embedding`` or ``causal`` for a pack (from its carried config.json or ``config``)."""
    p = open_pack_arg(pack)
    if config is None:
        return family_of_config(carried_config(p))
    return family_of_config(resolve_config(p, config)[1])


# -- empty construction ---------------------------------------------------------------
def _dominant_float_dtype(pack: Pack):
    """The torch dtype holding most float elements of the pack (None if none)."""
    name = dominant_float_dtype(pack)
    return torch_dtype(name) if name else None


def build_empty(auto, cfg, dtype, attn_implementation: str | None, where: Path):
    """``auto.from_config(cfg)`` with every parameter on ``meta``."""
    import torch

    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["dtype"] = dtype
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    # accelerate puts every parameter on ``meta`` (no memory, no initialisation work) and
    # keeps buffers real, so what a model computes at construction (``position_ids``,
    # rotary ``inv_freq``) is there
    init_empty_weights = require("accelerate", "hhtld.load").init_empty_weights
    try:
        with init_empty_weights(), torch.no_grad():
            torch.manual_seed(0)
            net = auto.from_config(cfg, **kw)
    except Exception as e:
        raise ArchitectureError(
            f"{where}: transformers cannot build {getattr(auto, '__name__', auto)} from this config "
            f"(model_type '{getattr(cfg, 'model_type', '?')}'; {type(e).__name__}: {first_line(e)})"
        ) from None
    if not isinstance(net, torch.nn.Module):
        raise ArchitectureError(f"{where}: {auto} did not build a torch model")
    if hasattr(net, "tie_weights"):  # ties made under init_empty_weights can come apart: one object again
        net.tie_weights()
    return net


# -- names ----------------------------------------------------------------------------
def _listed(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")


@dataclass
class _Slot:
    """One tensor of the model to fill: every key that names it (tied parameters
    share one tensor), whether it is a parameter, and the pack tensor that fills it."""

    keys: list[str]
    is_param: bool
    source: str | None = None


def plan_fill(pack: Pack, model, strict: bool) -> tuple[list[_Slot], LoadInfo]:
    """Match the pack's tensors to the model's parameters and persistent buffers."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    slots: dict[int, _Slot] = {}
    key_slot: dict[str, _Slot] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        s = slots.setdefault(id(p), _Slot([], True))
        s.keys.append(key)
        key_slot[key] = s
    state_keys = set(model.state_dict(keep_vars=True))
    all_buffers = dict(model.named_buffers(remove_duplicate=False))
    for key, b in all_buffers.items():
        if key in state_keys:
            s = slots.setdefault(id(b), _Slot([], False))
            s.keys.append(key)
            key_slot[key] = s
    info = LoadInfo(pack.path, None, type(model).__name__)
    extra: list[str] = []
    for name in pack.names():
        cands = state_dict_candidates(name, prefix)
        hit = next((c for c in cands if c in key_slot), None)
        if hit is None:
            if any(c in all_buffers for c in cands):
                info.ignored.append(name)  # a non-persistent buffer: the model computes it
            elif strict:
                extra.append(name)
            else:
                info.ignored.append(name)
            continue
        slot = key_slot[hit]
        want = tuple(model.get_parameter(hit).shape if slot.is_param else all_buffers[hit].shape)
        have = tuple(pack.info(name)["shape"])
        if want != have:
            raise TensorMismatchError(
                f"{pack.path}: tensor '{name}' has shape {list(have)} in the pack but {type(model).__name__} "
                f"expects {list(want)} for '{hit}'"
            )
        if slot.source is None:
            slot.source = name
        elif hit == slot.keys[0] and slot.source != name:  # the owner's own name wins over a tied alias
            info.tied.append(slot.source)
            slot.source = name
        else:
            info.tied.append(name)
    if extra:
        raise TensorMismatchError(
            f"{pack.path}: {len(extra)} tensor(s) of the pack have no parameter in {type(model).__name__}: "
            f"{_listed(extra)}; is this the right config or auto_class? (strict=False ignores them)"
        )
    missing = [s.keys[0] for s in slots.values() if s.is_param and s.source is None]
    if missing:
        raise TensorMismatchError(
            f"{pack.path}: {len(missing)} parameter(s) of {type(model).__name__} have no tensor in the pack: "
            f"{_listed(missing)}; is this the right config or auto_class?"
        )
    return [s for s in slots.values() if s.source is not None], info


# -- decoding into parameters ------------------------------------------------------------------
def decode_tensor(pack: Pack, name: str, device=None):
    """Tensor ``name`` as the checkpoint stored it (shape, dtype), as a torch
    tensor on ``device``. Encoded tensors are decoded in blocks of rows into
    one preallocated tensor; passthrough tensors are copied out of the pack."""
    import torch

    t = pack.info(name)
    if t["kind"] != "encoded":
        out = to_torch(pack.tensor(name))  # read-only memory map → copied
        return out if device is None else out.to(device)
    shape = tuple(t["shape"])
    n_rows, n_cols = (t.get("row_shape") or shape)[:2]
    transposed = bool(t.get("transposed"))
    block = max(1, BLOCK_BYTES // max(1, 4 * n_cols))
    if n_rows <= block or (transposed and len(shape) != 2):
        out = to_torch(pack.tensor(name))
        return out if device is None else out.to(device)
    tdt = torch_dtype(t["dtype"])
    pack.reserve(name, n_rows * n_cols * tdt.itemsize + block * n_cols * 4 * DECODE_WORK, "loading it")
    try:
        out = torch.empty(shape, dtype=tdt)
    except RuntimeError as e:  # torch's allocator reports no memory as a RuntimeError
        raise PackError(f"{pack.path}: tensor '{name}': out of memory while loading it ({first_line(e)})") from None
    rows = out.t() if transposed else out.view(n_rows, n_cols)
    for s in range(0, n_rows, block):
        e = min(n_rows, s + block)
        rows[s:e] = torch.from_numpy(pack.rows(name, np.arange(s, e, dtype=np.int64))).to(out.dtype)
    return out if device is None else out.to(device)


def _set_tensor(model, key: str, value, is_param: bool) -> None:
    """Put ``value`` (a Parameter, or a tensor for a buffer) in place of ``key``."""
    mod_name, _, leaf = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    (mod._parameters if is_param else mod._buffers)[leaf] = value


def check_materialised(model, where: Path) -> None:
    meta = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if meta:
        raise LoadError(f"{where}: {len(meta)} tensor(s) of the model were left unfilled: {_listed(meta)}")


def fill_model(p: Pack, net, dtype, device, keep_compressed: bool, cache_layers: int, codec_space: bool,
               strict: bool, tables: str = "int16", trainable: bool = True) -> LoadInfo:
    """Fill ``net`` (built empty: parameters on ``meta``) from pack ``p``: every pack
    tensor decoded into its parameter or buffer, or with ``keep_compressed`` kept as
    its stored parts in hhtld's compressed modules (swapped in at the end). Tied
    parameters stay one tensor. ``trainable=False``: every parameter without grad."""
    import torch

    slots, info = plan_fill(p, net, strict)
    comp = None
    if keep_compressed:
        from .compress_model import CompressPlan

        comp = CompressPlan(p, net, dtype, cache_layers, device, codec_space, tables)
    with torch.no_grad():
        for slot in slots:
            if comp is not None and comp.take(slot):
                info.compressed.append(slot.source)
                continue
            value = decode_tensor(p, slot.source, device)
            if slot.is_param:
                old = net.get_parameter(slot.keys[0])
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                grad = trainable and old.requires_grad and value.is_floating_point()
                value = torch.nn.Parameter(value, requires_grad=grad)
            else:
                old = net.get_buffer(slot.keys[0])
                value = value.to(dtype=old.dtype)
            for key in slot.keys:
                _set_tensor(net, key, value, slot.is_param)
            info.decoded.append(slot.source)
        if comp is not None:
            comp.install()
    return info


# -- the public calls ----------------------------------------------------------------------------
def load(pack: str | os.PathLike | Pack, *, config=None, family: str | None = None, auto_class=None,
         dtype=None, device=None, keep_compressed: bool = False, cache_layers: int = 0, codec_space: bool = True,
         strict: bool = True, trust_remote_code: bool = False, attn_implementation: str | None = None,
         memory_limit: int | str | None = None, tables: str = "int16"):
    """A ready ``transformers`` model (eval mode) from a ``.hhtld`` pack.

    ``pack``: a path or an open :class:`Pack`. ``config``: the architecture
    when the pack carries no ``config.json`` (a config.json, a folder holding
    one, a dict, or a ``PretrainedConfig``). The class is ``AutoModel`` for
    embedding models and ``AutoModelForCausalLM`` for causal LMs (the family
    comes from the config; ``family=`` or ``auto_class=`` — a class or its
    name in transformers — override it).

    Every parameter gets the dtype of its checkpoint tensor, or ``dtype``
    (a ``torch.dtype``, e.g. ``torch.float32``, or its name) for every float
    one; ``device`` places it (default CPU). ``keep_compressed=True`` keeps
    encoded ``nn.Linear`` / ``nn.Embedding`` weights as their stored parts
    and decodes them on use (see :mod:`hhtld.loader.compressed`):
    embeddings decode only the rows they look up; ``cache_layers=N`` keeps
    the N most recently decoded weights; with ``codec_space`` (default) a
    float32 hhtl-vq linear is applied in the codec's space by the kernels of
    :mod:`hhtld.kernels` (its inputs rotated, never its weight decoded: on the
    CPU lookup tables for a few input rows, decode-then-GEMM block by block
    for many; ``tables="int16"``, the default, sums 12-bit tables with the
    vector extension, ``tables="float32"`` equals the decoded product up to
    float32 rounding), and ``codec_space=False`` decodes every weight exactly
    as the dense load.

    Raises :class:`NoConfigError` (no config), :class:`ArchitectureError`
    (transformers cannot build it), :class:`TensorMismatchError` (parameters
    without a tensor, tensors without a parameter — ``strict=False`` ignores
    the latter — or another shape), :class:`MissingDependencyError` (torch /
    transformers not installed: ``pip install 'hhtld[load]'``), and
    :class:`PackError` before allocating a tensor that does not fit in
    ``memory_limit`` (bytes or e.g. ``"4G"``; default: what the process may
    really use, :mod:`hhtld.memory`).
    """
    torch, transformers = torch_and_transformers("hhtld.load")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise LoadError(f"dtype={dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        dtype = getattr(torch, dtype)
    if not isinstance(cache_layers, int) or isinstance(cache_layers, bool) or cache_layers < 0:
        raise LoadError(f"cache_layers must be an integer >= 0, got {cache_layers!r}")
    if tables not in TABLES:
        raise LoadError(f"tables must be one of {', '.join(TABLES)}, got {tables!r}")
    p = open_pack_arg(pack)
    with p.limited(memory_limit):
        return _load(p, torch, transformers, config, family, auto_class, dtype, device, keep_compressed, cache_layers,
                     codec_space, strict, trust_remote_code, attn_implementation, tables)


def _load(p: Pack, torch, transformers, config, family, auto_class, dtype, device, keep_compressed, cache_layers,
          codec_space, strict, trust_remote_code, attn_implementation, tables="int16"):
    cfg, cfg_dict = resolve_config(p, config, trust_remote_code)
    auto, fam = resolve_auto_class(cfg_dict, family, auto_class)
    build_dtype = dtype or _dominant_float_dtype(p)
    net = build_empty(auto, cfg, build_dtype, attn_implementation, p.path)
    info = fill_model(p, net, dtype, device, keep_compressed, cache_layers, codec_space, strict, tables)
    info.family = fam
    if device is not None:
        net.to(device)
    check_materialised(net, p.path)
    if fam == "causal" and has_file(p, "generation_config.json"):
        try:
            net.generation_config = transformers.GenerationConfig.from_dict(read_json(p, "generation_config.json"))
        except LoadError:
            raise
        except Exception as e:
            raise LoadError(f"{p.path}: the carried generation_config.json is not usable ({type(e).__name__}: "
                            f"{first_line(e)})") from None
    net.eval()
    net.hhtld_info = info
    return net


def load_tokenizer(pack: str | os.PathLike | Pack, **kwargs):
    """The tokenizer carried by the pack (``AutoTokenizer.from_pretrained`` on
    its side files; ``kwargs`` are passed on). Raises :class:`LoadError` when
    the pack carries none."""
    _, transformers = torch_and_transformers("hhtld.load_tokenizer")
    p = open_pack_arg(pack)
    if not p.aux_files():
        raise LoadError(f"{p.path}: the pack carries no side files, so no tokenizer (it was made from a bare "
                        f".safetensors file or with --no-aux-files)")
    with side_files(p) as tmp:
        try:
            return transformers.AutoTokenizer.from_pretrained(str(tmp), **kwargs)
        except Exception as e:
            raise LoadError(f"{p.path}: no usable tokenizer among the carried side files "
                            f"({type(e).__name__}: {first_line(e)})") from None
