"""One-token decode through 4-bit NF4 weights on Hopper: Gluon kernels, layouts chosen by hand.

Why a second 4-bit kernel beside kernels._nf4_rows: there the code-table lookup and the float32
multiply cost about 19 SASS instructions per weight byte, which held the 8B shapes' GEMVs near
1.3 TB/s on an H100 while bf16 streamed at 2.7. Here each byte's pair of weights is looked up as one
fp16 pair and multiplied by its pair of x in one fp16x2 FMA: from a 256-entry byte table in shared
memory, one copy per lane (lut.smem_dot_program, about 5 instructions a byte all told), or from the
code held in registers (lut.dot_program, about 9). x comes as its fp16 planes (ops.planes, written by
the kernel that produced x: rmsnorm, the attention's last pass, the GLU), or as bf16 converted here
per thread (slower: the conversion costs ~1.3 instructions a byte at four rows a thread). It is
scaled by X16_SCALE so the fp16 partial sums of eight products cannot overflow (|x| up to ~5e5) while
small values keep 2^-25 absolute precision. Each step a thread reads 16 contiguous bytes of a block
per row (one 128-bit load), the matching 32 x values (four 128-bit loads, shared by its RPT rows), and
the absmax of the step after, so loads of step i+1 are in flight while step i multiplies.
bench/gemv4_probe.py times every tile and both lookups against the Triton kernels.

Gluon has no CPU interpreter: the tests check the lookup program bit by bit (lut.emulate_dot) and the
kernels run on GPUs only, checked by bench/decode_gpu.py against a float64 reference.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .kernels import PDL, nf4_code
from .lut import dot_ptx, smem_dot_ptx
from .weights import NF4 as _NF4, NF4_DQ as _NF4_DQ, X16_SCALE

NF4 = gl.constexpr(_NF4)
NF4_DQ = gl.constexpr(_NF4_DQ)
DOT = gl.constexpr(dot_ptx(nf4_code()))
SMEM_DOT = gl.constexpr(smem_dot_ptx())
XSCALE = gl.constexpr(X16_SCALE)  # x is multiplied by this before it becomes fp16; the result by its inverse
NB = gl.constexpr(16)  # 64-blocks per step: a warp's 16 lanes along them, two lanes (halves of 16 bytes) each
STEP = 16 * 64  # weights per row per step


@gluon.constexpr_function
def tile_layout(rpt, warps):
    """The step tile [rows, 16 blocks, 2 halves, 4 words, 4 bytes]: a thread holds 16 contiguous bytes of a
    block for each of its rpt rows, lanes run along the blocks, warps along the rows."""
    return gl.BlockedLayout([rpt, 1, 1, 4, 4], [1, 16, 2, 1, 1], [warps, 1, 1, 1, 1], [4, 3, 2, 1, 0])


@gluon.jit
def plane_index(e, K):
    """Where element e of a K-vector sits in its planes, in fp16 units. Plane j (of four) holds, for each
    packed word g of a weight row, the x pair its byte j meets: x[8g + 2j] and x[8g + 2j + 1]. A thread's
    four words then meet four contiguous words of each plane (kernels.plane_index is the Triton twin)."""
    return (((e // 2) % 4) * (K // 8) + e // 8) * 2 + e % 2


@gluon.jit
def _pdl_enter():
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.jit
def _pdl_wait():
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # the CTA barrier: Triton 3.6's name, then 3.9's


@gluon.jit
def _ld(ptr, mask, EVEN_K: gl.constexpr):
    """A load that needs no mask when K is a whole number of steps; zeros past the row's end otherwise."""
    if EVEN_K:
        v = gl.load(ptr)
    else:
        v = gl.load(ptr, mask=mask, other=0)
    return v


