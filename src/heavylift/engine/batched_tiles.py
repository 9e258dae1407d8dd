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

from .kernels import DOT_BF16, DQ_GROUP, FP8, INT8, NF4, NF4_DQ, QBLOCK, widened
from .lut import pairs_ptx, scaled_pairs_ptx

SCALED_PAIRS_PTX = tl.constexpr(scaled_pairs_ptx())
PAIRS_PTX = tl.constexpr(pairs_ptx())


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
def table(code_ptr, M, LUT: tl.constexpr):
    """The register lookup's eight table words (lut.words), read once per program; nothing without LUT. Each is
    or-ed with lane id x (M >> 30), zero for every step of at most 64 rows but not provably so: values ptxas
    knows to be warp-uniform it keeps in uniform registers and copies back before every prmt (a sixth of the
    POST loop's instructions, compiled for sm_90)."""
    if LUT:
        z = tl.inline_asm_elementwise("{\n.reg .b32 l;\nmov.u32 l, %laneid;\nmul.lo.u32 $0, l, $1;\n}", "=r,r",
                                      [M >> 30], dtype=tl.int32, is_pure=True, pack=1)
        t = (tl.load(code_ptr) | z, tl.load(code_ptr + 1) | z, tl.load(code_ptr + 2) | z,
             tl.load(code_ptr + 3) | z, tl.load(code_ptr + 4) | z, tl.load(code_ptr + 5) | z,
             tl.load(code_ptr + 6) | z, tl.load(code_ptr + 7) | z)
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
        first, second = tl.inline_asm_elementwise(SCALED_PAIRS_PTX, "=r,=r,=r,=r" + ",r" * 35,
                                                  [packed, s, z + t[0], z + t[1], z + t[2], z + t[3], z + t[4],
                                                   z + t[5], z + t[6], z + t[7]],
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        scale = _bf16_nearest(a)[:, :, None]
        first = _bf16_nearest(_bf16_nearest(tl.load(code_ptr + (packed >> 4))) * scale).to(tl.bfloat16)
        second = _bf16_nearest(_bf16_nearest(tl.load(code_ptr + (packed & 15))) * scale).to(tl.bfloat16)
    return tl.reshape(first, (BLOCK_N, BLOCK_K // 2)), tl.reshape(second, (BLOCK_N, BLOCK_K // 2))


@triton.jit
def _codes4(packed, code_ptr, t, LUT: tl.constexpr):
    """The code values of each packed byte's two weights in bf16, as two tiles shaped like `packed`: the first
    weight of each byte (high nibble, even k) and the second. With LUT looked up in registers (lut.pairs_program,
    the words `t`); without (the interpreter) read from the 16 floats at code_ptr and rounded as the GPU rounds."""
    if LUT:
        z = tl.zeros(packed.shape, tl.int32)
        first, second = tl.inline_asm_elementwise(PAIRS_PTX, "=r,=r,=r,=r" + ",r" * 33,
                                                  [packed, z + t[0], z + t[1], z + t[2], z + t[3], z + t[4],
                                                   z + t[5], z + t[6], z + t[7]],
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        first = _bf16_nearest(tl.load(code_ptr + (packed >> 4))).to(tl.bfloat16)
        second = _bf16_nearest(tl.load(code_ptr + (packed & 15))).to(tl.bfloat16)
    return first, second


@triton.jit
def _halves(v):
    """A [rows, 2 blocks, n] tile (or [rows, 2 blocks]) as its two blocks' tiles."""
    if len(v.shape) == 3:
        v = tl.permute(v, (0, 2, 1))
    return tl.split(v)


@triton.jit
def accumulate_blocks(acc, x_even, x_odd, w_ptr, a_ptr, s_ptr, offset, blk_base, code_ptr, code2_ptr, t, rows64,
                      row_mask, K, w_stride, k0, KIND: tl.constexpr, LUT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, SWAP: tl.constexpr, EVEN: tl.constexpr):
    """acc plus x's tile times the 4-bit weight's two 64-weight blocks at k0, each block's absmax applied to the
    block's float32 partial product rather than to each weight (POST): the codes meet x as they are, and the
    scale costs one multiply-add per accumulator element instead of a bf16 multiply per weight pair."""
    packed, a = _load4(w_ptr, a_ptr, s_ptr, offset, blk_base, code2_ptr, rows64, row_mask, K, w_stride, k0, KIND,
                       2 * QBLOCK, EVEN)
    first, second = _codes4(packed, code_ptr, t, LUT)
    f0, f1 = _halves(first)
    s0, s1 = _halves(second)
    a0, a1 = _halves(a)
    e0, e1 = _halves(tl.reshape(x_even, (BLOCK_M, 2, QBLOCK // 2)))
    o0, o1 = _halves(tl.reshape(x_odd, (BLOCK_M, 2, QBLOCK // 2)))
    p = _mma(tl.zeros(acc.shape, tl.float32), e0, f0, SWAP)
    q = _mma(tl.zeros(acc.shape, tl.float32), e1, f1, SWAP)
    p = _mma(p, o0, s0, SWAP)
    q = _mma(q, o1, s1, SWAP)
    if SWAP:
        acc += p * a0[:, None] + q * a1[:, None]
    else:
        acc += p * a0[None, :] + q * a1[None, :]
    return acc


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
        acc = _mma(acc, x_even, widened(w), SWAP)
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
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr, EVEN: tl.constexpr,
                 POST: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_N]: x[:M] times rows `rows` of one weight over this program's K slice (POST: a
    4-bit weight's block absmax applied to each block's partial, accumulate_block)."""
    rows64 = rows.to(tl.int64)
    t = table(code_ptr, M, LUT)
    acc = zeros(BLOCK_M, BLOCK_N, SWAP)
    lo, hi = k_blocks(K, SPLIT, BLOCK_K)
    for kb in range(lo, hi):
        k0 = kb * BLOCK_K
        if POST:
            tl.static_assert(BLOCK_K == 2 * QBLOCK, "post steps are two 64-weight blocks")
            x_even, x_odd = x_tile(x_ptr, x_stride, M, K, k0, KIND, BLOCK_M, 2 * QBLOCK, EVEN)
            acc = accumulate_blocks(acc, x_even, x_odd, w_ptr, a_ptr, s_ptr, offset, blk_base, code_ptr, code2_ptr, t,
                                    rows64, row_mask, K, w_stride, k0, KIND, LUT, BLOCK_M, BLOCK_N, SWAP, EVEN)
        else:
            x_even, x_odd = x_tile(x_ptr, x_stride, M, K, k0, KIND, BLOCK_M, BLOCK_K, EVEN)
            acc = accumulate(acc, x_even, x_odd, w_ptr, a_ptr, s_ptr, offset, blk_base, code_ptr, code2_ptr, t,
                             rows64, row_mask, K, w_stride, k0, KIND, LUT, BLOCK_N, BLOCK_K, SWAP, EVEN)
    return scaled(acc, a_ptr, rows, row_mask, KIND, SWAP)
