"""Where the NF4 decode kernels lose their bandwidth: kernel variants and tile shapes, timed one by one.

The engine's 4-bit GEMV read about 0.6 TB/s on an H100 while its bf16 one read 2.6. This script
times, for the 8B model's weight shapes, the production kernels (autotuned as the engine runs them)
beside variants that each change one thing, over a wide set of tiles:
  v0  the production loop body (byte tile, two code-table loads per byte, strided x loads)
  v1  x read as int32 pairs and split with shifts (no strided loads)
  v2  v1 with the table lookup replaced by arithmetic (wrong values: the ceiling without lookups)
  v3  v1, each 64-block reduced before its absmax multiply
  v4  weights read as int32 words, eight nibbles each, x contiguous
  v5  bytes and x pairs in one register layout, the lookup in registers (engine/lut.py)
  v6  v5 with the table lookup from memory
  v7  v5 with pointers advanced per step and no masks; v8 the same with the lookup from memory
  v9-v14   per-thread byte sums before the absmax, runs of 4-32 bytes a thread, prefetch, x broadcast
  v15, v16 v9 with the words of a block leading the thread order (v16: arithmetic for the lookup)
  v20-v24  Gluon, layouts by hand: 128-bit loads, x once per thread, no shared memory in the loop
           (v21: arithmetic for the lookup, v22: prefetch, v23/v24: warps along the row's blocks)
and, for 16 rows, the production tensor-core kernel against bitsandbytes' dequantize + cuBLAS.
Every variant but v2 is checked against a float64 reference first.
Usage (GPU machine, after the kit prelude): python3 bench/gemv_sweep.py --out $OUT/gemv_sweep.json
"""

import argparse
import datetime
import json
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

import bitsandbytes.functional as bnbf

from heavylift.engine import lut, weights as W
from heavylift.engine.kernels import DQ_GROUP, NF4_DQ, _dot, _nf4_rows
from heavylift.engine.ops import TritonOps, _codes, dense_linear

