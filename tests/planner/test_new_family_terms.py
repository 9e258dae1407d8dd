"""The KV cache and weights of the newer families as transformers 5.24 really holds them: DeepSeek-V3's cache of
its compressed latent, the sliding and chunked layers' smaller caches, and checkpoints stored in block FP8 or
MXFP4 (what each precision keeps, and the precisions they refuse)."""

from __future__ import annotations

import json

import pytest
import torch

from heavylift.model.architecture import architecture_from_config
from heavylift.model.tensors import Role, TensorSpec
from heavylift.model.prequantized import Prequantized, stored_as
from heavylift.planner.allocator import Program
from heavylift.planner.forward_program import Part, Step, forward_precisions, transformers_forward
from heavylift.planner.matmul_programs import KeptBlockFp8
from heavylift.planner.memory import kv_bytes_per_token, kv_cache_bytes
from heavylift.schemes import SCHEMES

from conftest import TINY_FAMILIES, run_cli

CONTEXT = 48


def _tiny_model(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_FAMILIES[family])
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_deepseek_caches_its_compressed_latent_not_per_head_keys(cache_kind):
    """Measured, not assumed: after a forward, every layer of transformers' cache holds one 'head' of
    kv_lora_rank (64) key channels and qk_rope_head_dim (32) value channels per token: the normed latent and
    the shared RoPE key, which the attention expands per head on every step. Per-head keys and values would
    take 4 heads x (64 + 32) = 384 channels a token; the latent takes 96."""
    from transformers import DynamicCache, StaticCache

    model = _tiny_model("deepseek_v3")
    cache = DynamicCache(config=model.config) if cache_kind == "dynamic" else \
        StaticCache(config=model.config, max_cache_len=CONTEXT)
    ids = torch.arange(5).view(1, 5)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers}
    positions = 5 if cache_kind == "dynamic" else CONTEXT
    assert shapes == {((1, 1, positions, 64), (1, 1, positions, 32))}
    arch = architecture_from_config(TINY_FAMILIES["deepseek_v3"])
    assert kv_bytes_per_token(arch, 2) == (64 + 32) * 2  # per token and layer, in bf16


@pytest.mark.parametrize("family", ["gemma3_text", "llama4_text", "gpt_oss", "deepseek_v3", "qwen3"])
def test_the_static_cache_transformers_allocates_is_the_planned_one(family):
    """Sliding (Gemma 3, gpt-oss) and chunked (Llama 4) layers keep min(window, context) positions in a
    StaticSlidingWindowLayer; the planner counts every layer's keys and values to the byte."""
    from transformers import StaticCache

    model = _tiny_model(family)
    cache = StaticCache(config=model.config, max_cache_len=CONTEXT)
    with torch.inference_mode():
        model(input_ids=torch.arange(3).view(1, 3), cache=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    arch = architecture_from_config(TINY_FAMILIES[family])
    assert kv_cache_bytes(arch, range(arch.num_layers), CONTEXT, 1, 2) == held
    if arch.layer_windows[0]:  # the window-sized layer is smaller than the context
        assert cache.layers[0].keys.shape[-2] == arch.layer_windows[0] < CONTEXT


def test_block_fp8_weights_are_planned_as_stored():
    # A [24, 64] linear weight in block FP8 with 128 x 128 blocks: 1,536 float8 bytes and one float32 scale
    # (4 bytes); allocated 1,536 and 512. Under bf16 it is 3,072 bytes.
    pre = Prequantized("fp8", (128, 128))
    t = stored_as(TensorSpec("model.layers.0.self_attn.q_a_proj.weight", (24, 64), Role.LINEAR, 0), pre)
    assert t.stored == ((t.name, (24, 64)), ("model.layers.0.self_attn.q_a_proj.weight_scale_inv", (1, 1)))
    assert SCHEMES["fp8"].weights_bytes([t], as_stored=True) == 1536 + 512
    assert SCHEMES["bf16"].weights_bytes([t]) == 3072
    norm = stored_as(TensorSpec("model.norm.weight", (64,), Role.NORM, None), pre)
    assert norm.stored == ()  # norms, embeddings, routers and lm_head stay bf16 in such checkpoints


def test_mxfp4_experts_are_stored_as_blocks_and_scales():
    # gpt-oss: gate_up [experts 4, hidden 64, 2 x 64] held as [4, 128, 64 / 32 = 2, 16] code bytes and [4, 128, 2]
    # scales; modules_to_not_convert leaves attention and the router in bf16.
    arch = architecture_from_config({**TINY_FAMILIES["gpt_oss"], "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"]}})
    stored = {t.name: t.stored for t in arch.tensors if t.stored}
    assert stored["model.layers.0.mlp.experts.gate_up_proj"] == (
        ("model.layers.0.mlp.experts.gate_up_proj_blocks", (4, 128, 2, 16)),
        ("model.layers.0.mlp.experts.gate_up_proj_scales", (4, 128, 2)))
    assert stored["model.layers.0.mlp.experts.down_proj"][0] == ("model.layers.0.mlp.experts.down_proj_blocks",
                                                                (4, 64, 2, 16))
    assert not any("self_attn" in name or "router" in name for name in stored)


