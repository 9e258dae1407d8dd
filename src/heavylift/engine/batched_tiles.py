"""The batched kernels' inner loop (batched.py): x's tile and a stored weight's tile widened to bf16 in
registers, multiplied on the tensor cores over one program's K slice.

4-bit codes (NF4 or FP4, with or without double quantization) are looked up in registers (lut.py's
scaled_pairs_ptx, the table as eight words) and scaled by their 64-weight block's absmax; the interpreter,
which cannot run PTX, reads the 16-float table and rounds as the GPU does. LLM.int8 and FP8 rows are widened
as stored and their row scale applied to the accumulator; bf16 is read as it is. With SWAP the accumulator is
the transpose, the weight the left operand (batched.py says why).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import DOT_BF16, DQ_GROUP, FP8, INT8, NF4, NF4_DQ, QBLOCK
from .lut import scaled_pairs_ptx

PAIRS_PTX = tl.constexpr(scaled_pairs_ptx())


@triton.jit
def _mma(acc, x, w, SWAP: tl.constexpr):
    """acc + x @ w^T, or with SWAP acc^T + w @ x^T: bf16 operands on the tensor cores, float32 accumulate.
    Triton's interpreter multiplies bf16 operands as raw bits, so there they are float32."""
    if DOT_BF16:
        x = x.to(tl.bfloat16)
        w = w.to(tl.bfloat16)
    else:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    if SWAP:
        acc = tl.dot(w, tl.trans(x), acc)
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def table(code_ptr, LUT: tl.constexpr):
    """The register lookup's eight table words (lut.words), read once per program; nothing without LUT."""
    if LUT:
        t = (tl.load(code_ptr), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
             tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7))
    else:
        t = (0, 0, 0, 0, 0, 0, 0, 0)
    return t


