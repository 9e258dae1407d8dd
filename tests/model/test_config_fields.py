"""config.json fields: head size and sliding windows derived in one place, and every field checked before use."""

from __future__ import annotations

import pytest

from heavylift.defaults import MAX_PARAMETERS, MAX_TENSORS
from heavylift.errors import ConfigError, UnsupportedArchitectureError
from heavylift.model.architecture import architecture_from_config, head_dim_of, layer_windows_of
from heavylift.model.catalog import catalog_entries

from conftest import TINY_FAMILIES, TINY_LLAMA

PLANNED = ("llama, mistral, mixtral, qwen2, gemma2, phi3, qwen3, qwen3_moe, gemma3_text, llama4_text, deepseek_v3, "
           "gpt_oss")
MISTRAL = TINY_FAMILIES["mistral"]
QWEN2 = TINY_FAMILIES["qwen2"]


# --- head_dim ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "head_dim"), [
    (TINY_LLAMA, 16),  # 64 / 4 heads
    ({**TINY_LLAMA, "head_dim": 32}, 32),  # given: wins over 64 / 4
    ({**TINY_LLAMA, "head_dim": None}, 16),  # null: derived, as transformers does
    ({**TINY_FAMILIES["gemma2"], "head_dim": None}, 256),  # Gemma2Config's default, not 64 / 4
    ({**TINY_LLAMA, "hidden_size": 66, "head_dim": 16}, 16),  # given: the heads need not divide the width
])
def test_head_dim(config, head_dim):
    assert head_dim_of(config) == head_dim == architecture_from_config(config).head_dim


def test_heads_that_do_not_divide_the_width_without_head_dim_are_refused():
    with pytest.raises(ConfigError) as caught:
        head_dim_of({**TINY_LLAMA, "hidden_size": 66}, "m/config.json")
    assert str(caught.value) == ("m/config.json: num_attention_heads 4 does not divide hidden_size 66 and there is "
                                 "no head_dim; fix one of them or give head_dim")


# --- sliding windows --------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "windows"), [
    (TINY_LLAMA, (None, None)),
    (MISTRAL, (32, 32)),
    ({k: v for k, v in MISTRAL.items() if k != "sliding_window"}, (4096, 4096)),  # MistralConfig's default
    ({**MISTRAL, "sliding_window": None}, (None, None)),
    ({**MISTRAL, "sliding_window": 0}, (None, None)),
    ({**MISTRAL, "layer_types": ["full_attention", "sliding_attention"]}, (None, 32)),
    (TINY_FAMILIES["gemma2"], (16, None)),  # alternates, sliding first
    ({**QWEN2, "sliding_window": 32}, (None, None)),  # use_sliding_window is false by default
    ({**QWEN2, "sliding_window": 32, "use_sliding_window": True, "max_window_layers": 1}, (None, 32)),
    ({**QWEN2, "sliding_window": 32, "use_sliding_window": True}, (None, None)),  # slides from layer 28 on
])
def test_layer_windows(config, windows):
    assert layer_windows_of(config) == windows == architecture_from_config(config).layer_windows


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_derived_from_transformers_config_as_from_config_json(family):
    """The engine and the loader derive from a transformers config (its to_dict()), the planner from config.json:
    the same function gives both the same head size and windows, class defaults included."""
    from transformers import AutoConfig

    raw = {k: v for k, v in TINY_FAMILIES[family].items() if k not in ("head_dim", "sliding_window")}
    loaded = AutoConfig.for_model(**raw).to_dict()
    assert head_dim_of(loaded) == head_dim_of(raw)
    assert layer_windows_of(loaded) == layer_windows_of(raw)


@pytest.mark.parametrize(("types", "message"), [
    (["full_attention"], "m/config.json lists 1 layer_types for 2 layers; fix one of the two"),
    (["full_attention", "chunked_attention"],
     "m/config.json: 'layer_types' must be a list of \"sliding_attention\" and \"full_attention\", one per layer"),
    ("full_attention",
     "m/config.json: 'layer_types' must be a list of \"sliding_attention\" and \"full_attention\", one per layer"),
])
def test_bad_layer_types(types, message):
    with pytest.raises(ConfigError) as caught:
        layer_windows_of({**MISTRAL, "layer_types": types}, "m/config.json")
    assert str(caught.value) == message


# --- field checks -----------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "rule"), [
    ("num_hidden_layers", None, "an integer from 1 to 4,096"),
    ("num_hidden_layers", True, "an integer from 1 to 4,096"),
    ("num_hidden_layers", "2", "an integer from 1 to 4,096"),
    ("num_hidden_layers", 2.0, "an integer from 1 to 4,096"),
    ("num_hidden_layers", -2, "an integer from 1 to 4,096"),
    ("num_hidden_layers", 10**12, "an integer from 1 to 4,096"),
    ("hidden_size", 10**12, "an integer from 1 to 1,048,576"),
    ("intermediate_size", 0, "an integer from 1 to 4,194,304"),
    ("vocab_size", 2**24 + 1, "an integer from 1 to 16,777,216"),
    ("num_attention_heads", [4], "an integer from 1 to 4,096"),
    ("num_key_value_heads", 8, "an integer from 1 to 4"),  # more KV heads than query heads
    ("head_dim", 0, "an integer from 1 to 4,096"),
    ("max_position_embeddings", 0, "an integer from 1 to 16,777,216"),
    ("sliding_window", -1, "an integer from 0 to 16,777,216"),
    ("tie_word_embeddings", "false", "true or false"),
    ("attention_bias", 1, "true or false"),
])
def test_a_bad_field_is_named_with_its_value_and_rule(field, value, rule):
    import json

    with pytest.raises(ConfigError) as caught:
        architecture_from_config({**TINY_LLAMA, field: value}, "m/config.json")
    assert str(caught.value) == f"m/config.json: '{field}' is {json.dumps(value)}; it must be {rule}"