@gluon.jit
def _absmax(abs_ptr, abs2_ptr, code2_ptr, offset, idx, mask, KIND: gl.constexpr, EVEN_K: gl.constexpr):
    if KIND == NF4_DQ:
        q = _ld(abs_ptr + idx, mask, EVEN_K)
        a = gl.load(code2_ptr + q) * _ld(abs2_ptr + idx // 256, mask, EVEN_K) + offset
    else:
        a = _ld(abs_ptr + idx, mask, EVEN_K)
    return a


@gluon.jit
def _x_pairs(px, mask, XS: gl.constexpr, L5: gl.constexpr, EVEN_K: gl.constexpr):
    """The step's x as four [1, NB, 2, 4] tensors of fp16 pairs, one per byte of a packed word."""
    x = _ld(px, mask, EVEN_K)  # bf16 pairs, the even element in the low half
    e = (x << 16).to(gl.float32, bitcast=True) * XS
    o = (x & -65536).to(gl.float32, bitcast=True) * XS
    h = gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [e, o], dtype=gl.int32,
                                  is_pure=True, pack=1)
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
    j = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(j, 0), 1), 2), 3)
    # Picking element j of each thread's own four registers: the selects fold away at compile time.
    x0 = gl.sum(gl.where(j == 0, h, 0), axis=4)
    x1 = gl.sum(gl.where(j == 1, h, 0), axis=4)
    x2 = gl.sum(gl.where(j == 2, h, 0), axis=4)
    x3 = gl.sum(gl.where(j == 3, h, 0), axis=4)
    return x0, x1, x2, x3


@gluon.jit
def _lane_id(L5: gl.constexpr):
    """The thread's lane in its warp, as a [1, 1, 1, 1] tensor of the step tile's word layout."""
    one = gl.full([1, 1, 1, 1], 0, gl.int32, layout=gl.SliceLayout(4, L5))
    return gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [one], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _table(words_ptr, zero, L5: gl.constexpr):
    """The lookup's eight table words, one register each per thread. Read through an address ptxas cannot
    prove warp-uniform (lane id times a runtime zero): uniform values it keeps in uniform registers and
    copies back before every prmt, a seventh of the loop."""
    p = words_ptr + _lane_id(L5) * zero
    return (gl.load(p), gl.load(p + 1), gl.load(p + 2), gl.load(p + 3), gl.load(p + 4), gl.load(p + 5),
            gl.load(p + 6), gl.load(p + 7))


