"""Classification (docs/design.md §1) on real tensor names of MiniLM, Llama/Qwen2, GPT-2, Qwen3-TTS."""

from __future__ import annotations

import pytest

from hhtld import OptionsError, open_checkpoint
from hhtld.classify import EncodablePolicy, RoleRule, classify_component, classify_role, effective_shape, is_encodable, plan_checkpoint, should_use_leaf
from hhtld.classify import DEFAULT_RULES, load_rules_file, parse_rule, plan_tensor

LLAMA_QWEN2 = {
    "model.embed_tokens.weight": "embed",
    "model.layers.0.self_attn.q_proj.weight": "qko",
    "model.layers.0.self_attn.k_proj.weight": "qko",
    "model.layers.0.self_attn.v_proj.weight": "v",
    "model.layers.0.self_attn.o_proj.weight": "qko",
    "model.layers.0.self_attn.q_proj.bias": "qko",  # Qwen2 has q/k/v biases
    "model.layers.0.mlp.gate_proj.weight": "gate",
    "model.layers.0.mlp.up_proj.weight": "up",
    "model.layers.0.mlp.down_proj.weight": "down",
    "model.layers.0.input_layernorm.weight": "other",
    "model.layers.0.post_attention_layernorm.weight": "other",
    "model.norm.weight": "other",
    "lm_head.weight": "lm_head",
}

GPT2 = {
    "transformer.wte.weight": ("embed", False),
    "transformer.wpe.weight": ("embed", False),
    "transformer.h.0.ln_1.weight": ("other", False),
    "transformer.h.0.attn.c_attn.weight": ("qko", True),
    "transformer.h.0.attn.c_attn.bias": ("qko", False),
    "transformer.h.0.attn.c_proj.weight": ("qko", True),
    "transformer.h.0.mlp.c_fc.weight": ("up", True),
    "transformer.h.0.mlp.c_proj.weight": ("down", True),
    "transformer.ln_f.weight": ("other", False),
}

QWEN3_TTS = {
    "talker.model.codec_embedding.weight": ("talker", "embed"),
    "talker.model.text_embedding.weight": ("talker", "embed"),
    "talker.model.layers.0.self_attn.q_proj.weight": ("talker", "qko"),
    "talker.model.layers.0.self_attn.v_proj.weight": ("talker", "v"),
    "talker.model.layers.0.mlp.gate_proj.weight": ("talker", "gate"),
    "talker.model.layers.0.mlp.down_proj.weight": ("talker", "down"),
    "talker.codec_head.weight": ("talker", "lm_head"),
    "talker.text_projection.linear_fc1.weight": ("talker", "projection"),
    "talker.code_predictor.model.layers.0.self_attn.k_proj.weight": ("code_predictor", "qko"),
    "talker.code_predictor.model.layers.0.mlp.up_proj.weight": ("code_predictor", "up"),
    "talker.code_predictor.model.codec_embedding.0.weight": ("code_predictor", "embed"),
    "talker.code_predictor.lm_head.0.weight": ("code_predictor", "lm_head"),
    "speaker_encoder.blocks.0.conv.weight": ("speaker_encoder", "other"),
    "speaker_encoder.fc.weight": ("speaker_encoder", "other"),
}


def test_minilm_real_names(minilm_dir):
    ck = open_checkpoint(minilm_dir)
    roles = {n: classify_role(n) for n in ck.tensors}
    assert roles["embeddings.word_embeddings.weight"] == "embed"
    assert roles["embeddings.position_embeddings.weight"] == "embed"
    assert roles["embeddings.token_type_embeddings.weight"] == "embed"
    for i in range(6):
        p = f"encoder.layer.{i}."
        assert roles[p + "attention.self.query.weight"] == "qko"
        assert roles[p + "attention.self.key.weight"] == "qko"
        assert roles[p + "attention.self.value.weight"] == "v"
        assert roles[p + "attention.output.dense.weight"] == "qko"
        assert roles[p + "intermediate.dense.weight"] == "up"
        assert roles[p + "output.dense.weight"] == "down"
        assert roles[p + "output.LayerNorm.weight"] == "other"
        assert classify_component(p + "output.dense.weight") == "encoder"
    assert roles["pooler.dense.weight"] == "projection"
    assert classify_component("embeddings.word_embeddings.weight") == "other"


def test_minilm_groups_default_and_encode_all(minilm_dir):
    ck = open_checkpoint(minilm_dir)
    plan = plan_checkpoint(ck)
    keys = [str(g.key) for g in plan.groups]
    # reference thresholds: >= 512 rows and > 100 kB; 384-row attention matrices stay dense
    assert keys == ["other/embed/512x384", "other/embed/30522x384", "encoder/up/1536x384"]
    plan_all = plan_checkpoint(ck, EncodablePolicy(encode_all=True))
    by_key = {str(g.key): len(g.tensors) for g in plan_all.groups}
    assert by_key["encoder/qko/384x384"] == 18
    assert by_key["encoder/v/384x384"] == 6
    assert by_key["encoder/down/384x1536"] == 6
    assert plan_all.tensors["embeddings.position_ids"].encoded is False  # I64 passthrough
    assert plan_all.tensors["encoder.layer.0.output.dense.bias"].reason == "1-D"


@pytest.mark.parametrize("name,role", LLAMA_QWEN2.items())
def test_llama_qwen2_roles(name, role):
    assert classify_role(name) == role


