"""A pack as a Hugging Face folder (slow: real MiniLM and SmolLM2, run through
transformers; still part of `make test`): `hhtld export-hf` writes it, and after
`import hhtld.hf` transformers' own entry points load it with hhtld's compressed
modules and give what `hhtld.load(..., keep_compressed=True)` gives."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

import hhtld  # noqa: E402
import hhtld.hf  # noqa: E402
from hhtld import LoadError, OptionsError, PackError  # noqa: E402
from hhtld.cli import main  # noqa: E402
from hhtld.format import HF_PACK_NAME, HF_SOURCE_CARD, HF_WEIGHTS_STANDIN, META_VERSION  # noqa: E402
from hhtld.gates import heldout_texts  # noqa: E402
from hhtld.loader.compressed import CompressedEmbedding, CompressedLinear  # noqa: E402
from hhtld.loader.model_card import figure, percent  # noqa: E402

from .test_integrity import edited, setp  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
SENTENCES = heldout_texts()[:8]


@pytest.fixture(scope="module")
def minilm_report(minilm_dir, minilm_pack):
    """``hhtld verify`` of the MiniLM pack on 32 held-out sentences, as its JSON."""
    return hhtld.verify(minilm_dir, minilm_pack, texts=32).to_json()


@pytest.fixture(scope="module")
def minilm_hf(minilm_pack, minilm_report, tmp_path_factory):
    return hhtld.export_hf(minilm_pack, tmp_path_factory.mktemp("hf") / "minilm", verify_report=minilm_report,
                           command="hhtld export-hf minilm.hhtld minilm --verify-json report.json")


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_pack, tmp_path_factory):
    return hhtld.export_hf(smollm2_pack, tmp_path_factory.mktemp("hf") / "smollm2")


def compressed_modules(model) -> int:
    return sum(isinstance(m, (CompressedLinear, CompressedEmbedding)) for m in model.modules())


# --- the folder ---------------------------------------------------------------------------------
def test_the_folder_holds_config_side_files_pack_and_card_but_no_weights_file(minilm_hf, minilm_pack, minilm_dir):
    files = sorted(p.relative_to(minilm_hf).as_posix() for p in minilm_hf.rglob("*") if p.is_file())
    assert HF_PACK_NAME in files and "README.md" in files and "1_Pooling/config.json" in files
    assert not [f for f in files if f.startswith(("model.safetensors", "pytorch_model"))]
    assert (minilm_hf / HF_PACK_NAME).read_bytes() == Path(minilm_pack).read_bytes()
    assert (minilm_hf / HF_SOURCE_CARD).read_bytes() == (Path(minilm_dir) / "README.md").read_bytes()
    cfg = json.loads((minilm_hf / "config.json").read_text())
    pack = hhtld.open(minilm_pack)
    assert cfg["quantization_config"] == {"quant_method": "hhtld", "format_version": 2, "codec": "hhtl-vq",
                                          "bits_per_weight": round(16 / pack.storage_ratio(), 4),
                                          "pack": HF_PACK_NAME}
    assert cfg["transformers_weights"] == HF_WEIGHTS_STANDIN and cfg["dtype"] == "float32"
    source = json.loads((Path(minilm_dir) / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k not in ("quantization_config", "transformers_weights", "dtype")} == \
        {k: v for k, v in source.items() if k != "torch_dtype"}


def test_an_existing_folder_is_never_written_into(minilm_pack, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(OptionsError) as e:
        hhtld.export_hf(minilm_pack, tmp_path / "x")
    assert str(e.value) == f"{tmp_path / 'x'}: already exists and is not an empty folder; choose a new folder"
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporary folder left either


def test_the_model_card_carries_the_verify_reports_figures(minilm_hf, minilm_report):
    card = (minilm_hf / "README.md").read_text()
    for g in minilm_report["gates"]:
        assert f"| {g['gate']} | {g['name']} | {g['value']} | {g['target']} | {g['status']} |" in card
    kinds = minilm_report["gates"][1]["measured"]["kinds"]
    assert len(kinds) == 2
    for kind, v in kinds.items():
        row = (f"| {kind} | {v['texts']} | {percent(v['top1'])} | {percent(v['top10'])} | {figure(v['cos_mean'])} | "
               f"{figure(v['cos_min'])} |")
        assert row in card
    assert minilm_report["behaviour"]["texts_source"] in card
    assert f"{hhtld.open(minilm_hf / HF_PACK_NAME).storage_ratio():.2f}:1 against bfloat16" in card
    assert "`hhtld export-hf minilm.hhtld minilm --verify-json report.json`" in card
    assert "No behaviour was measured" not in card


def test_without_a_verify_report_the_card_says_nothing_was_measured(smollm2_hf):
    card = (smollm2_hf / "README.md").read_text()
    assert "No behaviour was measured for this folder" in card
    assert "| gate |" not in card and "KL" not in card


def test_a_verify_report_of_another_pack_is_refused(smollm2_pack, minilm_report, tmp_path):
    with pytest.raises(LoadError) as e:
        hhtld.export_hf(smollm2_pack, tmp_path / "x", verify_report=minilm_report)
    size = Path(smollm2_pack).stat().st_size
    assert str(e.value) == (f"verify report: the verify report is of another pack "
                            f"({minilm_report['storage']['file_bytes']} bytes, {smollm2_pack} has {size})")
    assert not (tmp_path / "x").exists()


# --- transformers and sentence-transformers --------------------------------------------------------
def test_minilm_through_automodel_and_sentence_transformer_agree_with_hhtld(minilm_hf, minilm_pack):
    model = transformers.AutoModel.from_pretrained(minilm_hf)
    ours = hhtld.load(minilm_pack, keep_compressed=True)
    assert compressed_modules(model) == compressed_modules(ours) > 0
    assert hhtld.weight_memory(model) == hhtld.weight_memory(ours)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_hf)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, ours(**batch).last_hidden_state)
    folder = st.SentenceTransformer(str(minilm_hf))
    reference = hhtld.load_sentence_transformer(minilm_pack, keep_compressed=True)
    np.testing.assert_array_equal(folder.encode(SENTENCES), reference.encode(SENTENCES))
    assert compressed_modules(folder) == compressed_modules(ours)


def test_smollm2_through_from_pretrained_and_pipeline_generates_as_hhtld(smollm2_hf, smollm2_pack):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf)
    ours = hhtld.load(smollm2_pack, keep_compressed=True)
    assert compressed_modules(model) == compressed_modules(ours) > 0
    assert model.get_input_embeddings().source is model.get_output_embeddings().source  # tied: one compressed weight
    assert hhtld.weight_memory(model) == hhtld.weight_memory(ours)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    x = tok(PROMPT, return_tensors="pt")
    greedy = model.generate(**x, max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, ours.generate(**x, max_new_tokens=8, do_sample=False))
    text = tok.decode(greedy[0], skip_special_tokens=True)
    pipe = transformers.pipeline("text-generation", model=str(smollm2_hf))
    assert pipe(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"] == text
    streamed = []

    class Collect(transformers.generation.streamers.BaseStreamer):
        def put(self, value):
            streamed.append(value.reshape(-1))

        def end(self):
            pass

    model.generate(**x, max_new_tokens=8, do_sample=False, streamer=Collect())
    assert torch.equal(torch.cat(streamed), greedy[0])
    sampled = []
    for _ in range(2):
        torch.manual_seed(7)
        sampled.append(model.generate(**x, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8))
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape == greedy.shape


def test_dtype_and_device_map_as_for_other_quantizers(smollm2_hf):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.bfloat16, device_map="auto")
    assert model.model.norm.weight.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert compressed_modules(model) > 0
    with pytest.raises(LoadError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, device_map={"model": "cpu", "lm_head": "disk"})
    assert str(e.value) == "hhtld: a pack loads onto one device, but device_map puts the model on cpu, disk"


def test_save_pretrained_is_refused_before_writing(smollm2_hf, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf)
    with pytest.raises(LoadError) as e:
        model.save_pretrained(tmp_path / "saved")
    assert str(e.value).startswith("save_pretrained would write this model's weights dense")
    assert not (tmp_path / "saved").exists()


# --- bad folders -------------------------------------------------------------------------------------
def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_folder_without_its_pack_is_named(smollm2_hf, tmp_path):
    d = copy_folder(smollm2_hf, tmp_path / "d")
    (d / HF_PACK_NAME).unlink()
    with pytest.raises(LoadError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(d)
    assert str(e.value) == (f"{d}: the folder has no {HF_PACK_NAME}, the hhtld pack its config.json names; "
                            "it is written by `hhtld export-hf PACK DIR`")


def test_a_damaged_pack_or_an_unknown_version_gets_the_packs_own_error(smollm2_hf, tmp_path):
    d = copy_folder(smollm2_hf, tmp_path / "d")
    pack = d / HF_PACK_NAME
    blob = bytearray(pack.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # inside the twigs
    pack.write_bytes(bytes(blob))
    with pytest.raises(PackError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(d)
    assert re.fullmatch(rf"{re.escape(str(pack))}: damaged hhtld pack \(checksum mismatch in '[^']+'\)", str(e.value))
    newer = edited(tmp_path, (smollm2_hf / HF_PACK_NAME).read_bytes(), header=setp("__metadata__", META_VERSION, "3"))
    newer.replace(pack)
    with pytest.raises(PackError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(d)
    assert str(e.value) == f"{pack}: pack format version 3 is newer than this hhtld reads (up to 2); upgrade hhtld"


def test_plain_transformers_fails_loudly_and_says_to_import_hhtld_hf(smollm2_hf, minilm_hf):
    script = (
        "import sys\n"
        "import transformers, sentence_transformers\n"
        "for what, load in (('auto', lambda: transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])),\n"
        "                   ('st', lambda: sentence_transformers.SentenceTransformer(sys.argv[2]))):\n"
        "    try:\n"
        "        load()\n"
        "        print(what, 'LOADED')\n"
        "    except Exception as e:\n"
        "        print(what, type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(smollm2_hf), str(minilm_hf)], capture_output=True,
                         text=True, timeout=300)
    lines = out.stdout.splitlines()
    assert lines == [f"auto FileNotFoundError No such file or directory: {smollm2_hf / HF_WEIGHTS_STANDIN}",
                     f"st FileNotFoundError No such file or directory: {minilm_hf / HF_WEIGHTS_STANDIN}"], out
    assert "import-hhtld.hf" in HF_WEIGHTS_STANDIN


# --- the command line ------------------------------------------------------------------------------------
def test_export_hf_command_and_encode_hf_dir(minilm_pack, minilm_report, small_folder, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(minilm_report))
    assert main(["export-hf", str(minilm_pack), str(tmp_path / "a"), "--verify-json", str(report), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["verified"] is True and got["passed"] == minilm_report["passed"] and HF_PACK_NAME in got["files"]
    assert f"`hhtld export-hf {minilm_pack} {tmp_path / 'a'} --verify-json {report} --json`" in \
        (tmp_path / "a" / "README.md").read_text()
    assert main(["export-hf", str(minilm_pack), str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err == (f"hhtld: error: {tmp_path / 'a'}: already exists and is not an empty folder; "
                                       "choose a new folder\n")
    report.write_text("{")
    assert main(["export-hf", str(minilm_pack), str(tmp_path / "b"), "--verify-json", str(report)]) == 1
    assert capsys.readouterr().err.startswith(f"hhtld: error: {report}: not a readable verify report (")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    assert main(["encode", str(small_folder), "-o", str(tmp_path / "s.hhtld"), "--hf-dir", str(tmp_path / "c"),
                 "--codec", "hhtl-f32", "-q"]) == 1
    assert not (tmp_path / "s.hhtld").exists()  # refused before any work
    assert main(["encode", str(small_folder), "-o", str(tmp_path / "s.hhtld"), "--hf-dir", str(tmp_path / "d"),
                 "--codec", "hhtl-f32", "-q"]) == 0
    assert (tmp_path / "d" / HF_PACK_NAME).read_bytes() == (tmp_path / "s.hhtld").read_bytes()
    assert "No behaviour was measured" in (tmp_path / "d" / "README.md").read_text()


def test_config_options_and_the_transformers_version_are_checked(monkeypatch):
    from hhtld import MissingDependencyError
    from hhtld.loader import hf_quantizer

    with pytest.raises(LoadError) as e:
        hhtld.hf.HhtldConfig(pack="../pack.safetensors")
    assert str(e.value) == "quantization_config.pack must be a *.safetensors file name in the folder, got " \
                           "'../pack.safetensors'"
    with pytest.raises(LoadError) as e:
        hhtld.hf.HhtldConfig(tables="int4")
    assert str(e.value) == "quantization_config.tables must be one of int16, float32, got 'int4'"
    monkeypatch.setattr(hf_quantizer.transformers, "__version__", "5.99.0")  # the module object hhtld.hf reads
    with pytest.raises(MissingDependencyError) as e:
        hf_quantizer.register()
    assert str(e.value) == ("hhtld.hf works with transformers 5.25.x (it follows transformers' loading steps), "
                            "found 5.99.0: pip install 'hhtld[hf]'")
