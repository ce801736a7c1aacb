"""llama.cpp's quantisations of SmolLM2 with an importance matrix, as rows of the rate–KL table.

What users pick in practice: llama.cpp's k-quants and i-quants, quantised with an
importance matrix (``llama-imatrix``) computed on calibration text. For each type this
module

1. builds ``llama-imatrix`` and ``llama-quantize`` (``scripts/llama_cpp.py``: the
   llama-cpp-python sdist's ``vendor/llama.cpp``, CMake, into ``.cache/llama.cpp``;
   an optional benchmark extra, never a dependency of hhtld) and converts the SmolLM2
   folder to an F16 GGUF with llama.cpp's own ``convert_hf_to_gguf.py``;
2. computes the importance matrix on hhtld's calibration passages (the calibration
   kinds in turn, rendered as the calibrated encode renders them; never the held-out
   passages the table is measured on), in chunks of 256 tokens;
3. quantises with ``llama-quantize --imatrix`` to the type, and records, per tensor, the
   type llama.cpp actually stored (with 576 columns many k- and i-quant tensors fall
   back to another type: a row of 576 is not a whole number of 256-weight super-blocks)
   and the bytes it stored;
4. reads the GGUF back with transformers' GGUF loader (the ``gguf`` package's
   dequantisers; it undoes llama.cpp's q/k row order) into float32 tensors under their
   Hugging Face names.

Bits per weight count every byte stored for the 2-D matrices (scales and minimums
included), as the table counts every method's.

    .venv/bin/python bench/causal.py --llama-cpp Q3_K_M,Q4_K_M,IQ4_XS,Q5_K_M,Q6_K,Q8_0
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TYPES = ("Q3_K_M", "Q4_K_M", "IQ4_XS", "Q5_K_M", "Q6_K", "Q8_0")
CHUNK = 256  # tokens per importance-matrix chunk, as the calibrated encode's passages


def _run(cmd: list, log=print) -> None:
    log("+ " + " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def tools(cache: Path, log=print) -> dict[str, Path]:
    """``llama-quantize`` and ``llama-imatrix``, built when missing, and the F16 GGUF."""
    _run([sys.executable, REPO / "scripts" / "llama_cpp.py", "--cache", cache], log)
    root = cache / "llama.cpp"
    out = {t: root / "build" / "bin" / t for t in ("llama-quantize", "llama-imatrix")}
    out["f16"] = root / "gguf" / "smollm2-135m-f16.gguf"
    return out


def calibration_text(model: Path, n_texts: int = 32) -> str:
    """hhtld's calibration passages (the calibration kinds in turn), rendered as the
    calibrated encode renders them, one after another."""
    import transformers

    from hhtld.measure.texts import USE_KINDS, passages, render

    tok = transformers.AutoTokenizer.from_pretrained(model)
    by_kind = [[render(p, tok) for p in passages("calibration", k)] for k in USE_KINDS["calibration"]]
    return "\n\n".join([t for row in zip(*by_kind) for t in row][:n_texts])


def importance_matrix(t: dict[str, Path], model: Path, folder: Path, n_texts: int = 32, log=print) -> Path:
    out = folder / f"imatrix-{n_texts}.gguf"
    if not out.exists():
        text = folder / f"calibration-{n_texts}.txt"
        text.write_text(calibration_text(model, n_texts), encoding="utf-8")
        _run([t["llama-imatrix"], "-m", t["f16"], "-f", text, "-o", out, "-c", CHUNK, "--chunks", n_texts,
              "-t", "2"], log)
    return out


def quantise(t: dict[str, Path], imatrix: Path, qtype: str, folder: Path, log=print) -> Path:
    out = folder / f"smollm2-135m-{qtype}-imatrix.gguf"
    if not out.exists():
        _run([t["llama-quantize"], "--imatrix", imatrix, t["f16"], out, qtype], log)
    return out


def stored(path: Path) -> tuple[int, Counter]:
    """Bits stored for the GGUF's 2-D tensors, and how many tensors of each type."""
    import gguf

    r = gguf.GGUFReader(str(path))
    bits, types = 0, Counter()
    for tensor in r.tensors:
        if len([d for d in tensor.shape if d > 1]) == 2:
            bits += 8 * int(tensor.n_bytes)
            types[tensor.tensor_type.name] += 1
    return bits, types


def dequantised(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The GGUF's tensors ``names`` (Hugging Face names) as float32, q/k in Hugging Face order."""
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise RuntimeError(f"{path}: no tensor for {missing[:3]}")
    return {n: tensors[n].numpy().astype(np.float32) for n in names}


def candidates(model: Path, names: list[str], make, qtypes=TYPES, cache: Path | None = None,
               log=print) -> list[Any]:
    """One table row per llama.cpp type: ``make(key, label, source, bits, note, seconds, extra)``
    (bench/causal.py's ``Candidate``) over the 2-D matrices ``names``."""
    from hhtld.gates import FunctionSource

    cache = cache or REPO / ".cache"
    t = tools(cache, log)
    folder = cache / "llama.cpp" / "gguf"
    imat = importance_matrix(t, model, folder, log=log)
    out = []
    for q in qtypes:
        t0 = time.perf_counter()
        path = quantise(t, imat, q, folder, log)
        bits, types = stored(path)
        weights = dequantised(path, names)
        src = FunctionSource(list(weights), lambda n, w=weights: w[n], f"llama.cpp {q}")
        kinds = ", ".join(f"{n} {k}" for k, n in types.most_common())
        out.append(make(f"llama.cpp:{q}", f"llama.cpp {q} (imatrix)", src, bits,
                             f"llama-quantize --imatrix (32 calibration passages); tensors stored as {kinds}",
                             time.perf_counter() - t0, {"types": dict(types)}))
        log(f"llama.cpp {q}: {bits / sum(w.size for w in weights.values()):.3f} bits/weight; {kinds}")
    return out