@pytest.mark.parametrize("name,expected", GPT2.items())
def test_gpt2_roles_and_conv1d_transposition(name, expected):
    role, transposed = expected
    assert classify_role(name) == role
    assert DEFAULT_RULES.transposed(name) is transposed


def test_gpt2_conv1d_rows_are_output_features():
    # c_fc stores [in=768, out=3072]; rows of the encoded matrix are the 3072 output features
    tp = plan_tensor("transformer.h.0.mlp.c_fc.weight", "model.safetensors", "F32", (768, 3072),
                     768 * 3072 * 4, EncodablePolicy(), DEFAULT_RULES)
    assert tp.transposed and tp.row_shape == (3072, 768) and tp.encoded
    assert str(tp.key) == "other/up/3072x768"


@pytest.mark.parametrize("name,expected", QWEN3_TTS.items())
def test_qwen3_tts(name, expected):
    component, role = expected
    assert classify_component(name) == component
    assert classify_role(name) == role


def test_should_use_leaf_exactly_index_roles():
    assert {r for r in ("qko", "v", "gate", "up", "down", "embed", "lm_head", "projection", "other")
            if should_use_leaf(r)} == {"embed", "lm_head"}


def test_effective_shape():
    assert effective_shape((4, 5)) == (4, 5)
    assert effective_shape((4, 5, 1)) == (4, 5)
    assert effective_shape((4, 5, 3)) == (4, 15)
    assert effective_shape((2, 3, 4, 5)) == (2, 60)
    assert effective_shape((7,)) == (7,)


def test_is_encodable_thresholds():
    assert is_encodable((512, 64), 512 * 64 * 4)  # 131 kB > 100 kB
    assert not is_encodable((511, 64), 511 * 64 * 4)  # too few rows
    assert not is_encodable((512, 48), 100_000)  # not MORE than 100 kB
    assert is_encodable((512, 64, 1), 512 * 64 * 4)  # kernel-size-1 conv
    assert not is_encodable((512, 64, 3), 512 * 64 * 12)
    assert not is_encodable((4096,), 16384)
    assert is_encodable((384, 384), 384 * 384 * 4, EncodablePolicy(min_rows=384))
    assert is_encodable((2, 8), 64, EncodablePolicy(encode_all=True))


def test_user_rules_override_the_table(tmp_path):
    rules = DEFAULT_RULES.with_overrides([parse_rule(r"my_table=embed")])
    assert rules.role("blocks.0.my_table.weight") == "embed"
    assert rules.role("model.layers.0.mlp.up_proj.weight") == "up"
    # an override in front wins over the built-in rule
    rules = DEFAULT_RULES.with_overrides([RoleRule(r"up_proj", "down")])
    assert rules.role("model.layers.0.mlp.up_proj.weight") == "down"
    f = tmp_path / "rules.json"
    f.write_text('[{"pattern": "wqkv", "role": "qko", "transposed": true}]')
    (rule,) = load_rules_file(f)
    assert rule == RoleRule("wqkv", "qko", True)
    assert parse_rule("c_x=up:transposed") == RoleRule("c_x", "up", True)


def test_group_by_input_puts_pairs_of_one_input_together_and_ties_them():
    rules = DEFAULT_RULES.group_by("input")
    assert DEFAULT_RULES.group_by("role") is DEFAULT_RULES
    assert rules.group_by("input") is rules  # asked twice: the pairs once
    layer = "model.layers.3."
    assert [rules.role(layer + n + ".weight") for n in ("mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                        "self_attn.v_proj", "self_attn.q_proj")] == \
        ["up", "up", "v", "v", "qko"]
    assert rules.tie(layer + "mlp.gate_proj.weight") == layer + "mlp.up_proj.weight"
    assert rules.tie(layer + "self_attn.k_proj.weight") == layer + "self_attn.v_proj.weight"
    assert rules.tie(layer + "mlp.up_proj.weight") == layer + "mlp.up_proj.weight"
    assert rules.tie(layer + "self_attn.q_proj.weight") == layer + "self_attn.q_proj.weight"
    bert = "encoder.layer.0.attention.self."
    assert (rules.role(bert + "key.weight"), rules.tie(bert + "key.weight")) == ("v", bert + "value.weight")
    assert DEFAULT_RULES.tie(layer + "mlp.gate_proj.weight") == layer + "mlp.gate_proj.weight"
    # a user's rule still wins over the pairs' roles
    mine = DEFAULT_RULES.with_overrides([parse_rule("gate_proj=gate")]).group_by("input")
    assert mine.role(layer + "mlp.gate_proj.weight") == "gate"
    with pytest.raises(OptionsError, match=r"^group-by 'shape': expected one of role, input$"):
        DEFAULT_RULES.group_by("shape")


def test_bad_rules_are_clear_errors(tmp_path):
    with pytest.raises(OptionsError, match=r"^rule 'x': unknown role 'bogus' \(roles: qko, v, gate"):
        parse_rule("x=bogus")
    with pytest.raises(OptionsError, match=r"^--rule 'noequals': expected PATTERN=ROLE"):
        parse_rule("noequals")
    with pytest.raises(OptionsError, match=r"^rule '\(': not a valid regular expression"):
        parse_rule("(=up")
    f = tmp_path / "r.json"
    f.write_text("not json")
    with pytest.raises(OptionsError, match=r"r\.json: rules file is not valid JSON"):
        load_rules_file(f)