@triton.jit
def x_tile(x_ptr, x_stride, M, K, k0, KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
           EVEN: tl.constexpr):
    """x[:M, k0:k0 + BLOCK_K] in bf16, zeros past M and K. For 4-bit weights as its even and odd elements
    ([BLOCK_M, BLOCK_K / 2] each, read as int32 pairs), the ones a packed byte's two weights meet."""
    m = tl.arange(0, BLOCK_M)
    if KIND == NF4 or KIND == NF4_DQ:
        c = tl.arange(0, BLOCK_K // 2)
        if EVEN:
            mask = (m < M)[:, None] & (c >= 0)[None, :]
        else:
            mask = (m < M)[:, None] & (k0 + 2 * c < K)[None, :]
        words = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + m[:, None] * (x_stride // 2)
                        + k0 // 2 + c[None, :], mask=mask, other=0)
        even = words.to(tl.int16).to(tl.bfloat16, bitcast=True)  # little-endian: the even element is the low half
        odd = (words >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            mask = (m < M)[:, None] & (k >= 0)[None, :]
        else:
            mask = (m < M)[:, None] & (k < K)[None, :]
        even = tl.load(x_ptr + m[:, None] * x_stride + k[None, :], mask=mask, other=0.0)
        odd = even
    return even, odd


@triton.jit
def _load4(w_ptr, a_ptr, s_ptr, offset, blk_base, code2_ptr, rows64, row_mask, K, w_stride, k0,
           KIND: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """Packed bytes of the tile, [BLOCK_N, BLOCK_K / 64 blocks, 32], and each block's absmax [BLOCK_N, blocks]
    (with double quantization: its byte through code2, times the 256-block scale, plus the offset). EVEN:
    the tile lies inside the weight, no mask."""
    b = tl.arange(0, BLOCK_K // QBLOCK)
    blk = k0 // QBLOCK + b
    byte = (rows64[:, None, None] * w_stride + (blk * (QBLOCK // 2))[None, :, None]
            + tl.arange(0, QBLOCK // 2)[None, None, :])
    idx = blk_base + rows64[:, None] * (K // QBLOCK) + blk[None, :]
    if EVEN:
        packed = tl.load(w_ptr + byte)
        if KIND == NF4_DQ:
            a = tl.load(code2_ptr + tl.load(a_ptr + idx)) * tl.load(s_ptr + idx // DQ_GROUP) + offset
        else:
            a = tl.load(a_ptr + idx)
    else:
        mask = row_mask[:, None] & (blk * QBLOCK < K)[None, :]
        packed = tl.load(w_ptr + byte, mask=mask[:, :, None], other=0)
        if KIND == NF4_DQ:
            q = tl.load(a_ptr + idx, mask=mask, other=0)
            a = tl.load(code2_ptr + q) * tl.load(s_ptr + idx // DQ_GROUP, mask=mask, other=0.0) + offset
        else:
            a = tl.load(a_ptr + idx, mask=mask, other=0.0)
    return packed, a


@triton.jit
def _widen4(packed, a, code_ptr, t, LUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each byte's two weights times their block's absmax, in bf16, as two [BLOCK_N, BLOCK_K / 2] tiles: the
    first weight of each byte (high nibble, even k) and the second. With LUT the code (as bf16) is looked up
    in registers, the words `t` (lut.scaled_pairs_program, a rounded bf16 product per weight); without (the
    interpreter) read from the 16 floats at code_ptr and rounded the same three times."""
    s = tl.broadcast_to(a.to(tl.bfloat16)[:, :, None], (BLOCK_N, BLOCK_K // QBLOCK, QBLOCK // 2))
    if LUT:
        z = tl.zeros((BLOCK_N, BLOCK_K // QBLOCK, QBLOCK // 2), tl.int32)
        first, second = tl.inline_asm_elementwise(PAIRS_PTX, "=r,=r,=r,=r" + ",r" * 35,
                                                  [packed, s, z + t[0], z + t[1], z + t[2], z + t[3], z + t[4],
                                                   z + t[5], z + t[6], z + t[7]],
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        scale = _bf16_nearest(a)[:, :, None]
        first = _bf16_nearest(_bf16_nearest(tl.load(code_ptr + (packed >> 4))) * scale).to(tl.bfloat16)
        second = _bf16_nearest(_bf16_nearest(tl.load(code_ptr + (packed & 15))) * scale).to(tl.bfloat16)
    return tl.reshape(first, (BLOCK_N, BLOCK_K // 2)), tl.reshape(second, (BLOCK_N, BLOCK_K // 2))


@triton.jit
def _bf16_nearest(v):
    """float32 v rounded to the nearest bf16 (ties to even), still float32: the GPU's rounding, spelled out
    because Triton's interpreter rounds toward zero."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def accumulate(acc, x_even, x_odd, w_ptr, a_ptr, s_ptr, offset, blk_base, code_ptr, code2_ptr, t, rows64,
               row_mask, K, w_stride, k0, KIND: tl.constexpr, LUT: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, SWAP: tl.constexpr, EVEN: tl.constexpr):
    """acc plus x's tile times the weight's tile [rows, k0:k0 + BLOCK_K]."""
    if KIND == NF4 or KIND == NF4_DQ:
        packed, a = _load4(w_ptr, a_ptr, s_ptr, offset, blk_base, code2_ptr, rows64, row_mask, K, w_stride, k0,
                           KIND, BLOCK_K, EVEN)
        first, second = _widen4(packed, a, code_ptr, t, LUT, BLOCK_N, BLOCK_K)
        acc = _mma(acc, x_even, first, SWAP)
        acc = _mma(acc, x_odd, second, SWAP)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            w = tl.load(w_ptr + rows64[:, None] * w_stride + k[None, :])
        else:
            w = tl.load(w_ptr + rows64[:, None] * w_stride + k[None, :], mask=row_mask[:, None] & (k < K)[None, :],
                        other=0.0)
        acc = _mma(acc, x_even, w, SWAP)
    return acc


@triton.jit
def zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    return acc


@triton.jit
def k_blocks(K, SPLIT, BLOCK_K: tl.constexpr):
    """This program's K steps [lo, hi): slice program_id(1) of SPLIT (empty where K has fewer steps)."""
    steps = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(steps, SPLIT)
    lo = tl.program_id(1) * per
    return lo, tl.minimum(lo + per, steps)


@triton.jit
def scaled(acc, a_ptr, rows, row_mask, KIND: tl.constexpr, SWAP: tl.constexpr):
    """The accumulator as [BLOCK_M, BLOCK_N], times the row scale of FP8 and INT8 weights."""
    if SWAP:
        acc = tl.trans(acc)
    if KIND == FP8 or KIND == INT8:
        acc = acc * tl.load(a_ptr + rows, mask=row_mask, other=0.0)[None, :]
    return acc


@triton.jit
def rows_times_x(x_ptr, x_stride, M, K, w_ptr, a_ptr, s_ptr, offset, blk_base, w_stride, code_ptr, code2_ptr,
                 rows, row_mask, SPLIT, KIND: tl.constexpr, LUT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr, EVEN: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N]: x[:M] times rows `rows` of one weight over this program's K slice."""
    rows64 = rows.to(tl.int64)
    t = table(code_ptr, LUT)
    acc = zeros(BLOCK_M, BLOCK_N, SWAP)
    lo, hi = k_blocks(K, SPLIT, BLOCK_K)
    for kb in range(lo, hi):
        k0 = kb * BLOCK_K
        x_even, x_odd = x_tile(x_ptr, x_stride, M, K, k0, KIND, BLOCK_M, BLOCK_K, EVEN)
        acc = accumulate(acc, x_even, x_odd, w_ptr, a_ptr, s_ptr, offset, blk_base, code_ptr, code2_ptr, t,
                         rows64, row_mask, K, w_stride, k0, KIND, LUT, BLOCK_N, BLOCK_K, SWAP, EVEN)
    return scaled(acc, a_ptr, rows, row_mask, KIND, SWAP)
