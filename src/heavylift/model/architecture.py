"""What a model is made of, from config.json alone: every tensor's name and shape, and its attention layout.

Tensor names follow the checkpoints on the hub (`model.layers.0.self_attn.q_proj.weight`), so the
inventory can be compared name by name with the safetensors headers of a real checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from math import prod
from typing import Any, Callable, Mapping

from heavylift.errors import ConfigError, UnsupportedArchitectureError


class Role(str, Enum):
    """What a tensor does, which decides whether a quantization scheme rewrites it."""

    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    NORM = "norm"
    LINEAR = "linear"  # a dense projection weight: quantized by every scheme below bf16
    BIAS = "bias"
    ROUTER = "router"  # an MoE gate: kept in bf16, as the loaders leave it
    EXPERT = "expert"  # an MoE expert projection: quantized like LINEAR


QUANTIZABLE_ROLES = frozenset({Role.LINEAR, Role.EXPERT})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: Role
    layer: int | None  # decoder layer index; None for embeddings, final norm and lm_head
    # The runtime parameter this tensor is stacked into when loaded, if any: transformers 5 fuses
    # each layer's MoE experts into `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`, and a
    # quantizer stores the stacked parameter as one tensor (one set of block statistics).
    fused_into: str | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int  # 0 for a dense model
    experts_per_token: int
    layer_windows: tuple[int | None, ...]  # per layer: sliding window in tokens, None = full attention
    max_position_embeddings: int
    tensors: tuple[TensorSpec, ...]

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def layer_tensors(self, layer: int) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.layer == layer)

    def global_tensors(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.layer is None)


def _get(config: Mapping[str, Any], key: str, default: Any = ..., kind: type = int) -> Any:
    value = config.get(key, default)
    if value is ...:
        raise ConfigError(f"config.json has no '{key}', which a {config.get('model_type')} model needs; "
                          "re-download config.json or fix the field")
    if kind is int and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"config.json field '{key}' must be a positive integer, not {value!r}")
    return value


# --- Per-family layer layouts -------------------------------------------------------------------

def _attention(p: str, a: "_Dims", fused_qkv: bool, bias: bool) -> list[TensorSpec]:
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    if fused_qkv:
        out = [TensorSpec(f"{p}.self_attn.qkv_proj.weight", (q + 2 * kv, a.hidden), Role.LINEAR, a.layer)]
    else:
        out = [TensorSpec(f"{p}.self_attn.{n}_proj.weight", (rows, a.hidden), Role.LINEAR, a.layer)
               for n, rows in (("q", q), ("k", kv), ("v", kv))]
        if bias:
            out += [TensorSpec(f"{p}.self_attn.{n}_proj.bias", (rows,), Role.BIAS, a.layer)
                    for n, rows in (("q", q), ("k", kv), ("v", kv))]
    out.append(TensorSpec(f"{p}.self_attn.o_proj.weight", (a.hidden, q), Role.LINEAR, a.layer))
    return out


def _mlp(p: str, a: "_Dims", fused_gate_up: bool) -> list[TensorSpec]:
    if fused_gate_up:
        return [TensorSpec(f"{p}.mlp.gate_up_proj.weight", (2 * a.inter, a.hidden), Role.LINEAR, a.layer),
                TensorSpec(f"{p}.mlp.down_proj.weight", (a.hidden, a.inter), Role.LINEAR, a.layer)]
    return [TensorSpec(f"{p}.mlp.gate_proj.weight", (a.inter, a.hidden), Role.LINEAR, a.layer),
            TensorSpec(f"{p}.mlp.up_proj.weight", (a.inter, a.hidden), Role.LINEAR, a.layer),
            TensorSpec(f"{p}.mlp.down_proj.weight", (a.hidden, a.inter), Role.LINEAR, a.layer)]


def _moe(p: str, a: "_Dims") -> list[TensorSpec]:
    m = f"{p}.block_sparse_moe"
    out = [TensorSpec(f"{m}.gate.weight", (a.experts, a.hidden), Role.ROUTER, a.layer)]
    gate_up, down = f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj"
    for e in range(a.experts):
        out += [TensorSpec(f"{m}.experts.{e}.w1.weight", (a.inter, a.hidden), Role.EXPERT, a.layer, gate_up),
                TensorSpec(f"{m}.experts.{e}.w2.weight", (a.hidden, a.inter), Role.EXPERT, a.layer, down),
                TensorSpec(f"{m}.experts.{e}.w3.weight", (a.inter, a.hidden), Role.EXPERT, a.layer, gate_up)]
    return out


def _norms(p: str, a: "_Dims", names: tuple[str, ...]) -> list[TensorSpec]:
    return [TensorSpec(f"{p}.{n}.weight", (a.hidden,), Role.NORM, a.layer) for n in names]


@dataclass(frozen=True)
class _Dims:
    layer: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int


_TWO_NORMS = ("input_layernorm", "post_attention_layernorm")
_FOUR_NORMS = _TWO_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _llama_layer(p: str, a: _Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    out = _attention(p, a, fused_qkv=False, bias=bool(c.get("attention_bias", False)))
    if c.get("attention_bias", False):
        out.append(TensorSpec(f"{p}.self_attn.o_proj.bias", (a.hidden,), Role.BIAS, a.layer))
    out += _mlp(p, a, fused_gate_up=False)
    if c.get("mlp_bias", False):
        out += [TensorSpec(f"{p}.mlp.{n}_proj.bias", (rows,), Role.BIAS, a.layer)
                for n, rows in (("gate", a.inter), ("up", a.inter), ("down", a.hidden))]
    return out + _norms(p, a, _TWO_NORMS)


def _qwen2_layer(p: str, a: _Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=False, bias=True) + _mlp(p, a, False) + _norms(p, a, _TWO_NORMS)


def _mistral_layer(p: str, a: _Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=False, bias=False) + _mlp(p, a, False) + _norms(p, a, _TWO_NORMS)


def _mixtral_layer(p: str, a: _Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=False, bias=False) + _moe(p, a) + _norms(p, a, _TWO_NORMS)


def _gemma2_layer(p: str, a: _Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=False, bias=False) + _mlp(p, a, False) + _norms(p, a, _FOUR_NORMS)


def _phi3_layer(p: str, a: _Dims, c: Mapping[str, Any]) -> list[TensorSpec]:
    return _attention(p, a, fused_qkv=True, bias=False) + _mlp(p, a, True) + _norms(p, a, _TWO_NORMS)


@dataclass(frozen=True)
class Family:
    layer: Callable[[str, _Dims, Mapping[str, Any]], list[TensorSpec]]
    tie_default: bool  # the family config class's default for tie_word_embeddings
    moe: bool = False
    # Whether transformers runs the family's attention through SDPA. Gemma 2's logit softcapping is not
    # expressible there, so transformers 5 refuses SDPA and the scores are materialized (eager).
    sdpa: bool = True


FAMILIES: Mapping[str, Family] = {
    "llama": Family(_llama_layer, tie_default=False),
    "mistral": Family(_mistral_layer, tie_default=False),
    "mixtral": Family(_mixtral_layer, tie_default=False, moe=True),
    "qwen2": Family(_qwen2_layer, tie_default=False),
    "gemma2": Family(_gemma2_layer, tie_default=True, sdpa=False),
    "phi3": Family(_phi3_layer, tie_default=False),
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def _layer_windows(config: Mapping[str, Any], model_type: str, n_layers: int) -> tuple[int | None, ...]:
    """Which layers keep only a sliding window of keys and values, as transformers' cache does.

    Mirrors transformers 5 (`cache_utils.get_layer_types_and_kwargs` and each config's
    `__post_init__`): explicit `layer_types` win; Gemma 2 alternates, starting with a sliding layer;
    Qwen2 slides from `max_window_layers` on only when `use_sliding_window`; any other family with a
    `sliding_window` slides on every layer.
    """
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    if types is None:
        if model_type == "gemma2":
            window = window if window is not None else 4096  # Gemma2Config's default
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        elif model_type == "qwen2":
            start = config.get("max_window_layers", n_layers)
            types = ["sliding_attention" if window and i >= start else "full_attention" for i in range(n_layers)]
        else:
            types = ["sliding_attention" if window else "full_attention"] * n_layers
    if len(types) != n_layers:
        raise ConfigError(f"config.json lists {len(types)} layer_types for {n_layers} layers; fix one of the two")
    return tuple(window if t == "sliding_attention" and window else None for t in types)


def architecture_from_config(config: Mapping[str, Any]) -> Architecture:
    """Describe the model a config.json defines; raise ConfigError or UnsupportedArchitectureError."""
    if not isinstance(config, Mapping):
        raise ConfigError("config.json must hold a JSON object; re-download it")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        shown = f"'{model_type}'" if model_type else "no model_type"
        raise UnsupportedArchitectureError(
            f"model_type {shown} is not supported; heavylift plans and loads {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    hidden = _get(config, "hidden_size")
    n_layers = _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads", heads)
    head_dim = _get(config, "head_dim", None) or hidden // heads
    vocab = _get(config, "vocab_size")
    inter = _get(config, "intermediate_size")
    experts = _get(config, "num_local_experts") if family.moe else 0
    per_token = _get(config, "num_experts_per_tok") if family.moe else 0
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    tied = config.get("tie_word_embeddings", family.tie_default)

    tensors = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), Role.EMBEDDING, None)]
    for i in range(n_layers):
        dims = _Dims(i, hidden, inter, heads, kv_heads, head_dim, experts)
        tensors += family.layer(f"model.layers.{i}", dims, config)
    tensors.append(TensorSpec("model.norm.weight", (hidden,), Role.NORM, None))
    if not tied:
        tensors.append(TensorSpec("lm_head.weight", (vocab, hidden), Role.LM_HEAD, None))
    return Architecture(
        model_type=model_type, num_layers=n_layers, hidden_size=hidden, intermediate_size=inter,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        tie_word_embeddings=bool(tied), num_experts=experts, experts_per_token=per_token,
        layer_windows=_layer_windows(config, model_type, n_layers),
        max_position_embeddings=config.get("max_position_embeddings") or 0,
        tensors=tuple(tensors),
    )
