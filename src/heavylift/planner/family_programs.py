"""transformers' forward as allocation programs for the families whose layers depart furthest from Llama's:
Llama 4 (chunked masks, complex RoPE, L2 qk norm, NoPE temperature tuning, every token through every expert),
DeepSeek-V3 (latent attention) and gpt-oss (sinks, biased interleaved experts). Each function mirrors the
transformers 5.24 code named in its docstring, as forward_program.py does for the others, and
tests/planner/test_programs.py holds them to a trace of the real forward. Pure Python: no torch.
"""

from __future__ import annotations

from .allocator import Program, Tensor
from heavylift.model.architecture import Architecture
from .matmul_programs import BF16, FP32, INT64, expert_weights, linear
from .shared_programs import eager_output, expert_routing, expert_unsort_sum, linear_mlp, mask_indices, \
    repeated_kv, rms_core, sdpa_kernel

COMPLEX64 = 8  # a complex64 element: Llama 4's RoPE frequencies


# --- Llama 4 ------------------------------------------------------------------------------------------

def llama4_norm(p: Program, rows: int, width: int, weight: bool = True) -> Tensor:
    """Llama4TextRMSNorm (weight) and Llama4TextL2Norm (none): x in fp32, its square and mean (freed once the
    epsilon is added), rsqrt, the product, cast back; times the weight in bf16."""
    y, _ = rms_core(p, rows, width, keep_mean=False)
    cast = p.alloc("norm_bf16", BF16 * rows * width)
    p.free(y)
    if not weight:
        return cast
    out = p.alloc("normed", BF16 * rows * width)
    p.free(cast)
    return out


def llama4_chunked_mask(p: Program, batch: int, tokens: int, kv: int) -> Tensor:
    """create_chunked_causal_mask (masking_utils.sdpa_mask, non-vmap) without padding: the left padding per
    sequence (zeros), then chunk indices of keys and queries ((position - padding) // chunk), their equality,
    and the causal bound; a [batch, 1, tokens, kv] bool."""
    c, b = tokens, batch
    pad = p.alloc("mask_padding", INT64 * b)
    indices = mask_indices(p, b, c, kv)
    chunks = []
    for n in (kv, c):  # the keys' chunk indices, then the queries'
        i = p.alloc("mask_pad_index", INT64 * b)
        d = p.alloc("mask_sub", INT64 * b * n)
        p.free(i)
        chunks.append(p.alloc("mask_chunk", INT64 * b * n))
        p.free(d)
    eq = p.alloc("mask_eq", b * c * kv)
    p.free(*chunks)
    same = p.alloc("mask_and", b * c * kv)
    p.free(eq)
    le = p.alloc("mask_le", c * kv)
    m = p.alloc("mask", b * c * kv)
    p.free(le, same)
    p.free(*indices, pad)
    return m


def llama4_rotary(p: Program, arch: Architecture, tokens: int) -> Tensor:
    """Llama4TextRotaryEmbedding.forward: positions times the inverse frequencies in fp32, then their complex
    exponential (torch.polar of ones), scaled: [1, tokens, head_dim / 2] complex64."""
    half = arch.head_dim // 2
    pf = p.alloc("rope_pos", FP32 * tokens)
    fr = p.alloc("rope_freqs", FP32 * tokens * half)
    p.free(pf)
    ones = p.alloc("rope_ones", FP32 * tokens * half)
    polar = p.alloc("rope_polar", COMPLEX64 * tokens * half)
    p.free(ones)
    cis = p.alloc("rope_cis", COMPLEX64 * tokens * half)
    p.free(polar, fr)
    return cis