def test_a_precision_a_prequantized_checkpoint_cannot_load_in_is_refused_in_one_line(capsys):
    code, out, err = run_cli(capsys, "plan", "deepseek-v3", "--gpus", "8xH200", "--quant", "nf4")
    assert code == 2 and out == ""
    assert err == ("error: deepseek-v3 is stored in block FP8 (config.json's quantization_config), which transformers "
                   "cannot requantize to nf4: --quant fp8 keeps the stored block-FP8 weights and their 128 x 128 "
                   "block scales; --quant bf16 dequantizes the block-FP8 weights to bf16 while they load\n")
    code, out, err = run_cli(capsys, "plan", "gpt-oss-20b", "--gpus", "1xH100", "--quant", "fp8")
    assert code == 2 and err.startswith("error: gpt-oss-20b is stored in MXFP4") and err.count("\n") == 1


def test_all_means_the_precisions_the_checkpoint_accepts(capsys):
    code, out, _ = run_cli(capsys, "plan", "deepseek-v3", "--gpus", "8xH200", "--json")
    plan = json.loads(out)
    assert code == 0 and [s["quant"] for s in plan["schemes"]] == ["bf16", "fp8"]
    by = {s["quant"]: s for s in plan["schemes"]}
    # fp8 keeps 1 byte a weight (plus block scales; bf16 embeddings, norms, fp32 routers): about half of bf16
    assert 0.49 < by["fp8"]["weights_bytes"] / by["bf16"]["weights_bytes"] < 0.52
    assert plan["warnings"] == ["the checkpoint stores block-FP8 weights: fp8 keeps them so, its matmuls run by the "
                                "`kernels` package's finegrained-fp8 kernel on GPUs of compute capability 8.9 or "
                                "later where it loads, else by heavylift's torch matmuls (slower: a tile of rows "
                                "dequantized per matmul, as planned); bf16 dequantizes them while they load"]
    code, out, _ = run_cli(capsys, "plan", "gpt-oss-120b", "--gpus", "4xH100", "--json")
    assert [s["quant"] for s in json.loads(out)["schemes"]] == ["bf16"]


