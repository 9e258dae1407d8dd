"""What a model is made of, from config.json alone: every tensor's name and shape, and its attention layout.

Tensor names follow the checkpoints on the hub (`model.layers.0.self_attn.q_proj.weight`), so the
inventory can be compared name by name with the safetensors headers of a real checkpoint.

The one place config.json's fields are checked (type and the bounds in defaults.py) and the head size and
sliding windows are derived (head_dim_of, layer_windows_of): the planner reads them from config.json, the
loader and the engine from a transformers config's to_dict(), so both derive them alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property
from math import prod
from typing import Any, Callable, Mapping

from heavylift.defaults import (MAX_ATTENTION_HEADS, MAX_CONTEXT_TOKENS, MAX_EXPERTS, MAX_HEAD_DIM, MAX_HIDDEN_SIZE,
                                MAX_INTERMEDIATE_SIZE, MAX_LAYERS, MAX_PARAMETERS, MAX_TENSORS, MAX_VOCAB_SIZE)
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
        return self._by_layer.get(layer, ())

    def global_tensors(self) -> tuple[TensorSpec, ...]:
        return self._by_layer.get(None, ())

    @cached_property
    def _by_layer(self) -> dict[int | None, tuple[TensorSpec, ...]]:
        """The tensors grouped by layer once, in inventory order: the planner asks for every layer's many times."""
        groups: dict[int | None, list[TensorSpec]] = {}
        for t in self.tensors:
            groups.setdefault(t.layer, []).append(t)
        return {layer: tuple(ts) for layer, ts in groups.items()}


CONFIG_FILE = "config.json"  # the file a model's fields come from; messages name it when the caller gives no path
_NEEDED = object()  # the default of a field a model cannot do without


def _shown(value: Any) -> str:
    """A value as config.json spells it: null, true, "2", 2.0."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _integer(config: Mapping[str, Any], key: str, where: str, high: int, low: int = 1,
             default: Any = _NEEDED) -> Any:
    """config[key], a whole number from `low` to `high`; absent or null gives `default` where there is one."""
    value = config.get(key)
    if value is None and default is not _NEEDED:
        return default
    if key not in config:
        raise ConfigError(f"{where} has no '{key}', which a {config.get('model_type')} model needs; "
                          "copy it from the model's published config.json")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: '{key}' is {_shown(value)}; it must be an integer from {low:,} to {high:,}")
    return value


def _flag(config: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    """config[key], true or false; absent or null gives `default`."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' is {_shown(value)}; it must be true or false")
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
    # The family config class's defaults where config.json has no such key (transformers 5.24): head_dim
    # (None: hidden_size / num_attention_heads) and sliding_window (None: full attention).
    head_dim_default: int | None = None
    window_default: int | None = None


FAMILIES: Mapping[str, Family] = {
    "llama": Family(_llama_layer, tie_default=False),
    "mistral": Family(_mistral_layer, tie_default=False, window_default=4096),
    "mixtral": Family(_mixtral_layer, tie_default=False, moe=True),
    "qwen2": Family(_qwen2_layer, tie_default=False, window_default=4096),
    "gemma2": Family(_gemma2_layer, tie_default=True, sdpa=False, head_dim_default=256, window_default=4096),
    "phi3": Family(_phi3_layer, tie_default=False),
}
QWEN2_MAX_WINDOW_LAYERS_DEFAULT = 28  # Qwen2Config's first sliding layer when config.json does not say
SLIDING, FULL = "sliding_attention", "full_attention"  # the layer_types heavylift's families use


