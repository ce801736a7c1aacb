"""A pack as a Hugging Face model folder (``hhtld export-hf``).

The folder holds what ``from_pretrained`` reads, and no weights file of its own:

* ``config.json``: the carried config, with ``dtype`` (the pack's when the config has
  none), a ``quantization_config`` (``quant_method: "hhtld"``, the pack's format
  version, codec, bits per weight and file name) and ``transformers_weights`` naming
  :data:`~hhtld.format.HF_WEIGHTS_STANDIN`, a file that is never written: without
  ``import hhtld.hf`` transformers skips the unknown quantisation method, opens that
  name and stops with it in its error; with it, the quantizer names the pack instead;
* the carried side files (tokenizer, generation config, sentence-transformers
  modules), the source model's own card kept as :data:`~hhtld.format.HF_SOURCE_CARD`;
* the pack itself as :data:`~hhtld.format.HF_PACK_NAME`;
* ``README.md``: a model card (:mod:`hhtld.loader.model_card`).

Nothing here imports torch or transformers. The folder is built in a temporary
folder beside the target and renamed into place: an interrupted export leaves
nothing behind, and an existing folder is never written into.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import LoadError, OptionsError
from ..format import (HF_EXPORT_KEEPS_OUT, HF_PACK_NAME, HF_QUANT_METHOD, HF_SOURCE_CARD, HF_WEIGHTS_STANDIN)
from ..outputs import forget_temp, make_public, make_temp_dir, remove_temp
from ..pack.reader import Pack
from .model_card import model_card
from .sidefiles import carried_config, dominant_float_dtype, open_pack_arg

BF16_BITS = 16


def quantization_config(pack: Pack) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for ``pack``."""
    return {"quant_method": HF_QUANT_METHOD, "format_version": pack.version, "codec": pack.manifest["codec"],
            "bits_per_weight": round(BF16_BITS / pack.storage_ratio(), 4), "pack": HF_PACK_NAME}


TRANSFORMERS_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def check_verify_report(report: dict[str, Any], pack: Pack, where: str) -> None:
    """A verify report (``hhtld verify --json``) must be of ``pack``: same file size and
    source size, else the card would carry another pack's figures."""
    try:
        st = report["storage"]
        same = int(st["file_bytes"]) == pack.path.stat().st_size and \
            int(st["source_bf16_bytes"]) == pack.source_bf16_bytes
        report["gates"], report["behaviour"]  # noqa: B018 (the card reads them)
    except (KeyError, TypeError, ValueError):
        raise LoadError(f"{where}: not a report of hhtld verify --json (no storage, gates or behaviour)") from None
    if not same:
        raise LoadError(f"{where}: the verify report is of another pack ({st['file_bytes']} bytes, "
                        f"{pack.path} has {pack.path.stat().st_size})")


def check_hf_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a folder to export into: new, or an empty folder (:class:`OptionsError` otherwise)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptionsError(f"{out}: already exists and is not an empty folder; choose a new folder")
    return out


def export_hf(pack: str | os.PathLike | Pack, out_dir: str | os.PathLike, *, verify_report: dict | None = None,
              command: str | None = None) -> Path:
    """Write ``pack`` as a Hugging Face folder ``out_dir`` (module docstring): loadable by
    ``from_pretrained``, ``pipeline`` and ``SentenceTransformer`` after ``import hhtld.hf``.
    ``verify_report``: the JSON of ``hhtld verify`` on this pack (its gates and behaviour
    figures go into the card; without it the card says that no behaviour was measured).
    ``command``: the command that made the folder, for the card. Returns the folder.

    Raises :class:`OptionsError` when ``out_dir`` exists and is not an empty folder,
    :class:`NoConfigError` when the pack carries no config.json."""
    p = open_pack_arg(pack)
    out = check_hf_dir(out_dir)
    cfg = carried_config(p)
    if verify_report is not None:
        check_verify_report(verify_report, p, "verify report")
    tmp = make_temp_dir(out, ".export")
    try:
        files = []
        for rel in p.aux_files():
            if rel in HF_EXPORT_KEEPS_OUT and rel != "README.md":
                continue  # a weights file of the source is not the pack's
            dst = tmp / (HF_SOURCE_CARD if rel == "README.md" else rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.aux_bytes(rel))
            files.append(dst.relative_to(tmp).as_posix())
        cfg = dict(cfg)
        # transformers would take the dtype of the pack's first float array (a palette) without it
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or TRANSFORMERS_DTYPE[dominant_float_dtype(p) or "F32"]
        cfg.pop("torch_dtype", None)
        cfg["dtype"] = dtype
        cfg["quantization_config"] = quantization_config(p)
        cfg["transformers_weights"] = HF_WEIGHTS_STANDIN
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        shutil.copyfile(p.path, tmp / HF_PACK_NAME)
        files = sorted(set(files) | {"config.json", HF_PACK_NAME, "README.md"})
        card = model_card(p, cfg, verify_report, command, files)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        make_public(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        forget_temp(tmp)
    except BaseException:
        remove_temp(tmp)
        raise
    return out


__all__ = ["check_hf_dir", "check_verify_report", "export_hf", "quantization_config"]
