"""Pieces of transformers' forward that several families' allocation programs share: the start of every
RMSNorm, sdpa_mask's index vectors, torch SDPA's kernel, eager attention's repeated K and V and its output,
the gated MLP (transformers' and the in-place one that heavylift's transformers MLPs and the engine's prefill
compute), and grouped_mm_experts_forward's routing and return path. forward_program.py, family_programs.py and
engine_program.py call them. Pure Python: no torch.
"""

from __future__ import annotations

from .allocator import Program, Tensor
from heavylift.defaults import SDPA_MASK_ALIGNMENT
from heavylift.model.architecture import Architecture
from .matmul_programs import BF16, FP32, INT32, INT64, linear


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def rms_core(p: Program, rows: int, width: int, keep_mean: bool) -> tuple[Tensor, Tensor | None]:
    """What every RMSNorm computes first: x in fp32, its square (freed once averaged), the mean, the epsilon
    added, rsqrt (the sum freed), the product (rsqrt and the fp32 copy freed). The mean lives on until the
    norm returns in Llama's and gpt-oss's code (`keep_mean`); Gemma's and Llama 4's free it once the epsilon is
    added. Returns (the fp32 product, the mean or None)."""
    f = p.alloc("norm_fp32", FP32 * rows * width)
    sq = p.alloc("norm_pow", FP32 * rows * width)
    mean = p.alloc("norm_mean", FP32 * rows)
    p.free(sq)
    eps = p.alloc("norm_eps", FP32 * rows)
    if not keep_mean:
        p.free(mean)
        mean = None
    r = p.alloc("norm_rsqrt", FP32 * rows)
    p.free(eps)
    y = p.alloc("norm_y", FP32 * rows * width)
    p.free(r, f)
    return y, mean


def mask_indices(p: Program, batch: int, tokens: int, kv: int) -> list[Tensor]:
    """sdpa_mask's index vectors: batch and head aranges, the query positions and the key positions (each
    an arange plus its offset, the arange freed). Returns those that live until the mask is built."""
    bar = p.alloc("mask_b", INT64 * batch)
    har = p.alloc("mask_h", INT64)
    q0 = p.alloc("mask_q", INT64 * tokens)
    qa = p.alloc("mask_q", INT64 * tokens)
    p.free(q0)
    k0 = p.alloc("mask_kv", INT64 * kv)
    ka = p.alloc("mask_kv", INT64 * kv)
    p.free(k0)
    return [bar, har, qa, ka]


def sdpa_kernel(p: Program, batch: int, tokens: int, heads: int, kv: int, out_bytes: int, masked: bool) -> Tensor:
    """torch SDPA's kernel on CUDA: without a mask flash attention (the output, its fp32 log-sum-exp); with
    one, the bool mask in bf16 per sequence (convert_boolean_attn_mask), padded to SDPA_MASK_ALIGNMENT keys,
    then the memory-efficient kernel's output."""
    if not masked:
        out = p.alloc("attn", out_bytes)
        lse = p.alloc("lse", FP32 * batch * heads * tokens)
        p.free(lse)
        return out
    fm = p.alloc("mask_bf16", BF16 * batch * tokens * kv)
    pad = p.alloc("mask_pad", BF16 * batch * tokens * _ceil(kv, SDPA_MASK_ALIGNMENT)) \
        if kv % SDPA_MASK_ALIGNMENT else None
    out = p.alloc("attn", out_bytes)
    p.free(pad, fm)
    return out


def repeated_kv(p: Program, arch: Architecture, batch: int, kv: int) -> list[Tensor]:
    """repeat_kv on K and V for eager attention: copies to every query head, none when the heads are as many."""
    if arch.num_heads == arch.num_kv_heads:
        return []
    nh, d = arch.num_heads, arch.head_dim
    return [p.alloc("k_rep", BF16 * batch * nh * kv * d), p.alloc("v_rep", BF16 * batch * nh * kv * d)]


