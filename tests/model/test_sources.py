"""Model input: local folders with real safetensors headers, the catalog, the hub cache."""

from __future__ import annotations

import json
import shutil

import pytest

from heavylift.model.architecture import architecture_from_config
from heavylift.errors import (CheckpointError, ConfigError, InventoryMismatchError, ModelNotFoundError,
                              UnsupportedArchitectureError)
from heavylift.model.source import resolve_model

from conftest import TINY_FAMILIES, TINY_LLAMA, save_tiny_checkpoint, write_config


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_header_inventory_equals_config_inventory(tmp_path, family):
    folder = save_tiny_checkpoint(tmp_path / family, family)
    source = resolve_model(str(folder))
    assert source.origin == "local" and source.checkpoint is not None
    expected = {t.name: t.shape for t in source.architecture.tensors}
    assert {n: i.shape for n, i in source.checkpoint.tensors.items()} == expected


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    source = resolve_model(str(tmp_path))
    assert len(source.checkpoint.files) > 1
    assert len(source.checkpoint.tensors) == len(source.architecture.tensors)


def test_header_that_disagrees_with_config_is_refused(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "llama")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InventoryMismatchError, match="mlp.*96.*config.json"):
        resolve_model(str(folder))


def test_truncated_shard_is_named(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "llama")
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        resolve_model(str(folder))


def test_user_files_are_never_modified(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "mixtral")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    resolve_model(str(folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("text, error, match", [
    ("{", ConfigError, "malformed or truncated"),
    ('{"model_type": "llama", "hidden_size": 64', ConfigError, "malformed or truncated"),
    ("[1, 2]", ConfigError, "JSON object"),
    ('{"model_type": "llama"}', ConfigError, "hidden_size"),
    ('{"model_type": "llama", "hidden_size": -4, "num_hidden_layers": 2}', ConfigError,
     "'hidden_size' is -4; it must be an integer from 1 to 1,048,576"),
    ('{"model_type": "bert", "hidden_size": 8}', UnsupportedArchitectureError, "llama, mistral, mixtral"),
])
def test_bad_config_json(tmp_path, text, error, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(error, match=match):
        resolve_model(str(tmp_path))


def test_missing_path_and_unknown_names():
    with pytest.raises(ModelNotFoundError, match="no folder or catalog model"):
        resolve_model("./no/such/folder")
    with pytest.raises(ModelNotFoundError, match="did you mean llama3.1-8b"):
        resolve_model("llama3-8b")


def test_hub_id_offline_and_not_cached_is_one_clear_error():
    with pytest.raises(ModelNotFoundError, match="not in the hub cache.*HF_HUB_OFFLINE"):
        resolve_model("someone/not-a-model")


def test_hub_id_is_read_from_the_cache_offline(tmp_path):
    """A model the user downloaded before is planned from the hub cache with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    repo = constants.HF_HUB_CACHE and __import__("pathlib").Path(constants.HF_HUB_CACHE) / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    save_tiny_checkpoint(snapshot, "qwen2")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    try:
        source = resolve_model("acme/tiny")
        assert source.origin == "hub" and source.architecture.model_type == "qwen2"
        assert source.checkpoint is not None
    finally:
        shutil.rmtree(repo)


def test_catalog_entry_plans_offline():
    source = resolve_model("meta-llama/Llama-3.1-405B")
    assert source.origin == "catalog" and source.architecture.params == 405_853_388_800


def test_config_inventory_for_phi3_is_fused():
    arch = architecture_from_config({**TINY_LLAMA, "model_type": "phi3"})
    names = {t.name for t in arch.layer_tensors(0)}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