class _Recording(Program):
    """A Program that also lists what it allocates, by label."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[str, int]] = []

    def alloc(self, label: str, nbytes: int):
        self.allocations.append((label, nbytes))
        return super().alloc(label, nbytes)


def _deepseek_prefill(config: dict, way) -> list[tuple[str, int]]:
    arch = architecture_from_config(config)
    p = _Recording()
    transformers_forward(p, arch, way, Step(1, 4, 0, 16), Part(range(arch.num_layers), True, True),
                         range(arch.num_layers), logits=True)
    return p.allocations


KEPT_TINY = {**TINY_FAMILIES["deepseek_v3"], "quantization_config": {
    "quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}}


def test_block_fp8_kept_as_stored_runs_transformers_fp8_kernels_not_heavylifts_dequantized_experts():
    # FP8Experts' grouped matmul reads the stored experts; heavylift's own fp8 (a bf16 checkpoint quantized by
    # torchao, experts by experts.py) dequantizes each fused expert tensor in fp32 for the forward.
    kernels, fallback = forward_precisions(architecture_from_config(KEPT_TINY), "fp8")
    assert (kernels, fallback) == (KeptBlockFp8((128, 128), False), KeptBlockFp8((128, 128), True))
    kept = _deepseek_prefill(KEPT_TINY, kernels)
    ours = _deepseek_prefill(TINY_FAMILIES["deepseek_v3"], "fp8")
    assert not [a for a in kept if a[0].startswith("experts_")]
    assert ("experts_fp32", 4 * 2 * 64 * 64 * 4) in ours  # 4 experts' gate_up [2 x 64, 64] in fp32
    # FP8Linear: x cast to FP8 (4 rows x 64) with one fp32 scale per 128 columns of a row, as DeepGEMM does
    assert ("x_fp8", 4 * 64) in kept and ("x_scales", 4 * 1 * 4) in kept
    assert ("weights_bf16", 4 * 2 * 2) in kept  # the fp32 routing weights of 4 tokens x top-2, cast to bf16
    assert not [a for a in kept if a[0] in ("w_fp32", "w_tile")]


def test_block_fp8_kept_as_stored_through_heavylifts_torch_matmuls_dequantizes_a_tile_at_a_time():
    """Without the kernels each FP8 matmul allocates its output, then per tile of output rows the weight's rows
    in fp32 padded to whole 128 x 128 blocks and their bf16 copy; no activation goes to FP8. Tiny DeepSeek-V3
    (hidden 64, latent ranks 64, RoPE 32, 4 heads of 32 + 32 channels, MLP 128, 4 experts of width 64, one
    shared), 4 tokens: every weight fits one tile."""
    way = forward_precisions(architecture_from_config(KEPT_TINY), "fp8")[1]
    kept = _deepseek_prefill(KEPT_TINY, way)
    assert not [a for a in kept if a[0] in ("x_fp8", "x_scales", "experts_fp32")]

    def tile(rows: int, cols: int) -> list[tuple[str, int]]:  # staged in whole blocks, then the bf16 rows
        return [("w_fp32", -(-rows // 128) * 128 * -(-cols // 128) * 128 * 4), ("w_tile", rows * cols * 2)]

    # q_a [64, 64], q_b [4 x 64, 64], kv_a [64 + 32, 64], kv_b [4 x (32 + 32), 64], o [64, 4 x 32]
    attention = tile(64, 64) + tile(256, 64) + tile(96, 64) + tile(256, 64) + tile(64, 128)
    dense = tile(128, 64) * 2 + tile(64, 128)  # layer 0's MLP: gate, up, down
    # layer 1: 4 tokens x top 2 reach up to all 4 experts: each one's gate_up [128, 64], then each one's down
    # [64, 64]; then the shared expert's gate, up and down [64, 64]
    moe = tile(128, 64) * 4 + tile(64, 64) * 4 + tile(64, 64) * 3
    assert [a for a in kept if a[0] in ("w_fp32", "w_tile")] == attention + dense + attention + moe
    # q_a_proj's output, 4 x 64 in bf16, comes before its tile
    assert kept[kept.index(("w_fp32", 128 * 128 * 4)) - 1] == ("linear", 4 * 64 * 2)


def test_the_plan_of_a_kept_block_fp8_checkpoint_holds_both_ways_its_matmuls_may_run():
    from heavylift.planner.memory import _Device, _transformers_phases

    arch = architecture_from_config(KEPT_TINY)
    dev = _Device(True, (9, 0), True)
    part = Part(range(arch.num_layers), True, True)
    both = _transformers_phases(arch, "fp8", 64, 1, 2, dev, part, range(arch.num_layers))[1]
    plain = _transformers_phases(architecture_from_config(TINY_FAMILIES["deepseek_v3"]), "fp8", 64, 1, 2, dev, part,
                                 range(arch.num_layers))[1]
    assert len(both) == 2 * len(plain) == 4  # one prefill chunk and a decode step, each way


def test_deepseek_v3_kept_in_fp8_fits_eight_h200s(capsys):
    code, out, _ = run_cli(capsys, "plan", "deepseek-v3", "--gpus", "8xH200", "--context", "8192", "--json")
    plan = json.loads(out)
    by = {s["quant"]: s for s in plan["schemes"]}
    assert code == 0 and plan["recommended"] == "fp8" and by["fp8"]["fits"] and not by["bf16"]["fits"]
