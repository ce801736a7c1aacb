"""The real all-MiniLM-L6-v2: encode → decode → load in transformers → embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from hhtld import open_checkpoint
from hhtld.classify import EncodablePolicy
from hhtld.pack import decode_pack, encode_checkpoint, open_pack


@pytest.mark.slow
def test_minilm_encode_decode_loads_in_transformers(minilm_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pack = tmp_path / "minilm.hhtld"
    res = encode_checkpoint(minilm_dir, pack, codec="hhtl-f32", policy=EncodablePolicy(encode_all=True))
    p = open_pack(pack)
    ck = open_checkpoint(minilm_dir)
    matrices = [t for t in ck.tensors.values() if len(t.shape) == 2 and t.dtype == "F32"]
    assert len(matrices) == 40  # 3 embedding tables, 36 layer matrices, the pooler
    assert res.n_weights_encoded == sum(t.shape[0] * t.shape[1] for t in matrices)
    assert p.storage_ratio() > 10  # the reference budget is tiny; verify says what it costs
    for name in p.passthrough_names():
        assert p.tensor(name).tobytes() == ck.read(name).tobytes()

    out = tmp_path / "decoded"
    decode_pack(pack, out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModel.from_pretrained(out).eval()
    batch = tok(["a sentence about compression", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(hidden).all()
    # the decoded weights are exactly the pack's reconstruction
    w = dict(model.named_parameters())["encoder.layer.0.intermediate.dense.weight"]
    np.testing.assert_array_equal(w.detach().numpy(), p.tensor("encoder.layer.0.intermediate.dense.weight"))