LUT_ASM = tl.constexpr(lut.ptx(bnbf.get_4bit_type("nf4", device="cpu").tolist()))
SHAPES = {"gate": (14336, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}
LARGE = {"gate16": (14336 * 16, 4096)}  # --large: the streaming rate without a kernel's fixed costs
TILES = ((4, 8), (8, 4), (2, 16), (8, 8), (4, 16), (16, 4), (16, 8), (8, 16), (32, 4), (16, 16), (32, 8), (1, 32))
WARPS = (2, 4, 8)


@triton.jit
def _load_absmax(abs_ptr, abs2_ptr, code2_ptr, offset, blk_base, rows, blk, nblk, mask2, KIND: tl.constexpr):
    """The fp32 absmax of blocks `blk` of `rows` (the engine's loop before v7): stored, or rebuilt from its
    8-bit double quantization."""
    idx = blk_base + rows[:, None].to(tl.int64) * nblk + blk[None, :]
    if KIND == NF4_DQ:
        q = tl.load(abs_ptr + idx, mask=mask2, other=0)
        a = tl.load(code2_ptr + q) * tl.load(abs2_ptr + idx // DQ_GROUP, mask=mask2, other=0.0) + offset
    else:
        a = tl.load(abs_ptr + idx, mask=mask2, other=0.0)
    return tl.where(mask2, a, 0.0)


@triton.jit
def nf4_gemv(x_ptr, x32_ptr, w_ptr, w32_ptr, abs_ptr, abs2_ptr, code_ptr, code2_ptr, offset, out_ptr, N, K,
             VARIANT: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    j = tl.arange(0, 32)
    b = tl.arange(0, NB)
    nblk = K // 64
    acc3 = tl.zeros((BLOCK_N, NB, 32), tl.float32)
    acc2 = tl.zeros((BLOCK_N, NB), tl.float32)
    acc4 = tl.zeros((BLOCK_N, NB, 8, 8), tl.float32)
    for kb in range(0, nblk, NB):
        blk = kb + b
        blk_mask = blk < nblk
        mask2 = row_mask[:, None] & blk_mask[None, :]
        a = _load_absmax(abs_ptr, abs2_ptr, code2_ptr, offset, 0, rows, blk, nblk, mask2, 3)
        if VARIANT >= 5:  # x and the packed bytes read in one register layout (4 per thread), no shared memory
            offs = tl.max_contiguous(blk[None, :, None] * 32 + j[None, None, :], [1, 1, 4])
            packed = tl.load(w_ptr + rows64[:, None, None] * (K // 2) + offs, mask=mask2[:, :, None], other=0)
            x32 = tl.load(x32_ptr + offs + 0 * rows[:, None, None], mask=mask2[:, :, None], other=0)
            xe = (x32 << 16).to(tl.float32, bitcast=True)
            xo = (x32 & -65536).to(tl.float32, bitcast=True)
            if VARIANT == 5:
                hi, lo = tl.inline_asm_elementwise(LUT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                                   dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
            else:
                hi = tl.load(code_ptr + (packed >> 4))
                lo = tl.load(code_ptr + (packed & 15))
            acc3 += (hi * xe + lo * xo) * a[:, :, None]
        elif VARIANT == 4:
            i = tl.arange(0, 8)
            words = tl.load(w32_ptr + rows64[:, None, None] * (K // 8) + blk[None, :, None] * 8 + i[None, None, :],
                            mask=mask2[:, :, None], other=0)
            shift = 8 * (i // 2) + 4 * (1 - i % 2)  # element 8w+e sits at these bits of word w
            nib = (words[:, :, :, None] >> shift[None, None, None, :]) & 15
            wv = tl.load(code_ptr + nib)
            xk = blk[:, None, None] * 64 + i[None, :, None] * 8 + i[None, None, :]
            xv = tl.load(x_ptr + xk, mask=blk_mask[:, None, None], other=0.0).to(tl.float32)
            acc4 += wv * xv[None, :, :, :] * a[:, :, None, None]
        else:
            packed = tl.load(w_ptr + rows64[:, None, None] * (K // 2) + blk[None, :, None] * 32 + j[None, None, :],
                             mask=mask2[:, :, None], other=0)
            if VARIANT == 0:
                xk = blk[:, None] * 64 + 2 * j[None, :]
                xe = tl.load(x_ptr + xk, mask=blk_mask[:, None], other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + xk + 1, mask=blk_mask[:, None], other=0.0).to(tl.float32)
            else:
                x32 = tl.load(x32_ptr + blk[:, None] * 32 + j[None, :], mask=blk_mask[:, None], other=0)
                xe = (x32 << 16).to(tl.float32, bitcast=True)
                xo = (x32 & -65536).to(tl.float32, bitcast=True)
            if VARIANT == 2:
                hi = (packed >> 4).to(tl.float32) * 0.125 - 0.9
                lo = (packed & 15).to(tl.float32) * 0.125 - 0.9
            else:
                hi = tl.load(code_ptr + (packed >> 4))
                lo = tl.load(code_ptr + (packed & 15))
            if VARIANT == 3:
                acc2 += tl.sum(hi * xe[None, :, :] + lo * xo[None, :, :], axis=2) * a
            else:
                acc3 += (hi * xe[None, :, :] + lo * xo[None, :, :]) * a[:, :, None]
    if VARIANT == 3:
        acc = tl.sum(acc2, axis=1)
    elif VARIANT == 4:
        acc = tl.sum(tl.sum(tl.sum(acc4, axis=3), axis=2), axis=1)
    else:
        acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
    tl.store(out_ptr + rows, acc.to(tl.bfloat16), mask=row_mask)


@triton.jit
def nf4_gemm(x_ptr, w_ptr, abs_ptr, abs2_ptr, code_ptr, code2_ptr, offset, out_ptr, M, N, K,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """16 rows of x against BLOCK_N weight rows, one 64-block per step: the tile [BLOCK_N, 64] is built from
    byte loads at k // 2 (each byte read for both its nibbles), scaled by the block's absmax after the dot."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, 64)
    shift = 4 * (1 - k % 2)
    nblk = K // 64
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for blk in range(0, nblk):
        byte = tl.load(w_ptr + rows64[:, None] * (K // 2) + blk * 32 + k[None, :] // 2, mask=row_mask[:, None], other=0)
        w = tl.load(code_ptr + ((byte >> shift[None, :]) & 15))
        xt = tl.load(x_ptr + m[:, None] * K + blk * 64 + k[None, :], mask=(m < M)[:, None], other=0.0)
        idx = rows64 * nblk + blk
        q = tl.load(abs_ptr + idx, mask=row_mask, other=0)
        a = tl.load(code2_ptr + q) * tl.load(abs2_ptr + idx // 256, mask=row_mask, other=0.0) + offset
        acc += _dot(xt, tl.trans(w)) * a[None, :]
    mask = (m < M)[:, None] & row_mask[None, :]
    tl.store(out_ptr + m[:, None] * N + rows[None, :], acc.to(tl.bfloat16), mask=mask)


@triton.jit
def nf4_gemv7(x_ptr, w_ptr, abs_ptr, abs2_ptr, code_ptr, code2_ptr, offset, out_ptr, N, K,
              BLOCK_N: tl.constexpr, NB: tl.constexpr, LUT: tl.constexpr):
    """v5 with pointers advanced per step and no masks: the engine's own loop (kernels._nf4_rows)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _nf4_rows(x_ptr, w_ptr, abs_ptr, abs2_ptr, offset, 0, code_ptr, code2_ptr, rows, rows < N, K, NF4_DQ,
                    BLOCK_N, NB, True, LUT)
    tl.store(out_ptr + rows, acc.to(tl.bfloat16))


@triton.jit
def _products(packed, x2, ARITH: tl.constexpr):
    """Per byte, first weight * even x + second weight * odd x; ARITH puts arithmetic in place of the lookup
    (wrong values: the ceiling of a loop without it)."""
    xe = (x2 << 16).to(tl.float32, bitcast=True)
    xo = (x2 & -65536).to(tl.float32, bitcast=True)
    if ARITH:
        hi = (packed >> 4).to(tl.float32) * 0.125 - 0.9
        lo = (packed & 15).to(tl.float32) * 0.125 - 0.9
    else:
        hi, lo = tl.inline_asm_elementwise(LUT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    return hi * xe + lo * xo


@triton.jit
def _step9(packed, x2, a, VARIANT: tl.constexpr):
    """[BLOCK_N, NB, 32 // RUN] fp32: one step's products, a thread's bytes summed before the absmax."""
    return tl.sum(_products(packed, x2, VARIANT == 10), axis=3) * a[:, :, None]


@triton.jit
def _absmax9(abs_ptr, abs2_ptr, code2_ptr, offset, idx):
    q = tl.load(abs_ptr + idx)
    return tl.load(code2_ptr + q) * tl.load(abs2_ptr + idx // DQ_GROUP) + offset


@triton.jit
def nf4_gemv9(x_ptr, w_ptr, abs_ptr, abs2_ptr, code2_ptr, offset, out_ptr, N, K,
              BLOCK_N: tl.constexpr, NB: tl.constexpr, VARIANT: tl.constexpr, PREFETCH: tl.constexpr,
              XB: tl.constexpr, RUN: tl.constexpr):
    """v9: tile [rows, NB blocks, 32 // RUN, RUN bytes]; a thread sums its RUN bytes before the absmax multiply
    (two FP ops per byte, not three) and keeps one accumulator per word; PREFETCH loads step i+1 before
    step i is multiplied; XB reads x once per thread for all its rows ([1, ...] broadcast) instead of per row.
    K must be a whole number of NB-block steps."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.where(rows < N, rows, N - 1)  # the last program recomputes row N-1 rather than masking
    rows64 = rows.to(tl.int64)
    nblk = K // 64
    b = tl.arange(0, NB)
    # a block's 32 bytes as [32 // RUN, RUN]: RUN contiguous bytes (and RUN x pairs) per thread
    offs = (b[:, None, None] * 32 + tl.arange(0, 32 // RUN)[None, :, None] * RUN + tl.arange(0, RUN)[None, None, :])
    offs = tl.max_contiguous(offs, [1, 1, RUN])
    pw = w_ptr + rows64[:, None, None, None] * (K // 2) + offs[None, :, :, :]
    if XB:
        px = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs[None, :, :, :]
    else:
        px = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs[None, :, :, :] + 0 * rows[:, None, None, None]
    idx = rows64[:, None] * nblk + b[None, :]
    acc = tl.zeros((BLOCK_N, NB, 32 // RUN), tl.float32)
    if PREFETCH:
        packed = tl.load(pw)
        x2 = tl.load(px)
        a = _absmax9(abs_ptr, abs2_ptr, code2_ptr, offset, idx)
        for kb in range(NB, nblk, NB):
            pw += NB * 32
            px += NB * 32
            idx += NB
            packed_n = tl.load(pw)
            x2_n = tl.load(px)
            a_n = _absmax9(abs_ptr, abs2_ptr, code2_ptr, offset, idx)
            acc += _step9(packed, x2, a, VARIANT)
            packed = packed_n
            x2 = x2_n
            a = a_n
        acc += _step9(packed, x2, a, VARIANT)
    else:
        for kb in range(0, nblk, NB):
            acc += _step9(tl.load(pw), tl.load(px), _absmax9(abs_ptr, abs2_ptr, code2_ptr, offset, idx), VARIANT)
            pw += NB * 32
            px += NB * 32
            idx += NB
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + rows, out.to(tl.bfloat16))


@triton.jit
def _step15(packed, x2, a, VARIANT: tl.constexpr):
    """[8, NB, BLOCK_N] fp32: one step's products, a thread's four bytes summed before the absmax."""
    return tl.sum(_products(packed, x2, VARIANT == 16), axis=3) * a[None, :, :]


@triton.jit
def nf4_gemv15(x_ptr, w_ptr, abs_ptr, abs2_ptr, code2_ptr, offset, out_ptr, N, K,
               BLOCK_N: tl.constexpr, NB: tl.constexpr, VARIANT: tl.constexpr, XB: tl.constexpr):
    """v15: tile [8 words, NB blocks, rows, 4 bytes]. The words of a block lead the thread order (Triton
    orders equally contiguous dims by index), so a warp's 32-bit loads cover 128 contiguous bytes of a row;
    with XB, x is read once per thread for all its rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.where(rows < N, rows, N - 1)
    rows64 = rows.to(tl.int64)
    nblk = K // 64
    b = tl.arange(0, NB)
    offs = tl.arange(0, 8)[:, None, None, None] * 4 + b[None, :, None, None] * 32 + tl.arange(0, 4)[None, None, None, :]
    offs = tl.max_contiguous(offs, [1, 1, 1, 4])
    pw = w_ptr + rows64[None, None, :, None] * (K // 2) + offs
    if XB:
        px = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs
    else:
        px = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs + 0 * rows[None, None, :, None]
    idx = rows64[None, :] * nblk + b[:, None]
    acc = tl.zeros((8, NB, BLOCK_N), tl.float32)
    for kb in range(0, nblk, NB):
        acc += _step15(tl.load(pw), tl.load(px), _absmax9(abs_ptr, abs2_ptr, code2_ptr, offset, idx), VARIANT)
        pw += NB * 32
        px += NB * 32
        idx += NB
    out = tl.sum(tl.sum(acc, axis=0), axis=0)
    tl.store(out_ptr + rows, out.to(tl.bfloat16))


V15 = {15: (15, 1), 151: (15, 0), 16: (16, 1)}  # variant: (body, xb)


from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _absmax20(abs_ptr, abs2_ptr, code2_ptr, offset, idx, mask):
    q = gl.load(abs_ptr + idx, mask=mask, other=0)
    return gl.load(code2_ptr + q) * gl.load(abs2_ptr + idx // 256, mask=mask, other=0.0) + offset


@gluon.jit
def _step20(packed, x2, a, VARIANT: gl.constexpr):
    xe = (x2 << 16).to(gl.float32, bitcast=True)
    xo = (x2 & -65536).to(gl.float32, bitcast=True)
    if VARIANT == 21:  # arithmetic in place of the lookup (wrong values): the ceiling
        hi = (packed >> 4).to(gl.float32) * 0.125 - 0.9
        lo = (packed & 15).to(gl.float32) * 0.125 - 0.9
    else:
        hi, lo = gl.inline_asm_elementwise(LUT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                           dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
    return gl.sum(hi * xe + lo * xo, axis=3) * gl.expand_dims(a, 2)


@gluon.jit
def nf4_gemv20(x_ptr, w_ptr, abs_ptr, abs2_ptr, code2_ptr, offset, out_ptr, N, K, row_bytes,
               RPT: gl.constexpr, NB: gl.constexpr, WARPS: gl.constexpr, VARIANT: gl.constexpr,
               PF: gl.constexpr, WB: gl.constexpr = 1):
    """v20 (Gluon, layouts by hand): tile [rows, NB blocks, 2 halves, 16 bytes]. A thread holds 16
    contiguous bytes of a block (one 128-bit load) and the 16 x pairs they meet (four), lanes run along
    the row (a warp reads 512 contiguous bytes), warps and RPT registers along rows; x is read once per
    thread for all its rows, the absmax in the tile's own layout, so nothing passes through shared memory
    inside the loop. The absmax of step i+1 is read during step i (its two dependent loads otherwise
    stall every step); PF=1 reads the weights and x one step ahead too."""
    L: gl.constexpr = gl.BlockedLayout([RPT, 1, 1, 16], [1, 16, 2, 1], [WARPS // WB, WB, 1, 1], [3, 2, 1, 0])
    S3: gl.constexpr = gl.SliceLayout(3, L)  # [rows, blocks, halves]
    A: gl.constexpr = gl.SliceLayout(2, S3)  # [rows, blocks]
    X: gl.constexpr = gl.SliceLayout(0, L)  # [blocks, halves, bytes]
    BN: gl.constexpr = RPT * (WARPS // WB)
    rows = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, A))
    rows = gl.where(rows < N, rows, N - 1)
    rows64 = rows.to(gl.int64)
    nblk = K // 64
    xb = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, X)))
    xh = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, X)))
    xj = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, X)))
    offs = xb[:, None, None] * 32 + xh[None, :, None] * 16 + xj[None, None, :]  # [NB, 2, 16] in X
    px = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + offs
    r4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(rows64, 1), 2), 3)  # [BN, 1, 1, 1] in L
    pw = w_ptr + r4 * row_bytes + gl.expand_dims(offs, 0)
    ab = gl.arange(0, NB, layout=gl.SliceLayout(0, A))
    idx = rows64[:, None] * nblk + ab[None, :]  # [BN, NB] in A
    acc = gl.zeros([BN, NB, 2], gl.float32, layout=S3)
    a = _absmax20(abs_ptr, abs2_ptr, code2_ptr, offset, idx, idx >= 0)
    if PF:
        packed = gl.load(pw)
        x2 = gl.expand_dims(gl.load(px), 0)
    for kb in range(0, nblk, NB):
        more = kb + NB < nblk
        if PF:
            pw += NB * 32
            px += NB * 32
            packed_n = gl.load(pw, mask=more, other=0)
            x2_n = gl.expand_dims(gl.load(px, mask=more, other=0), 0)
        else:
            packed_n = gl.load(pw)
            x2_n = gl.expand_dims(gl.load(px), 0)
            pw += NB * 32
            px += NB * 32
        idx += NB
        a_n = _absmax20(abs_ptr, abs2_ptr, code2_ptr, offset, idx, (idx >= 0) & more)
        if PF:
            acc += _step20(packed, x2, a, VARIANT)
            packed = packed_n
            x2 = x2_n
        else:
            acc += _step20(packed_n, x2_n, a, VARIANT)
        a = a_n
    out = gl.sum(gl.sum(acc, axis=2), axis=1)
    gl.store(out_ptr + rows, out.to(gl.bfloat16))


# variant: (body, prefetch, xb, run)
V9 = {9: (9, 0, 0, 4), 91: (9, 1, 0, 4), 92: (9, 0, 1, 4), 93: (9, 1, 1, 4), 10: (10, 1, 1, 4),
      11: (9, 0, 0, 16), 111: (9, 1, 0, 16), 112: (9, 0, 1, 16), 12: (10, 0, 0, 16), 13: (9, 0, 0, 8),
      14: (9, 0, 0, 32)}


def run_gemm(w, x, out, bn, warps, stages):
    nf4_gemm[(triton.cdiv(w.n, bn),)](x, w.data, w.scale, w.absmax2, w.code, w.code2, w.offset, out, x.shape[0],
                                      w.n, w.k, BLOCK_M=16, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def run_variant(variant, w, x, out, bn, nb, warps):
    grid = (triton.cdiv(w.n, bn),)
    if variant in (23, 24):  # warps along the row's blocks (23: all, 24: half); bn = rows per thread
        wb = warps if variant == 23 else max(1, warps // 2)
        if nb % (16 * wb) or (w.k // 64) % nb:
            raise ValueError(f"NB={nb} does not suit {wb} warps along blocks or K={w.k}")
        return nf4_gemv20[(triton.cdiv(w.n, bn * (warps // wb)),)](x, w.data, w.scale, w.absmax2, w.code2,
                                                                   w.offset, out, w.n, w.k, w.k // 2, RPT=bn, NB=nb,
                                                                   WARPS=warps, VARIANT=20, PF=False, WB=wb,
                                                                   num_warps=warps)
    if variant in (20, 21, 22):  # bn = rows per thread, nb = blocks per step (a multiple of 16)
        return nf4_gemv20[(triton.cdiv(w.n, bn * warps),)](x, w.data, w.scale, w.absmax2, w.code2, w.offset, out,
                                                          w.n, w.k, w.k // 2, RPT=bn, NB=nb, WARPS=warps,
                                                          VARIANT=21 if variant == 21 else 20, PF=variant == 22,
                                                          num_warps=warps)
    if variant in V15:
        body, xb = V15[variant]
        return nf4_gemv15[grid](x, w.data, w.scale, w.absmax2, w.code2, w.offset, out, w.n, w.k, BLOCK_N=bn, NB=nb,
                                VARIANT=body, XB=xb, num_warps=warps, num_stages=1)
    if variant in V9:
        body, prefetch, xb, run = V9[variant]
        return nf4_gemv9[grid](x, w.data, w.scale, w.absmax2, w.code2, w.offset, out, w.n, w.k, BLOCK_N=bn, NB=nb,
                               VARIANT=body, PREFETCH=prefetch, XB=xb, RUN=run, num_warps=warps, num_stages=1)
    if variant in (7, 8):
        code = _codes(w, variant == 7)[0]  # the table as the register lookup's words (v7) or as floats (v8)
        return nf4_gemv7[grid](x, w.data, w.scale, w.absmax2, code, w.code2, w.offset, out, w.n,
                               w.k, BLOCK_N=bn, NB=nb, LUT=variant == 7, num_warps=warps, num_stages=3)
    nf4_gemv[grid](x, x.view(torch.int32), w.data, w.data.view(torch.int32), w.scale, w.absmax2, w.code, w.code2,
                   w.offset, out, w.n, w.k, VARIANT=variant, BLOCK_N=bn, NB=nb, num_warps=warps, num_stages=3)


def rel_err(y, x, w):
    ref = x.double() @ w.dequantize(torch.float64).T
    return ((y.double().reshape(ref.shape) - ref).norm() / ref.norm()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="0,1,2,3,4")
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--dump-asm", action="store_true")
    p.add_argument("--tiles", help="BLOCK_N x NB pairs, e.g. 4x16,2x32 (default: a wide set)")
    p.add_argument("--warps", help="warp counts, e.g. 2,4 (default: 2,4,8)")
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument("--large", action="store_true", help="also time a 16x gate-sized weight (not in the averages)")
    args = p.parse_args()
    t0 = time.time()
    dev = torch.cuda.get_device_name()
    command = (f"python3 bench/gemv_sweep.py --out {args.out} --variants {args.variants}" +
               (f" --tiles {args.tiles}" if args.tiles else "") + (f" --warps {args.warps}" if args.warps else ""))
    result = dict(card=dev, date=datetime.date.today().isoformat(), command=command, gemv=[], gemm=[], production=[])
    shapes = SHAPES | (LARGE if args.large else {})
    weights = {name: W.quantize(torch.randn(n, k, device="cuda") * 0.02, W.NF4_DQ) for name, (n, k) in shapes.items()}
    dense = {name: W.quantize(torch.randn(n, k, device="cuda") * 0.02, W.DENSE) for name, (n, k) in SHAPES.items()}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for name in SHAPES:  # production kernels first: the numbers to beat
        w = weights[name]
        for rows in (1, 16):
            x = torch.randn(rows, w.k, device="cuda").bfloat16()
            out = torch.full((rows, w.n), float("nan"), device="cuda", dtype=torch.bfloat16)
            for label, fn in (("triton", lambda: TritonOps.linear(x, [w], out)),
                              ("dequant+cublas", lambda: out.copy_(dense_linear(x, w)))):
                if rows == 1 and label != "triton":
                    continue
                fn()
                err = rel_err(out, x, w)
                ms = do_bench(fn, warmup=10, rep=40)
                result["production"].append(dict(shape=name, rows=rows, path=label, kind="nf4-dq", ms=ms,
                                                 gb_s=w.nbytes / ms / 1e6, rel_err=err))
            xd = torch.randn(rows, w.k, device="cuda").bfloat16()
            od = torch.empty(rows, w.n, device="cuda", dtype=torch.bfloat16)
            ms = do_bench(lambda: TritonOps.linear(xd, [dense[name]], od), warmup=10, rep=40)
            result["production"].append(dict(shape=name, rows=rows, path="triton", kind="bf16", ms=ms,
                                             gb_s=dense[name].nbytes / ms / 1e6))
    for r in result["production"]:
        print("production", r, flush=True)
    save()

    for bn in (() if args.skip_gemm else (32, 64, 128)):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                row = dict(block_n=bn, warps=warps, stages=stages)
                try:
                    for name, w in weights.items():
                        x = torch.randn(16, w.k, device="cuda").bfloat16()
                        out = torch.full((16, w.n), float("nan"), device="cuda", dtype=torch.bfloat16)
                        run_gemm(w, x, out, bn, warps, stages)
                        row[f"{name}_err"] = rel_err(out, x, w)
                        ms = do_bench(lambda: run_gemm(w, x, out, bn, warps, stages), warmup=5, rep=25)
                        row[f"{name}_gb_s"] = w.nbytes / ms / 1e6
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                result["gemm"].append(row)
                print("gemm", row, flush=True)
    save()
    if args.dump_asm:  # what one step costs: registers, spills, layout conversions, the SASS of each variant
        import os
        w, xv = weights["gate"], torch.randn(1, 4096, device="cuda").bfloat16()
        out = torch.empty(w.n, device="cuda", dtype=torch.bfloat16)
        for variant in [int(v) for v in args.variants.split(",")]:
            kern = run_variant(variant, w, xv, out, 4, 16, 2)
            ttgir = kern.asm["ttgir"]
            sass = kern.asm["sass"]
            for key, text in (("ttgir", ttgir), ("sass", sass)):
                with open(os.path.join(os.path.dirname(args.out), f"v{variant}.{key}"), "w") as f:
                    f.write(text)
            ops = {op: sass.count(op) for op in ("LDG", "LDS", "STS", "BAR", "PRMT", "FFMA", "FMUL", "F2F", "HADD2")}
            print("asm", variant, "registers", kern.n_regs, "spills", kern.n_spills, "convert_layout",
                  ttgir.count("convert_layout"), ops, flush=True)
            print("\n".join(line for line in ttgir.splitlines() if line.startswith("#blocked")), flush=True)

    x = torch.randn(1, 4096, device="cuda").bfloat16()
    xs = {4096: x, 14336: torch.randn(1, 14336, device="cuda").bfloat16()}
    for variant in [int(v) for v in args.variants.split(",")]:
        tiles = [tuple(map(int, t.split("x"))) for t in args.tiles.split(",")] if args.tiles else TILES
        for bn, nb in tiles:
            for warps in [int(v) for v in args.warps.split(",")] if args.warps else WARPS:
                if time.time() - t0 > args.budget_s:
                    break
                row = dict(variant=variant, block_n=bn, nb=nb, warps=warps)
                for name, w in weights.items():  # a tile a shape cannot take is recorded and skipped
                    try:
                        xv = xs[w.k]
                        out = torch.full((w.n,), float("nan"), device="cuda", dtype=torch.bfloat16)
                        run_variant(variant, w, xv, out, bn, nb, warps)
                        if variant not in (2, 10, 12, 16, 21):
                            row[f"{name}_err"] = rel_err(out, xv, w)
                        ms = do_bench(lambda: run_variant(variant, w, xv, out, bn, nb, warps), warmup=5, rep=25)
                        row[f"{name}_gb_s"] = w.nbytes / ms / 1e6
                    except Exception as e:  # noqa: BLE001 - too many registers, or NB not dividing K
                        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                result["gemv"].append(row)
                print("gemv", row, flush=True)
        save()
    # Per variant, the fastest tile of each shape (the engine tunes per shape), weighted by the shapes' bytes.
    best = {}
    for r in result["gemv"]:
        for name in weights:
            if f"{name}_gb_s" in r and r[f"{name}_gb_s"] > best.get(r["variant"], {}).get(name, {}).get("gb_s", 0):
                best.setdefault(r["variant"], {})[name] = dict(gb_s=r[f"{name}_gb_s"], err=r.get(f"{name}_err"),
                                                               block_n=r["block_n"], nb=r["nb"], warps=r["warps"])
    total = sum(n * k for n, k in SHAPES.values())
    for v, per in best.items():
        if all(name in per for name in SHAPES):  # time-weighted: bytes over the sum of per-shape times
            per["weighted_gb_s"] = total / sum(SHAPES[n][0] * SHAPES[n][1] / per[n]["gb_s"] for n in SHAPES)
    result["best_per_variant"] = {str(v): per for v, per in best.items()}
    for v, per in sorted(best.items()):
        print(f"best v{v}:", json.dumps(per), flush=True)
    result["elapsed_s"] = time.time() - t0
    save()


if __name__ == "__main__":
    main()
