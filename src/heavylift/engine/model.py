"""The fast engine: a Llama-style decoder (Qwen 3's per-head q and k norms included) over the loaded weights, a
static KV cache, CUDA-graph decode.

`Engine.from_model` takes a model transformers loaded by the plan (quantized, placed) and keeps
pointers to its weights; `Engine.from_random` builds the same storage layer by layer straight from
random bf16 tensors (benchmarks of shapes whose checkpoints would not fit on disk). `prefill` runs
chunks of a prompt through dense matmuls and SDPA; `decode` runs one token per sequence through the
GEMV kernels, replaying one captured graph per device segment, with the cache length kept on the GPU.

A server drives it over slots: `prefill_steps` fills one slot a chunk at a time, so decode steps of the
other slots run between chunks, `decode(tokens, active)` steps only the active rows of a batch bucket, and
`mixed(tokens, slots, positions, lengths)` runs rows of (slot, position, token), a prompt's chunk riding in
a decode step as extra rows (every bucket's buffers are views of the full batch's, every graph shares one
pool).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from heavylift.hardware.gpus import KIND_CUDA
from heavylift.model.architecture import head_dim_of, layer_windows_of
from heavylift.planner import runtimes
from heavylift.defaults import PREFILL_CHUNK_TOKENS, SCORE_ROWS, SDPA_MASK_ALIGNMENT
from heavylift.planner.engine_program import prefill_mlp_rows
from .ops import OPS, attention_scratch, decode_splits, dense_linear, dense_linear_mul, dense_parts
from .weights import DENSE, QWeight, from_linear, quantize


@dataclass
class PrefillScratch:
    """One prompt's buffers for the sliding-window layers of one device whose chunks reach past their window
    (Engine._prefill_scratch); the other layers' prefill attention needs none."""

    keys: torch.Tensor  # [heads, prompt, head_dim] bf16: the cache's keys repeated per query head
    values: torch.Tensor
    positions: torch.Tensor  # [prompt] int32: 0, 1, ... (key positions)
    mask: torch.Tensor  # [chunk, prompt rounded up to 16] bf16: 0 or -inf
    masked: torch.Tensor  # the same in bool: True where a key is hidden
    outside: torch.Tensor  # bool: keys beyond the window


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float


@dataclass
class Layer:
    device: torch.device
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: tuple[QWeight, ...]
    o: QWeight
    gate: QWeight
    up: QWeight
    down: QWeight
    window: int  # sliding window in tokens, 0 for full attention
    k_cache: torch.Tensor | None = None  # [batch, kv heads, context, head dim]
    v_cache: torch.Tensor | None = None
    qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None  # Qwen 3's q_norm and k_norm weights [head dim]


# Decode buffers with a row per sequence (a smaller batch steps on their first rows), and the one-row fp16
# planes the 4-bit GEMVs read.
_PER_ROW = ("hidden", "hidden2", "x", "qkv", "q", "attn", "act", "slots", "active", "positions", "row_slots",
            "lengths")
_PLANES = ("x16", "attn16", "act16")


def _lower_right(queries: int, keys: int):
    """causal_lower_right(queries, keys): each query sees the keys up to its own position, the last query all of
    them. The bias is a tensor subclass around a placeholder that no kernel reads (float32 [2, queries, keys] in
    host memory, left unset), made with Python dispatch off: a tracing mode (tests/planner/memtrace.py) runs
    the engine's prefill, and a tensor subclass cannot be made under one."""
    with torch._C._DisableTorchDispatch():
        return causal_lower_right(queries, keys)


def _on(device: torch.device):
    """`device` made the current one while its work is issued: Triton launches a kernel on the current CUDA
    device and stream, not on its tensors' device (torch ops follow their tensors either way)."""
    return torch.cuda.device(device) if device.type == KIND_CUDA else nullcontext()


def _config_dict(config) -> Mapping:
    return config if isinstance(config, Mapping) else config.to_dict()


def model_reason(config, quant: str) -> str | None:
    """Why the fast engine cannot run this model (a config.json mapping or a transformers config) in this
    precision on any device, or None (runtimes.model_reason: the planner's rules)."""
    return runtimes.model_reason(_config_dict(config), quant)


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the fast engine needs Triton (`pip install triton`)"
    return None


def device_reason(devices: Sequence[torch.device]) -> str | None:
    """Why the engine's kernels cannot run on these torch devices in this process (its torch reference path
    still can), or None: runtimes.devices_reason, told whether Triton imports here."""
    kinds = [d.type for d in devices]
    return runtimes.devices_reason(kinds, _triton_reason() if all(k == KIND_CUDA for k in kinds) else None)


