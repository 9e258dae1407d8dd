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
from functools import cached_property
from typing import Any, Mapping

from heavylift.defaults import (MAX_ATTENTION_HEADS, MAX_CONTEXT_TOKENS, MAX_EXPERTS, MAX_HEAD_DIM, MAX_HIDDEN_SIZE,
                                MAX_INTERMEDIATE_SIZE, MAX_LAYERS, MAX_PARAMETERS, MAX_TENSORS, MAX_VOCAB_SIZE)
from heavylift.errors import ConfigError, UnsupportedArchitectureError
from .families import FAMILIES, WRAPPERS, Dims, Family, Latent
from .prequantized import Prequantized, prequantized_of, stored_as
from .tensors import QUANTIZABLE_ROLES, Role, TensorSpec  # noqa: F401 - the inventory's types, imported from here


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
    layer_windows: tuple[int | None, ...]  # per layer: keys and values its cache keeps (sliding or chunk), None = all
    max_position_embeddings: int
    tensors: tuple[TensorSpec, ...]
    # transformers' layer types: full_attention, sliding_attention, chunked_attention (Llama 4's chunks of
    # attention_chunk_size, cached like a sliding window of that size); empty: every layer full or sliding
    # as layer_windows says.
    layer_types: tuple[str, ...] = ()
    moe_layers: tuple[bool, ...] = ()  # per layer: an MoE block; empty: every layer when num_experts, else none
    expert_intermediate_size: int = 0  # one routed expert's width; 0: intermediate_size
    shared_expert_intermediate_size: int = 0  # the shared expert's width; 0: no shared expert
    rope_layers: tuple[bool, ...] = ()  # per layer: rotary positions applied; empty: every layer
    latent: Latent | None = None  # DeepSeek's multi-head latent attention
    # What the KV cache holds per token and layer: `cache_heads` heads of `key_dim` key and `value_dim` value
    # channels (0: num_kv_heads and head_dim). DeepSeek-V3 caches its compressed latent, not per-head keys.
    cache_heads: int = 0
    key_dim: int = 0
    value_dim: int = 0
    prequantized: Prequantized | None = None  # config.json's quantization_config, for a checkpoint stored quantized
    wrapped: bool = False  # the language model of a multimodal config (families.WRAPPERS)
    extra_layers: int = 0  # layers the checkpoint holds past num_layers that transformers leaves unloaded
    norm_topk_prob: bool = False  # Qwen 3 MoE: the top-k routing weights renormalized to sum to one
    qk_norm: bool = False  # Llama 4's use_qk_norm: an L2 norm on queries and keys of its RoPE layers
    rope_interleave: bool = False  # DeepSeek-V3: RoPE on interleaved channel pairs
    expert_groups: tuple[int, int] = (0, 0)  # DeepSeek-V3's routing groups: (n_group, topk_group)
    mlp_activation: str = "silu"  # the dense MLP's activation, as transformers' ACT2FN names it

    @property
    def params(self) -> int:
        """Parameters, as transformers counts them: the buffers a checkpoint stores (TensorSpec.buffer) left out."""
        return sum(t.numel for t in self.tensors if not t.buffer)

    def is_moe(self, layer: int) -> bool:
        return self.moe_layers[layer] if self.moe_layers else self.num_experts > 0

    def layer_type(self, layer: int) -> str:
        if self.layer_types:
            return self.layer_types[layer]
        return SLIDING if self.layer_windows[layer] else FULL

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers[layer] if self.rope_layers else True

    def layer_kind(self, layer: int) -> tuple:
        """What makes a layer's runtime memory differ from another's: its cache window, attention type, MoE
        block and RoPE (a family whose layers differ only by window: the window alone, as ever)."""
        window = self.layer_windows[layer]
        if not (self.layer_types or self.moe_layers or self.rope_layers):
            return (window,)
        return window, self.layer_type(layer), self.is_moe(layer), self.uses_rope(layer)

    @property
    def expert_width(self) -> int:
        return self.expert_intermediate_size or self.intermediate_size

    @property
    def kv_layout(self) -> tuple[int, int, int]:
        """(heads, key channels, value channels) the KV cache holds per token and layer."""
        return (self.cache_heads or self.num_kv_heads, self.key_dim or self.head_dim, self.value_dim or self.head_dim)

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


