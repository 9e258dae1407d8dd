"""The bundled catalog: name lookup, suggestions, file contents, and exact parameter counts.

The parameter counts are checked against transformers itself: every entry's config is built
with AutoConfig.for_model and its model instantiated on the meta device (no memory, so even
405B takes a fraction of a second on CPU), then its parameters are summed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heavylift.model.catalog import (
    METADATA_KEY,
    CatalogEntry,
    catalog_entries,
    closest_models,
    find_model,
    require_model,
)
from heavylift.errors import ModelNotFoundError

SRC = Path(__file__).resolve().parents[2] / "src"
MODELS_DIR = SRC / "heavylift" / "data" / "models"
CATALOG_FILES = sorted(MODELS_DIR.glob("*.json"))

# Keys the planner reads from every config.json it sizes.
REQUIRED_CONFIG_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
    "rms_norm_eps", "torch_dtype", "bos_token_id", "eos_token_id",
)

# Fields a published config.json leaves to its config class's defaults (the planner applies them too:
# families.Family.defaults): Gemma 3's text_config names a dozen keys, gpt-oss gives no bos_token_id or dtype.
LEFT_TO_DEFAULTS = {
    "gemma3-27b": {"vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id"},
    "gpt-oss-20b": {"bos_token_id", "torch_dtype"},
    "gpt-oss-120b": {"bos_token_id", "torch_dtype"},
}

# Llama 3.1 8B, by hand: embeddings 128256 x 4096 = 525,336,576, twice (untied) = 1,050,673,152;
# one layer: q 4096x4096 16,777,216 + k,v 2 x 1024x4096 8,388,608 + o 16,777,216
# + gate/up/down 3 x 4096x14336 176,160,768 + two norms 8,192 = 218,112,000, x 32 layers
# = 6,979,584,000; final norm 4,096. Total 8,030,261,248. 70B and 405B follow the same sum.
LLAMA_31_PARAMS = {
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-405B": 405_853_388_800,
}


def test_catalog_has_one_entry_per_file():
    assert len(CATALOG_FILES) == 21
    assert len(catalog_entries()) == len(CATALOG_FILES)
    assert all(isinstance(entry, CatalogEntry) for entry in catalog_entries())


def test_lookup_by_hub_id():
    entry = find_model("meta-llama/Llama-3.1-8B")
    assert entry is not None
    assert entry.hub_id == "meta-llama/Llama-3.1-8B"
    assert entry.aliases == ("llama3.1-8b", "llama-3.1-8b")
    assert entry.params == 8_030_261_248


@pytest.mark.parametrize(
    ("name", "hub_id"),
    [
        ("llama3.1-8b", "meta-llama/Llama-3.1-8B"),  # alias
        ("llama-3.1-8b", "meta-llama/Llama-3.1-8B"),  # second alias
        ("LLAMA3.1-70B", "meta-llama/Llama-3.1-70B"),  # any case
        ("META-LLAMA/llama-3.1-405b", "meta-llama/Llama-3.1-405B"),  # hub id, any case
        ("Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),  # the hub id's last part
        ("Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-v0.1"),
        ("phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct"),
        ("gemma-2-27b", "google/gemma-2-27b"),
        (" qwen2.5-72b ", "Qwen/Qwen2.5-72B"),  # surrounding blanks are not part of a name
    ],
)
def test_lookup_by_alias_case_and_last_part(name, hub_id):
    entry = find_model(name)
    assert entry is not None and entry.hub_id == hub_id


def test_unknown_name_is_none():
    assert find_model("llama3-8b") is None
    assert find_model("meta-llama/Llama-3.1-8B-Instruct") is None


@pytest.mark.parametrize(
    ("name", "first_suggestion"),
    [
        ("llama3-8b", "llama3.1-8b"),
        ("Llama-3-70B", "llama3.1-70b"),
        ("gemma-9b", "gemma2-9b"),
        ("mixtral", "mixtral-8x7b"),
        ("qwen-72b", "qwen2.5-72b"),
        ("meta-llama/llama-3-8b", "meta-llama/Llama-3.1-8B"),
    ],
)
def test_unknown_names_get_sensible_suggestions(name, first_suggestion):
    suggestions = closest_models(name)
    assert suggestions[0] == first_suggestion
    assert len(suggestions) <= 3
    assert len({find_model(s).hub_id for s in suggestions}) == len(suggestions)  # one per model


def test_nonsense_gets_no_suggestions():
    assert closest_models("zzzz") == []
    assert closest_models("llama3-8b", n=1) == ["llama3.1-8b"]


def test_require_model_raises_with_did_you_mean():
    assert require_model("llama3.1-8b").hub_id == "meta-llama/Llama-3.1-8B"
    with pytest.raises(ModelNotFoundError, match=r"did you mean llama3\.1-8b"):
        require_model("llama3-8b")
    with pytest.raises(ModelNotFoundError, match="bundled models: deepseek-v3, gemma2-27b"):
        require_model("zzzz")


@pytest.mark.parametrize("path", CATALOG_FILES, ids=lambda p: p.stem)
def test_catalog_file_parses_and_has_required_keys(path):
    document = json.loads(path.read_text(encoding="utf-8"))
    meta = document.pop(METADATA_KEY)
    assert set(meta) == {"hub_id", "aliases", "params"}
    assert meta["aliases"][0] == path.stem  # the file is named after the first alias
    assert isinstance(meta["params"], int) and meta["params"] > 0
    text = document.get("text_config", {})  # a multimodal config: its language model's fields
    missing = {key for key in REQUIRED_CONFIG_KEYS if key not in document and key not in text}
    assert missing == LEFT_TO_DEFAULTS.get(path.stem, set()), f"{path.name} lacks {missing}"
    entry = find_model(path.stem)
    assert entry.config_dict() == document  # the entry's config is the file minus METADATA_KEY


def test_config_is_read_only_all_the_way_down():
    entry = find_model("llama3.1-8b")
    with pytest.raises(TypeError):
        entry.config["hidden_size"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        entry.config["rope_scaling"]["factor"] = 1.0  # type: ignore[index]
    copy = entry.config_dict()
    copy["rope_scaling"]["factor"] = 1.0
    assert entry.config["rope_scaling"]["factor"] == 8.0


@pytest.mark.parametrize(
    ("name", "facts"),
    [
        ("gemma2-9b", {"head_dim": 256, "num_key_value_heads": 8, "query_pre_attn_scalar": 256}),
        ("gemma2-27b", {"head_dim": 128, "num_key_value_heads": 16, "query_pre_attn_scalar": 144}),
        ("phi3-mini", {"vocab_size": 32064, "num_key_value_heads": 32,
                       "tie_word_embeddings": False}),
        ("qwen2.5-7b", {"num_attention_heads": 28, "num_key_value_heads": 4,
                        "tie_word_embeddings": False}),
        ("qwen2.5-72b", {"tie_word_embeddings": False, "num_key_value_heads": 8}),
        ("llama3.2-1b", {"tie_word_embeddings": True, "head_dim": 64}),
        ("llama3.2-3b", {"tie_word_embeddings": True, "head_dim": 128}),
        ("mixtral-8x7b", {"num_local_experts": 8, "num_experts_per_tok": 2}),
        ("llama3.1-405b", {"num_key_value_heads": 8, "tie_word_embeddings": False}),
    ],
)
def test_architecture_facts(name, facts):
    config = find_model(name).config
    assert {key: config[key] for key in facts} == facts


@pytest.mark.parametrize("entry", catalog_entries(), ids=lambda e: e.aliases[0])
def test_params_match_a_meta_device_build(entry):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**entry.config_dict())
    text = config.get_text_config(decoder=True)  # a multimodal entry: its language model, which heavylift plans
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
    if text is config:
        assert type(model).__name__ == entry.config["architectures"][0]
    # parameters() yields a tied embedding once, which is how `params` counts it.
    assert sum(p.numel() for p in model.parameters()) == entry.params
    if entry.hub_id in LLAMA_31_PARAMS:
        assert entry.params == LLAMA_31_PARAMS[entry.hub_id]


def test_importing_the_catalog_does_not_import_torch():
    probe = (
        "import sys, heavylift.model.catalog as c; c.catalog_entries(); c.find_model('llama3.1-8b');"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
