"""Triton kernels of the fast engine's decode step: weight-streaming GEMV, RMSNorm, RoPE, attention.

Why our own kernels: at batch 1 a decode step reads every weight once, so its speed is bytes over
bandwidth. bitsandbytes' 4-bit path dequantizes to bf16 and calls a matmul, and its fused
inference kernel is one launch per linear with Python around it; neither reads the packed nibbles
once at full bandwidth inside a CUDA graph. These kernels read the bitsandbytes storage as it is
(packed NF4/FP4 nibbles, 64-element blocks, fp32 absmax or its 8-bit double quantization), FP8
with a per-row scale, or bf16, and never materialise a bf16 weight. The NF4 table is looked up in
registers (lut.py); bench/gemv_sweep.py holds the variants that led to the 4-bit loop as it is.

Each kernel has a pure-torch twin in `ops.py`; tests run both (the Triton side through Triton's
CPU interpreter) on fresh random inputs against a float64 reference.
"""

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .lut import ptx as _lut_ptx
from .weights import DQ_GROUP as _DQ, FP8 as _FP8, INT8 as _INT8, NF4 as _NF4, NF4_DQ as _NF4_DQ, QBLOCK as _QBLOCK
from .weights import X16_SCALE as _X16_SCALE

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's CPU interpreter multiplies bf16 dot operands as raw bits; it gets float32 ones instead.
DOT_BF16 = tl.constexpr(not INTERPRET)
# Triton kernels read module globals only as constexpr.
FP8 = tl.constexpr(_FP8)
INT8 = tl.constexpr(_INT8)
NF4 = tl.constexpr(_NF4)
NF4_DQ = tl.constexpr(_NF4_DQ)
QBLOCK = tl.constexpr(_QBLOCK)
DQ_GROUP = tl.constexpr(_DQ)


def nf4_code() -> list[float]:
    """bitsandbytes' NF4 table: the 16 values a nibble stands for."""
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu").tolist()


NF4_LUT_PTX = tl.constexpr(_lut_ptx(nf4_code(), table_operands=True))
XS = tl.constexpr(_X16_SCALE)


def _pdl_enabled() -> bool:
    import torch

    if INTERPRET or os.environ.get("HEAVYLIFT_PDL") == "0":  # HEAVYLIFT_PDL=0: plain launches, to compare
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 9


# Programmatic dependent launch (Hopper on): a kernel is launched while its predecessor still runs its last
# programs, sets itself up, and waits for the predecessor's writes only where it needs them. A decode step is
# ~300 short kernels; without it each one's ramp-up and tail sit end to end (bench/profile_decode.py).
PDL = tl.constexpr(_pdl_enabled())