def family_of(config: Mapping[str, Any], where: str = CONFIG_FILE) -> Family:
    """The family config.json's model_type names; ConfigError or UnsupportedArchitectureError otherwise."""
    config = language_config(config, where)
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(f'{where} has no "model_type"; heavylift plans: {", ".join(FAMILIES)}')
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {_shown(model_type)} is not supported; heavylift plans: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def head_dim_of(config: Mapping[str, Any], where: str = CONFIG_FILE) -> int:
    """Channels per attention head, as transformers derives them: config.json's head_dim, else the family's
    default, else hidden_size / num_attention_heads, which must then divide evenly; DeepSeek-V3's RoPE
    channels (qk_rope_head_dim, which its config calls head_dim)."""
    config = language_config(config, where)
    if config.get("model_type") == "deepseek_v3":
        return _integer(config, "qk_rope_head_dim", where, MAX_HEAD_DIM, default=64)
    explicit = _integer(config, "head_dim", where, MAX_HEAD_DIM, default=family_of(config, where).head_dim_default)
    if explicit is not None:
        return explicit
    hidden = _integer(config, "hidden_size", where, MAX_HIDDEN_SIZE)
    heads = _integer(config, "num_attention_heads", where, MAX_ATTENTION_HEADS)
    if hidden % heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} does not divide hidden_size {hidden} and there "
                          "is no head_dim; fix one of them or give head_dim")
    return hidden // heads


SLIDING, FULL, CHUNKED = "sliding_attention", "full_attention", "chunked_attention"  # transformers' layer types
QWEN2_MAX_WINDOW_LAYERS_DEFAULT = 28  # Qwen2Config's and Qwen3Config's first sliding layer, unless config.json says
GEMMA3_SLIDING_PATTERN_DEFAULT = 6  # Gemma3TextConfig: every sixth layer attends to everything
LLAMA4_NO_ROPE_INTERVAL_DEFAULT = 4  # Llama4TextConfig: every fourth layer has no RoPE and full attention


def language_config(config: Mapping[str, Any], where: str = CONFIG_FILE) -> Mapping[str, Any]:
    """The config of the model heavylift plans: config.json's, or for a multimodal config (families.WRAPPERS)
    its text_config, with the model_type transformers gives it where config.json leaves it out."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where} must hold a JSON object; re-download it")
    kind = config.get("model_type")
    text_type = WRAPPERS.get(kind) if isinstance(kind, str) else None
    if text_type is not None:
        text = config.get("text_config")
        if not isinstance(text, Mapping):
            raise ConfigError(f"{where} describes a {kind} model without a text_config object; "
                              "download config.json again")
        config = {"model_type": text_type, **text}
    family = FAMILIES.get(config.get("model_type")) if isinstance(config.get("model_type"), str) else None
    if family is None or not family.defaults:
        return config
    named = {family.aliases.get(k, k): v for k, v in config.items()}
    return {**family.defaults, **named}


def _window(config: Mapping[str, Any], where: str, family: Family) -> int | None:
    """The sliding window a family's sliding layers keep (0 or null in config.json: none)."""
    window = family.window_default
    if "sliding_window" in config:
        window = _integer(config, "sliding_window", where, MAX_CONTEXT_TOKENS, low=0, default=None)
    qwen = config["model_type"] in ("qwen2", "qwen3", "qwen3_moe")
    if qwen and not _flag(config, "use_sliding_window", where, False):
        return None
    if window and config["model_type"] == "gemma3_text" and _flag(config, "use_bidirectional_attention", where, False):
        window = window // 2 + 1  # Gemma3TextConfig.__post_init__
    return window or None