@gluon.jit
def _byte_table(pairs_ptr, WARPS: gl.constexpr):
    """The shared-memory byte table of lut.smem_dot_program: entry b (lut.pair_words) copied into each of the
    32 lanes' columns of row b, rows 256 bytes apart (the unused half of each row keeps prmt's addressing to
    one instruction). Triton puts this first allocation at the start of shared memory, where the lookup's
    PTX reads it (global_smem); the caller keeps it alive (_keep_alive) until its last lookup is done."""
    FL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0])
    table = gl.allocate_shared_memory(gl.int32, [256, 64], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    v = gl.load(pairs_ptr + gl.arange(0, 256, layout=gl.SliceLayout(1, FL)))
    table.slice(0, 32, dim=1).store(gl.expand_dims(v, 1) + gl.zeros([256, 32], gl.int32, layout=FL))
    barrier()
    return table


@gluon.jit
def _word_dots(q, x0, x1, x2, x3, t, SMEM: gl.constexpr):
    """Per packed word of q: its eight products with x summed (lut.dot_ptx, or lut.smem_dot_ptx with SMEM)."""
    if SMEM:
        s = gl.inline_asm_elementwise(SMEM_DOT, "=r,r,r,r,r,r,r", [q, x0, x1, x2, x3, t[0]], dtype=gl.float32,
                                      is_pure=False, pack=1)
    else:
        s = gl.inline_asm_elementwise(DOT, "=r" + ",r" * 13, [q, x0, x1, x2, x3, t[0], t[1], t[2], t[3], t[4],
                                                             t[5], t[6], t[7]], dtype=gl.float32, is_pure=True,
                                      pack=1)
    return s


@gluon.jit
def _planes(p, mask, KW, EVEN_K: gl.constexpr):
    """The step's x from its planes (x16): four [1, NB, 2, 4] tensors, each four contiguous words a thread."""
    return _ld(p, mask, EVEN_K), _ld(p + KW, mask, EVEN_K), _ld(p + 2 * KW, mask, EVEN_K), _ld(p + 3 * KW, mask, EVEN_K)


@gluon.jit
def _dot_rows(x_ptr, w_ptr, abs_ptr, abs2_ptr, code2_ptr, offset, blk_base, rows, K, t,
              KIND: gl.constexpr, RPT: gl.constexpr, WARPS: gl.constexpr, EVEN_K: gl.constexpr, X16: gl.constexpr,
              SMEM: gl.constexpr):
    """[RPT * WARPS] fp32 (rows' layout): x times rows `rows` (clamped in range) of one 4-bit weight. x is
    bf16 [K], or with X16 its planes (`planes`): no conversion here, 128-bit loads straight into place.
    t: the register table's words, or with SMEM the lane's column of the shared-memory table first."""
    L5: gl.constexpr = tile_layout(RPT, WARPS)
    Q: gl.constexpr = gl.SliceLayout(4, L5)  # [rows, blocks, halves, words]
    S3: gl.constexpr = gl.SliceLayout(3, Q)
    A: gl.constexpr = gl.SliceLayout(2, S3)  # [rows, blocks]
    XL: gl.constexpr = gl.SliceLayout(0, L5)  # [blocks, halves, words, bytes]
    nblk = K // 64
    rows64 = rows.to(gl.int64)
    # packed words: thread (block b, half h) holds words 8b + 4h .. 8b + 4h + 3 of the step, per row
    wb = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(0, Q))))
    wh = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(0, Q))))
    ww = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(0, Q))))
    woffs = gl.expand_dims(wb[:, None, None] * 8 + wh[None, :, None] * 4 + ww[None, None, :], 0)
    r4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(rows64, 1), 2), 3)
    pw = w_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + r4 * (K // 8) + woffs
    # x as bf16 pairs, one per packed byte: [blocks, halves, words, bytes]
    xb = gl.arange(0, NB, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, XL))))
    xh = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, XL))))
    xw = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, XL))))
    xj = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, XL))))
    xo = xb[:, None, None] * 32 + xh[None, :, None] * 16 + xw[None, None, :] * 4
    xoffs = gl.expand_dims(gl.expand_dims(xo, 3) + xj[None, None, None, :], 0)
    px = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + xoffs
    blk = gl.arange(0, NB, layout=gl.SliceLayout(0, A))
    idx = blk_base + rows64[:, None] * nblk + blk[None, :]
    wblk = gl.expand_dims(gl.expand_dims(gl.expand_dims(wb, 1), 2), 0)  # [1, NB, 1, 1]
    xblk = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(xb, 1), 2), 3), 0)  # [1, NB, 1, 1, 1]
    ablk = blk[None, :]
    # Step 0's weights and absmax are read before waiting for the kernel that writes x.
    q = _ld(pw, wblk < nblk, EVEN_K)
    a = _absmax(abs_ptr, abs2_ptr, code2_ptr, offset, idx, ablk < nblk, KIND, EVEN_K)
    _pdl_wait()
    px16 = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + woffs
    kw = gl.multiple_of(K // 8, 8)  # a plane's words: K is a whole number of 64-blocks
    if X16:
        x0, x1, x2, x3 = _planes(px16, wblk < nblk, kw, EVEN_K)
    else:
        x0, x1, x2, x3 = _x_pairs(px, xblk < nblk, XSCALE, L5, EVEN_K)
    acc = gl.zeros([RPT * WARPS, NB, 2], gl.float32, layout=S3)
    for kb in range(NB, nblk + NB, NB):  # the last pass multiplies the last step and reads nothing new
        kk = gl.where(kb < nblk, kb, 0)
        q_n = _ld(pw + kk * 8, wblk + kk < nblk, EVEN_K)
        a_n = _absmax(abs_ptr, abs2_ptr, code2_ptr, offset, idx + kk, ablk + kk < nblk, KIND, EVEN_K)
        if X16:
            y0, y1, y2, y3 = _planes(px16 + kk * 8, wblk + kk < nblk, kw, EVEN_K)
        else:
            y0, y1, y2, y3 = _x_pairs(px + kk * 32, xblk + kk < nblk, XSCALE, L5, EVEN_K)
        s = _word_dots(q, x0, x1, x2, x3, t, SMEM)
        acc += gl.sum(s, axis=3) * gl.expand_dims(a, 2)
        q = q_n
        a = a_n
        x0 = y0
        x1 = y1
        x2 = y2
        x3 = y3
    return gl.sum(gl.sum(acc, axis=2), axis=1) * (1.0 / XSCALE)


@gluon.jit
def _rows(pid, RPT: gl.constexpr, WARPS: gl.constexpr):
    L5: gl.constexpr = tile_layout(RPT, WARPS)
    R: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L5))))
    return pid * (RPT * WARPS) + gl.arange(0, RPT * WARPS, layout=R)