def unsupported_reason(config, quant: str, devices: Sequence[torch.device]) -> str | None:
    """Why `heavylift run --engine auto` would run this model on transformers on these devices, or None
    when the engine runs it (runtimes.choose_runtime, the one decision)."""
    runtime = runtimes.choose_runtime(_config_dict(config), quant, runtimes.AUTO, [d.type for d in devices],
                                      device_reason(devices))
    return runtime.reason or None


def _windows(config) -> list[int]:
    """Each layer's sliding window, 0 for full attention (model.architecture, the one place it is derived)."""
    return [w or 0 for w in layer_windows_of(config.to_dict())]


def _has_qk_norm(config) -> bool:
    """Whether the family's layer norms each head's queries and keys (Qwen 3's q_norm and k_norm): its layout in
    model.families, the one place a family's tensors are listed."""
    from heavylift.model.architecture import architecture_from_config

    return any(t.name.endswith("self_attn.q_norm.weight")
               for t in architecture_from_config(config.to_dict()).layer_tensors(0))


def _shape(config) -> Shape:
    head_dim = head_dim_of(config.to_dict())
    return Shape(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
                 config.intermediate_size, config.vocab_size, config.rms_norm_eps)


def token_scores(logits: torch.Tensor, following: torch.Tensor, top: int) -> list:
    """For each row of `logits` [positions, vocab], the log-probability of the token that follows it
    (`following`, one per row) and the `top` most likely tokens: [(logprob, ((token, logprob), ...)), ...]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, following.to(logprobs.device)[:, None])[:, 0].tolist()
    if not top:
        return [(c, ()) for c in chosen]
    best = torch.topk(logprobs, top, dim=-1)
    return [(c, tuple(zip(i, v))) for c, i, v in zip(chosen, best.indices.tolist(), best.values.tolist())]


def rope_tables(rotary: torch.nn.Module, context: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 cos and sin of every position, first halves only (rotate-half RoPE repeats them), from
    transformers' own rotary module, so every scaling rule it knows applies."""
    positions = torch.arange(context, device=device)[None]
    probe = torch.zeros(1, 1, head_dim, device=device, dtype=torch.bfloat16)
    cos, sin = rotary(probe, positions)
    half = head_dim // 2
    return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()