def family_of(config: Mapping[str, Any], where: str = CONFIG_FILE) -> Family:
    """The family config.json's model_type names; ConfigError or UnsupportedArchitectureError otherwise."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(f'{where} has no "model_type"; heavylift plans: {", ".join(FAMILIES)}')
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {_shown(model_type)} is not supported; heavylift plans: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def head_dim_of(config: Mapping[str, Any], where: str = CONFIG_FILE) -> int:
    """Channels per attention head, as transformers derives them: config.json's head_dim, else the family's
    default, else hidden_size / num_attention_heads, which must then divide evenly."""
    explicit = _integer(config, "head_dim", where, MAX_HEAD_DIM, default=family_of(config, where).head_dim_default)
    if explicit is not None:
        return explicit
    hidden = _integer(config, "hidden_size", where, MAX_HIDDEN_SIZE)
    heads = _integer(config, "num_attention_heads", where, MAX_ATTENTION_HEADS)
    if hidden % heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} does not divide hidden_size {hidden} and there "
                          "is no head_dim; fix one of them or give head_dim")
    return hidden // heads


def layer_windows_of(config: Mapping[str, Any], where: str = CONFIG_FILE) -> tuple[int | None, ...]:
    """Per layer, the sliding window of keys and values it keeps in tokens, or None for full attention, as
    transformers' cache does.

    Mirrors transformers 5 (`cache_utils.get_layer_types_and_kwargs` and each config's
    `__post_init__`): explicit `layer_types` win; Gemma 2 alternates, starting with a sliding layer;
    Qwen2 slides from `max_window_layers` on only when `use_sliding_window`; any other family with a
    `sliding_window` slides on every layer.
    """
    family, model_type = family_of(config, where), config["model_type"]
    n_layers = _integer(config, "num_hidden_layers", where, MAX_LAYERS)
    window = family.window_default  # 0 or null in config.json: no window
    if "sliding_window" in config:
        window = _integer(config, "sliding_window", where, MAX_CONTEXT_TOKENS, low=0, default=None)
    if model_type == "qwen2" and not _flag(config, "use_sliding_window", where, False):
        window = None
    types = config.get("layer_types")
    if types is None:
        if model_type == "gemma2":
            types = [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
        elif model_type == "qwen2":
            start = _integer(config, "max_window_layers", where, MAX_LAYERS, low=0,
                             default=QWEN2_MAX_WINDOW_LAYERS_DEFAULT)
            types = [SLIDING if window and i >= start else FULL for i in range(n_layers)]
        else:
            types = [SLIDING if window else FULL] * n_layers
    if not isinstance(types, list) or any(t not in (SLIDING, FULL) for t in types):
        raise ConfigError(f"{where}: 'layer_types' must be a list of \"{SLIDING}\" and \"{FULL}\", one per layer")
    if len(types) != n_layers:
        raise ConfigError(f"{where} lists {len(types)} layer_types for {n_layers} layers; fix one of the two")
    return tuple(window if t == SLIDING and window else None for t in types)


def _layers(family: Family, dims: _Dims, n_layers: int, config: Mapping[str, Any], where: str) -> list[TensorSpec]:
    """Every decoder layer's tensors; ConfigError before building them when they would outnumber MAX_TENSORS."""
    per_layer = len(family.layer("model.layers.0", dims, config))
    if n_layers * per_layer > MAX_TENSORS:
        raise ConfigError(f"{where} describes {n_layers:,} layers of {per_layer:,} tensors, more than the "
                          f"{MAX_TENSORS:,} heavylift plans; check num_hidden_layers and num_local_experts")
    return [t for i in range(n_layers) for t in family.layer(f"model.layers.{i}", replace(dims, layer=i), config)]


def architecture_from_config(config: Mapping[str, Any], where: str = CONFIG_FILE) -> Architecture:
    """Describe the model a config.json defines; `where` names the file in ConfigError and
    UnsupportedArchitectureError messages."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where} must hold a JSON object; re-download it")
    family = family_of(config, where)
    hidden = _integer(config, "hidden_size", where, MAX_HIDDEN_SIZE)
    n_layers = _integer(config, "num_hidden_layers", where, MAX_LAYERS)
    heads = _integer(config, "num_attention_heads", where, MAX_ATTENTION_HEADS)
    kv_heads = _integer(config, "num_key_value_heads", where, heads, default=heads)
    head_dim = head_dim_of(config, where)
    if heads * head_dim > MAX_HIDDEN_SIZE:
        raise ConfigError(f"{where}: {heads} heads of {head_dim} make attention {heads * head_dim:,} wide; "
                          f"it must be at most {MAX_HIDDEN_SIZE:,}; check num_attention_heads and head_dim")
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    vocab = _integer(config, "vocab_size", where, MAX_VOCAB_SIZE)
    inter = _integer(config, "intermediate_size", where, MAX_INTERMEDIATE_SIZE)
    experts = _integer(config, "num_local_experts", where, MAX_EXPERTS) if family.moe else 0
    per_token = _integer(config, "num_experts_per_tok", where, experts) if family.moe else 0
    tied = _flag(config, "tie_word_embeddings", where, family.tie_default)
    _flag(config, "attention_bias", where, False)  # read by the layer layouts: checked here, once
    _flag(config, "mlp_bias", where, False)
    windows = layer_windows_of(config, where)
    max_positions = _integer(config, "max_position_embeddings", where, MAX_CONTEXT_TOKENS, default=0)

    tensors = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), Role.EMBEDDING, None)]
    tensors += _layers(family, _Dims(0, hidden, inter, heads, kv_heads, head_dim, experts), n_layers, config, where)
    tensors.append(TensorSpec("model.norm.weight", (hidden,), Role.NORM, None))
    if not tied:
        tensors.append(TensorSpec("lm_head.weight", (vocab, hidden), Role.LM_HEAD, None))
    params = sum(t.numel for t in tensors)
    if params > MAX_PARAMETERS:
        raise ConfigError(f"{where} describes {params:,} parameters, more than the {MAX_PARAMETERS:,} heavylift "
                          "plans; check num_hidden_layers, hidden_size, intermediate_size and vocab_size")
    return Architecture(
        model_type=config["model_type"], num_layers=n_layers, hidden_size=hidden, intermediate_size=inter,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        tie_word_embeddings=tied, num_experts=experts, experts_per_token=per_token,
        layer_windows=windows, max_position_embeddings=max_positions, tensors=tuple(tensors),
    )