def eager_output(p: Program, batch: int, tokens: int, heads: int, head_dim: int) -> Tensor:
    """eager attention's probabilities times the values, then transpose(1, 2).contiguous(), which copies
    unless the token dimension is 1."""
    out = p.alloc("attn", BF16 * batch * heads * tokens * head_dim)
    if tokens > 1:
        av, out = out, p.alloc("attn_t", BF16 * batch * heads * tokens * head_dim)
        p.free(av)
    return out


def linear_mlp(p: Program, quant: str, rows: int, h: int, i: int, native_fp8: bool) -> Tensor:
    """A SiLU-gated MLP of three nn.Linear projections in `quant` (LlamaMLP, DeepSeek-V3's shared experts,
    Llama4TextMLP): gated_mlp with linear()'s matmuls."""
    return gated_mlp(p, rows, h, i, lambda k, n: linear(p, quant, rows, k, n, native_fp8))


def gated_mlp(p: Program, rows: int, h: int, i: int, project) -> Tensor:
    """down(act(gate(x)) * up(x)) with separate projections, `project(k, n)` allocating one of them: the
    activation outlives the gate, the product the activation and up (transformers' MLPs, the engine's prefill)."""
    gate = project(h, i)
    act = p.alloc("act", BF16 * rows * i)
    p.free(gate)
    up = project(h, i)
    prod = p.alloc("act_up", BF16 * rows * i)
    p.free(act, up)
    down = project(i, h)
    p.free(prod)
    return down


def gated_in_place(h: int, i: int, project, multiply) -> Tensor:
    """act(gate(x)) * up(x) computed in the gate's output, one [rows, i] tensor alive (the engine's prefill,
    engine/model.py _prefill_mlp; heavylift's transformers MLPs, runtime/mlp_forward.py): the gate's output from
    `project(k, n)`, the activation applied to it in place (nothing allocated), the up projection multiplied into
    it by `multiply(k, n)`, which frees what it allocates. Returns the gate's output."""
    act = project(h, i)
    multiply(h, i)
    return act


def expert_routing(p: Program, s: int, h: int, e: int, weight_bytes: int) -> list[Tensor]:
    """grouped_mm_experts_forward's routing of `s` (token, expert) pairs: the expert ids sorted, the permutation,
    the token index (freed once the tokens are gathered), the gathered tokens, the sorted routing weights
    (`weight_bytes` each), the histogram's input, the histogram and the offsets (4-byte counts: int32, gpt-oss's
    fp32). Returns them, in the order the experts' forward frees them as it returns."""
    ids = p.alloc("sorted", INT64 * s)
    perm = p.alloc("perm", INT64 * s)
    tok = p.alloc("token", INT64 * s)
    sel = p.alloc("gathered", BF16 * s * h)
    p.free(tok)
    sw = p.alloc("weights", weight_bytes * s)
    hi = p.alloc("hist_in", INT32 * s)
    hist = p.alloc("hist", INT32 * e)
    offs = p.alloc("offsets", INT32 * e)
    return [ids, perm, sel, sw, hi, hist, offs]


def expert_unsort_sum(p: Program, weighted: Tensor, rows: int, s: int, h: int, out_bytes: int
                      ) -> tuple[Tensor, list[Tensor]]:
    """grouped_mm_experts_forward's return path: the weighted outputs put back in token order (the inverse
    permutation, an arange freed at once, the scattered copy replacing `weighted`), then summed over the top-k.
    Returns (the sum, what lives until the experts' forward returns, in the order it frees them)."""
    inv = p.alloc("inv_perm", INT64 * s)
    ar = p.alloc("arange", INT64 * s)
    p.free(ar)
    unsorted = p.alloc("weighted", out_bytes * s * h)
    p.free(weighted)
    total = p.alloc("sum", out_bytes * rows * h)
    return total, [unsorted, inv]
