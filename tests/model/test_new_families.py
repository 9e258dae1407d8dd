"""Qwen 3, Qwen 3 MoE, Gemma 3, Llama 4, DeepSeek-V3 and gpt-oss: every tensor heavylift derives from config.json
against the model transformers 5.24 builds on the meta device, and the catalog's entries against their
published sizes."""

from __future__ import annotations

import pytest
import torch

from heavylift.model.architecture import architecture_from_config, layer_types_of, layer_windows_of
from heavylift.model.catalog import find_model
from heavylift.model.tensors import FP32_ALWAYS, Role

from conftest import TINY_FAMILIES

NEW = ("qwen3", "qwen3_moe", "gemma3_text", "llama4_text", "deepseek_v3", "gpt_oss")


def _meta_model(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    built = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(built.get_text_config(decoder=True))


def _runtime_shapes(arch) -> dict[str, tuple[int, ...]]:
    """The inventory as the loaded model holds it: per-expert checkpoint tensors stacked into their fused
    parameter (gate and up concatenated), Mixtral's block_sparse_moe renamed as transformers renames it."""
    shapes: dict[str, tuple[int, ...]] = {}
    parts: dict[str, list] = {}
    for t in arch.tensors:
        if t.fused_into is None:
            shapes[t.name] = t.shape
        else:
            parts.setdefault(t.fused_into, []).append(t)
    for name, tensors in parts.items():
        rows = sum(t.shape[0] for t in tensors) // arch.num_experts
        shapes[name] = (arch.num_experts, rows, tensors[0].shape[1])
    return shapes


@pytest.mark.parametrize("family", NEW)
def test_every_tensor_is_the_one_transformers_builds(family):
    arch = architecture_from_config(TINY_FAMILIES[family])
    model = _meta_model(TINY_FAMILIES[family])
    built = {n: tuple(p.shape) for n, p in model.named_parameters()}
    # DeepSeek-V3's routers keep a score-correction bias as a buffer, which its checkpoints store.
    built.update({n: tuple(b.shape) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    assert _runtime_shapes(arch) == built
    assert arch.params == sum(p.numel() for p in model.parameters())


def test_moe_layers_follow_each_familys_rule():
    # qwen3_moe: mlp_only_layers [0]; llama4: interleave_moe_layer_step 2 (layers 1, 3, ...); deepseek:
    # first_k_dense_replace 1; gpt_oss: every layer.
    four = {"num_hidden_layers": 4}
    assert architecture_from_config({**TINY_FAMILIES["qwen3_moe"], **four}).moe_layers == (False, True, True, True)
    assert architecture_from_config({**TINY_FAMILIES["qwen3_moe"], **four, "mlp_only_layers": [],
                                     "decoder_sparse_step": 2}).moe_layers == (False, True, False, True)
    assert architecture_from_config({**TINY_FAMILIES["llama4_text"], **four}).moe_layers == (False, True, False, True)
    assert architecture_from_config({**TINY_FAMILIES["deepseek_v3"], **four}).moe_layers == (False, True, True, True)
    gpt = architecture_from_config({**TINY_FAMILIES["gpt_oss"], **four, "layer_types": None})
    assert gpt.moe_layers == () and all(gpt.is_moe(i) for i in range(4))


@pytest.mark.parametrize(("family", "extra", "types", "windows"), [
    ("gemma3_text", {"sliding_window_pattern": 3}, ("s", "s", "f", "s"), (16, 16, None, 16)),
    ("gemma3_text", {"sliding_window_pattern": 6}, ("s", "s", "s", "s"), (16, 16, 16, 16)),  # only every 6th is full
    ("gpt_oss", {}, ("s", "f", "s", "f"), (16, None, 16, None)),
    ("llama4_text", {}, ("c", "f", "c", "f"), (16, None, 16, None)),  # RoPE layers chunk, NoPE layers attend fully
    ("llama4_text", {"no_rope_layer_interval": 4}, ("c", "c", "c", "f"), (16, 16, 16, None)),
    ("llama4_text", {"attention_chunk_size": None}, ("f", "f", "f", "f"), (None, None, None, None)),
    ("qwen3", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 2}, ("f", "f", "s", "s"),
     (None, None, 8, 8)),
    ("deepseek_v3", {}, ("f", "f", "f", "f"), (None, None, None, None)),
])
def test_layer_types_and_windows_as_transformers_derives_them(family, extra, types, windows):
    config = {**TINY_FAMILIES[family], "num_hidden_layers": 4, **extra}
    short = {"sliding_attention": "s", "full_attention": "f", "chunked_attention": "c"}
    assert tuple(short[t] for t in layer_types_of(config)) == types
    assert layer_windows_of(config) == windows
    from transformers import AutoConfig
    from transformers.cache_utils import get_layer_types_and_kwargs

    cache_types, kwargs = get_layer_types_and_kwargs(AutoConfig.for_model(**config))  # what the cache allocates by
    assert tuple(short[t] for t in cache_types) == types
    assert tuple(k.get("sliding_window") for k in kwargs) == windows


def test_deepseek_keeps_its_router_in_float32_and_caches_its_latent():
    arch = architecture_from_config(TINY_FAMILIES["deepseek_v3"])
    kept = {t.name for t in arch.tensors if t.keep_fp32 == FP32_ALWAYS}
    assert kept == {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    assert arch.kv_layout == (1, 64, 32)  # kv_lora_rank 64, qk_rope_head_dim 32


def test_the_llama4_router_is_quantized_by_fp8_alone():
    from heavylift.schemes import SCHEMES

    arch = architecture_from_config(TINY_FAMILIES["llama4_text"])
    router = next(t for t in arch.tensors if t.name.endswith("feed_forward.router.weight"))
    assert router.role is Role.LINEAR_ROUTER
    assert [q for q, s in SCHEMES.items() if s.quantizes(router.role)] == ["fp8"]


def test_a_multimodal_config_plans_its_language_model():
    entry = find_model("gemma3-27b")
    arch = architecture_from_config(entry.config_dict())
    assert arch.model_type == "gemma3_text" and arch.wrapped and arch.params == entry.params
    assert arch.num_layers == 62 and arch.layer_windows[:6] == (1024,) * 5 + (None,)


# Published totals, from each model card: Qwen3 8.2B, 32.8B, 235B; Gemma 3 27B (with its 0.4B SigLIP tower);
# Llama 4 Scout 109B and Maverick 400B (both with a 0.7B vision tower); DeepSeek-V3 671B main model (685B with
# its 14B multi-token-prediction layer, which transformers does not load); gpt-oss 21B and 117B.
PUBLISHED = {
    "qwen3-8b": (8.2e9, 0.05e9), "qwen3-32b": (32.8e9, 0.05e9), "qwen3-235b-a22b": (235e9, 0.5e9),
    "gemma3-27b": (27e9, 0.5e9), "llama4-scout": (109e9, 1.5e9), "llama4-maverick": (400e9, 1.5e9),
    "deepseek-v3": (671e9, 0.5e9), "gpt-oss-20b": (21e9, 0.1e9), "gpt-oss-120b": (117e9, 0.2e9),
}
# What heavylift's inventory holds beyond the meta build's parameters, and loads as weights: DeepSeek-V3's 58 MoE
# layers' score-correction bias buffers of 256 experts, which its checkpoint stores.
BUFFERS = {"deepseek-v3": 58 * 256}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_catalog_models_against_the_meta_build_and_the_published_size(name):
    entry = find_model(name)
    arch = architecture_from_config(entry.config_dict())
    model = _meta_model(entry.config_dict())
    meta = sum(p.numel() for p in model.parameters())
    assert entry.params == arch.params == meta
    assert sum(t.numel for t in arch.tensors) == meta + BUFFERS.get(name, 0)
    published, within = PUBLISHED[name]
    assert abs(meta - published) <= within, f"{name}: {meta:,} vs {published:,.0f}"


def test_the_vision_towers_heavylift_leaves_out_are_the_difference_to_the_whole_model():
    from transformers import AutoConfig, Gemma3ForConditionalGeneration, Llama4ForConditionalGeneration

    for name, cls in (("gemma3-27b", Gemma3ForConditionalGeneration), ("llama4-scout", Llama4ForConditionalGeneration)):
        entry = find_model(name)
        with torch.device("meta"):
            whole = cls(AutoConfig.for_model(**entry.config_dict()))
        towers = sum(p.numel() for n, p in whole.named_parameters() if "language_model" not in n)
        assert sum(p.numel() for p in whole.parameters()) == entry.params + towers
        assert 0.3e9 < towers < 1e9
