"""Each supported family's decoder layer as tensors, and the family's defaults: what transformers 5.24 builds
for a model_type (models/<family>/modeling_<family>.py), named as the family's checkpoints on the hub name it.

A layout takes the layer's prefix (`model.layers.3`), its dimensions (`Dims`, derived from config.json in
architecture.py) and the config for flags; it returns the layer's tensors in no particular order (loaders
sort them). Pure data: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .tensors import FP32_ALWAYS, FP32_UNDER_FP16, Role, TensorSpec


@dataclass(frozen=True)
class Latent:
    """DeepSeek's multi-head latent attention: query and key/value low-rank projections."""

    q_rank: int | None  # q_lora_rank; None: one q_proj
    kv_rank: int  # kv_lora_rank: the width of the compressed keys and values the cache holds
    nope: int  # qk_nope_head_dim
    rope: int  # qk_rope_head_dim
    value: int  # v_head_dim


@dataclass(frozen=True)
class Dims:
    """One decoder layer's dimensions."""

    layer: int
    hidden: int
    inter: int  # the dense MLP's width (a dense layer of an MoE model: its own width)
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 0  # routed experts in this layer; 0 for a dense layer
    expert_inter: int = 0  # one routed expert's width
    shared_inter: int = 0  # the shared expert's width; 0 for none
    latent: Latent | None = None


def _w(name: str, shape: tuple[int, ...], role: Role, a: Dims, **kw) -> TensorSpec:
    return TensorSpec(name, shape, role, a.layer, **kw)


def _attention(p: str, a: Dims, fused_qkv: bool, bias: bool, o_bias: bool = False) -> list[TensorSpec]:
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    if fused_qkv:
        out = [_w(f"{p}.self_attn.qkv_proj.weight", (q + 2 * kv, a.hidden), Role.LINEAR, a)]
    else:
        out = [_w(f"{p}.self_attn.{n}_proj.weight", (rows, a.hidden), Role.LINEAR, a)
               for n, rows in (("q", q), ("k", kv), ("v", kv))]
        if bias:
            out += [_w(f"{p}.self_attn.{n}_proj.bias", (rows,), Role.BIAS, a)
                    for n, rows in (("q", q), ("k", kv), ("v", kv))]
    out.append(_w(f"{p}.self_attn.o_proj.weight", (a.hidden, q), Role.LINEAR, a))
    if o_bias:
        out.append(_w(f"{p}.self_attn.o_proj.bias", (a.hidden,), Role.BIAS, a))
    return out


def _qk_norms(p: str, a: Dims) -> list[TensorSpec]:
    """Qwen 3's and Gemma 3's RMSNorm over each head's channels, on queries and keys before RoPE."""
    return [_w(f"{p}.self_attn.{n}_norm.weight", (a.head_dim,), Role.NORM, a) for n in ("q", "k")]


def _mlp(p: str, a: Dims, fused_gate_up: bool = False, module: str = "mlp", inter: int | None = None
         ) -> list[TensorSpec]:
    i = a.inter if inter is None else inter
    if fused_gate_up:
        return [_w(f"{p}.{module}.gate_up_proj.weight", (2 * i, a.hidden), Role.LINEAR, a),
                _w(f"{p}.{module}.down_proj.weight", (a.hidden, i), Role.LINEAR, a)]
    return [_w(f"{p}.{module}.gate_proj.weight", (i, a.hidden), Role.LINEAR, a),
            _w(f"{p}.{module}.up_proj.weight", (i, a.hidden), Role.LINEAR, a),
            _w(f"{p}.{module}.down_proj.weight", (a.hidden, i), Role.LINEAR, a)]


def _moe(p: str, a: Dims) -> list[TensorSpec]:
    m = f"{p}.block_sparse_moe"
    out = [_w(f"{m}.gate.weight", (a.experts, a.hidden), Role.ROUTER, a)]
    gate_up, down = f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj"
    for e in range(a.experts):
        out += [_w(f"{m}.experts.{e}.w1.weight", (a.inter, a.hidden), Role.EXPERT, a, fused_into=gate_up),
                _w(f"{m}.experts.{e}.w2.weight", (a.hidden, a.inter), Role.EXPERT, a, fused_into=down),
                _w(f"{m}.experts.{e}.w3.weight", (a.inter, a.hidden), Role.EXPERT, a, fused_into=gate_up)]
    return out


