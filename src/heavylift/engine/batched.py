"""Decode steps of 2 to 64 tokens: a mixed-input tensor-core GEMM that reads each stored weight once a step.

At batch 1 a step is a GEMV (kernels.py, gemv4.py). With more tokens the same weight bytes serve every
token, so a program loads a tile of the stored weight once, widens it to bf16 in registers and multiplies
it on the tensor cores against x's tile (its rows padded to BLOCK_M, 16 to 64), accumulating in float32:
4-bit codes (NF4 or FP4, with or without double quantization) looked up in registers (lut.py) and scaled
by their 64-weight block's absmax; LLM.int8 and FP8 rows widened as they are, their row scale applied to
the accumulator; bf16 as it is (that inner loop: batched_tiles.py). bitsandbytes' dequantize + cuBLAS
instead writes and re-reads the whole bf16 weight (four times the 4-bit bytes, twice) every step.

Where a weight's row tiles alone leave multiprocessors idle (the 8B model's o and down projections have
32 tiles of 128 rows for 132 SMs), the K loop is split over SPLIT programs per tile (`split_k`): each
stores its float32 partial in a workspace and takes a ticket; the last to arrive sums the partials in
split order (the same bits whichever arrives last), runs the epilogue and resets the ticket, so the next
call needs no memset and no second kernel runs. The epilogue rounds as the reference (ops.TorchOps) does:
bias in float32, each projection to bf16, silu(gate) * up, the residual added to the rounded projection.

A program computes acc [BLOCK_M, BLOCK_N], or with SWAP its transpose with the weight as the left
operand (Hopper's wgmma can take that one from registers, and needs 64 of its rows, which x's 16 lack);
the autotuner picks the tile and SWAP per shape. Triton's interpreter runs one fixed tile (FIXED).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from heavylift.errors import InvalidArgumentError
from heavylift.schemes import ENGINE_BATCHED_MAX_ROWS

from .batched_tiles import accumulate, accumulate_blocks, k_blocks, rows_times_x, scaled, table, x_tile, zeros
from .kernels import INTERPRET, QBLOCK, glu_store, pdl_enter, store_part

MAX_ROWS = ENGINE_BATCHED_MAX_ROWS  # the largest BLOCK_M: x's rows in one tile
SPLITS_TARGET = 2  # split-K aims at this many programs per multiprocessor
SPLITS_MAX = 8  # and never cuts a tile's K into more slices than this,
# nor into slices shorter than this many times BLOCK_M: a slice's float32 partial [BLOCK_M, BLOCK_N], written
# and read back, then stays under half the 4-bit weight bytes the slice reads (16 BLOCK_M / slice).
SLICE_PER_ROW = 32
INTERPRET_SMS = 8  # multiprocessors split_k assumes on a CPU (Triton's interpreter)

# BLOCK_N, BLOCK_K, SWAP, warps, stages: 64 widened weights per thread, one warpgroup per 64 rows (SWAP's
# wgmma). Compiled for sm_90 these loops spend 10 to 15 SASS instructions per packed weight byte; 256-wide K
# steps spent more, and more registers and shared memory, so they are left out (autotuning compiles each).
_TILES = ((64, 128, False, 4, 4), (128, 128, False, 8, 3), (64, 128, True, 4, 4), (128, 128, True, 8, 3))
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SWAP": swap}, num_warps=w, num_stages=s)
           for bn, bk, swap, w, s in _TILES]
# Triton's CPU interpreter (tests) has no timer to autotune with: it runs this tile (tests change SWAP).
FIXED = {"BLOCK_N": 32, "BLOCK_K": 128, "SWAP": False}


# How steps through 4-bit weights widen them (HEAVYLIFT_BATCHED4 picks one, to compare):
# scaled: each weight times its block's absmax in bf16 as it is looked up (lut.scaled_pairs_program);
# post: the codes meet x as they are and the absmax multiplies each 64-weight block's float32 partial
#   (batched_tiles.accumulate_blocks, K steps of two blocks), one rounding fewer;
# wgmma: wgmma4.py's Gluon kernels on Hopper, weights in registers from the load to the tensor cores (scaled
#   where they do not run).
VARIANTS = ("scaled", "post", "wgmma")
VARIANT_ENV = "HEAVYLIFT_BATCHED4"
# Unset, steps of up to this many tokens take wgmma and longer ones scaled. On an H100 the 8B shape in NF4-DQ
# decodes 19% faster with wgmma than with scaled at batch 4 and 14% at 16, and 7% slower at 64, where its
# 64-row tiles lose on the o and down projections (bench/results/batched_variants_h100_2026-12-06.json).
WGMMA_MAX_ROWS = 16


def variant(rows: int) -> str:
    """The variant a step of `rows` tokens (2 to 64) through 4-bit weights takes: $HEAVYLIFT_BATCHED4, else
    wgmma up to WGMMA_MAX_ROWS and scaled above."""
    chosen = os.environ.get(VARIANT_ENV)
    if chosen is None:
        return "wgmma" if rows <= WGMMA_MAX_ROWS else "scaled"
    if chosen not in VARIANTS:
        raise InvalidArgumentError(f"{VARIANT_ENV}={chosen!r} is not a batched 4-bit variant; set it to one of "
                                   f"{', '.join(VARIANTS)} or unset it")
    return chosen


def block_m(rows: int) -> int:
    """x's tile height for a step of `rows` tokens: 16, 32 or 64 (the tensor cores' smallest is 16)."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"the batched kernel takes 1 to {MAX_ROWS} rows, not {rows}")
    return max(16, triton.next_power_of_2(rows))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def tiles(sizes, block_n: int) -> int:
    """Row tiles of parts of `sizes` rows side by side, each part starting a tile of its own."""
    return sum(-(-n // block_n) for n in sizes)


def split_k(n_tiles: int, k: int, block_k: int, rows: int, device: torch.device) -> int:
    """K slices per tile, so that the tiles' programs come to about SPLITS_TARGET per multiprocessor (`rows`:
    the tile's BLOCK_M)."""
    want = SPLITS_TARGET * _sm_count(device) // max(n_tiles, 1)
    return max(1, min(SPLITS_MAX, want, -(-k // block_k), k // (SLICE_PER_ROW * rows)))


def _candidates() -> list[dict]:
    return [FIXED] if INTERPRET else [c.kwargs for c in CONFIGS]


def scratch_sizes(sizes, columns: int, k: int, rows: int, device: torch.device) -> tuple[int, int]:
    """Float32 workspace elements and tickets a call may need, whichever tile the autotuner picks: per split
    slice, BLOCK_M rows of the `columns` partial sums (a linear's outputs; the GLU's gate and up); a ticket
    per row tile of parts of `sizes` rows."""
    bm = block_m(rows)
    work = tickets = 0
    for c in _candidates():
        n_tiles = tiles(sizes, c["BLOCK_N"])
        split = split_k(n_tiles, k, c["BLOCK_K"], bm, device)
        if split > 1:
            work, tickets = max(work, split * bm * columns), max(tickets, n_tiles)
    return work, tickets


_SCRATCH: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def scratch(device: torch.device, work: int, tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's split-K workspace and tickets, at least this large. One pair serves every call (calls on
    a device run one after another, and each leaves its tickets at zero); a larger need adds a larger pair
    and keeps the old one, which captured CUDA graphs may still point at."""
    held = _SCRATCH.setdefault(device, [])
    if held and held[-1][0].numel() >= work and held[-1][1].numel() >= tickets:
        return held[-1]
    old_work, old_tickets = (held[-1][0].numel(), held[-1][1].numel()) if held else (0, 0)
    pair = (torch.empty(max(work, 2 * old_work, 1), dtype=torch.float32, device=device),
            torch.zeros(max(tickets, 2 * old_tickets, 1), dtype=torch.int32, device=device))
    held.append(pair)
    return pair


# -- device code: split-K, epilogues, kernels (their inner loop: batched_tiles.py) -----------------


@triton.jit
def _publish(acc, ws_ptr, M, cols, col_mask, n_total, BLOCK_M: tl.constexpr):
    """This program's partial into its split slice of the workspace: [SPLIT, BLOCK_M, n_total] float32."""
    m = tl.arange(0, BLOCK_M)
    offs = (tl.program_id(1) * BLOCK_M + m[:, None]) * n_total + cols[None, :]
    tl.store(ws_ptr + offs, acc, mask=(m < M)[:, None] & col_mask[None, :])


@triton.jit
def _last_to_arrive(tickets_ptr, tile, SPLIT):
    """Whether every other slice of this tile has published its partial (their stores ordered before their
    tickets by the barrier and the release; the reads after this one's acquire)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(tickets_ptr + tile, 1, sem="acq_rel", scope="gpu")
    return arrived == SPLIT - 1


@triton.jit
def _collect(ws_ptr, M, cols, col_mask, n_total, SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's partials summed in split order (read past L1, where another multiprocessor wrote them)."""
    m = tl.arange(0, BLOCK_M)
    mask = (m < M)[:, None] & col_mask[None, :]
    total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for s in range(0, SPLIT):
        total += tl.load(ws_ptr + (s * BLOCK_M + m[:, None]) * n_total + cols[None, :], mask=mask, other=0.0,
                         cache_modifier=".cg")
    return total


@triton.jit
def _linear_out(acc, out_ptr, out_stride, res_ptr, M, bias_ptr, rows, n, col0, HAS_BIAS: tl.constexpr,
                HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < n, other=0.0).to(tl.float32)[None, :]
    store_part(out_ptr, out_stride, res_ptr, M, acc, rows, n, col0, HAS_RES, BLOCK_M)


@triton.jit
def _linear_part(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K, w_ptr, a_ptr, s_ptr, offset, blk_base,
                 bias_ptr, n, col0, n_total, w_stride, code_ptr, code2_ptr, ws_ptr, tickets_ptr, SPLIT, tile,
                 KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, LUT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
                 EVEN: tl.constexpr, POST: tl.constexpr):
    """Row tile `tile` of one part (its rows written at columns col0 + rows); the program's ticket is its
    place in the whole grid."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    acc = rows_times_x(x_ptr, x_stride, M, K, w_ptr, a_ptr, s_ptr, offset, blk_base, w_stride, code_ptr,
                       code2_ptr, rows, row_mask, SPLIT, KIND, LUT, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, EVEN, POST)
    if SPLIT == 1:
        _linear_out(acc, out_ptr, out_stride, res_ptr, M, bias_ptr, rows, n, col0, HAS_BIAS, HAS_RES, BLOCK_M)
    else:
        ticket = tl.program_id(0)
        _publish(acc, ws_ptr, M, col0 + rows, row_mask, n_total, BLOCK_M)
        if _last_to_arrive(tickets_ptr, ticket, SPLIT):
            acc = _collect(ws_ptr, M, col0 + rows, row_mask, n_total, SPLIT, BLOCK_M, BLOCK_N)
            _linear_out(acc, out_ptr, out_stride, res_ptr, M, bias_ptr, rows, n, col0, HAS_BIAS, HAS_RES, BLOCK_M)
            tl.store(tickets_ptr + ticket, 0)


@triton.jit(do_not_specialize=["M"])  # one compile for every step size of a tile height
def _linear_kernel(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K,
                   w0, a0, s0, o0, g0, b0, n0,
                   w1, a1, s1, o1, g1, b1, n1,
                   w2, a2, s2, o2, g2, b2, n2,
                   code_ptr, code2_ptr, w_stride, ws_ptr, tickets_ptr, SPLIT,
                   KIND: tl.constexpr, PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   LUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SWAP: tl.constexpr, EVEN: tl.constexpr, POST: tl.constexpr):
    """y[:, parts] = x @ W_p^T (+ bias) (+ residual) for up to three weights side by side (q, k, v); grid
    (row tiles of all parts, SPLIT)."""
    pdl_enter()
    pid = tl.program_id(0)
    p0 = tl.cdiv(n0, BLOCK_N)
    p1 = tl.cdiv(n1, BLOCK_N)
    n_total = n0 + n1 + n2
    if pid < p0:
        _linear_part(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K, w0, a0, s0, o0, g0, b0, n0, 0, n_total,
                     w_stride, code_ptr, code2_ptr, ws_ptr, tickets_ptr, SPLIT, pid, KIND, HAS_BIAS, HAS_RES, LUT,
                     BLOCK_M, BLOCK_N, BLOCK_K, SWAP, EVEN, POST)
    elif PARTS > 1 and pid < p0 + p1:
        _linear_part(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K, w1, a1, s1, o1, g1, b1, n1, n0, n_total,
                     w_stride, code_ptr, code2_ptr, ws_ptr, tickets_ptr, SPLIT, pid - p0, KIND, HAS_BIAS, HAS_RES,
                     LUT, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, EVEN, POST)
    elif PARTS > 2:
        _linear_part(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K, w2, a2, s2, o2, g2, b2, n2, n0 + n1,
                     n_total, w_stride, code_ptr, code2_ptr, ws_ptr, tickets_ptr, SPLIT, pid - p0 - p1, KIND,
                     HAS_BIAS, HAS_RES, LUT, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, EVEN, POST)


@triton.jit(do_not_specialize=["M"])
def _glu_kernel(x_ptr, x_stride, out_ptr, out_stride, M, K, w0, a0, s0, o0, g0, w1, a1, s1, o1, g1, n,
                code_ptr, code2_ptr, w_stride, ws_ptr, tickets_ptr, SPLIT, KIND: tl.constexpr, LUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
                EVEN: tl.constexpr, POST: tl.constexpr):
    """act = silu(x @ gate^T) * (x @ up^T): both projections of the same rows in one pass over x; grid
    (row tiles, SPLIT), the workspace's columns [0, n) the gate's and [n, 2n) the up projection's."""
    pdl_enter()
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    rows64 = rows.to(tl.int64)
    t = table(code_ptr, M, LUT)
    g = zeros(BLOCK_M, BLOCK_N, SWAP)
    u = zeros(BLOCK_M, BLOCK_N, SWAP)
    lo, hi = k_blocks(K, SPLIT, BLOCK_K)
    for kb in range(lo, hi):
        k0 = kb * BLOCK_K
        if POST:
            tl.static_assert(BLOCK_K == 2 * QBLOCK, "post steps are two 64-weight blocks")
            x_even, x_odd = x_tile(x_ptr, x_stride, M, K, k0, KIND, BLOCK_M, 2 * QBLOCK, EVEN)
            g = accumulate_blocks(g, x_even, x_odd, w0, a0, s0, o0, g0, code_ptr, code2_ptr, t, rows64, row_mask, K,
                                  w_stride, k0, KIND, LUT, BLOCK_M, BLOCK_N, SWAP, EVEN)
            u = accumulate_blocks(u, x_even, x_odd, w1, a1, s1, o1, g1, code_ptr, code2_ptr, t, rows64, row_mask, K,
                                  w_stride, k0, KIND, LUT, BLOCK_M, BLOCK_N, SWAP, EVEN)
        else:
            x_even, x_odd = x_tile(x_ptr, x_stride, M, K, k0, KIND, BLOCK_M, BLOCK_K, EVEN)
            g = accumulate(g, x_even, x_odd, w0, a0, s0, o0, g0, code_ptr, code2_ptr, t, rows64, row_mask, K,
                           w_stride, k0, KIND, LUT, BLOCK_N, BLOCK_K, SWAP, EVEN)
            u = accumulate(u, x_even, x_odd, w1, a1, s1, o1, g1, code_ptr, code2_ptr, t, rows64, row_mask, K,
                           w_stride, k0, KIND, LUT, BLOCK_N, BLOCK_K, SWAP, EVEN)
    g = scaled(g, a0, rows, row_mask, KIND, SWAP)
    u = scaled(u, a1, rows, row_mask, KIND, SWAP)
    if SPLIT == 1:
        glu_store(g, u, out_ptr, out_stride, M, rows, n, BLOCK_M)
    else:
        _publish(g, ws_ptr, M, rows, row_mask, 2 * n, BLOCK_M)
        _publish(u, ws_ptr, M, n + rows, row_mask, 2 * n, BLOCK_M)
        if _last_to_arrive(tickets_ptr, pid, SPLIT):
            g = _collect(ws_ptr, M, rows, row_mask, 2 * n, SPLIT, BLOCK_M, BLOCK_N)
            u = _collect(ws_ptr, M, n + rows, row_mask, 2 * n, SPLIT, BLOCK_M, BLOCK_N)
            glu_store(g, u, out_ptr, out_stride, M, rows, n, BLOCK_M)
            tl.store(tickets_ptr + pid, 0)


def _linear_sizes(args) -> tuple[int, ...]:
    return tuple(args[f"n{p}"] for p in range(args["PARTS"]))


def _split(sizes, columns):
    """The SPLIT heuristic, which also holds the launch to the scratch it was given (scratch_sizes): a
    workspace too small for the split would be written past its end."""
    def pick(args) -> int:
        n_tiles = tiles(sizes(args), args["BLOCK_N"])
        split = split_k(n_tiles, args["K"], args["BLOCK_K"], args["BLOCK_M"], args["x_ptr"].device)
        need = split * args["BLOCK_M"] * columns(args)
        if split > 1 and (args["ws_ptr"].numel() < need or args["tickets_ptr"].numel() < n_tiles):
            raise RuntimeError(f"batched kernel: {split}-way split-K needs {need} workspace floats and {n_tiles} "
                               f"tickets, given {args['ws_ptr'].numel()} and {args['tickets_ptr'].numel()}")
        return split
    return pick


def _even(sizes):
    """Whether every tile lies inside its weight: each part a whole number of row tiles, K of steps."""
    return lambda args: (args["K"] % args["BLOCK_K"] == 0
                         and all(n % args["BLOCK_N"] == 0 for n in sizes(args)))


def _tuned(sizes, columns, key):
    heuristics = triton.heuristics({"SPLIT": _split(sizes, columns), "EVEN": _even(sizes)})
    return heuristics if INTERPRET else (lambda fn: triton.autotune(configs=CONFIGS, key=key)(heuristics(fn)))


linear_kernel = _tuned(_linear_sizes, lambda args: sum(_linear_sizes(args)),
                       ["K", "KIND", "PARTS", "n0", "n1", "n2", "BLOCK_M", "POST"])(_linear_kernel)
glu_kernel = _tuned(lambda args: (args["n"],), lambda args: 2 * args["n"], ["K", "KIND", "n", "BLOCK_M", "POST"])(
    _glu_kernel)


def fixed() -> dict:
    """Launch options the autotuner would pick: the interpreter's fixed tile, nothing when compiled."""
    return dict(FIXED) if INTERPRET else {}
