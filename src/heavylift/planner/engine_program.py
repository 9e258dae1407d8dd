"""The fast engine's prefill as allocation programs (engine/model.py Engine.prefill, _prefill_chunk,
_prefill_attention), Python's reference counting included: each layer's locals live until the next
layer rebinds them. The Triton kernels it calls allocate nothing (they write into buffers they are
given); tests/planner/test_programs.py holds these programs to a trace of the engine with such kernels.
Pure Python: no torch.
"""

from __future__ import annotations

from functools import partial
from itertools import groupby
from typing import Sequence

from .allocator import Program, Tensor, replayed_rounds
from heavylift.model.architecture import Architecture
from heavylift.defaults import SDPA_MASK_ALIGNMENT
from .matmul_programs import BF16, FP32, INT32, INT64, dense_linear
from .forward_program import Part
from .shared_programs import gated_mlp
from heavylift.schemes import SCHEMES


def _prefill_scratch(p: Program, arch: Architecture, prompt: int, chunk: int, layers: Sequence[int]) -> list[Tensor]:
    """Engine._prefill_scratch on one device: the repeated keys and values at the prompt's length, and where
    a chunk needs a mask, the key positions, the bf16 mask and its bool form (two with a sliding window)."""
    nh, d = arch.num_heads, arch.head_dim
    held = [p.alloc("k_rep", BF16 * nh * prompt * d), p.alloc("v_rep", BF16 * nh * prompt * d)]
    first = min(prompt, chunk)
    windows = {arch.layer_windows[i] for i in layers}
    if prompt > first or any(w and w < first for w in windows):
        width = -(-prompt // SDPA_MASK_ALIGNMENT) * SDPA_MASK_ALIGNMENT
        held += [p.alloc("key_positions", INT32 * prompt), p.alloc("mask", BF16 * first * width),
                 p.alloc("masked", first * width)]
        if any(windows):
            held.append(p.alloc("outside", first * width))
    return held


def _engine_attention(p: Program, arch: Architecture, t: int, start: int, window: int | None) -> list[Tensor]:
    """Engine._prefill_attention: the keys and values repeated into the scratch, then SDPA, causal on a first
    chunk, else with the scratch's mask (a window's bound computed per query); SDPA pads a copy of a mask
    whose length is not 16-aligned. Returns its locals, freed when it returns (the output is a view)."""
    nh, d = arch.num_heads, arch.head_dim
    end = start + t
    if start == 0 and not (window and end > window):
        out = p.alloc("attn", BF16 * t * nh * d)
        lse = p.alloc("lse", FP32 * nh * t)
        p.free(lse)
        return [out]
    if window:
        p.free(p.alloc("window_lo", INT32 * t))
    padded = -(-end // SDPA_MASK_ALIGNMENT) * SDPA_MASK_ALIGNMENT
    pad = p.alloc("mask_pad", BF16 * t * padded) if padded != end else None
    out = p.alloc("attn", BF16 * t * nh * d)
    p.free(pad)
    return [out]


def _engine_chunk(p: Program, arch: Architecture, quant: str, t: int, start: int, layers: Sequence[int],
                  part: Part, native_fp8: bool) -> Tensor:
    """Engine._prefill_chunk for one sequence: each layer's locals (positions, slots, normed input, qkv,
    q, attention output) live until the next layer rebinds them. Consecutive layers of one window repeat."""
    hidden = p.alloc("embed" if part.first else "hidden_in", BF16 * t * arch.hidden_size)
    carried = (hidden,) + (None,) * len(_LAYER_LOCALS)
    for window, group in groupby(arch.layer_windows[layer] for layer in layers):
        step = partial(_engine_layer, p, arch, quant, t, start, window, native_fp8)
        carried = p.repeat(len(list(group)), step, carried)
    p.free(*carried[1:])
    return carried[0]


_LAYER_LOCALS = ("positions", "slots", "x", "qkv", "q", "attn")


def _engine_layer(p: Program, arch: Architecture, quant: str, t: int, start: int, window: int | None,
                  native_fp8: bool, carried: tuple) -> tuple:
    """One decoder layer of Engine._prefill_chunk, given the hidden state and the previous layer's locals
    (_LAYER_LOCALS); returns its own."""
    h, i = arch.hidden_size, arch.intermediate_size
    nh, nkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    hidden = carried[0]
    loc = dict(zip(_LAYER_LOCALS, carried[1:]))

    def rebind(name: str, new: Tensor) -> None:
        p.free(loc[name])
        loc[name] = new

    rebind("positions", p.alloc("positions", INT32 * t))
    rebind("slots", p.alloc("slots", INT32 * t))
    rebind("x", p.alloc("normed", BF16 * t * h))
    parts = [dense_linear(p, quant, t, h, n, native_fp8) for n in (nh * d, nkv * d, nkv * d)]
    qkv = p.alloc("qkv", BF16 * t * (nh + 2 * nkv) * d)
    p.free(*reversed(parts))
    rebind("qkv", qkv)
    rebind("q", p.alloc("q", BF16 * t * nh * d))
    attn_locals = _engine_attention(p, arch, t, start, window)
    out = attn_locals.pop()
    p.free(*attn_locals)
    rebind("attn", out)
    o = dense_linear(p, quant, t, nh * d, h, native_fp8)
    new = p.alloc("hidden", BF16 * t * h)
    p.free(o, hidden)
    hidden = new
    rebind("x", p.alloc("normed", BF16 * t * h))
    dn = gated_mlp(p, t, h, i, lambda k, n: dense_linear(p, quant, t, k, n, native_fp8))
    new = p.alloc("hidden", BF16 * t * h)
    p.free(dn, hidden)
    return (new, *loc.values())


def engine_prefill(p: Program, arch: Architecture, quant: str, prompt: int, chunk: int, layers: Sequence[int],
                   part: Part, native_fp8: bool, cuda: bool) -> Tensor | None:
    """Engine.prefill of one sequence: its ids copied to the GPU (read in place on a CPU), every chunk (the
    last hidden state kept until the next replaces it), then on the last device the final norm of the
    last token and its fp32 logits."""
    h, v = arch.hidden_size, arch.vocab_size
    tokens = p.alloc("prompt_ids", INT64 * prompt) if part.first and cuda else None
    scratch = _prefill_scratch(p, arch, prompt, chunk, part.layers)
    hidden = None
    # Whatever grows with the position lives in the scratch: the chunks repeat (64 in a 128k-token prompt).
    for start in replayed_rounds(list(range(0, prompt, chunk))):
        new = _engine_chunk(p, arch, quant, min(chunk, prompt - start), start, layers, part, native_fp8)
        p.free(hidden)
        hidden = new
    if not part.last:
        p.free(tokens, *scratch, hidden)
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