def _experts_per_checkpoint_tensor(p: str, a: Dims) -> list[TensorSpec]:
    """Routed experts stored one by one (`mlp.experts.7.gate_proj.weight`), as Qwen 3 MoE and DeepSeek-V3
    checkpoints hold them, stacked on load into `mlp.experts.gate_up_proj` and `down_proj`."""
    i = a.expert_inter
    gate_up, down = f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj"
    out = []
    for e in range(a.experts):
        out += [_w(f"{p}.mlp.experts.{e}.gate_proj.weight", (i, a.hidden), Role.EXPERT, a, fused_into=gate_up),
                _w(f"{p}.mlp.experts.{e}.up_proj.weight", (i, a.hidden), Role.EXPERT, a, fused_into=gate_up),
                _w(f"{p}.mlp.experts.{e}.down_proj.weight", (a.hidden, i), Role.EXPERT, a, fused_into=down)]
    return out


def _norms(p: str, a: Dims, names: tuple[str, ...], keep_fp32: str | None = None) -> list[TensorSpec]:
    return [_w(f"{p}.{n}.weight", (a.hidden,), Role.NORM, a, keep_fp32=keep_fp32) for n in names]


TWO_NORMS = ("input_layernorm", "post_attention_layernorm")
FOUR_NORMS = TWO_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")


# --- The families heavylift has planned from the start --------------------------------------------

def _llama_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    bias = bool(c.get("attention_bias", False))
    out = _attention(p, a, fused_qkv=False, bias=bias, o_bias=bias) + _mlp(p, a)
    if c.get("mlp_bias", False):
        out += [_w(f"{p}.mlp.{n}_proj.bias", (rows,), Role.BIAS, a)
                for n, rows in (("gate", a.inter), ("up", a.inter), ("down", a.hidden))]
    return out + _norms(p, a, TWO_NORMS)


def _qwen2_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=False, bias=True) + _mlp(p, a) + _norms(p, a, TWO_NORMS)


def _mistral_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=False, bias=False) + _mlp(p, a) + _norms(p, a, TWO_NORMS)


def _mixtral_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=False, bias=False) + _moe(p, a) + _norms(p, a, TWO_NORMS)


def _gemma2_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=False, bias=False) + _mlp(p, a) + _norms(p, a, FOUR_NORMS)


def _phi3_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=True, bias=False) + _mlp(p, a, fused_gate_up=True) + _norms(p, a, TWO_NORMS)


# --- Qwen 3, Gemma 3 --------------------------------------------------------------------------------

def _qwen3_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    """Qwen3DecoderLayer: Llama's, with q_norm and k_norm (attention_bias puts a bias on q, k, v and o)."""
    bias = bool(c.get("attention_bias", False))
    return _attention(p, a, False, bias, o_bias=bias) + _qk_norms(p, a) + _mlp(p, a) + _norms(p, a, TWO_NORMS)


def _qwen3_moe_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    """Qwen3MoeDecoderLayer: Qwen 3's attention; a sparse block (router `mlp.gate`, experts) or, on a layer
    of mlp_only_layers or off decoder_sparse_step, a dense MLP of intermediate_size."""
    bias = bool(c.get("attention_bias", False))
    out = _attention(p, a, False, bias, o_bias=bias) + _qk_norms(p, a)
    if a.experts:
        out += [_w(f"{p}.mlp.gate.weight", (a.experts, a.hidden), Role.ROUTER, a)]
        out += _experts_per_checkpoint_tensor(p, a)
    else:
        out += _mlp(p, a)
    return out + _norms(p, a, TWO_NORMS)


def _gemma3_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    """Gemma3DecoderLayer: Gemma 2's four norms and Qwen 3's q_norm and k_norm."""
    bias = bool(c.get("attention_bias", False))
    return _attention(p, a, False, bias, o_bias=bias) + _qk_norms(p, a) + _mlp(p, a) + _norms(p, a, FOUR_NORMS)


# --- Llama 4 ----------------------------------------------------------------------------------------

def _llama4_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    """Llama4TextDecoderLayer: plain attention (its qk norm is an L2 norm without weights); `feed_forward` is
    an MoE block (a router, the experts fused in the checkpoint as [experts, hidden, 2 x width] and
    [experts, width, hidden], a shared expert of the same width) or a dense MLP of intermediate_size_mlp.
    The router subclasses nn.Linear: torchao's FP8 rewrites it, bitsandbytes leaves it (Role.LINEAR_ROUTER)."""
    bias = bool(c.get("attention_bias", False))
    out = _attention(p, a, False, bias, o_bias=bias)
    f = f"{p}.feed_forward"
    if a.experts:
        i = a.expert_inter
        out += [_w(f"{f}.router.weight", (a.experts, a.hidden), Role.LINEAR_ROUTER, a),
                _w(f"{f}.experts.gate_up_proj", (a.experts, a.hidden, 2 * i), Role.EXPERT, a),
                _w(f"{f}.experts.down_proj", (a.experts, i, a.hidden), Role.EXPERT, a)]
        out += _mlp(p, a, module="feed_forward.shared_expert", inter=a.shared_inter)
    else:
        out += _mlp(p, a, module="feed_forward")
    return out + _norms(p, a, TWO_NORMS)