def _rope_layers(config: Mapping[str, Any], where: str, n_layers: int) -> tuple[bool, ...]:
    """Llama 4's no_rope_layers (1: the layer applies RoPE), by default all but every fourth."""
    flags = config.get("no_rope_layers")
    if not flags:  # null or empty: Llama4TextConfig's default
        every = _integer(config, "no_rope_layer_interval", where, MAX_LAYERS, default=LLAMA4_NO_ROPE_INTERVAL_DEFAULT)
        return tuple((i + 1) % every != 0 for i in range(n_layers))
    if not isinstance(flags, list) or len(flags) != n_layers or any(f not in (0, 1) for f in flags):
        raise ConfigError(f"{where}: 'no_rope_layers' must list 0 or 1 for each of the {n_layers} layers")
    return tuple(bool(f) for f in flags)


def layer_types_of(config: Mapping[str, Any], where: str = CONFIG_FILE) -> tuple[str, ...]:
    """Per layer, transformers' layer type (full_attention, sliding_attention, chunked_attention), as each
    config's `__post_init__` derives it (transformers 5.24): explicit `layer_types` win; Gemma 2 and gpt-oss
    alternate, starting with a sliding layer; Gemma 3 slides on all but every sliding_window_pattern-th;
    Qwen 2 and Qwen 3 slide from `max_window_layers` on only when `use_sliding_window`; Llama 4 chunks every
    layer that applies RoPE; any other family with a `sliding_window` slides on every layer."""
    config = language_config(config, where)
    family, model_type = family_of(config, where), config["model_type"]
    n = _integer(config, "num_hidden_layers", where, MAX_LAYERS)
    window = _window(config, where, family)
    types = config.get("layer_types")
    if types is None:
        if model_type in ("gemma2", "gpt_oss"):
            types = [SLIDING if i % 2 == 0 else FULL for i in range(n)]
        elif model_type in ("qwen2", "qwen3"):
            start = _integer(config, "max_window_layers", where, MAX_LAYERS, low=0,
                             default=QWEN2_MAX_WINDOW_LAYERS_DEFAULT)
            types = [SLIDING if window and i >= start else FULL for i in range(n)]
        elif model_type == "gemma3_text":
            every = _integer(config, "sliding_window_pattern", where, MAX_LAYERS,
                             default=GEMMA3_SLIDING_PATTERN_DEFAULT)
            types = [SLIDING if (i + 1) % every else FULL for i in range(n)]
        elif model_type == "llama4_text":
            chunk = _integer(config, "attention_chunk_size", where, MAX_CONTEXT_TOKENS, default=None)
            types = [CHUNKED if rope and chunk else FULL for rope in _rope_layers(config, where, n)]
        else:
            types = [SLIDING if window else FULL] * n
    allowed = family.layer_types
    if not isinstance(types, list) or any(t not in allowed for t in types):
        listed = " and ".join(f'"{t}"' for t in allowed)
        raise ConfigError(f"{where}: 'layer_types' must be a list of {listed}, one per layer")
    if len(types) != n:
        raise ConfigError(f"{where} lists {len(types)} layer_types for {n} layers; fix one of the two")
    return tuple(types)


def layer_windows_of(config: Mapping[str, Any], where: str = CONFIG_FILE) -> tuple[int | None, ...]:
    """Per layer, the keys and values its cache keeps in tokens, or None for all of them, as transformers'
    StaticCache does: a sliding layer its window (StaticSlidingWindowLayer), a chunked layer its
    attention_chunk_size (the same layer class; only the mask differs)."""
    config = language_config(config, where)
    family = family_of(config, where)
    window = _window(config, where, family)
    chunk = _integer(config, "attention_chunk_size", where, MAX_CONTEXT_TOKENS, default=None) \
        if family.layer_types[0] == CHUNKED else None
    kept = {SLIDING: window, CHUNKED: chunk, FULL: None}
    return tuple(kept[t] for t in layer_types_of(config, where))


# --- What differs between families beyond the layer layout --------------------------------------------

@dataclass(frozen=True)
class _Experts:
    """A model's MoE blocks: which layers have one, how many experts of what width, and any shared expert."""

    count: int
    per_token: int
    width: int
    shared: int
    layers: tuple[bool, ...]


