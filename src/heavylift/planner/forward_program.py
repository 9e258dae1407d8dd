"""transformers' forward as an allocation program: what each step of it allocates and frees, in order.

Each function mirrors one piece of the code that runs (named in its docstring; transformers 5.24 and
torch SDPA on CUDA) and appends to an allocator `Program` what it allocates, in the order it allocates
and frees it, Python's reference counting included (a local lives until it is rebound or its function
returns). tests/planner/test_programs.py holds these programs to a trace of the real forward on the CPU, event
by event, for every family; what happens inside CUDA kernels (SDPA's mask conversion, flash attention's
log-sum-exp) is written from their source. Matmuls come from matmul_programs.py. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .allocator import Program, Tensor
from heavylift.model.architecture import FAMILIES, Architecture
from heavylift.model.prequantized import keeps_stored
from .matmul_programs import BF16, FP32, INT64, KeptBlockFp8, block_fp8_tiles, expert_weights, linear, linear_mul, \
    linear_over
from .shared_programs import eager_output, expert_routing, expert_unsort_sum, gated_in_place, linear_mlp, \
    mask_indices, repeated_kv, rms_core, sdpa_kernel


@dataclass(frozen=True)
class Step:
    """One forward call: `batch` sequences of `tokens` new tokens after `start` cached ones."""

    batch: int
    tokens: int
    start: int
    context: int  # the static cache's length: the plan's context

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


# --- transformers' forward ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """The layers one device runs and whether it also runs the model's start (embeddings, masks, RoPE
    tables) and end (final norm, lm_head)."""

    layers: range
    first: bool
    last: bool


GEMMA_NORMS = ("gemma2", "gemma3_text")  # RMSNorm in fp32 times (1 + weight), cast back


def _rms_norm(p: Program, family: str, rows: int, hidden: int) -> Tensor:
    """LlamaRMSNorm (fp32 copy, its square, mean, rsqrt, product, bf16 cast, weight) or Gemma2RMSNorm
    (the same in fp32, then (1 + weight) in fp32 and a cast back); Llama 4's in family_programs."""
    if family == "llama4_text":
        from .family_programs import llama4_norm

        return llama4_norm(p, rows, hidden)
    if family == "gpt_oss":  # GptOssRMSNorm: the weight multiplies in fp32, then the cast
        y, mean = rms_core(p, rows, hidden, keep_mean=True)
        w = p.alloc("norm_w", FP32 * rows * hidden)
        out = p.alloc("normed", BF16 * rows * hidden)
        p.free(w, y, mean)
        return out
    if family in GEMMA_NORMS:
        y, _ = rms_core(p, rows, hidden, keep_mean=False)
        w1 = p.alloc("norm_w", FP32 * hidden)
        w2 = p.alloc("norm_1w", FP32 * hidden)
        p.free(w1)
        z = p.alloc("norm_z", FP32 * rows * hidden)
        p.free(w2, y)
        out = p.alloc("normed", BF16 * rows * hidden)
        p.free(z)
        return out
    y, mean = rms_core(p, rows, hidden, keep_mean=True)
    x0 = p.alloc("norm_bf16", BF16 * rows * hidden)
    out = p.alloc("normed", BF16 * rows * hidden)
    p.free(x0, y, mean)
    return out