# --- DeepSeek-V3 ------------------------------------------------------------------------------------

def _latent_attention(p: str, a: Dims, bias: bool) -> list[TensorSpec]:
    """DeepseekV3Attention: queries through a rank-q_lora_rank bottleneck (or one q_proj), keys and values
    compressed to kv_lora_rank plus one shared RoPE key, expanded per head by kv_b_proj."""
    m, s = a.latent, f"{p}.self_attn"
    qk = m.nope + m.rope
    if m.q_rank is None:
        out = [_w(f"{s}.q_proj.weight", (a.heads * qk, a.hidden), Role.LINEAR, a)]
    else:
        out = [_w(f"{s}.q_a_proj.weight", (m.q_rank, a.hidden), Role.LINEAR, a),
               _w(f"{s}.q_a_layernorm.weight", (m.q_rank,), Role.NORM, a),
               _w(f"{s}.q_b_proj.weight", (a.heads * qk, m.q_rank), Role.LINEAR, a)]
        if bias:
            out.append(_w(f"{s}.q_a_proj.bias", (m.q_rank,), Role.BIAS, a))
    out += [_w(f"{s}.kv_a_proj_with_mqa.weight", (m.kv_rank + m.rope, a.hidden), Role.LINEAR, a),
            _w(f"{s}.kv_a_layernorm.weight", (m.kv_rank,), Role.NORM, a),
            _w(f"{s}.kv_b_proj.weight", (a.heads * (m.nope + m.value), m.kv_rank), Role.LINEAR, a),
            _w(f"{s}.o_proj.weight", (a.hidden, a.heads * m.value), Role.LINEAR, a)]
    if bias:
        out += [_w(f"{s}.kv_a_proj_with_mqa.bias", (m.kv_rank + m.rope,), Role.BIAS, a),
                _w(f"{s}.o_proj.bias", (a.hidden,), Role.BIAS, a)]
    return out


def _deepseek_v3_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    """DeepseekV3DecoderLayer: latent attention; from first_k_dense_replace on an MoE block (the router and
    its score-correction bias, both kept in float32; routed experts; shared experts of n_shared_experts x
    moe_intermediate_size), before it a dense MLP of intermediate_size."""
    out = _latent_attention(p, a, bool(c.get("attention_bias", False)))
    if a.experts:
        out += [_w(f"{p}.mlp.gate.weight", (a.experts, a.hidden), Role.ROUTER, a, keep_fp32=FP32_ALWAYS),
                _w(f"{p}.mlp.gate.e_score_correction_bias", (a.experts,), Role.ROUTER, a, keep_fp32=FP32_ALWAYS,
                   buffer=True)]
        out += _experts_per_checkpoint_tensor(p, a)
        out += _mlp(p, a, module="mlp.shared_experts", inter=a.shared_inter)
    else:
        out += _mlp(p, a)
    return out + _norms(p, a, TWO_NORMS)


# --- gpt-oss ----------------------------------------------------------------------------------------