def test_experts_per_token_cannot_exceed_the_experts():
    with pytest.raises(ConfigError) as caught:
        architecture_from_config({**TINY_FAMILIES["mixtral"], "num_experts_per_tok": 5}, "m/config.json")
    assert str(caught.value) == "m/config.json: 'num_experts_per_tok' is 5; it must be an integer from 1 to 4"


def test_a_missing_field_is_named():
    config = {k: v for k, v in TINY_LLAMA.items() if k != "vocab_size"}
    with pytest.raises(ConfigError) as caught:
        architecture_from_config(config, "m/config.json")
    assert str(caught.value) == ("m/config.json has no 'vocab_size', which a llama model needs; "
                                 "copy it from the model's published config.json")


@pytest.mark.parametrize(("model_type", "error", "message"), [
    (None, ConfigError, f'm/config.json has no "model_type"; heavylift plans: {PLANNED}'),
    ("bert", UnsupportedArchitectureError,
     f'm/config.json: model_type "bert" is not supported; heavylift plans: {PLANNED}'),
    (["llama"], UnsupportedArchitectureError,
     f'm/config.json: model_type ["llama"] is not supported; heavylift plans: {PLANNED}'),
])
def test_model_type(model_type, error, message):
    config = {**TINY_LLAMA, "model_type": model_type}
    with pytest.raises(error) as caught:
        architecture_from_config({k: v for k, v in config.items() if v is not None}, "m/config.json")
    assert str(caught.value) == message


def test_too_many_tensors_are_refused_before_they_are_built():
    # 100 layers of 4 attention weights, a router, 4,096 x 3 expert weights and 2 norms: 12,295 each
    config = {**TINY_FAMILIES["mixtral"], "num_hidden_layers": 100, "num_local_experts": 4096}
    with pytest.raises(ConfigError) as caught:
        architecture_from_config(config, "m/config.json")
    assert str(caught.value) == (f"m/config.json describes 100 layers of 12,295 tensors, more than the {MAX_TENSORS:,} "
                                 "heavylift plans; check num_hidden_layers and num_local_experts")


def test_too_many_parameters_are_refused():
    # embeddings and lm_head 2 x 2^24 x 2^20 = 2^45; a layer's q, k, v, o 4 x 2^40, MLP 3 x 2^42 and 2 norms of
    # 2^20 make 2^44 + 2^21, 4 layers 2^46 + 2^23; the final norm 2^20: 105,553,125,703,680 in all
    config = {**TINY_LLAMA, "hidden_size": 2**20, "intermediate_size": 2**22, "num_attention_heads": 1024,
              "num_key_value_heads": 1024, "vocab_size": 2**24, "num_hidden_layers": 4}
    with pytest.raises(ConfigError) as caught:
        architecture_from_config(config, "m/config.json")
    assert str(caught.value) == ("m/config.json describes 105,553,125,703,680 parameters, more than the "
                                 f"{MAX_PARAMETERS:,} heavylift plans; check num_hidden_layers, hidden_size, "
                                 "intermediate_size and vocab_size")


def test_attention_wider_than_a_model_can_be_is_refused():
    config = {**TINY_LLAMA, "num_attention_heads": 4096, "num_key_value_heads": 1, "head_dim": 4096}
    with pytest.raises(ConfigError) as caught:
        architecture_from_config(config, "m/config.json")
    assert str(caught.value) == ("m/config.json: 4096 heads of 4096 make attention 16,777,216 wide; it must be at "
                                 "most 1,048,576; check num_attention_heads and head_dim")


@pytest.mark.parametrize("entry", catalog_entries(), ids=lambda e: e.aliases[0])
def test_every_catalog_model_passes_the_checks_and_groups_its_layers(entry):
    arch = architecture_from_config(entry.config_dict())
    assert [t for i in range(arch.num_layers) for t in arch.layer_tensors(i)] + list(arch.global_tensors()) == \
        sorted(arch.tensors, key=lambda t: (t.layer is None, t.layer or 0))
    assert arch.layer_tensors(arch.num_layers) == ()


# --- the MLP's activation ---------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_the_mlp_activation_is_the_one_transformers_builds(family):
    """hidden_act (Gemma's hidden_activation) from config.json, else the config class's default."""
    from transformers import AutoConfig

    from heavylift.model.families import FAMILIES

    key = FAMILIES[family].activation_key
    for config in (TINY_FAMILIES[family], {**TINY_FAMILIES[family], key: "relu"}):
        expected = getattr(AutoConfig.for_model(**config), key)
        assert architecture_from_config(config).mlp_activation == expected


def test_an_activation_that_is_not_a_name_is_refused():
    with pytest.raises(ConfigError) as caught:
        architecture_from_config({**TINY_LLAMA, "hidden_act": 3}, "m/config.json")
    assert str(caught.value) == "m/config.json: 'hidden_act' is 3; it must name an activation, such as \"silu\""