@gluon.jit
def _part(x_ptr, out_ptr, res_ptr, code2_ptr, w, a, s, o, g, bias_ptr, n, col0, pid, K, t, KIND: gl.constexpr,
          HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr, RPT: gl.constexpr, WARPS: gl.constexpr,
          EVEN_K: gl.constexpr, X16: gl.constexpr, SMEM: gl.constexpr):
    rows = _rows(pid, RPT, WARPS)
    keep = rows < n
    rows_in = gl.where(keep, rows, n - 1)  # the last tile recomputes row n - 1 rather than masking every load
    acc = _dot_rows(x_ptr, w, a, s, code2_ptr, o, g, rows_in, K, t, KIND, RPT, WARPS, EVEN_K, X16, SMEM)
    if HAS_BIAS:
        acc += gl.load(bias_ptr + rows_in).to(gl.float32)
    y = acc.to(gl.bfloat16)
    if HAS_RES:  # hidden = residual + projection, each rounded to bf16 as the reference does
        y = (y.to(gl.float32) + gl.load(res_ptr + col0 + rows, mask=keep, other=0.0).to(gl.float32)).to(gl.bfloat16)
    gl.store(out_ptr + col0 + rows, y, mask=keep)


@gluon.jit
def _lookup_operands(words_ptr, zero, L5: gl.constexpr, SMEM: gl.constexpr):
    """What _word_dots takes besides the weights and x: the lane's table column, or the register table."""
    if SMEM:
        t = (_lane_id(L5) * 4,)  # the lane's column of the byte table, in bytes (lut.smem_dot_program)
    else:
        t = _table(words_ptr, zero, L5)
    return t


@gluon.jit
def linear4_kernel(x_ptr, out_ptr, res_ptr, K, words_ptr, pairs_ptr, code2_ptr, zero,
                   w0, a0, s0, o0, g0, b0, n0, w1, a1, s1, o1, g1, b1, n1, w2, a2, s2, o2, g2, b2, n2,
                   KIND: gl.constexpr, PARTS: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr,
                   RPT: gl.constexpr, WARPS: gl.constexpr, EVEN_K: gl.constexpr, X16: gl.constexpr,
                   SMEM: gl.constexpr):
    """y[parts] = x @ W_p^T (+ bias) (+ residual) for one token, up to three weights side by side (q, k, v)."""
    _pdl_enter()
    L5: gl.constexpr = tile_layout(RPT, WARPS)
    if SMEM:
        table = _byte_table(pairs_ptr, WARPS)
    t = _lookup_operands(words_ptr, zero, L5, SMEM)
    BN: gl.constexpr = RPT * WARPS
    pid = gl.program_id(0)
    p0 = gl.cdiv(n0, BN)
    p1 = gl.cdiv(n1, BN)
    if pid < p0:
        _part(x_ptr, out_ptr, res_ptr, code2_ptr, w0, a0, s0, o0, g0, b0, n0, 0, pid, K, t, KIND, HAS_BIAS, HAS_RES,
              RPT, WARPS, EVEN_K, X16, SMEM)
    elif PARTS > 1 and pid < p0 + p1:
        _part(x_ptr, out_ptr, res_ptr, code2_ptr, w1, a1, s1, o1, g1, b1, n1, n0, pid - p0, K, t, KIND, HAS_BIAS,
              HAS_RES, RPT, WARPS, EVEN_K, X16, SMEM)
    elif PARTS > 2:
        _part(x_ptr, out_ptr, res_ptr, code2_ptr, w2, a2, s2, o2, g2, b2, n2, n0 + n1, pid - p0 - p1, K, t, KIND,
              HAS_BIAS, HAS_RES, RPT, WARPS, EVEN_K, X16, SMEM)
    if SMEM:
        table._keep_alive()