def llama4_projections(p: Program, arch: Architecture, quant: str, rows: int, tokens: int, layer: int,
                       native_fp8: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Llama4TextAttention up to the cache update: q, k, v; on a RoPE layer apply_rotary_emb (q and k in fp32,
    times the complex frequencies, cast back) and, with use_qk_norm, an L2 norm on each; on a NoPE layer the
    query scaled by its temperature (attn_temperature_tuning: log1p(floor((position + 1) / floor_scale)) in
    fp32, the positions and scales held until the attention returns). Returns (q, k, v, those held)."""
    h, nh, nkv, d = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    q0 = linear(p, quant, rows, h, nh * d, native_fp8)
    k0 = linear(p, quant, rows, h, nkv * d, native_fp8)
    v = linear(p, quant, rows, h, nkv * d, native_fp8)
    if not arch.uses_rope(layer):
        pa = p.alloc("positions", INT64 * tokens)
        pos = p.alloc("positions", INT64 * tokens)
        p.free(pa)
        value = p.alloc("scale_fp32", FP32 * tokens)
        for label in ("scale_plus_one", "scale_div", "scale_floor", "scale_log1p", "scale_mul", "attn_scales"):
            nxt = p.alloc(label, FP32 * tokens)
            p.free(value)
            value = nxt
        scaled = p.alloc("q_scaled", FP32 * rows * nh * d)
        q = p.alloc("q", BF16 * rows * nh * d)
        p.free(scaled, q0)
        return q, k0, v, [pos, value]
    qf = p.alloc("rope_q_fp32", FP32 * rows * nh * d)
    kf = p.alloc("rope_k_fp32", FP32 * rows * nkv * d)
    qc = p.alloc("rope_q_cis", FP32 * rows * nh * d)  # complex64, half as many elements
    kc = p.alloc("rope_k_cis", FP32 * rows * nkv * d)
    q = p.alloc("rope_q", BF16 * rows * nh * d)
    k = p.alloc("rope_k", BF16 * rows * nkv * d)
    p.free(qf, kf, qc, kc, q0, k0)
    if arch.qk_norm:
        normed = llama4_norm(p, rows * nh, d, weight=False)
        p.free(q)
        q = normed
        normed = llama4_norm(p, rows * nkv, d, weight=False)
        p.free(k)
        k = normed
    return q, k, v, []


def llama4_feed_forward(p: Program, arch: Architecture, quant: str, rows: int, native_fp8: bool
                        ) -> tuple[Tensor, list[Tensor]]:
    """Llama4TextMoe: the router (bf16 logits, top-k, every other score -inf, sigmoid in fp32, cast back), every
    token repeated for every expert and scaled by its score, two batched matmuls through all experts
    (Llama4TextExperts), the shared expert (a SiLU-gated MLP), the experts' outputs summed into it. Returns
    (the output, the router logits the decoder layer holds until it returns)."""
    h, e, k, i = arch.hidden_size, arch.num_experts, arch.experts_per_token, arch.expert_width
    # The router is an nn.Linear subclass: FP8 (torchao) quantized, otherwise bf16 (model.tensors.LINEAR_ROUTER).
    logits = linear(p, quant if quant == "fp8" else "bf16", rows, h, e, native_fp8)
    top_v = p.alloc("topk", BF16 * rows * k)
    top_i = p.alloc("topk", INT64 * rows * k)
    full = p.alloc("router_full", BF16 * rows * e)
    f = p.alloc("router_fp32", FP32 * rows * e)
    sig = p.alloc("router_sigmoid", FP32 * rows * e)
    p.free(f)
    scores = p.alloc("router_scores", BF16 * rows * e)
    p.free(sig, full, top_v, top_i)
    rep = p.alloc("repeat", BF16 * e * rows * h)
    col = p.alloc("scores_column", BF16 * e * rows)
    routed = p.alloc("routed_in", BF16 * e * rows * h)
    p.free(col, rep)
    cached = expert_weights(p, quant, e * h * 2 * i)
    gu = p.alloc("gate_up", BF16 * e * rows * 2 * i)
    act = p.alloc("act", BF16 * e * rows * i)
    prod = p.alloc("act_up", BF16 * e * rows * i)
    p.free(act)
    cached += expert_weights(p, quant, e * i * h)
    down = p.alloc("down", BF16 * e * rows * h)
    p.free(prod, gu)
    shared = linear_mlp(p, quant, rows, h, arch.shared_expert_intermediate_size, native_fp8)
    p.free(p.alloc("experts_sum", BF16 * rows * h))
    p.free(scores, routed, down, *cached)
    return shared, [logits]


# --- DeepSeek-V3 --------------------------------------------------------------------------------------

def halves_rope(p: Program, nbytes: int, difference_first: bool = False) -> Tensor:
    """RoPE on two halves of the channels, each rotated by the other (two products and a difference, two
    products and a sum, each half the size), concatenated: DeepSeek's apply_rotary_pos_emb_interleave (the
    even and odd channels; the sum freed first) and gpt-oss's _apply_rotary_emb (the two halves; the
    difference freed first)."""
    half = nbytes // 2
    a, b = p.alloc("rope_mul", half), p.alloc("rope_mul", half)
    diff = p.alloc("rope_sub", half)
    p.free(a, b)
    a, b = p.alloc("rope_mul", half), p.alloc("rope_mul", half)
    add = p.alloc("rope_add", half)
    p.free(a, b)
    out = p.alloc("rope", nbytes)
    p.free(*((diff, add) if difference_first else (add, diff)))
    return out


def latent_attention(p: Program, arch: Architecture, quant: str, batch: int, tokens: int, kv: int, masked: bool,
                     cache_positions: bool, native_fp8: bool, rms_norm, rope) -> Tensor:
    """DeepseekV3Attention.forward with a StaticCache of its compressed latent: queries through the q_a / q_b
    bottleneck, the latent (kv_a_proj_with_mqa) normed and RoPE on its shared key, the latent cached (the
    cache's tensors replace the new ones), the cached latent expanded per head by kv_b_proj for all `kv`
    positions with the keys assembled in a new tensor, SDPA, o_proj. `rms_norm(p, rows, width)` and
    `rope(p, nbytes)` are forward_program's; RoPE is interleaved when the config says rope_interleave."""
    m, h, nh = arch.latent, arch.hidden_size, arch.num_heads
    rows, qk = batch * tokens, m.nope + m.rope
    if m.q_rank is None:
        q = linear(p, quant, rows, h, nh * qk, native_fp8)
    else:
        qa = linear(p, quant, rows, h, m.q_rank, native_fp8)
        qn = rms_norm(p, rows, m.q_rank)
        p.free(qa)
        q = linear(p, quant, rows, m.q_rank, nh * qk, native_fp8)
        p.free(qn)
    compressed = linear(p, quant, rows, h, m.kv_rank + m.rope, native_fp8)
    latent = rms_norm(p, rows, m.kv_rank)
    rotate = halves_rope if arch.rope_interleave else rope
    q_rot = rotate(p, BF16 * rows * nh * m.rope)
    k_rot = rotate(p, BF16 * rows * m.rope)
    if cache_positions:
        ar = p.alloc("cache_pos", INT64 * tokens)
        pos = p.alloc("cache_pos", INT64 * tokens)
        p.free(ar, pos)
    p.free(latent, k_rot)
    query = p.alloc("query", BF16 * rows * nh * qk)
    expanded = linear(p, quant, batch * kv, m.kv_rank, nh * (m.nope + m.value), native_fp8)
    keys = p.alloc("keys", BF16 * batch * nh * kv * qk)
    out = _latent_sdpa(p, arch, batch, tokens, kv, masked)
    o = linear(p, quant, rows, nh * m.value, h, native_fp8)
    p.free(out, q, q_rot, compressed, query, keys, expanded)
    return o


def _latent_sdpa(p: Program, arch: Architecture, batch: int, tokens: int, kv: int, masked: bool) -> Tensor:
    """sdpa_attention_forward on the expanded heads (queries and keys of nope + rope channels, values of
    v_head_dim), through torch SDPA's kernel (a decode step's too: every key head is its query's)."""
    nh = arch.num_heads
    return sdpa_kernel(p, batch, tokens, nh, kv, BF16 * batch * nh * tokens * arch.latent.value, masked)


def deepseek_router(p: Program, arch: Architecture, rows: int) -> list[Tensor]:
    """DeepseekV3TopkRouter: logits in fp32 (the input cast up), sigmoid scores plus the correction bias, each
    group's best two summed, the best topk_group groups kept (a mask built, inverted, filled in), the top-k of
    those, their scores gathered, renormalized (norm_topk_prob) and scaled. Returns what the MoE block holds
    until it returns: the logits, the weights, the indices."""
    h, e, k = arch.hidden_size, arch.num_experts, arch.experts_per_token
    g, tg = arch.expert_groups
    x = p.alloc("router_in", FP32 * rows * h)
    logits = p.alloc("router", FP32 * rows * e)
    p.free(x)
    sig = p.alloc("scores", FP32 * rows * e)
    choice = p.alloc("scores_for_choice", FP32 * rows * e)
    gv = p.alloc("group_top2", FP32 * rows * g * 2)
    gi = p.alloc("group_top2_idx", INT64 * rows * g * 2)
    p.free(gi)
    gs = p.alloc("group_scores", FP32 * rows * g)
    p.free(gv)
    tv = p.alloc("group_topk", FP32 * rows * tg)
    ti = p.alloc("group_idx", INT64 * rows * tg)
    p.free(tv)
    gm = p.alloc("group_mask", FP32 * rows * g)
    sm = p.alloc("score_mask", FP32 * rows * e)
    smb = p.alloc("score_mask_bool", rows * e)
    inv = p.alloc("score_mask_not", rows * e)
    p.free(smb)
    filled = p.alloc("masked_scores", FP32 * rows * e)
    p.free(inv, choice)
    kv_ = p.alloc("topk", FP32 * rows * k)
    ki = p.alloc("topk_idx", INT64 * rows * k)
    p.free(kv_)
    w = p.alloc("topk_weights", FP32 * rows * k)
    den = None
    if arch.norm_topk_prob:
        total = p.alloc("topk_sum", FP32 * rows)
        den = p.alloc("denominator", FP32 * rows)
        p.free(total)
    scaled = p.alloc("topk_scaled", FP32 * rows * k)
    p.free(w)
    p.free(sig, filled, gs, ti, gm, sm, den)
    return [logits, scaled, ki]


# --- gpt-oss --------------------------------------------------------------------------------------------

def gpt_oss_eager(p: Program, arch: Architecture, batch: int, tokens: int, kv: int) -> tuple[Tensor, Tensor]:
    """gpt-oss's eager_attention_forward: K and V repeated to every query head, the scaled scores plus the
    additive mask, each head's sink logit appended as one more key, the row maxima subtracted, the softmax in
    bf16 (returned as the attention weights, which the decoder layer holds until its MoE block returns), the
    weighted values and their transposed copy. Returns (output, weights)."""
    b, c, nh, d = batch, tokens, arch.num_heads, arch.head_dim
    scores = BF16 * b * nh * c * kv
    sinked = BF16 * b * nh * c * (kv + 1)
    reps = repeated_kv(p, arch, b, kv)
    w = p.alloc("scores", scores)
    scaled = p.alloc("scaled", scores)
    p.free(w)
    masked = p.alloc("masked", scores)
    p.free(scaled)
    cat = p.alloc("with_sinks", sinked)
    top = p.alloc("row_max", BF16 * b * nh * c)
    p.free(p.alloc("row_argmax", INT64 * b * nh * c))
    shifted = p.alloc("shifted", sinked)
    p.free(top, cat)
    probs = p.alloc("probs", sinked)
    p.free(masked)
    out = eager_output(p, b, c, nh, d)
    p.free(*reps, shifted)
    return out, probs


def gpt_oss_experts(p: Program, arch: Architecture, quant: str, rows: int) -> tuple[Tensor, Tensor]:
    """GptOssMLP: the router (a biased linear, top-k, softmax over the top-k in bf16; the scores returned to the
    decoder layer, which holds them until it returns), then grouped_mm_experts_forward with biases gathered
    per token before each grouped matmul and gpt-oss's clamped gate (GptOssExperts._apply_gate): both halves
    clamped, gate times sigmoid(alpha gate), times (up + 1). Returns (output, router scores)."""
    h, i, e, k = arch.hidden_size, arch.expert_width, arch.num_experts, arch.experts_per_token
    s = rows * k
    logits = p.alloc("router", BF16 * rows * e)
    top_v = p.alloc("topk", BF16 * rows * k)
    top_i = p.alloc("topk", INT64 * rows * k)
    scores = p.alloc("router_scores", BF16 * rows * k)
    p.free(top_v)
    routing = expert_routing(p, s, h, e, BF16)
    bias = p.alloc("gate_up_bias", BF16 * s * 2 * i)
    cached = expert_weights(p, quant, e * h * 2 * i)
    gu = p.alloc("gate_up", BF16 * s * 2 * i)
    gate, up = p.alloc("gate_clamped", BF16 * s * i), p.alloc("up_clamped", BF16 * s * i)
    ag = p.alloc("alpha_gate", BF16 * s * i)
    sig = p.alloc("sigmoid", BF16 * s * i)
    p.free(ag)
    glu = p.alloc("glu", BF16 * s * i)
    p.free(sig)
    up1 = p.alloc("up_plus_one", BF16 * s * i)
    gated = p.alloc("gated", BF16 * s * i)
    p.free(up1, gate, up, glu, gu)
    down_bias = p.alloc("down_bias", BF16 * s * h)
    p.free(bias)
    cached += expert_weights(p, quant, e * i * h)
    down = p.alloc("down", BF16 * s * h)
    p.free(gated)
    wo = p.alloc("weighted", BF16 * s * h)
    total, held = expert_unsort_sum(p, wo, rows, s, h, BF16)
    p.free(*routing, down_bias, down, *held, *cached)
    p.free(logits, top_i)
    return total, scores