def _gpt_oss_layer(p: str, a: Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    """GptOssDecoderLayer: biased attention with one learned sink logit per head; an MoE block with a
    biased router and biased experts, fused as [experts, hidden, 2 x width] (gate and up interleaved) and
    [experts, width, hidden]. Its norms stay in float32 when the model computes in fp16."""
    bias = bool(c.get("attention_bias", True))
    i, m = a.expert_inter, f"{p}.mlp"
    out = _attention(p, a, False, bias, o_bias=bias)
    out += [_w(f"{p}.self_attn.sinks", (a.heads,), Role.BIAS, a),
            _w(f"{m}.router.weight", (a.experts, a.hidden), Role.ROUTER, a),
            _w(f"{m}.router.bias", (a.experts,), Role.ROUTER, a),
            _w(f"{m}.experts.gate_up_proj", (a.experts, a.hidden, 2 * i), Role.EXPERT, a),
            _w(f"{m}.experts.gate_up_proj_bias", (a.experts, 2 * i), Role.BIAS, a),
            _w(f"{m}.experts.down_proj", (a.experts, i, a.hidden), Role.EXPERT, a),
            _w(f"{m}.experts.down_proj_bias", (a.experts, a.hidden), Role.BIAS, a)]
    return out + _norms(p, a, TWO_NORMS, keep_fp32=FP32_UNDER_FP16)


# --- The table ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    layer: Callable[[str, Dims, Mapping[str, Any]], list[TensorSpec]]
    tie_default: bool  # the family config class's default for tie_word_embeddings
    moe: bool = False
    # Whether transformers runs the family's attention through SDPA. Gemma 2's logit softcapping and
    # gpt-oss's sink logits are not expressible there, so transformers 5 refuses SDPA for them and the
    # scores are materialized (eager).
    sdpa: bool = True
    # Whether the loader may ask for FlashAttention 2 where it is installed: not for Llama 4 (transformers refuses
    # it), gpt-oss (its sink logits) or DeepSeek-V3 (values narrower than keys), which the plan counts on SDPA or
    # eager attention.
    flash: bool = True
    # The family config class's defaults where config.json has no such key (transformers 5.24): head_dim
    # (None: hidden_size / num_attention_heads) and sliding_window (None: full attention).
    head_dim_default: int | None = None
    window_default: int | None = None
    # The layer types its config accepts in layer_types (chunked_attention: Llama 4's chunked layers).
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention")
    # The config class's defaults for the fields heavylift reads, which published config.json files of the
    # family leave out (Gemma 3's text_config names a dozen keys). Empty for the families whose config.json
    # files have always listed every field: they are asked for by name.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Other names the config class takes for a field (its attribute_map), as config.json files written by
    # transformers 5 spell it: Qwen3MoeConfig saves num_experts as num_local_experts.
    aliases: Mapping[str, str] = field(default_factory=dict)
    # Precisions the family's transformers code cannot run, with why (a user asking for one is told in one line).
    refuses: Mapping[str, str] = field(default_factory=dict)
    # The config key naming the dense MLP's activation (ACT2FN's key), and the config class's default for it.
    activation_key: str = "hidden_act"
    activation_default: str = "silu"


FAMILIES: Mapping[str, Family] = {
    "llama": Family(_llama_layer, tie_default=False),
    "mistral": Family(_mistral_layer, tie_default=False, window_default=4096),
    "mixtral": Family(_mixtral_layer, tie_default=False, moe=True),
    "qwen2": Family(_qwen2_layer, tie_default=False, window_default=4096),
    "gemma2": Family(_gemma2_layer, tie_default=True, sdpa=False, head_dim_default=256, window_default=4096,
                     activation_key="hidden_activation", activation_default="gelu_pytorch_tanh"),
    "phi3": Family(_phi3_layer, tie_default=False),
    # transformers 5.24's Qwen3Config, Qwen3MoeConfig, Gemma3TextConfig, Llama4TextConfig, DeepseekV3Config and
    # GptOssConfig class defaults.
    "qwen3": Family(_qwen3_layer, tie_default=False, defaults=dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, max_position_embeddings=32768, sliding_window=4096)),
    "qwen3_moe": Family(_qwen3_moe_layer, tie_default=False, moe=True, defaults=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=32768, sliding_window=4096, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1),
        aliases={"num_local_experts": "num_experts"}),
    "gemma3_text": Family(_gemma3_layer, tie_default=True, activation_key="hidden_activation", activation_default="gelu_pytorch_tanh",
                          defaults=dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=131072, sliding_window=4096)),
    "llama4_text": Family(_llama4_layer, tie_default=False, moe=True, flash=False,
                          layer_types=("chunked_attention", "full_attention"),
                          defaults=dict(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8192)),
    "deepseek_v3": Family(_deepseek_v3_layer, tie_default=False, moe=True, flash=False, defaults=dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        num_experts_per_tok=8, first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, max_position_embeddings=4096),
        aliases={"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
        refuses={"int8": "LLM.int8 flattens 2-D and 3-D inputs only, and DeepSeek-V3's kv_b_proj expands the cached "
                         "latent as a 4-D one"}),
    "gpt_oss": Family(_gpt_oss_layer, tie_default=False, moe=True, sdpa=False, flash=False, defaults=dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, num_local_experts=128,
        num_experts_per_tok=4, sliding_window=128, attention_bias=True)),
}

# Multimodal configs whose language model heavylift plans and loads alone: config.json's text_config
# describes it, and the checkpoint holds it under "language_model." beside a vision tower heavylift leaves
# on disk (the loader maps the prefix away; checkpoint.py skips the vision tensors).
WRAPPERS: Mapping[str, str] = {"gemma3": "gemma3_text", "llama4": "llama4_text"}
WRAPPED_PREFIX = "language_model."
VISION_PREFIXES = ("vision_tower.", "vision_model.", "multi_modal_projector.")