class Engine:
    """Decoder state for up to `batch` sequences of up to `context` tokens."""

    def __init__(self, shape: Shape, layers: list[Layer], embed: torch.Tensor, norm: torch.Tensor,
                 lm_head: QWeight, rotary: torch.nn.Module, batch: int, context: int, ops: str = "triton",
                 prefill_rows: Mapping[torch.device, int] | None = None):
        self.shape, self.layers, self.embed, self.norm, self.lm_head = shape, layers, embed, norm, lm_head
        self.batch, self.context, self.ops = batch, context, OPS[ops]
        # Tokens of a prefill chunk a device takes through its layers at a time, where its plan says fewer than
        # the whole chunk fit (plan.DevicePlan.prefill_rows); a device not named takes the whole chunk.
        self.prefill_rows = dict(prefill_rows or {})
        self.rotary = rotary
        self.scale = shape.head_dim ** -0.5
        self.devices = list(dict.fromkeys([embed.device] + [layer.device for layer in layers] + [norm.device]))
        self.rope = {d: rope_tables(rotary, context, shape.head_dim, d) for d in self.devices}
        kv_shape = (batch, shape.kv_heads, context, shape.head_dim)
        for layer in layers:
            layer.k_cache = torch.zeros(kv_shape, dtype=torch.bfloat16, device=layer.device)
            layer.v_cache = torch.zeros(kv_shape, dtype=torch.bfloat16, device=layer.device)
        self.seq_len = {d: torch.zeros(batch, dtype=torch.int32, device=d) for d in self.devices}
        self.segments = self._segments()
        self._static: dict[int, dict] = {}
        self._graphs: dict[tuple[int, bool], list] = {}  # (batch, mixed) -> each segment's graph
        self._pool = None  # the CUDA graphs' one shared memory pool, made at the first capture
        self._full: dict | None = None  # the decode buffers at the engine's batch (_allocate_buffers)
        self.ragged = False  # set by enable_ragged(): steps advance only the rows `decode` is told are active

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model, batch: int, context: int, ops: str = "triton",
                   prefill_rows: Mapping[torch.device, int] | None = None) -> "Engine":
        """Point at the weights of a loaded Llama-style transformers model; nothing is copied."""
        config, inner = model.config, model.model
        layers, windows = [], _windows(config)
        for i, block in enumerate(inner.layers):
            attn, mlp = block.self_attn, block.mlp
            qk_norm = (attn.q_norm.weight.data, attn.k_norm.weight.data) if hasattr(attn, "q_norm") else None
            layers.append(Layer(block.input_layernorm.weight.device, block.input_layernorm.weight.data,
                                block.post_attention_layernorm.weight.data,
                                (from_linear(attn.q_proj), from_linear(attn.k_proj), from_linear(attn.v_proj)),
                                from_linear(attn.o_proj), from_linear(mlp.gate_proj), from_linear(mlp.up_proj),
                                from_linear(mlp.down_proj), windows[i], qk_norm=qk_norm))
        return cls(_shape(config), layers, inner.embed_tokens.weight.data, inner.norm.weight.data,
                   from_linear(model.lm_head), inner.rotary_emb, batch, context, ops, prefill_rows)

    @classmethod
    def from_random(cls, config, kind: int, device, batch: int, context: int, seed: int = 0,
                    ops: str = "triton") -> "Engine":
        """Random bf16 weights (std 0.02) quantized into `kind` storage one matrix at a time, so a model
        whose bf16 checkpoint would not fit the disk or the GPU is built at its quantized size; norms
        (Qwen 3's per-head q and k norms too) 1 + the same noise."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        shape = _shape(config)
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*size):
            return (torch.randn(*size, generator=g, device=device, dtype=torch.bfloat16) * 0.02)

        def lin(n, k):
            return quantize(rand(n, k), kind)

        h, d, windows, qk_norm = shape.hidden, shape.head_dim, _windows(config), _has_qk_norm(config)
        layers = [Layer(torch.device(device), 1 + rand(h), 1 + rand(h),
                        (lin(shape.heads * d, h), lin(shape.kv_heads * d, h), lin(shape.kv_heads * d, h)),
                        lin(h, shape.heads * d), lin(shape.intermediate, h), lin(shape.intermediate, h),
                        lin(h, shape.intermediate), windows[i], qk_norm=(1 + rand(d), 1 + rand(d)) if qk_norm else None)
                  for i in range(config.num_hidden_layers)]
        rotary = LlamaRotaryEmbedding(config).to(device)
        return cls(shape, layers, rand(shape.vocab, h), 1 + rand(h), quantize(rand(shape.vocab, h), DENSE), rotary,
                   batch, context, ops)

    def with_cache(self, batch: int, context: int) -> "Engine":
        """An engine over these weights (nothing copied) with a cache of its own for `batch` sequences of
        `context` tokens. This engine's cache and graphs are released first, so the two never hold a cache
        at once; it cannot decode afterwards (a benchmark's batch sweep past the planned batch)."""
        self._graphs.clear()
        self._static.clear()
        self._full = None
        for layer in self.layers:
            layer.k_cache = layer.v_cache = None
        layers = [replace(layer) for layer in self.layers]
        return Engine(self.shape, layers, self.embed, self.norm, self.lm_head, self.rotary, batch, context,
                      self.ops.name, self.prefill_rows)

    def _segments(self) -> list[tuple[torch.device, list[Layer]]]:
        """Consecutive layers on one device: each becomes one captured graph."""
        out: list[tuple[torch.device, list[Layer]]] = []
        for layer in self.layers:
            if out and out[-1][0] == layer.device:
                out[-1][1].append(layer)
            else:
                out.append((layer.device, [layer]))
        return out

    @property
    def weight_bytes(self) -> int:
        per_layer = sum(w.nbytes for layer in self.layers for w in (*layer.qkv, layer.o, layer.gate, layer.up,
                                                                      layer.down))
        return per_layer + self.lm_head.nbytes

    # -- prefill ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], slot: int = 0) -> torch.Tensor:
        """Run a prompt into `slot` of the cache (replacing what it held); the last position's logits."""
        for logits in self.prefill_steps(ids, slot):
            pass
        return logits[0]

    def prefill_steps(self, ids: Sequence[int], slot: int = 0, scores: int | None = None,
                      chunk: int | None = None):
        """`prefill` one chunk per step: yields None after each chunk but the last, then (the last
        position's logits [1, vocab] float32, the prompt's scores or None), `chunk` tokens at a time (at
        most PREFILL_CHUNK_TOKENS, which the planner counts). With `scores` (0 to 5), the
        scores are, for each prompt token after the first, its log-probability under the positions before
        it and the `scores` most likely tokens there: a list of (logprob, ((token, logprob), ...)).

        The slot's length is set only when the last chunk is in, so decode steps of other slots may run
        between chunks (the slot inactive): a step writes an inactive row's key and value at the last
        position of the context, which no prompt reaches."""
        if len(ids) > self.context:
            raise ValueError(f"{len(ids)} tokens exceed the engine's context of {self.context}")
        with torch.inference_mode():
            tokens = torch.tensor(list(ids), dtype=torch.long, device=self.embed.device)
            chunk = min(chunk or PREFILL_CHUNK_TOKENS, PREFILL_CHUNK_TOKENS)
            scratch = {d: self._prefill_scratch(len(tokens), d, chunk) for d, _ in self.segments}
            found = [] if scores is not None else None
        for start in range(0, len(tokens), chunk):
            with torch.inference_mode():
                hidden = None  # the last chunk's hidden state, not read again: freed before this chunk starts
                hidden = self._prefill_chunk(tokens[start:start + chunk], start, slot, scratch)
                if found is not None:
                    found += self._scores(hidden, tokens[start + 1:start + 1 + len(hidden)], scores)
            if start + chunk < len(tokens):
                yield None
        with torch.inference_mode(), _on(self.norm.device):
            for d in self.devices:
                self.seq_len[d][slot] = len(tokens)
            x = self._norm(hidden[-1:].to(self.norm.device), self.norm)
            logits = dense_linear(x, self.lm_head).float()
        yield logits, found

    @torch.inference_mode()
    def prompt_logprobs(self, ids: Sequence[int], first: int, slot: int = 0) -> torch.Tensor:
        """Prefill `ids` into `slot` (as `prefill` does) and return the log-probabilities over the whole
        vocabulary at positions first, first + 1, ..., len(ids) - 1: float32 [len(ids) - first, vocab] on
        the last device. The head runs over SCORE_ROWS positions at a time; only the rows asked for are kept
        (heavylift eval scores the second half of each window)."""
        if len(ids) > self.context:
            raise ValueError(f"{len(ids)} tokens exceed the engine's context of {self.context}")
        tokens = torch.tensor(list(ids), dtype=torch.long, device=self.embed.device)
        scratch = {d: self._prefill_scratch(len(tokens), d) for d, _ in self.segments}
        rows = []
        for start in range(0, len(tokens), PREFILL_CHUNK_TOKENS):
            hidden = None  # the last chunk's, freed before this one starts
            hidden = self._prefill_chunk(tokens[start:start + PREFILL_CHUNK_TOKENS], start, slot, scratch)
            with _on(self.norm.device):
                for piece in hidden[max(first - start, 0):].to(self.norm.device).split(SCORE_ROWS):
                    x = self._norm(piece, self.norm)
                    rows.append(torch.log_softmax(dense_linear(x, self.lm_head).float(), dim=-1))
        for d in self.devices:
            self.seq_len[d][slot] = len(tokens)
        return torch.cat(rows)

    def _scores(self, hidden: torch.Tensor, following: torch.Tensor, top: int) -> list:
        """Each position's log-probability of the token after it (`following`, one fewer at a prompt's end)
        and its `top` best tokens, from the final norm and the head over at most SCORE_ROWS positions at a
        time: the full-vocabulary logits of a whole chunk would be chunk x vocab floats."""
        out = []
        hidden = hidden[:len(following)].to(self.norm.device)
        following = following.to(self.norm.device)
        with _on(self.norm.device):
            for start in range(0, len(following), SCORE_ROWS):
                x = self._norm(hidden[start:start + SCORE_ROWS], self.norm)
                out += token_scores(dense_linear(x, self.lm_head), following[start:start + SCORE_ROWS], top)
        return out

    def _norm(self, x, weight):
        return self.ops.rmsnorm(x, weight, self.shape.eps, torch.empty_like(x))

    def _prefill_scratch(self, prompt: int, dev, chunk: int | None = None) -> PrefillScratch | None:
        """One prompt's buffers for a device's sliding-window layers, at the prompt's full length, where a chunk
        reaches past a window (None elsewhere): the keys and values repeated per query head, the key positions
        and the chunks' masks, all views of one allocation each, so a long prompt's chunks reuse them instead of
        each taking a larger one (which the allocator would keep cached)."""
        s = self.shape
        first = min(prompt, chunk or PREFILL_CHUNK_TOKENS)
        if not any(layer.window and layer.window < prompt for layer in self.layers if layer.device == dev):
            return None
        width = -(-prompt // SDPA_MASK_ALIGNMENT) * SDPA_MASK_ALIGNMENT
        bf16, flags = dict(dtype=torch.bfloat16, device=dev), dict(dtype=torch.bool, device=dev)
        keys, values = (torch.empty(s.heads, prompt, s.head_dim, **bf16) for _ in range(2))
        return PrefillScratch(keys, values, torch.arange(prompt, dtype=torch.int32, device=dev),
                              torch.empty(first, width, **bf16), torch.empty(first, width, **flags),
                              torch.empty(first, width, **flags))

    def _prefill_chunk(self, tokens, start: int, slot: int, scratch: dict) -> torch.Tensor:
        """A chunk's hidden state through every layer, each device's layers updating it in place, on a device
        with prefill_rows that many of its tokens through all of the device's layers at a time."""
        hidden = F.embedding(tokens, self.embed)
        for dev, layers in self.segments:
            with _on(dev):
                hidden = hidden.to(dev)
                step = self.prefill_rows.get(dev) or len(hidden)
                for lo in range(0, len(hidden), step):
                    for layer in layers:
                        self._prefill_layer(layer, hidden[lo:lo + step], start + lo, slot, scratch[dev])
        return hidden

    def _prefill_layer(self, layer: Layer, hidden: torch.Tensor, start: int, slot: int,
                       scratch: PrefillScratch | None) -> None:
        """One decoder layer over a chunk's hidden state, which it updates in place (both residual adds); each
        temporary is freed once read for the last time."""
        s, t, dev = self.shape, len(hidden), layer.device
        positions = torch.arange(start, start + t, dtype=torch.int32, device=dev)
        slots = torch.full((t,), slot, dtype=torch.int32, device=dev)
        x = self._norm(hidden, layer.ln1)
        qkv = dense_parts(x, layer.qkv)
        del x
        q = torch.empty(t, s.heads, s.head_dim, dtype=torch.bfloat16, device=dev)
        cos, sin = self.rope[dev]
        self.ops.rope_cache(qkv, positions, slots, cos, sin, layer.k_cache, layer.v_cache, s.heads, s.kv_heads, q,
                            layer.qk_norm, s.eps)
        del qkv, slots
        attn = self._prefill_attention(q, layer, start, positions, slot, scratch)
        del q, positions
        hidden.add_(dense_linear(attn, layer.o))
        del attn
        self._prefill_mlp(layer, hidden)

    def _prefill_mlp(self, layer: Layer, hidden: torch.Tensor) -> None:
        """hidden += down(silu(gate(x)) * up(x)), x the normed hidden state, prefill_mlp_rows rows at a time:
        SiLU in place on the gate's output, the up projection multiplied into it as each tile of its weight is
        done (dense_linear_mul): the values transformers' MLP rounds to, with one intermediate [rows, width]
        alive instead of three. x goes once the last rows' up projection has read it."""
        x = self._norm(hidden, layer.ln2)
        t = len(x)
        step = prefill_mlp_rows(t, layer.gate.n)
        for start in range(0, t, step):
            rows = slice(start, start + step)
            act = dense_linear(x[rows], layer.gate)
            F.silu(act, inplace=True)
            dense_linear_mul(x[rows], layer.up, act)
            if start + step >= t:
                del x
            hidden[rows].add_(dense_linear(act, layer.down))
            del act

    def _prefill_attention(self, q, layer: Layer, start: int, positions, slot: int,
                           scratch: PrefillScratch | None) -> torch.Tensor:
        """SDPA of a chunk's queries over the cache up to its last token, each query head reading its key and
        value head in place (enable_gqa): causal on a first chunk, aligned to the last key after it
        (causal_lower_right, which a GPU runs on flash attention with no mask); a sliding-window layer whose
        chunk reaches past its window takes `_windowed_attention`."""
        t = q.shape[0]
        end = start + t
        if layer.window and end > layer.window:
            return self._windowed_attention(q, layer, start, positions, slot, scratch)
        k, v = (cache[slot, :, :end][None] for cache in (layer.k_cache, layer.v_cache))
        q = q.transpose(0, 1)[None]
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right(t, end), scale=self.scale,
                                               enable_gqa=True)
        return y[0].transpose(0, 1).reshape(t, -1)

    def _windowed_attention(self, q, layer: Layer, start: int, positions, slot: int,
                            scratch: PrefillScratch) -> torch.Tensor:
        """SDPA over the cache with a sliding window, as transformers runs it: keys repeated per query head (into
        the prompt's scratch) and an additive bf16 mask built in place in the scratch (its rows 16-aligned, as
        the memory-efficient kernel reads them without a copy)."""
        s, t = self.shape, q.shape[0]
        end, group = start + t, self.shape.heads // self.shape.kv_heads
        k, v = scratch.keys[:, :end], scratch.values[:, :end]
        for rep, cache in ((k, layer.k_cache), (v, layer.v_cache)):
            source = cache[slot, :, :end]
            rep.view(s.kv_heads, group, end, s.head_dim).copy_(source[:, None].expand(-1, group, -1, -1))
        q = q.transpose(0, 1)[None]
        keys, masked = scratch.positions[None, :end], scratch.masked[:t, :end]
        torch.gt(keys, positions[:, None], out=masked)  # a later key
        torch.le(keys, (positions - layer.window)[:, None], out=scratch.outside[:t, :end])
        masked.logical_or_(scratch.outside[:t, :end])
        mask = scratch.mask[:t, :end].zero_().masked_fill_(masked, float("-inf"))
        y = F.scaled_dot_product_attention(q, k[None], v[None], attn_mask=mask[None, None], scale=self.scale)
        return y[0].transpose(0, 1).reshape(t, -1)

    # -- decode -----------------------------------------------------------------------------------

    def _buffers(self, batch: int) -> dict:
        """The static buffers of a decode step of `batch` rows: views of the first rows of the buffers for
        the engine's whole batch, allocated once, so a server's batch buckets add no memory."""
        if batch in self._static:
            return self._static[batch]
        if self._full is None:
            self._full = self._allocate_buffers()
        full, s = self._full, self.shape
        per_device = {}
        for dev, b in full["dev"].items():
            splits = decode_splits(dev, batch, s.kv_heads)
            o_part, m_part, l_part = (t.view(-1) for t in b["scratch"])
            view = {name: b[name][:batch] for name in _PER_ROW if name in b}
            if "last" in b:
                view["last"] = b["last"]
            for name in _PLANES:  # one row's planes: only a one-row step reads or writes them
                view[name] = b[name] if batch == 1 else None
            view["scratch"] = (o_part[:batch * s.heads * splits * s.head_dim].view(batch, s.heads, splits, s.head_dim),
                               m_part[:batch * s.heads * splits].view(batch, s.heads, splits),
                               l_part[:batch * s.heads * splits].view(batch, s.heads, splits))
            per_device[dev] = view
        self._static[batch] = dict(tokens=full["tokens"][:batch], dev=per_device, final=full["final"][:batch],
                                   logits=full["logits"][:batch])
        return self._static[batch]

    def _allocate_buffers(self) -> dict:
        """Engine._buffers at the engine's batch. The attention scratch holds the split count of whichever
        batch up to it needs the most (at most DECODE_SPLITS_MAX per row, as the planner counts it). Rows
        of `active` (only for `decode(tokens, active)`) say which sequences a step advances; a mixed step's
        rows (`mixed`) read their sequence from `row_slots` (int64: it also indexes the scatter of the cache
        lengths), their cache position from `positions` and how many positions they see from `lengths`."""
        s, batch = self.shape, self.batch
        per_device = {}
        for dev, _ in self.segments:
            bf16 = dict(dtype=torch.bfloat16, device=dev)
            rows = max(b * decode_splits(dev, b, s.kv_heads) for b in range(1, batch + 1))
            per_device[dev] = dict(
                hidden=torch.zeros(batch, s.hidden, **bf16), hidden2=torch.zeros(batch, s.hidden, **bf16),
                x=torch.zeros(batch, s.hidden, **bf16),
                qkv=torch.zeros(batch, (s.heads + 2 * s.kv_heads) * s.head_dim, **bf16),
                q=torch.zeros(batch, s.heads, s.head_dim, **bf16), attn=torch.zeros(batch, s.heads * s.head_dim, **bf16),
                act=torch.zeros(batch, s.intermediate, **bf16),
                slots=torch.arange(batch, dtype=torch.int32, device=dev),
                scratch=attention_scratch(1, s.heads, s.head_dim, rows, dev))
            if self.ragged:
                per_device[dev].update(active=torch.zeros(batch, dtype=torch.bool, device=dev),
                                       positions=torch.zeros(batch, dtype=torch.int32, device=dev),
                                       last=torch.tensor(self.context - 1, dtype=torch.int32, device=dev),
                                       row_slots=torch.zeros(batch, dtype=torch.long, device=dev),
                                       lengths=torch.zeros(batch, dtype=torch.int32, device=dev))
            # The fp16 planes of each 4-bit GEMV's input (ops.planes), written by the kernel that makes it.
            wants = all(self.ops.wants_planes(layer.gate) for layer in self.layers if layer.device == dev)
            for name, size in zip(_PLANES, (s.hidden, s.heads * s.head_dim, s.intermediate)):
                per_device[dev][name] = torch.zeros(size // 2, dtype=torch.int32, device=dev) if wants else None
        last = self.norm.device
        return dict(tokens=torch.zeros(batch, dtype=torch.long, device=self.embed.device), dev=per_device,
                    final=torch.zeros(batch, s.hidden, dtype=torch.bfloat16, device=last),
                    logits=torch.zeros(batch, s.vocab, dtype=torch.bfloat16, device=last))

    def _run_segment(self, index: int, batch: int, mixed: bool = False) -> None:
        """One device's layers for one token per row, reading and writing the static buffers: a decode step
        (row i is sequence i) or, `mixed`, rows of any sequences at any positions (Engine.mixed)."""
        s, st = self.shape, self._static[batch]
        dev, layers = self.segments[index]
        b = st["dev"][dev]
        ops, seq_len, (cos, sin) = self.ops, self.seq_len[dev], self.rope[dev]
        if index == 0:
            b["hidden"].copy_(F.embedding(st["tokens"], self.embed))
        positions, slots, lengths, row_slots = seq_len, b["slots"], seq_len, None
        if mixed:
            positions, slots, lengths, row_slots = b["positions"], b["row_slots"], b["lengths"], b["row_slots"]
        elif self.ragged:  # an inactive row writes where no prompt or live sequence reads (prefill_steps)
            positions = torch.where(b["active"], seq_len[:batch], b["last"], out=b["positions"])
        for layer in layers:
            ops.rmsnorm(b["hidden"], layer.ln1, s.eps, b["x"], b["x16"])
            ops.linear(b["x"], layer.qkv, b["qkv"], x16=b["x16"])
            ops.rope_cache(b["qkv"], positions, slots, cos, sin, layer.k_cache, layer.v_cache, s.heads,
                           s.kv_heads, b["q"], layer.qk_norm, s.eps)
            ops.decode_attention(b["q"], layer.k_cache, layer.v_cache, lengths, self.scale, layer.window, b["attn"],
                                 b["scratch"], b["attn16"], slots=row_slots)
            ops.linear(b["attn"], (layer.o,), b["hidden2"], residual=b["hidden"], x16=b["attn16"])
            ops.rmsnorm(b["hidden2"], layer.ln2, s.eps, b["x"], b["x16"])
            ops.glu(b["x"], layer.gate, layer.up, b["act"], b["x16"], b["act16"])
            ops.linear(b["act"], (layer.down,), b["hidden"], residual=b["hidden2"], x16=b["act16"])
        if mixed:  # each sequence's length: its furthest row's (a padding row's 1 leaves a live length as it is)
            seq_len.scatter_reduce_(0, b["row_slots"], b["lengths"], "amax")
        elif self.ragged:
            seq_len[:batch] += b["active"]
        else:
            seq_len[:batch] += 1
        if index == len(self.segments) - 1:
            ops.rmsnorm(b["hidden"], self.norm, s.eps, st["final"])
            if self.lm_head.kind == DENSE:  # cuBLAS streams a bf16 matrix this wide at full bandwidth
                torch.mm(st["final"], self.lm_head.data.t(), out=st["logits"])
            else:
                ops.linear(st["final"], (self.lm_head,), st["logits"])

    def _carry(self, index: int, batch: int) -> None:
        """Hand the hidden state to the next segment's device."""
        st = self._static[batch]
        src = st["dev"][self.segments[index][0]]["hidden"]
        st["dev"][self.segments[index + 1][0]]["hidden"].copy_(src, non_blocking=True)

    def _capture(self, batch: int, mixed: bool = False) -> list:
        """Warm every kernel up (autotuning included), then capture each segment as a CUDA graph."""
        saved = {d: t.clone() for d, t in self.seq_len.items()}
        # Warm-up on a side stream per device, as graph capture wants; each segment on its own device, after
        # the segment before it and the carry of its output. It writes past the live lengths (the restore hides it).
        sides = {dev: torch.cuda.Stream(dev) for dev, _ in self.segments}
        for dev, side in sides.items():
            side.wait_stream(torch.cuda.current_stream(dev))
        previous = None
        for i, (dev, _) in enumerate(self.segments):
            with _on(dev), torch.cuda.stream(sides[dev]):
                if previous is not None:
                    sides[dev].wait_stream(previous)
                self._run_segment(i, batch, mixed)
                if i + 1 < len(self.segments):
                    self._carry(i, batch)
            previous = sides[dev]
        for dev, side in sides.items():
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
        for d, t in saved.items():
            self.seq_len[d].copy_(t)
        graphs = []
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for i, (dev, _) in enumerate(self.segments):
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            # One pool for every batch's graphs: their temporaries die inside each replay, and replays never
            # overlap, so the pool holds one step's temporaries whatever the number of buckets.
            with torch.cuda.device(dev), torch.cuda.graph(graph, pool=self._pool):
                self._run_segment(i, batch, mixed)
            graphs.append(graph)
        return graphs

    def enable_ragged(self) -> None:
        """Let `decode` step only some rows (`active`); before the first decode step."""
        if self._full is not None:
            raise RuntimeError("enable_ragged() comes before the first decode step")
        self.ragged = True

    def free_slot(self, slot: int) -> None:
        """Forget a slot's sequence: its length back to 0, so its next prompt starts clean."""
        for d in self.devices:
            self.seq_len[d][slot] = 0

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token to each of the first len(tokens) sequences; their next-token logits (float32).
        With `active` (bool per row, after enable_ragged), only those rows' sequences advance (all of them
        when it is left out); the others' logits are meaningless."""
        batch = tokens.shape[0]
        if batch > self.batch:
            raise ValueError(f"a step of {batch} sequences exceeds the engine's batch of {self.batch}")
        if active is not None and not self.ragged:
            raise ValueError("decode takes `active` only after enable_ragged()")
        if self.ragged and active is None:
            active = torch.ones(batch, dtype=torch.bool)
        st = self._buffers(batch)
        st["tokens"].copy_(tokens.view(-1))
        if active is not None:
            for d, b in st["dev"].items():
                b["active"].copy_(active, non_blocking=True)
        return self._step(batch, False)

    def _step(self, batch: int, mixed: bool) -> torch.Tensor:
        """Run the step whose inputs are in the buffers of `batch` rows (its graphs, captured at its first run
        where every device is a GPU); its logits in float32."""
        graphs_ok = all(d.type == "cuda" for d in self.devices)
        if graphs_ok and (batch, mixed) not in self._graphs:
            self._graphs[batch, mixed] = self._capture(batch, mixed)
        for i in range(len(self.segments)):
            if graphs_ok:
                self._graphs[batch, mixed][i].replay()
            else:
                self._run_segment(i, batch, mixed)
            if i + 1 < len(self.segments):
                self._carry(i, batch)
        return self._static[batch]["logits"].float()

    @torch.inference_mode()
    def mixed(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
              lengths: torch.Tensor) -> torch.Tensor:
        """One step of rows (slot, position, token), after enable_ragged: row i writes its key and value at
        position positions[i] of sequence slots[i], then attends to that sequence's first lengths[i]
        positions (positions[i] + 1; a window keeps its last ones). Every row writes before any attends, so
        several rows of one sequence at consecutive positions (a prompt's chunk) see each other causally,
        and a decode token is the row at its sequence's length. Afterwards each sequence's length is the
        largest of its rows' lengths (or what it was). A row that only pads the step to a bucket writes at
        the context's last position, which no sequence reaches, of a sequence another row steps, with
        length 1. The logits (float32) of every row; the inputs (host or device tensors, row counts equal)
        are read before the step runs, the step's row count is a size `decode` takes too."""
        batch = tokens.shape[0]
        if not self.ragged:
            raise ValueError("mixed steps come after enable_ragged()")
        if batch > self.batch:
            raise ValueError(f"a step of {batch} rows exceeds the engine's batch of {self.batch}")
        st = self._buffers(batch)
        if all(d.type == "cuda" for d in self.devices) and (batch, True) not in self._graphs:
            self._fill_rows(st, torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long),
                            torch.full((batch,), self.context - 1, dtype=torch.int32),
                            torch.ones(batch, dtype=torch.int32))  # the capture's warm-up runs padding rows
            self._graphs[batch, True] = self._capture(batch, True)
        self._fill_rows(st, tokens, slots, positions, lengths)
        return self._step(batch, True)

    @staticmethod
    def _fill_rows(st: dict, tokens, slots, positions, lengths) -> None:
        st["tokens"].copy_(tokens.view(-1), non_blocking=True)
        for b in st["dev"].values():
            b["row_slots"].copy_(slots, non_blocking=True)
            b["positions"].copy_(positions, non_blocking=True)
            b["lengths"].copy_(lengths, non_blocking=True)

    def lengths(self) -> list[int]:
        return self.seq_len[self.segments[0][0]].tolist()