def _rope(p: Program, nbytes: int, phi3: bool) -> Tensor:
    """apply_rotary_pos_emb on one of q, k: x*cos + rotate_half(x)*sin (Phi-3 then concatenates the
    rotated part with the pass-through part, which is empty at its full rotary)."""
    a = p.alloc("rope_cos", nbytes)
    neg = p.alloc("rope_neg", nbytes // 2)
    half = p.alloc("rope_half", nbytes)
    p.free(neg)
    s = p.alloc("rope_sin", nbytes)
    p.free(half)
    out = p.alloc("rope", nbytes)
    p.free(a, s)
    if phi3:
        cat = p.alloc("rope_cat", nbytes)
        p.free(out)
        out = cat
    return out


def sliding_kv(window: int, step: Step) -> int:
    """Keys a StaticSlidingWindowLayer of `window` (at most the context) attends to in this step (get_mask_sizes)."""
    w = min(window, step.context)
    if step.start >= w:
        return w - 1 + step.tokens
    if step.start + step.tokens > w:
        return step.start + step.tokens
    return w


# Families whose loaded model attends through runtime/attention_forward.py: a full-attention layer reads the
# cache's key and value heads in place on every prefill chunk, with no mask (SDPA's causal_lower_right after the
# first). Gemma 2 and gpt-oss attend eagerly, DeepSeek-V3's latent attention has one key head per query head and
# Llama 4's forward is left as transformers writes it.
LEAN_ATTENTION_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma3_text")


def _mask(p: Program, arch: Architecture, step: Step, window: int | None) -> Tensor | None:
    """create_causal_mask / create_sliding_window_causal_mask (masking_utils.sdpa_mask, non-vmap): a
    [1, 1, tokens, kv] bool, or for eager attention (Gemma 2) its bf16 additive form per sequence.
    SDPA skips the full mask on the first chunk (is_causal) but never on a decode step of a static cache;
    LEAN_ATTENTION_FAMILIES skip it on every prefill chunk of a full-attention layer (lean_mask)."""
    eager = not FAMILIES[arch.model_type].sdpa
    c, b = step.tokens, step.batch
    kv = step.context if window is None else sliding_kv(window, step)
    if not eager and c > 1:
        if window is not None and kv >= window:
            pass
        elif kv == c or step.start == 0 or (window is None and arch.model_type in LEAN_ATTENTION_FAMILIES):
            return None
    if window is not None and arch.model_type == "llama4_text":
        from .family_programs import llama4_chunked_mask

        return llama4_chunked_mask(p, b, c, kv)
    indices = mask_indices(p, b, c, kv)
    if window is None:
        m = p.alloc("mask", c * kv)
    else:
        sub = p.alloc("mask_sub", INT64 * c)
        gt = p.alloc("mask_gt", c * kv)
        p.free(sub)
        a1 = p.alloc("mask_and", c * kv)
        p.free(gt)
        le = p.alloc("mask_le", c * kv)
        m = p.alloc("mask", c * kv)
        p.free(le, a1)
    p.free(*indices)
    if eager:
        f = p.alloc("mask_additive", BF16 * b * c * kv)
        p.free(m)
        m = f
    return m


def _rotary(p: Program, arch: Architecture, tokens: int) -> tuple[Tensor, Tensor]:
    """LlamaRotaryEmbedding.forward: cos and sin [1, tokens, head_dim] in bf16, computed in fp32; gpt-oss's
    [1, tokens, head_dim / 2], the frequencies not doubled."""
    c, d = tokens, arch.head_dim
    if arch.model_type == "gpt_oss":
        pf = p.alloc("rope_pos", FP32 * c)
        fr = p.alloc("rope_freqs", FP32 * c * d // 2)
        p.free(pf)
        c0 = p.alloc("rope_cos", FP32 * c * d // 2)
        c1 = p.alloc("rope_cos", FP32 * c * d // 2)
        p.free(c0)
        s0 = p.alloc("rope_sin", FP32 * c * d // 2)
        s1 = p.alloc("rope_sin", FP32 * c * d // 2)
        p.free(s0)
        cos = p.alloc("cos", BF16 * c * d // 2)
        sin = p.alloc("sin", BF16 * c * d // 2)
        p.free(fr, c1, s1)
        return cos, sin
    pf = p.alloc("rope_pos", FP32 * c)
    fr = p.alloc("rope_freqs", FP32 * c * d // 2)
    p.free(pf)
    emb = p.alloc("rope_emb", FP32 * c * d)
    c0 = p.alloc("rope_cos", FP32 * c * d)
    c1 = p.alloc("rope_cos", FP32 * c * d)
    p.free(c0)
    s0 = p.alloc("rope_sin", FP32 * c * d)
    s1 = p.alloc("rope_sin", FP32 * c * d)
    p.free(s0)
    cos = p.alloc("cos", BF16 * c * d)
    sin = p.alloc("sin", BF16 * c * d)
    p.free(fr, emb, c1, s1)
    return cos, sin


def _rope_tables(p: Program, arch: Architecture, tokens: int) -> list[tuple[Tensor, ...]]:
    """The RoPE tables a forward computes: (cos, sin); Gemma 3 one pair per layer type in use (its sliding layers
    rotate with another base); Llama 4 one complex table."""
    if arch.model_type == "llama4_text":
        from .family_programs import llama4_rotary

        return [(llama4_rotary(p, arch, tokens),)]
    count = len({w is None for w in arch.layer_windows}) if arch.model_type == "gemma3_text" else 1
    return [_rotary(p, arch, tokens) for _ in range(count)]


def _table_bytes(arch: Architecture, tokens: int) -> list[int]:
    """A decoder layer's RoPE inputs as a later device receives them: cos and sin in bf16, or Llama 4's complex64
    frequencies (the same bytes)."""
    if arch.model_type == "llama4_text":
        return [BF16 * 2 * tokens * arch.head_dim]
    if arch.model_type == "gpt_oss":
        return [BF16 * tokens * arch.head_dim // 2] * 2
    return [BF16 * tokens * arch.head_dim] * 2


def _mask_windows(arch: Architecture, mask_order: Sequence[str] | None = None) -> list[int | None]:
    """The masks a model builds per forward, in order: None for the full-attention one, a window for the sliding
    (or Llama 4's chunked) one. Llama 4 builds one per layer type in use, in the order of a Python set of their
    names, which string hashing makes differ between processes: `mask_order` gives it; by default, sorted."""
    windows = [w for w in arch.layer_windows if w]
    window = windows[0] if windows else None
    kind = arch.model_type
    if kind == "llama4_text":
        types = {arch.layer_type(i): arch.layer_windows[i] for i in range(arch.num_layers)}
        return [types[t] for t in (mask_order or sorted(types)) if t in types]
    if kind in ("gemma2", "qwen2", "gemma3_text", "qwen3", "gpt_oss"):
        full = kind != "qwen2" or any(w is None for w in arch.layer_windows)
        return ([None] if full else []) + ([window] if window else [])
    if kind == "llama":
        return [None]
    return [window]  # mistral, mixtral, phi3: one mask, sliding when the config has a window


def _sdpa(p: Program, arch: Architecture, step: Step, kv: int, masked: bool) -> Tensor:
    """sdpa_attention_forward + torch SDPA on CUDA: with a mask, K and V repeated to every query head
    (repeat_kv; a decode step packs the query heads instead), the bool mask turned into a bf16 one per
    sequence (convert_boolean_attn_mask) and padded to 16 keys, then the memory-efficient kernel; without
    one (a first chunk, or any prefill chunk of LEAN_ATTENTION_FAMILIES' full-attention layers: lean_attention),
    flash attention with grouped KV heads and its fp32 log-sum-exp."""
    b, c, nh, d = step.batch, step.tokens, arch.num_heads, arch.head_dim
    out_bytes = BF16 * b * nh * c * d
    if not masked:
        return sdpa_kernel(p, b, c, nh, kv, out_bytes, False)
    reps = []
    if arch.num_heads != arch.num_kv_heads and c > 1:
        reps = [p.alloc("k_rep", BF16 * b * nh * kv * d), p.alloc("v_rep", BF16 * b * nh * kv * d)]
    out = sdpa_kernel(p, b, c, nh, kv, out_bytes, True)
    if c == 1 and arch.num_heads != arch.num_kv_heads:  # packed heads come back strided: reshape copies
        flat = p.alloc("attn", out_bytes)
        p.free(out)
        out = flat
    p.free(*reps)
    return out


def _eager(p: Program, arch: Architecture, step: Step, kv: int) -> tuple[Tensor, Tensor]:
    """Gemma 2's eager_attention_forward: repeated K and V, scores, scaling, logit softcapping (divide,
    tanh, multiply), the additive mask, fp32 softmax (after a fp32 copy of its input) and its bf16 copy (returned, so it lives until the
    decoder layer returns), the weighted values and their transposed copy."""
    b, c, nh, d = step.batch, step.tokens, arch.num_heads, arch.head_dim
    scores = BF16 * b * nh * c * kv
    reps = repeated_kv(p, arch, b, kv)
    # matmul folds [b, heads] into bmm's batch: the query, a transposed view of q_proj's output, copies
    # unless one of the two is 1.
    q_copy = p.alloc("q_bmm", BF16 * b * nh * c * d) if b > 1 and c > 1 else None
    w = p.alloc("scores", scores)
    p.free(q_copy)
    for label in ("scaled", "softcap_div", "softcap_tanh", "softcap_mul", "masked"):
        nxt = p.alloc(label, scores)
        p.free(w)
        w = nxt
    # softmax(dtype=float32) of bf16 scores converts them to a fp32 copy first, then allocates its fp32
    # result: aten SoftMax.cpp fuses the conversion only for fp16 on CUDA. Five score-sized units at once.
    upcast = p.alloc("softmax_in", 2 * scores)
    sm = p.alloc("softmax", 2 * scores)
    p.free(upcast)
    probs = p.alloc("probs", scores)
    p.free(sm, w)
    out = eager_output(p, b, c, nh, d)
    p.free(*reps)
    return out, probs


def _cache_update(p: Program, arch: Architecture, step: Step, window: int | None, k: Tensor, v: Tensor | None
                  ) -> tuple[int, list[Tensor]]:
    """StaticLayer / StaticSlidingWindowLayer.update: (keys attended to, tensors that live until the
    attention returns). The new keys and values go into the preallocated cache (index_copy_) or, for a
    sliding layer past its window, into a concatenation with the cached window."""
    b, c, nkv, d = step.batch, step.tokens, arch.num_kv_heads, arch.head_dim
    kv_new = []
    if window is None or step.start + c <= min(window, step.context):
        ar = p.alloc("cache_pos", INT64 * c)
        pos = p.alloc("cache_pos", INT64 * c)
        p.free(ar, pos)
        kv = step.context if window is None else min(window, step.context)
    else:
        kv = sliding_kv(window, step)
        w = min(window, step.context)
        if step.start >= w and c == 1:  # decode past the window: roll by one, write, copy back
            roll = [p.alloc("cache_roll", BF16 * b * nkv * w * d), p.alloc("cache_roll", BF16 * b * nkv * w * d)]
            p.free(*roll)
            kv = w
        elif step.start == 0:  # the first chunk already exceeds the window: attend to it as it is
            return kv, [k] + ([v] if v else [])
        else:
            kv_new = [p.alloc("keys", BF16 * b * nkv * kv * d), p.alloc("values", BF16 * b * nkv * kv * d)]
    p.free(k, v)
    return kv, kv_new


def _attention(p: Program, arch: Architecture, quant: str, step: Step, layer: int, x: Tensor,
               masks: dict, native_fp8: bool) -> tuple[Tensor, Tensor | None]:
    """The self-attention module of a decoder layer: (o_proj output, attention weights kept by the caller)."""
    b, c, rows, h = step.batch, step.tokens, step.rows, arch.hidden_size
    nh, nkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    phi3 = arch.model_type == "phi3"
    window = arch.layer_windows[layer]
    qkv, held = None, []
    if arch.latent is not None:
        from .family_programs import latent_attention

        o = latent_attention(p, arch, quant, b, c, step.context, masks.get(window) is not None, True, native_fp8,
                             lambda q, r, w: _rms_norm(q, "llama", r, w), lambda q, n: _rope(q, n, False))
        return o, None
    if phi3:
        qkv = linear(p, quant, rows, h, (nh + 2 * nkv) * d, native_fp8)
        q = _rope(p, BF16 * rows * nh * d, True)
        k = _rope(p, BF16 * rows * nkv * d, True)
        v = None  # a view of qkv
    elif arch.model_type in QK_NORMED:
        q, k, v = QK_NORMED[arch.model_type](p, arch, quant, rows, native_fp8)
    elif arch.model_type == "llama4_text":
        from .family_programs import llama4_projections

        q, k, v, held = llama4_projections(p, arch, quant, rows, c, layer, native_fp8)
    else:
        from .family_programs import halves_rope

        rope = (lambda n: halves_rope(p, n, difference_first=True)) if arch.model_type == "gpt_oss" \
            else (lambda n: _rope(p, n, False))
        q0 = linear(p, quant, rows, h, nh * d, native_fp8)
        k0 = linear(p, quant, rows, h, nkv * d, native_fp8)
        v = linear(p, quant, rows, h, nkv * d, native_fp8)
        q = rope(BF16 * rows * nh * d)
        k = rope(BF16 * rows * nkv * d)
        p.free(q0, k0)
    kv, kept = _cache_update(p, arch, step, window, k, v)
    mask = masks.get(window)
    weights = None
    if FAMILIES[arch.model_type].sdpa:
        out = _sdpa(p, arch, step, kv, mask is not None)
    elif arch.model_type == "gpt_oss":
        from .family_programs import gpt_oss_eager

        out, weights = gpt_oss_eager(p, arch, b, c, kv)
    else:
        out, weights = _eager(p, arch, step, kv)
    o = linear(p, quant, rows, nh * d, h, native_fp8)
    if qkv is not None and kept and kept[0] == k:  # Phi-3's values are still a view of qkv: it goes last
        p.free(out, q, *kept, qkv)
    else:
        p.free(out, qkv, q, *kept, *held)
    return o, weights


def qk_normed(norm_family: str, interleaved: bool = True):
    """Qwen 3's and Gemma 3's projections: q and k each normalized per head (an RMSNorm over head_dim channels,
    the projection freed once it is replaced) right after its projection (Qwen 3), or once q, k and v are
    all projected (Gemma 3); then RoPE on both."""
    def project(p: Program, arch: Architecture, quant: str, rows: int,
                native_fp8: bool) -> tuple[Tensor, Tensor, Tensor]:
        h, nh, nkv, d = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
        normed = []
        if interleaved:
            for heads in (nh, nkv):
                raw = linear(p, quant, rows, h, heads * d, native_fp8)
                normed.append(_rms_norm(p, norm_family, rows * heads, d))
                p.free(raw)
            v = linear(p, quant, rows, h, nkv * d, native_fp8)
        else:
            raw = [linear(p, quant, rows, h, heads * d, native_fp8) for heads in (nh, nkv)]
            v = linear(p, quant, rows, h, nkv * d, native_fp8)
            for r, heads in zip(raw, (nh, nkv)):
                normed.append(_rms_norm(p, norm_family, rows * heads, d))
                p.free(r)
        q = _rope(p, BF16 * rows * nh * d, False)
        k = _rope(p, BF16 * rows * nkv * d, False)
        p.free(*normed)
        return q, k, v

    return project


# Families whose model forward keeps its masks in a dict and the embeddings and positions in mask_kwargs.
MASK_DICT_FAMILIES = ("qwen2", "gemma2", "qwen3", "gemma3_text")
QK_NORMED = {"qwen3": qk_normed("llama"), "qwen3_moe": qk_normed("llama"), "gemma3_text": qk_normed("gemma2", False)}


# The families whose dense MLP heavylift computes in place on transformers' forward at inference
# (runtime/mlp_forward.py): their MLP class's forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
# (LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP, Gemma2MLP, Gemma3MLP), and the activation, as ACT2FN names it, has an
# in-place form that computes its values exactly (F.silu(inplace=True); aten.gelu_ with the tanh approximation).
IN_PLACE_MLP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
IN_PLACE_ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh")
# Families whose decoder layers heavylift runs with their residual adds in place on transformers' forward (runtime/
# layer_forward.py), where their MLPs compute in place: the attention's and the MLP's outputs added into the layer's
# input, which is the layer's output, and the down projection written over the normed input where it can.
LEAN_LAYER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def in_place_mlp(arch: Architecture) -> bool:
    """Whether heavylift computes the model's dense MLPs in place on transformers' forward (without gradients)."""
    return arch.model_type in IN_PLACE_MLP_FAMILIES and arch.mlp_activation in IN_PLACE_ACTIVATIONS


def lean_layer(arch: Architecture) -> bool:
    """Whether heavylift adds the residuals of the model's decoder layers in place on transformers' forward."""
    return arch.model_type in LEAN_LAYER_FAMILIES and in_place_mlp(arch)


def _mlp(p: Program, arch: Architecture, quant: str, rows: int, x: Tensor, native_fp8: bool,
         over: bool = False) -> Tensor | None:
    """A dense MLP, down(act(gate(x)) * up(x)): in place where heavylift computes it so (in_place_mlp: the gate's
    output holds the activation, then the product, until down returns; with `over`, down written over x where it
    can, linear_over, and None returned), else as transformers' forward computes it (LlamaMLP and its kin;
    Phi-3's fused gate_up split in two)."""
    h, i = arch.hidden_size, arch.intermediate_size
    if arch.model_type == "phi3":
        gu = linear(p, quant, rows, h, 2 * i, native_fp8)
        act = p.alloc("act", BF16 * rows * i)
        prod = p.alloc("act_up", BF16 * rows * i)
        p.free(act)
        down = linear(p, quant, rows, i, h, native_fp8)
        p.free(prod, gu)
        return down
    if in_place_mlp(arch):
        act = gated_in_place(h, i, lambda k, n: linear(p, quant, rows, k, n, native_fp8),
                             lambda k, n: linear_mul(p, quant, rows, k, n, native_fp8))
        down = (linear_over if over else linear)(p, quant, rows, i, h, native_fp8)
        p.free(act)
        return down
    return linear_mlp(p, quant, rows, h, i, native_fp8)


def _moe(p: Program, arch: Architecture, quant: str, rows: int, native_fp8: bool) -> Tensor:
    """MixtralSparseMoeBlock and Qwen3MoeSparseMoeBlock: the router (_router), then transformers' default
    grouped_mm experts (grouped_experts); DeepSeek-V3's DeepseekV3MoE: its router in fp32, the experts, then
    the shared experts on the same input, added."""
    if arch.model_type == "deepseek_v3":
        from .family_programs import deepseek_router

        kept = deepseek_router(p, arch, rows)
        routed = grouped_experts(p, arch, quant, rows, FP32)
        shared = linear_mlp(p, quant, rows, arch.hidden_size, arch.shared_expert_intermediate_size, native_fp8)
        out = p.alloc("moe", BF16 * rows * arch.hidden_size)
        p.free(shared, routed, *kept)
        return out
    kept, weight_bytes = _router(p, arch, rows)
    out = grouped_experts(p, arch, quant, rows, weight_bytes)
    p.free(*kept)
    return out


def _router(p: Program, arch: Architecture, rows: int) -> tuple[list[Tensor], int]:
    """MixtralTopKRouter / Qwen3MoeTopKRouter: bf16 logits, their fp32 softmax, the top-k renormalized (Qwen 3
    only with norm_topk_prob) and, for Qwen 3, cast back to bf16. Returns what the block holds until it
    returns (logits, routing weights, expert indices) and the routing weights' element size."""
    e, k = arch.num_experts, arch.experts_per_token
    logits = p.alloc("router", BF16 * rows * e)
    f = p.alloc("router_fp32", FP32 * rows * e)
    sm = p.alloc("router_softmax", FP32 * rows * e)
    p.free(f)
    top_v = p.alloc("topk", FP32 * rows * k)
    top_i = p.alloc("topk", INT64 * rows * k)
    if arch.model_type != "qwen3_moe":
        tot = p.alloc("topk_sum", FP32 * rows)
        p.free(tot, sm)
        return [logits, top_v, top_i], FP32
    if arch.norm_topk_prob:
        p.free(p.alloc("topk_sum", FP32 * rows))
    cast = p.alloc("topk_bf16", BF16 * rows * k)
    p.free(top_v, sm)
    return [logits, cast, top_i], BF16


def grouped_experts(p: Program, arch: Architecture, quant: str | KeptBlockFp8, rows: int,
                    weight_bytes: int) -> Tensor:
    """moe.py grouped_mm_experts_forward: tokens sorted by expert and gathered, one grouped matmul for gate_up
    and one for down, the routing weights applied in their dtype (fp32 or bf16: `weight_bytes`), the sum
    over the top-k (cast to bf16 where it is fp32). Block-FP8 experts kept as stored run
    finegrained_fp8.fp8_grouped_mm_experts_forward: the same steps, the routing weights cast to bf16 first,
    each grouped matmul dequantizing its experts' weights tile by tile where heavylift's torch matmuls run
    it (_kept_expert_tiles; the kernel's allocates its output alone)."""
    h, i, e, k = arch.hidden_size, arch.expert_width, arch.num_experts, arch.experts_per_token
    s = rows * k
    kept_fp8 = isinstance(quant, KeptBlockFp8)
    out_bytes = BF16 if kept_fp8 else max(BF16, weight_bytes)  # bf16 activations times the weights
    routing = expert_routing(p, s, h, e, weight_bytes)
    cached = expert_weights(p, quant, e * 2 * i * h)
    gu = p.alloc("gate_up", BF16 * s * 2 * i)
    _kept_expert_tiles(p, quant, min(e, s), h, 2 * i)
    act = p.alloc("act", BF16 * s * i)
    prod = p.alloc("act_up", BF16 * s * i)
    p.free(act, gu)
    cached += expert_weights(p, quant, e * h * i)
    down = p.alloc("down", BF16 * s * h)
    _kept_expert_tiles(p, quant, min(e, s), i, h)
    p.free(prod)
    cast = p.alloc("weights_bf16", BF16 * s) if kept_fp8 and weight_bytes != BF16 else None
    wo = p.alloc("weighted", out_bytes * s * h)
    p.free(cast)
    total, held = expert_unsort_sum(p, wo, rows, s, h, out_bytes)
    if out_bytes == BF16:
        p.free(*routing, down, *held, *cached)
        return total
    out = p.alloc("moe", BF16 * rows * h)
    p.free(*routing, down, *held, total, *cached)
    return out


def _kept_expert_tiles(p: Program, quant: str | KeptBlockFp8, experts: int, k: int, n: int) -> None:
    """block_fp8_matmul.grouped_matmul after its output: the [n, k] weight of each expert some row reaches (at
    most `experts`: every expert, or one per routed row) dequantized tile by tile (block_fp8_tiles)."""
    if isinstance(quant, KeptBlockFp8) and quant.fallback:
        for _ in range(experts):
            block_fp8_tiles(p, k, n, quant.block)


def _decoder_layer(p: Program, arch: Architecture, quant: str, step: Step, layer: int, h: Tensor, masks: dict,
                   native_fp8: bool) -> Tensor:
    """One decoder layer: norms, attention, residual adds, MLP (or MoE); returns its output."""
    fam, rows, hid = arch.model_type, step.rows, arch.hidden_size
    x = _rms_norm(p, fam, rows, hid)
    o, weights = _attention(p, arch, quant, step, layer, x, masks, native_fp8)
    if fam == "llama4_text":
        return _llama4_layer_end(p, arch, quant, rows, layer, x, o, native_fp8)
    p.free(x)
    if fam in GEMMA_NORMS:
        o2 = _rms_norm(p, fam, rows, hid)
        p.free(o)
        h1 = p.alloc("hidden", BF16 * rows * hid)
        p.free(o2)
        x2 = _rms_norm(p, fam, rows, hid)
        m = _mlp(p, arch, quant, rows, x2, native_fp8)
        p.free(x2)
        m2 = _rms_norm(p, fam, rows, hid)
        p.free(m)
        h2 = p.alloc("hidden", BF16 * rows * hid)
        p.free(m2, h1, weights)
        return h2
    if lean_layer(arch) and not arch.is_moe(layer):  # runtime/layer_forward.py: o added into h, then freed
        p.free(o)
        x2 = _rms_norm(p, fam, rows, hid)
        m = _mlp(p, arch, quant, rows, x2, native_fp8, over=True)
        if m is not None:  # the MLP's own output: x2 goes as its name takes it, m once added into h
            p.free(x2)
            x2 = m
        p.free(x2)
        return h
    h1 = p.alloc("hidden", BF16 * rows * hid)
    p.free(o)
    x2 = _rms_norm(p, fam, rows, hid)
    if fam == "gpt_oss":  # the attention weights go when the MoE block's router scores replace them
        from .family_programs import gpt_oss_experts

        m, scores = gpt_oss_experts(p, arch, quant, rows)
        p.free(x2, weights)
        h2 = p.alloc("hidden", BF16 * rows * hid)
        p.free(m, h1, scores)
        return h2
    m = _moe(p, arch, quant, rows, native_fp8) if arch.is_moe(layer) else _mlp(p, arch, quant, rows, x2, native_fp8)
    p.free(x2)
    h2 = p.alloc("hidden", BF16 * rows * hid)
    p.free(m, h1)
    return h2


def _llama4_layer_end(p: Program, arch: Architecture, quant: str, rows: int, layer: int, x: Tensor, o: Tensor,
                      native_fp8: bool) -> Tensor:
    """Llama4TextDecoderLayer after its attention, whose output (`attention_states`) and, on an MoE layer, the
    router logits live until the layer returns; the normed input goes once the residual is added."""
    from .family_programs import llama4_feed_forward, llama4_norm

    hid = arch.hidden_size
    h1 = p.alloc("hidden", BF16 * rows * hid)
    p.free(x)
    x2 = llama4_norm(p, rows, hid)
    held = []
    if arch.is_moe(layer):
        m, held = llama4_feed_forward(p, arch, quant, rows, native_fp8)
    else:
        m = _mlp(p, arch, quant, rows, x2, native_fp8)
    p.free(x2)
    h2 = p.alloc("hidden", BF16 * rows * hid)
    p.free(m, h1, o, *held)
    return h2


def forward_precisions(arch: Architecture, quant: str) -> tuple[str | KeptBlockFp8, ...]:
    """How a forward in `quant` may run its matmuls on the machine that runs it: the scheme's own way, or for a
    block-FP8 checkpoint kept as stored, the `kernels` package's kernels and heavylift's torch matmuls in their
    place (whichever the machine has: the plan holds the larger)."""
    if not keeps_stored(arch.prequantized, quant):
        return (quant,)
    return tuple(KeptBlockFp8(arch.prequantized.block, fallback) for fallback in (False, True))


def transformers_forward(p: Program, arch: Architecture, quant: str | KeptBlockFp8, step: Step, part: Part,
                         layers: Sequence[int], logits: bool, native_fp8: bool = True,
                         mask_order: Sequence[str] | None = None) -> Tensor | None:
    """One forward of the model (or of the layers one device runs) with a StaticCache, as
    LlamaForCausalLM.forward and its siblings run it: embeddings, positions, masks and RoPE tables on the
    first device; `layers` (the ones simulated: a run repeats the same pattern per layer); final norm and
    (if `logits`) lm_head on the last token. On a later device, accelerate's hooks copy the hidden state
    once and the masks, positions and RoPE tables for every layer. Returns the logits' tensor name.
    `mask_order`: Llama 4's masks in the order its forward builds them in this process (_mask_windows).
    `quant`: one of forward_precisions(arch, scheme): a block-FP8 checkpoint kept as stored runs its matmuls as
    a KeptBlockFp8, one way or the other."""
    if isinstance(quant, str) and keeps_stored(arch.prequantized, quant):
        raise ValueError(f"a block-FP8 checkpoint kept in {quant} runs one of forward_precisions' ways")
    b, c, rows, hid = step.batch, step.tokens, step.rows, arch.hidden_size
    mask_windows = _mask_windows(arch, mask_order)
    shared: list[Tensor] = []
    if part.first:
        if arch.model_type in GEMMA_NORMS:  # embeddings times sqrt(hidden)
            e0 = p.alloc("embed", BF16 * rows * hid)
            h = p.alloc("embed_scaled", BF16 * rows * hid)
            p.free(e0)
        else:
            h = p.alloc("embed", BF16 * rows * hid)
        pa = p.alloc("positions", INT64 * c)
        pos = p.alloc("positions", INT64 * c)
        p.free(pa)
        masks = {w: _mask(p, arch, step, w) for w in mask_windows}
        # Gemma 3 computes a table for each layer type its layers use; the others one (the tuple frees backwards).
        tables = _rope_tables(p, arch, c)
        held = [m for m in masks.values() if m]
        freed = [t for table in tables for t in reversed(table)]
        # What the model's forward frees as it returns, in the order its frame clears them: Qwen2, Gemma 2 and
        # their kin keep their masks in a dict and the embeddings and positions in mask_kwargs; Llama 4 frees its
        # complex frequencies before them.
        if arch.model_type == "llama4_text":
            shared = held + freed + [h, pos]
        elif arch.model_type == "gpt_oss":
            shared = [pos] + held + [h] + freed
        elif arch.model_type in MASK_DICT_FAMILIES:
            shared = held + [h, pos] + freed
        else:
            shared = [pos, h] + held + freed
    else:
        h = p.alloc("hidden_in", BF16 * rows * hid)
        masks = {w: _mask_size_only(arch, step, w) for w in mask_windows}
    inputs = h
    for layer in layers:
        copies = []
        if not part.first:  # AlignDevicesHook.pre_forward: send_to_device(args, kwargs)
            copies = [p.alloc("mask_copy", n) for n in masks.values() if n] + [
                p.alloc("rope_copy", n) for n in _table_bytes(arch, c)] + [p.alloc("positions_copy", INT64 * c)]
            layer_masks = {w: ("mask_copy" if n else None) for w, n in masks.items()}
        else:
            layer_masks = masks
        out = _decoder_layer(p, arch, quant, step, layer, h, layer_masks, native_fp8)
        p.free(*copies)
        if out != h and (h != inputs or not part.first):  # a lean layer's output is its input
            p.free(h)
        h = out
    if not part.last:
        return None
    xf = _rms_norm(p, arch.model_type, rows, hid)
    p.free(*([] if h in shared else [h]), *shared)
    result = None
    if logits:
        result = p.alloc("logits", BF16 * b * arch.vocab_size)
        if arch.model_type == "gemma2":  # final logit softcapping: divide, tanh, multiply
            for label in ("logits_div", "logits_tanh", "logits_cap"):
                nxt = p.alloc(label, BF16 * b * arch.vocab_size)
                p.free(result)
                result = nxt
    p.free(xf)
    return result


def _mask_size_only(arch: Architecture, step: Step, window: int | None) -> int:
    """Bytes of a mask another device built, as a later device receives it (0 when skipped)."""
    probe = Program()
    name = _mask(probe, arch, step, window)
    if name is None:
        return 0
    return next(e[2] for e in probe.events if e[0] == "alloc" and e[1] == name)