_EXPERT_COUNT_KEY = {"mixtral": "num_local_experts", "llama4_text": "num_local_experts", "gpt_oss": "num_local_experts",
                     "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def _experts(config: Mapping[str, Any], where: str, n: int, inter: int) -> _Experts:
    """The MoE blocks as each family's decoder layer decides them (transformers 5.24)."""
    kind = config["model_type"]
    count_key = _EXPERT_COUNT_KEY[kind]
    count = _integer(config, count_key, where, MAX_EXPERTS)
    per_token = _integer(config, "num_experts_per_tok", where, count)
    width, shared, layers = inter, 0, tuple([True] * n)
    if kind == "qwen3_moe":
        width = _integer(config, "moe_intermediate_size", where, MAX_INTERMEDIATE_SIZE)
        step = _integer(config, "decoder_sparse_step", where, MAX_LAYERS)
        dense = config.get("mlp_only_layers") or []
        if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dense):
            raise ConfigError(f"{where}: 'mlp_only_layers' must be a list of layer numbers")
        layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(n))
    elif kind == "llama4_text":
        shared = width
        step = _integer(config, "interleave_moe_layer_step", where, MAX_LAYERS)
        listed = config.get("moe_layers")
        chosen = set(listed) if isinstance(listed, list) else set(range(step - 1, n, step))
        layers = tuple(i in chosen for i in range(n))
    elif kind == "deepseek_v3":
        width = _integer(config, "moe_intermediate_size", where, MAX_INTERMEDIATE_SIZE)
        shared = width * _integer(config, "n_shared_experts", where, MAX_EXPERTS, low=0, default=0)
        first = _integer(config, "first_k_dense_replace", where, MAX_LAYERS, low=0, default=0)
        layers = tuple(i >= first for i in range(n))
    return _Experts(count, per_token, width, shared, layers)


def _latent(config: Mapping[str, Any], where: str) -> Latent:
    """DeepseekV3Config's latent attention fields (q_lora_rank null: a plain q_proj)."""
    q_rank = _integer(config, "q_lora_rank", where, MAX_HIDDEN_SIZE, default=None)
    return Latent(q_rank, _integer(config, "kv_lora_rank", where, MAX_HIDDEN_SIZE),
                  _integer(config, "qk_nope_head_dim", where, MAX_HEAD_DIM),
                  _integer(config, "qk_rope_head_dim", where, MAX_HEAD_DIM),
                  _integer(config, "v_head_dim", where, MAX_HEAD_DIM))


def _dense_width(config: Mapping[str, Any], where: str) -> int:
    """The dense MLP's width: Llama 4 sizes its dense layers by intermediate_size_mlp."""
    key = "intermediate_size_mlp" if config["model_type"] == "llama4_text" else "intermediate_size"
    return _integer(config, key, where, MAX_INTERMEDIATE_SIZE)


def _layers(family: Family, dims: Dims, experts: _Experts | None, n_layers: int, config: Mapping[str, Any],
            where: str) -> list[TensorSpec]:
    """Every decoder layer's tensors; ConfigError before building them when they would outnumber MAX_TENSORS."""
    moe = experts is not None and any(experts.layers)
    first = dims if not moe else replace(dims, experts=experts.count, expert_inter=experts.width,
                                         shared_inter=experts.shared)
    per_layer = len(family.layer("model.layers.0", first, config))
    if n_layers * per_layer > MAX_TENSORS:
        key = _EXPERT_COUNT_KEY.get(config["model_type"], "num_local_experts")
        raise ConfigError(f"{where} describes {n_layers:,} layers of {per_layer:,} tensors, more than the "
                          f"{MAX_TENSORS:,} heavylift plans; check num_hidden_layers and {key}")
    out = []
    for i in range(n_layers):
        layer = replace(first if experts is not None and experts.layers[i] else dims, layer=i)
        out += family.layer(f"model.layers.{i}", layer, config)
    return out


def _activation(config: Mapping[str, Any], where: str, family: Family) -> str:
    """The dense MLP's activation: config.json's hidden_act (Gemma's hidden_activation), else the family's default."""
    value = config.get(family.activation_key)
    if value is None:
        return family.activation_default
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{family.activation_key}' is {_shown(value)}; it must name an activation, "
                          f'such as "{family.activation_default}"')
    return value