@gluon.jit
def glu4_kernel(x_ptr, out_ptr, out16_ptr, K, words_ptr, pairs_ptr, code2_ptr, zero, w0, a0, s0, o0, g0,
                w1, a1, s1, o1, g1, n, KIND: gl.constexpr, RPT: gl.constexpr, WARPS: gl.constexpr,
                EVEN_K: gl.constexpr, X16: gl.constexpr, OUT16: gl.constexpr, SMEM: gl.constexpr):
    """act = silu(x @ gate^T) * (x @ up^T) for one token, rounded as the reference rounds; with OUT16 its
    planes too, for the down projection."""
    _pdl_enter()
    L5: gl.constexpr = tile_layout(RPT, WARPS)
    if SMEM:
        table = _byte_table(pairs_ptr, WARPS)
    t = _lookup_operands(words_ptr, zero, L5, SMEM)
    rows = _rows(gl.program_id(0), RPT, WARPS)
    keep = rows < n
    rows_in = gl.where(keep, rows, n - 1)
    g = _dot_rows(x_ptr, w0, a0, s0, code2_ptr, o0, g0, rows_in, K, t, KIND, RPT, WARPS, EVEN_K, X16, SMEM)
    u = _dot_rows(x_ptr, w1, a1, s1, code2_ptr, o1, g1, rows_in, K, t, KIND, RPT, WARPS, EVEN_K, X16, SMEM)
    if SMEM:
        table._keep_alive()
    g = g.to(gl.bfloat16).to(gl.float32)
    u = u.to(gl.bfloat16).to(gl.float32)
    act = (g / (1.0 + gl.exp(-g))).to(gl.bfloat16).to(gl.float32) * u
    act = act.to(gl.bfloat16)
    gl.store(out_ptr + rows, act, mask=keep)
    if OUT16:
        gl.store(out16_ptr + plane_index(rows, n), (act.to(gl.float32) * XSCALE).to(gl.float16), mask=keep)


def _configs():
    """Every tile bench/gemv4_probe.py times: (rows per thread, warps), each with the register lookup and with
    the shared-memory byte table (64 KB a program: at most three an SM)."""
    return [triton.Config({"RPT": r, "WARPS": w, "SMEM": m}, num_warps=w)
            for m in (False, True) for r, w in ((2, 8), (4, 4), (4, 2), (2, 4), (8, 2), (1, 8), (1, 4), (2, 2))]


# The one tile the engine runs: the shared-memory table, two rows a thread, eight warps. On an H100, in CUDA
# graphs over weights that do not fit L2, it was the fastest of _configs() for every 8B and 70B shape but
# the 70B down projection (+8%: 512 programs of 64 KB fill 1.3 waves), e.g. down 17.3 us against the register
# lookup's best 21.3, GLU 29.5 against 32.2 (bench/gemv4_probe.py). Triton's
# autotuner is not used: timing kernels alone (do_bench) charged the table fill that PDL hides in a decode
# step, and it picked tiles up to 28% slower there (down: 22.1 us).
TILE = triton.Config({"RPT": 2, "WARPS": 8, "SMEM": True}, num_warps=8)


def _even_k(args) -> bool:
    return args["K"] % STEP == 0


# Autotuner objects with the one tile, so bench/gemv4_probe.py can swap candidates in (tuner.configs).
linear4 = triton.autotune(configs=[TILE], key=["K", "KIND", "PARTS", "n0", "n1", "n2", "X16"])(
    triton.heuristics({"EVEN_K": _even_k})(linear4_kernel))
glu4 = triton.autotune(configs=[TILE], key=["K", "KIND", "n", "X16", "OUT16"])(
    triton.heuristics({"EVEN_K": _even_k})(glu4_kernel))
