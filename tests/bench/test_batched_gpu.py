"""bench/batched_gpu.py on CPU: --model picks the catalog shape the engine is built in, Qwen 3's q and k norms
included, and every decode record names it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import batched_gpu as bg  # noqa: E402

from conftest import TINY_FAMILIES  # noqa: E402


def test_model_config_is_the_catalog_shape_in_its_familys_config_class():
    qwen3, llama = bg.model_config("qwen3-8b"), bg.model_config()
    assert type(qwen3).__name__ == "Qwen3Config" and type(llama).__name__ == "LlamaConfig"
    assert (qwen3.num_hidden_layers, qwen3.hidden_size, qwen3.head_dim, qwen3.intermediate_size) == (36, 4096, 128,
                                                                                                      12288)
    assert llama.num_hidden_layers == 32


def test_a_model_the_engine_does_not_run_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="^--model gemma3-27b: the fast engine runs llama, mistral, qwen2, qwen3 "
                                         "layers.*; choose a model the engine runs, such as llama3.1-8b or qwen3-8b$"):
        bg.model_config("gemma3-27b")
    with pytest.raises(SystemExit, match="^--model: 'qwen9' is not in heavylift's bundled catalog"):
        bg.model_config("qwen9")


def _transformers_twin(engine, config):
    """transformers' model of `config` holding the engine's weights (dense storage dequantized)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    inner = model.model
    with torch.no_grad():
        inner.embed_tokens.weight.copy_(engine.embed)
        inner.norm.weight.copy_(engine.norm)
        model.lm_head.weight.copy_(engine.lm_head.dequantize(torch.bfloat16))
        for block, layer in zip(inner.layers, engine.layers):
            attn, mlp = block.self_attn, block.mlp
            block.input_layernorm.weight.copy_(layer.ln1)
            block.post_attention_layernorm.weight.copy_(layer.ln2)
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            for linear, w in zip(linears, (*layer.qkv, layer.o, layer.gate, layer.up, layer.down)):
                linear.weight.copy_(w.dequantize(torch.bfloat16))
            attn.q_norm.weight.copy_(layer.qk_norm[0])
            attn.k_norm.weight.copy_(layer.qk_norm[1])
    return model


def test_a_random_qwen3_engine_computes_qwen3s_forward():
    """Engine.from_random of a Qwen 3 config carries per-head q and k norms: its prefill gives transformers'
    Qwen3 logits over the same weights exactly, and without the norms it would not."""
    from dataclasses import replace

    from transformers import AutoConfig

    from heavylift.engine import Engine
    from heavylift.engine import weights as W

    config = AutoConfig.for_model(**{**TINY_FAMILIES["qwen3"], "vocab_size": 320})
    engine = Engine.from_random(config, W.DENSE, "cpu", batch=1, context=32, ops="torch")
    assert [tuple(n.shape) for layer in engine.layers for n in layer.qk_norm] == [(16,)] * 4
    ids = [1, 5, 9, 42, 7, 3]
    with torch.inference_mode():
        reference = _transformers_twin(engine, config)(torch.tensor([ids])).logits[0, -1]
    assert torch.equal(engine.prefill(ids)[-1].float(), reference.float())
    unnormed = Engine(engine.shape, [replace(layer, qk_norm=None) for layer in engine.layers], engine.embed,
                      engine.norm, engine.lm_head, engine.rotary, 1, 32, "torch")
    assert (unnormed.prefill(ids)[-1].float() - reference.float()).abs().max() > 0.05
    llama = Engine.from_random(AutoConfig.for_model(**TINY_FAMILIES["llama"]), W.DENSE, "cpu", batch=1, context=32,
                               ops="torch")
    assert all(layer.qk_norm is None for layer in llama.layers)


def test_decode_records_name_the_model_shape(monkeypatch):
    from transformers import AutoConfig

    from heavylift.engine import Engine
    from heavylift.engine import weights as W
    from heavylift.runtime import benchmark

    engine = Engine.from_random(AutoConfig.for_model(**{**TINY_FAMILIES["qwen3"], "vocab_size": 320}), W.DENSE,
                                "cpu", batch=1, context=16, ops="torch")
    monkeypatch.setattr(benchmark, "engine_decode_tok_s", lambda engine, batch, prompt, new: 100.0 * batch)
    saved = []
    records = bg.decode_records(engine, "qwen3-8b", "bf16", [1, 4], False,
                                {"bandwidth_bytes_s": 3.35e12, "flops_s": 989e12}, saved.append)
    assert [(r["model"], r["batch"], r["decode_tok_s"]) for r in records] == [("qwen3-8b-shape", 1, 100.0),
                                                                              ("qwen3-8b-shape", 4, 400.0)]
    assert saved == records