def _extra_layers(config: Mapping[str, Any], where: str) -> int:
    """Layers a DeepSeek-V3 checkpoint holds past num_hidden_layers for multi-token prediction, which
    transformers does not load (_keys_to_ignore_on_load_unexpected)."""
    if config["model_type"] != "deepseek_v3":
        return 0
    return _integer(config, "num_nextn_predict_layers", where, MAX_LAYERS, low=0, default=0)


def architecture_from_config(config: Mapping[str, Any], where: str = CONFIG_FILE) -> Architecture:
    """Describe the model a config.json defines; `where` names the file in ConfigError and
    UnsupportedArchitectureError messages."""
    outer = config
    config = language_config(config, where)
    family = family_of(config, where)
    kind = config["model_type"]
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
    inter = _dense_width(config, where)
    experts = _experts(config, where, n_layers, _integer(config, "intermediate_size", where, MAX_INTERMEDIATE_SIZE)) \
        if family.moe else None
    tied = _flag(config, "tie_word_embeddings", where, family.tie_default)
    _flag(config, "attention_bias", where, False)  # read by the layer layouts: checked here, once
    _flag(config, "mlp_bias", where, False)
    types = layer_types_of(config, where)
    windows = layer_windows_of(config, where)
    max_positions = _integer(config, "max_position_embeddings", where, MAX_CONTEXT_TOKENS, default=0)
    latent = _latent(config, where) if kind == "deepseek_v3" else None
    pre = prequantized_of(outer, where)

    dims = Dims(0, hidden, inter, heads, kv_heads, head_dim, latent=latent)
    tensors = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), Role.EMBEDDING, None)]
    tensors += _layers(family, dims, experts, n_layers, config, where)
    tensors.append(TensorSpec("model.norm.weight", (hidden,), Role.NORM, None,
                              keep_fp32=tensors[-1].keep_fp32 if kind == "gpt_oss" else None))
    if not tied:
        tensors.append(TensorSpec("lm_head.weight", (vocab, hidden), Role.LM_HEAD, None))
    params = sum(t.numel for t in tensors)
    if params > MAX_PARAMETERS:
        raise ConfigError(f"{where} describes {params:,} parameters, more than the {MAX_PARAMETERS:,} heavylift "
                          "plans; check num_hidden_layers, hidden_size, intermediate_size and vocab_size")
    tensors = [stored_as(t, pre) for t in tensors]
    rope = _rope_layers(config, where, n_layers) if kind == "llama4_text" else ()
    return Architecture(
        model_type=kind, num_layers=n_layers, hidden_size=hidden, intermediate_size=inter,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        tie_word_embeddings=tied, num_experts=experts.count if experts else 0,
        experts_per_token=experts.per_token if experts else 0,
        layer_windows=windows, max_position_embeddings=max_positions, tensors=tuple(tensors),
        layer_types=types if CHUNKED in types else (),
        moe_layers=experts.layers if experts and not all(experts.layers) else (),
        expert_intermediate_size=experts.width if experts and experts.width != inter else 0,
        shared_expert_intermediate_size=experts.shared if experts else 0,
        rope_layers=rope if rope and not all(rope) else (),
        latent=latent, cache_heads=1 if latent else 0, key_dim=latent.kv_rank if latent else 0,
        value_dim=latent.rope if latent else 0, prequantized=pre, wrapped=outer.get("model_type") in WRAPPERS,
        extra_layers=_extra_layers(config, where),
        qk_norm=_flag(config, "use_qk_norm", where, True) if kind == "llama4_text" else False,
        rope_interleave=_flag(config, "rope_interleave", where, True) if latent else False,
        norm_topk_prob=(_flag(config, "norm_topk_prob", where, kind == "deepseek_v3")
                        if kind in ("qwen3_moe", "deepseek_v3") else False),
        expert_groups=(_integer(config, "n_group", where, MAX_EXPERTS, default=1),
                       _integer(config, "topk_group", where, MAX_EXPERTS, default=1)) if latent else (0, 0),
        mlp_activation=_activation(config, where, family),
    )
