"""The fast engine's prefill as allocation programs (engine/model.py Engine.prefill, _prefill_chunk,
_prefill_layer, _prefill_attention, _prefill_mlp), Python's reference counting included: a layer frees each
temporary after its last read and updates the hidden state in place. The Triton kernels it calls allocate
nothing (they write into buffers they are given); tests/planner/test_programs.py holds these programs to a
trace of the engine with such kernels, and bench/cuda_inplace_probe.py its matmuls, attention and MLP to a
GPU's allocator. Pure Python: no torch.
"""

from __future__ import annotations

from functools import partial
from itertools import groupby
from typing import Sequence

from .allocator import Program, Tensor, replayed_rounds
from heavylift.model.architecture import Architecture
from heavylift.defaults import PREFILL_MLP_BYTES, SDPA_MASK_ALIGNMENT
from .matmul_programs import BF16, FP32, INT32, INT64, dense_linear, dense_linear_mul
from .forward_program import Part
from .shared_programs import gated_in_place
from heavylift.schemes import SCHEMES


def prefill_mlp_rows(tokens: int, width: int) -> int:
    """Rows of a chunk of `tokens` that Engine._prefill_mlp runs through an MLP `width` wide at a time: the
    fewest equal pieces whose bf16 intermediate [rows, width] stays within PREFILL_MLP_BYTES (one row at least)."""
    most = max(1, PREFILL_MLP_BYTES // (BF16 * width))
    return -(-tokens // -(-tokens // most))


def _prefill_scratch(p: Program, arch: Architecture, prompt: int, chunk: int, layers: Sequence[int]) -> list[Tensor]:
    """Engine._prefill_scratch on one device: where a chunk reaches past a sliding window, the repeated keys and
    values at the prompt's length, the key positions, the bf16 mask and its two bool forms; else nothing."""
    if not any(w and w < prompt for w in (arch.layer_windows[i] for i in layers)):
        return []
    nh, d = arch.num_heads, arch.head_dim
    first = min(prompt, chunk)
    width = -(-prompt // SDPA_MASK_ALIGNMENT) * SDPA_MASK_ALIGNMENT
    return [p.alloc("k_rep", BF16 * nh * prompt * d), p.alloc("v_rep", BF16 * nh * prompt * d),
            p.alloc("key_positions", INT32 * prompt), p.alloc("mask", BF16 * first * width),
            p.alloc("masked", first * width), p.alloc("outside", first * width)]


def _engine_attention(p: Program, arch: Architecture, t: int, start: int, window: int | None) -> Tensor:
    """Engine._prefill_attention: SDPA's output (flash attention's, with its fp32 log-sum-exp freed as it
    returns: causal on a first chunk, causal_lower_right after it, the key and value heads read in place); a
    window that the chunk reaches past: its bound computed per query, SDPA with the scratch's mask, which it
    pads a copy of where the length is not 16-aligned (_windowed_attention)."""
    nh, d = arch.num_heads, arch.head_dim
    end = start + t
    if not (window and end > window):
        out = p.alloc("attn", BF16 * t * nh * d)
        p.free(p.alloc("lse", FP32 * nh * t))
        return out
    p.free(p.alloc("window_lo", INT32 * t))
    padded = -(-end // SDPA_MASK_ALIGNMENT) * SDPA_MASK_ALIGNMENT
    pad = p.alloc("mask_pad", BF16 * t * padded) if padded != end else None
    out = p.alloc("attn", BF16 * t * nh * d)
    p.free(pad)
    return out


def _engine_chunk(p: Program, arch: Architecture, quant: str, t: int, start: int, layers: Sequence[int],
                  part: Part, native_fp8: bool, rows: int = 0) -> Tensor:
    """Engine._prefill_chunk for one sequence on one device: the hidden state, which each layer updates in
    place, freeing every tensor it allocates; `rows` (0: all of them) of its tokens through every layer of the
    device at a time. Consecutive layers of one window repeat."""
    hidden = p.alloc("embed" if part.first else "hidden_in", BF16 * t * arch.hidden_size)
    step = rows or t
    for lo in range(0, t, step):
        for window, group in groupby(arch.layer_windows[layer] for layer in layers):
            layer = partial(_engine_layer, p, arch, quant, min(step, t - lo), start + lo, window, native_fp8)
            p.repeat(len(list(group)), layer, ())
    return hidden


def _engine_layer(p: Program, arch: Architecture, quant: str, t: int, start: int, window: int | None,
                  native_fp8: bool, carried: tuple) -> tuple:
    """Engine._prefill_layer: the first norm's output until q, k and v are made and concatenated, the rotated
    queries, attention, the output projection added in place; then the MLP (_engine_mlp). Carries nothing to
    the next layer."""
    h, nh, nkv, d = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    positions = p.alloc("positions", INT32 * t)
    slots = p.alloc("slots", INT32 * t)
    x = p.alloc("normed", BF16 * t * h)
    parts = [dense_linear(p, quant, t, h, n, native_fp8) for n in (nh * d, nkv * d, nkv * d)]
    qkv = p.alloc("qkv", BF16 * t * (nh + 2 * nkv) * d)
    p.free(*reversed(parts))
    p.free(x)
    q = p.alloc("q", BF16 * t * nh * d)
    p.free(qkv, slots)
    attn = _engine_attention(p, arch, t, start, window)
    p.free(q, positions)
    p.free(dense_linear(p, quant, t, nh * d, h, native_fp8))
    p.free(attn)
    _engine_mlp(p, quant, t, h, arch.intermediate_size, native_fp8)
    return carried


def _engine_mlp(p: Program, quant: str, t: int, h: int, i: int, native_fp8: bool) -> None:
    """Engine._prefill_mlp: the normed hidden state; per piece of prefill_mlp_rows rows, the gate's output
    (SiLU in place) with the up projection multiplied into it (gated_in_place with dense_linear_mul), the normed
    state freed after the last piece's, the down projection's output (added into the hidden state), the gate's
    output freed."""
    x = p.alloc("normed", BF16 * t * h)
    step = prefill_mlp_rows(t, i)
    for start in range(0, t, step):
        rows = min(step, t - start)
        act = gated_in_place(h, i, lambda k, n: dense_linear(p, quant, rows, k, n, native_fp8),
                             lambda k, n: dense_linear_mul(p, quant, rows, k, n, native_fp8))
        if start + step >= t:
            p.free(x)
        p.free(dense_linear(p, quant, rows, i, h, native_fp8))
        p.free(act)


def engine_prefill(p: Program, arch: Architecture, quant: str, prompt: int, chunk: int, layers: Sequence[int],
                   part: Part, native_fp8: bool, cuda: bool, rows: int = 0) -> Tensor | None:
    """Engine.prefill of one sequence: its ids copied to the GPU (read in place on a CPU), every chunk (its
    hidden state leaves a device that is not the last as it moves on; the last device keeps it until the next
    chunk starts), `rows` tokens of it at a time through the device's layers where given (Engine.prefill_rows),
    then on the last device the final norm of the last token and its fp32 logits."""
    h, v = arch.hidden_size, arch.vocab_size
    tokens = p.alloc("prompt_ids", INT64 * prompt) if part.first and cuda else None
    scratch = _prefill_scratch(p, arch, prompt, chunk, part.layers)
    hidden = None
    # Whatever grows with the position lives in the scratch: the chunks repeat (64 in a 128k-token prompt).
    for start in replayed_rounds(list(range(0, prompt, chunk))):
        p.free(hidden)
        hidden = _engine_chunk(p, arch, quant, min(chunk, prompt - start), start, layers, part, native_fp8, rows)
        if not part.last:
            p.free(hidden)
            hidden = None
    if not part.last:
        p.free(tokens, *scratch)
        return None
    x = p.alloc("normed", BF16 * h)
    lm = p.alloc("logits", BF16 * v)
    logits = p.alloc("logits_fp32", FP32 * v)
    p.free(lm, tokens, *scratch, hidden, x)
    return logits


def decode_uses_kernels(quant: str, batch: int) -> bool:
    """Whether a decode step of `batch` sequences runs the (autotuned) Triton weight kernels."""
    return batch <= SCHEMES[quant].engine_gemv_max_rows


def engine_decode_step(p: Program, arch: Architecture, quant: str, batch: int, layers: Sequence[int], part: Part,
                       native_fp8: bool) -> None:
    """Engine._run_segment on one device: the embedding lookup on the first, then per layer nothing when
    the Triton kernels take the step (they write into the static buffers), else ops.TorchOps' linear and
    glu (dequantized matmuls, the residual added in a new tensor, copied into the buffers)."""
    if part.first:
        p.free(p.alloc("embed", BF16 * batch * arch.hidden_size))
    if not decode_uses_kernels(quant, batch):
        p.repeat(len(layers), lambda _: _torch_ops_layer(p, arch, quant, batch, native_fp8), ())


def _torch_ops_layer(p: Program, arch: Architecture, quant: str, batch: int, native_fp8: bool) -> tuple:
    """One decoder layer of a decode step on ops.TorchOps: every tensor it allocates is gone when it returns."""
    h, i = arch.hidden_size, arch.intermediate_size
    nh, nkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    parts = [dense_linear(p, quant, batch, h, n, native_fp8) for n in (nh * d, nkv * d, nkv * d)]
    qkv = p.alloc("qkv", BF16 * batch * (nh + 2 * nkv) * d)
    p.free(*reversed(parts))
    p.free(qkv)
    for k in (nh * d, None):  # o with its residual; then the GLU; then down with its residual
        if k is None:
            g = dense_linear(p, quant, batch, h, i, native_fp8)
            s = p.alloc("silu", BF16 * batch * i)
            p.free(g)
            u = dense_linear(p, quant, batch, h, i, native_fp8)
            m = p.alloc("silu_up", BF16 * batch * i)
            p.free(s, u, m)
            k = i
        y = dense_linear(p, quant, batch, k, h, native_fp8)
        r = p.alloc("residual", BF16 * batch * h)
        p.free(r, y)
    return ()