@triton.jit
def pdl_enter():
    """Let the next kernel start launching, then wait until the previous kernel's writes are visible.
    Every kernel calls this before its first read of another kernel's output and its first write."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


def _gemv_configs():
    # The first eight suit bf16 / FP8 / INT8 rows; the rest are the 4-bit tiles bench/gemv_sweep.py found
    # fastest on an H100 (two warps, 32 B of packed weights per thread per step).
    tiles = ((4, 4, 4), (8, 2, 4), (8, 4, 4), (16, 2, 4), (2, 8, 4), (4, 8, 8), (16, 4, 8), (32, 2, 8),
             (4, 16, 2), (2, 16, 2), (8, 8, 2), (4, 8, 2), (8, 16, 4))
    return [triton.Config({"BLOCK_N": bn, "NB": nb}, num_warps=warps, num_stages=3) for bn, nb, warps in tiles]


def _even_k(args) -> bool:
    """Whether the K loop covers whole steps of NB blocks (then it needs no block mask)."""
    return (args["K"] // _QBLOCK) % args["NB"] == 0


def _gemm_configs():
    return [triton.Config({"BLOCK_N": bn, "NB": nb}, num_warps=w, num_stages=s)
            for bn, nb, w, s in ((32, 1, 4, 3), (64, 1, 4, 3), (32, 2, 4, 3), (64, 2, 8, 3), (128, 1, 8, 3))]


@triton.jit
def _dot(a, b):
    """a @ b on the tensor cores, bf16 operands and a float32 result."""
    if DOT_BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return tl.dot(a.to(tl.float32), b.to(tl.float32))


@triton.jit
def _nf4_rows(x_ptr, w_ptr, abs_ptr, abs2_ptr, offset, blk_base, code_ptr, code2_ptr, rows, row_mask, K,
              KIND: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, EVEN_K: tl.constexpr, LUT: tl.constexpr):
    """[BLOCK_N] fp32: x (one row) times rows `rows` of a 4-bit weight.

    The tile is [rows, NB blocks, 32 bytes]; each byte holds two weights and meets one int32 of x
    (the bf16 pair it multiplies), and both are read four to a thread so they share one register
    layout: no tile passes through shared memory. Pointers advance per step; the code table is looked
    up in registers (lut.py) where the kernel runs compiled, from memory in the interpreter. With LUT,
    `code_ptr` holds the table as the lookup's eight int32 words (lut.words), not its 16 floats; they are
    read once, before the loop, so they stay in registers.
    """
    rows64 = rows.to(tl.int64)
    nblk = K // QBLOCK
    b = tl.arange(0, NB)
    offs = tl.max_contiguous(b[None, :, None] * 32 + tl.arange(0, 32)[None, None, :], [1, 1, 4])
    pw = w_ptr + rows64[:, None, None] * (K // 2) + offs
    px = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs + 0 * rows[:, None, None]
    idx = blk_base + rows64[:, None] * nblk + b[None, :]
    acc3 = tl.zeros((BLOCK_N, NB, 32), tl.float32)
    if LUT:
        z = tl.zeros((BLOCK_N, NB, 32), tl.int32)
        t0, t1, t2, t3 = (z + tl.load(code_ptr), z + tl.load(code_ptr + 1), z + tl.load(code_ptr + 2),
                          z + tl.load(code_ptr + 3))
        t4, t5, t6, t7 = (z + tl.load(code_ptr + 4), z + tl.load(code_ptr + 5), z + tl.load(code_ptr + 6),
                          z + tl.load(code_ptr + 7))
    for kb in range(0, nblk, NB):
        if EVEN_K:
            mask2 = row_mask[:, None] & (b >= 0)[None, :]
        else:
            mask2 = row_mask[:, None] & (kb + b < nblk)[None, :]
        packed = tl.load(pw, mask=mask2[:, :, None], other=0)
        x2 = tl.load(px, mask=mask2[:, :, None], other=0)
        if KIND == NF4_DQ:
            q = tl.load(abs_ptr + idx, mask=mask2, other=0)
            a = tl.load(code2_ptr + q) * tl.load(abs2_ptr + idx // DQ_GROUP, mask=mask2, other=0.0) + offset
        else:
            a = tl.load(abs_ptr + idx, mask=mask2, other=0.0)
        x_even = (x2 << 16).to(tl.float32, bitcast=True)  # little-endian: the even element is the low half
        x_odd = (x2 & -65536).to(tl.float32, bitcast=True)
        if LUT:
            hi, lo = tl.inline_asm_elementwise(NF4_LUT_PTX, "=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 33,
                                               [packed, t0, t1, t2, t3, t4, t5, t6, t7],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            hi = tl.load(code_ptr + (packed >> 4))  # the first weight of a byte sits in its high nibble
            lo = tl.load(code_ptr + (packed & 15))
        acc3 += (hi * x_even + lo * x_odd) * a[:, :, None]
        pw += NB * 32
        px += NB * 32
        idx += NB
    return tl.sum(tl.sum(acc3, axis=2), axis=1)


@triton.jit
def widened(w):
    """A loaded tile of one-byte weight rows as values the matmul takes: FP8 (e4m3) and INT8 as they are, and FP8
    rows handed over as bytes (ops._kernel_rows: GPUs before sm_89, whose Triton has no e4m3 type) widened to float32
    with integer operations, exactly: sign, the exponent rebiased from 7 to 127 with the three mantissa bits on
    top, and the subnormals (exponent 0) as mantissa x 2^-9. e4m3's NaN codes, which the quantizer never
    writes, read as 480."""
    if w.dtype == tl.uint8:
        b = w.to(tl.int32)
        e = (b >> 3) & 15
        m = b & 7
        normal = (((b & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        tiny = m.to(tl.float32) * 0.001953125
        w = tl.where(e == 0, tl.where((b & 0x80) != 0, -tiny, tiny), normal)
    return w


@triton.jit
def _part_rows(x_ptr, x_stride, M, w_ptr, abs_ptr, abs2_ptr, offset, blk_base, bias_ptr, code_ptr, code2_ptr,
               rows, K, KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, NB: tl.constexpr, EVEN_K: tl.constexpr, LUT: tl.constexpr, n_rows):
    """[BLOCK_M, BLOCK_N] fp32: x[:M] times rows `rows` of one weight, bias included."""
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    if KIND == NF4 or KIND == NF4_DQ:  # one row of x: the 4-bit path exists for decode only
        tl.static_assert(BLOCK_M == 1)
        acc = _nf4_rows(x_ptr, w_ptr, abs_ptr, abs2_ptr, offset, blk_base, code_ptr, code2_ptr, rows, row_mask,
                        K, KIND, BLOCK_N, NB, EVEN_K, LUT)[None, :]
    else:
        k = tl.arange(0, NB * QBLOCK)
        acc2 = tl.zeros((BLOCK_N, NB * QBLOCK), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, NB * QBLOCK):
            kk = k0 + k
            k_mask = kk < K
            w = widened(tl.load(w_ptr + rows64[:, None] * K + kk[None, :],
                                mask=row_mask[:, None] & k_mask[None, :], other=0.0))
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
                acc2 += w.to(tl.float32) * xv[None, :]
            else:
                xt = tl.load(x_ptr + m[:, None] * x_stride + kk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                             other=0.0)
                acc += _dot(xt, tl.trans(w))
        if BLOCK_M == 1:
            acc = tl.sum(acc2, axis=1)[None, :]
        if KIND == FP8 or KIND == INT8:  # one scale per output row
            acc = acc * tl.load(abs_ptr + rows, mask=row_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def store_part(out_ptr, out_stride, res_ptr, M, acc, rows, n_rows, col0, HAS_RES: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """acc's first M rows to columns col0 + rows of out in bf16, the residual added as the reference adds it
    (batched.py's epilogue too)."""
    m = tl.arange(0, BLOCK_M)
    mask = (m < M)[:, None] & (rows < n_rows)[None, :]
    offs = m[:, None] * out_stride + col0 + rows[None, :]
    y = acc.to(tl.bfloat16)
    if HAS_RES:  # hidden = residual + projection, each rounded to bf16 as the reference does
        y = (y.to(tl.float32) + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(tl.bfloat16)
    tl.store(out_ptr + offs, y, mask=mask)


@triton.jit
def _linear_kernel(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K,
                   w0, a0, s0, o0, g0, b0, n0,
                   w1, a1, s1, o1, g1, b1, n1,
                   w2, a2, s2, o2, g2, b2, n2,
                   code_ptr, code2_ptr,
                   KIND: tl.constexpr, PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   LUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                   EVEN_K: tl.constexpr):
    """y[:, parts] = x @ W_p^T (+ bias) (+ residual) for up to three weights side by side (q, k, v)."""
    pdl_enter()
    pid = tl.program_id(0)
    p0 = tl.cdiv(n0, BLOCK_N)
    p1 = tl.cdiv(n1, BLOCK_N)
    if pid < p0:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _part_rows(x_ptr, x_stride, M, w0, a0, s0, o0, g0, b0, code_ptr, code2_ptr, rows, K, KIND,
                         HAS_BIAS, BLOCK_M, BLOCK_N, NB, EVEN_K, LUT, n0)
        store_part(out_ptr, out_stride, res_ptr, M, acc, rows, n0, 0, HAS_RES, BLOCK_M)
    elif PARTS > 1 and pid < p0 + p1:
        rows = (pid - p0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _part_rows(x_ptr, x_stride, M, w1, a1, s1, o1, g1, b1, code_ptr, code2_ptr, rows, K, KIND,
                         HAS_BIAS, BLOCK_M, BLOCK_N, NB, EVEN_K, LUT, n1)
        store_part(out_ptr, out_stride, res_ptr, M, acc, rows, n1, n0, HAS_RES, BLOCK_M)
    elif PARTS > 2:
        rows = (pid - p0 - p1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _part_rows(x_ptr, x_stride, M, w2, a2, s2, o2, g2, b2, code_ptr, code2_ptr, rows, K, KIND,
                         HAS_BIAS, BLOCK_M, BLOCK_N, NB, EVEN_K, LUT, n2)
        store_part(out_ptr, out_stride, res_ptr, M, acc, rows, n2, n0 + n1, HAS_RES, BLOCK_M)


@triton.jit
def glu_store(g, u, out_ptr, out_stride, M, rows, n, BLOCK_M: tl.constexpr):
    """silu(gate) * up, rounded as the reference: each projection to bf16, silu in float32 back to bf16."""
    g = g.to(tl.bfloat16).to(tl.float32)
    u = u.to(tl.bfloat16).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32) * u
    m = tl.arange(0, BLOCK_M)
    mask = (m < M)[:, None] & (rows < n)[None, :]
    tl.store(out_ptr + m[:, None] * out_stride + rows[None, :], act.to(tl.bfloat16), mask=mask)


@triton.jit
def _glu_kernel(x_ptr, x_stride, out_ptr, out_stride, M, K,
                w0, a0, s0, o0, g0, w1, a1, s1, o1, g1, n,
                code_ptr, code2_ptr, KIND: tl.constexpr, LUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, EVEN_K: tl.constexpr):
    """act = silu(x @ gate^T) * (x @ up^T): both projections in one pass, the product in the epilogue."""
    pdl_enter()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = _part_rows(x_ptr, x_stride, M, w0, a0, s0, o0, g0, w0, code_ptr, code2_ptr, rows, K, KIND,
                   False, BLOCK_M, BLOCK_N, NB, EVEN_K, LUT, n)
    u = _part_rows(x_ptr, x_stride, M, w1, a1, s1, o1, g1, w1, code_ptr, code2_ptr, rows, K, KIND,
                   False, BLOCK_M, BLOCK_N, NB, EVEN_K, LUT, n)
    glu_store(g, u, out_ptr, out_stride, M, rows, n, BLOCK_M)


# Triton's CPU interpreter (tests) has no timer to autotune with: it runs one fixed, small tile.
FIXED = {"gemv": {"BLOCK_N": 4, "NB": 2}, "gemm": {"BLOCK_N": 32, "NB": 1}}


def _tuned(configs, key):
    even = triton.heuristics({"EVEN_K": _even_k})
    return even if INTERPRET else (lambda fn: triton.autotune(configs=configs, key=key)(even(fn)))


linear_gemv = _tuned(_gemv_configs(), ["K", "KIND", "PARTS", "n0", "n1", "n2", "BLOCK_M", "LUT"])(_linear_kernel)
linear_gemm = _tuned(_gemm_configs(), ["K", "KIND", "PARTS", "n0", "n1", "n2", "BLOCK_M"])(_linear_kernel)
glu_gemv = _tuned(_gemv_configs(), ["K", "KIND", "n", "BLOCK_M", "LUT"])(_glu_kernel)
glu_gemm = _tuned(_gemm_configs(), ["K", "KIND", "n", "BLOCK_M"])(_glu_kernel)


@triton.jit
def plane_index(e, K):
    """Where element e of a K-vector sits in its fp16 planes (gemv4.plane_index, in fp16 units)."""
    return (((e // 2) % 4) * (K // 8) + e // 8) * 2 + e % 2


@triton.jit
def _store_planes(out16_ptr, y, e, K, mask):
    """y (bf16 values as float32) into the planes of one token's K-vector, scaled by X16_SCALE."""
    tl.store(out16_ptr + plane_index(e, K), (y * XS).to(tl.float16), mask=mask)


@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, out_ptr, out16_ptr, H, eps, BLOCK: tl.constexpr, OUT16: tl.constexpr):
    """out = bf16(x * rsqrt(mean(x^2) + eps)) * w, one row per program, as LlamaRMSNorm computes it;
    with OUT16 (one row) its fp16 planes too."""
    pdl_enter()
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK)
    mask = h < H
    x = tl.load(x_ptr + row * H + h, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    y = (x * tl.rsqrt(var + eps)).to(tl.bfloat16).to(tl.float32)
    w = tl.load(w_ptr + h, mask=mask, other=0.0).to(tl.float32)
    out = (y * w).to(tl.bfloat16)
    tl.store(out_ptr + row * H + h, out, mask=mask)
    if OUT16:
        _store_planes(out16_ptr, out.to(tl.float32), h, H, mask)


@triton.jit
def _bf16(x):
    """x rounded to bf16 and widened back, to reproduce a bf16 computation step by step."""
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def rope_cache_kernel(qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
                      qn_ptr, kn_ptr, eps, HQ, HKV, S_MAX, POS_PLUS, D: tl.constexpr, QK_NORM: tl.constexpr):
    """Rotate one head of one token (rotate-half RoPE) and put it in place: q to q_out, k and v into the cache.

    Program (token, head): heads [0, HQ) are queries, [HQ, HQ+HKV) keys, the rest values.
    The token's position is pos[token] + POS_PLUS (decode passes the cache length, prefill the positions).
    With QK_NORM (Qwen 3), each query and key head is first RMS-normed over its D channels and scaled by
    q_norm's or k_norm's weight (qn_ptr, kn_ptr), rounded to bf16 as Qwen3RMSNorm does, then rotated.
    """
    pdl_enter()
    t = tl.program_id(0)
    head = tl.program_id(1)
    half = tl.arange(0, D // 2)
    pos = tl.load(pos_ptr + t) + POS_PLUS
    slot = tl.load(slot_ptr + t)
    src = qkv_ptr + t.to(tl.int64) * (HQ + 2 * HKV) * D + head * D
    x1 = tl.load(src + half).to(tl.float32)
    x2 = tl.load(src + D // 2 + half).to(tl.float32)
    if QK_NORM:
        if head < HQ + HKV:
            inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
            w_ptr = qn_ptr if head < HQ else kn_ptr
            x1 = _bf16(_bf16(x1 * inv) * tl.load(w_ptr + half).to(tl.float32))
            x2 = _bf16(_bf16(x2 * inv) * tl.load(w_ptr + D // 2 + half).to(tl.float32))
    if head < HQ + HKV:
        c = tl.load(cos_ptr + pos.to(tl.int64) * (D // 2) + half).to(tl.float32)
        s = tl.load(sin_ptr + pos.to(tl.int64) * (D // 2) + half).to(tl.float32)
        # Each product and the sum rounded to bf16, as transformers' apply_rotary_pos_emb computes in bf16:
        # rounding once in float32 instead puts about 1% between the logits of one 8B-shaped layer.
        y1 = (_bf16(x1 * c) - _bf16(x2 * s)).to(tl.bfloat16)
        y2 = (_bf16(x2 * c) + _bf16(x1 * s)).to(tl.bfloat16)
        if head < HQ:
            dst = q_out_ptr + (t.to(tl.int64) * HQ + head) * D
        else:
            dst = k_cache_ptr + ((slot.to(tl.int64) * HKV + head - HQ) * S_MAX + pos) * D
    else:
        y1 = x1.to(tl.bfloat16)
        y2 = x2.to(tl.bfloat16)
        dst = v_cache_ptr + ((slot.to(tl.int64) * HKV + head - HQ - HKV) * S_MAX + pos) * D
    tl.store(dst + half, y1)
    tl.store(dst + D // 2 + half, y2)


@triton.jit
def decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, len_ptr, slot_ptr, o_ptr, m_ptr, l_ptr, scale,
                            HQ, HKV, S_MAX, WINDOW, SPLITS, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_S: tl.constexpr, D: tl.constexpr, ROW_SLOTS: tl.constexpr):
    """Split-K attention of one new token per row over its sequence's cache (flash-decoding, first pass).

    Program (row x kv head, split): the GROUP query heads that share the kv head, against one slice
    of the row's valid positions, with an online softmax; partial results go to (o, m, l) for
    `attention_combine_kernel`. Without ROW_SLOTS row b is sequence b and attends to its first
    len[b] + 1 positions (a decode step: len is the cache length, the new token already cached); with
    ROW_SLOTS row b reads sequence slot[b]'s first len[b] positions (a mixed step: several rows of one
    sequence at consecutive positions, each attending up to its own). Both are read on the device, so
    one captured graph serves every step.
    """
    pdl_enter()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    if ROW_SLOTS:
        seq = tl.load(slot_ptr + b)
        length = tl.load(len_ptr + b)
    else:
        seq = b
        length = tl.load(len_ptr + b) + 1  # the cache holds the new token already
    lo = tl.maximum(length - WINDOW, 0)  # WINDOW > S_MAX when the layer attends to everything
    per = tl.cdiv(length - lo, SPLITS)
    start = lo + split * per
    stop = tl.minimum(start + per, length)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + (b * HQ + heads)[:, None].to(tl.int64) * D + d[None, :], mask=g_mask[:, None], other=0.0)
    base = (seq.to(tl.int64) * HKV + kvh) * S_MAX * D
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < stop
        k = tl.load(k_cache_ptr + base + s[:, None] * D + d[None, :], mask=s_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + base + s[:, None] * D + d[None, :], mask=s_mask[:, None], other=0.0)
        scores = _dot(q, tl.trans(k)) * scale
        scores = tl.where(s_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, v)
        m_i = m_new
    out = ((b * HQ + heads) * SPLITS + split).to(tl.int64)
    tl.store(o_ptr + out[:, None] * D + d[None, :], acc, mask=g_mask[:, None])
    tl.store(m_ptr + out, m_i, mask=g_mask)
    tl.store(l_ptr + out, l_i, mask=g_mask)


@triton.jit
def attention_combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, out16_ptr, SPLITS, K, BLOCK_SPLITS: tl.constexpr,
                             D: tl.constexpr, OUT16: tl.constexpr):
    """Second pass: merge the splits of one (sequence, query head) into its bf16 output; with OUT16 (one
    sequence, K = heads * D) the fp16 planes of the whole attention output too."""
    pdl_enter()
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_SPLITS)
    sp_mask = sp < SPLITS
    m = tl.load(m_ptr + row * SPLITS + sp, mask=sp_mask, other=float("-inf"))
    l = tl.load(l_ptr + row * SPLITS + sp, mask=sp_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    d = tl.arange(0, D)
    o = tl.load(o_ptr + (row * SPLITS + sp)[:, None] * D + d[None, :], mask=sp_mask[:, None], other=0.0)
    out = (tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)).to(tl.bfloat16)
    tl.store(out_ptr + row * D + d, out)
    if OUT16:
        _store_planes(out16_ptr, out.to(tl.float32), row * D + d, K, d >= 0)
