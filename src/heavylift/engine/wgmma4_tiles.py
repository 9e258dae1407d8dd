"""wgmma4.py's inner loop: a step's packed bytes loaded into the lanes whose wgmma fragments hold them, looked up
in the shared-memory byte table as bf16 pairs that wgmma takes from registers, against x's tile stored in shared
memory in the same K order.

wgmma gives the lane with column t of a row the weight pairs (2t, 2t + 1) and (2t + 8, 2t + 9) of each 16-wide
K step; K is a sum, so the loop orders it to suit the loads: that lane reads 8 contiguous packed bytes of a
64-weight block (one 64-bit load, `word_layout`), bytes 8t + j, and byte j takes the place of pair t + 4 (j % 2)
of step j // 2 (`k_order`). The looked-up pairs are joined and reshaped into wgmma's operand layout, a change
of layout Gluon checks is free (convert_layout with assert_trivial).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .lut import smem_pairs_ptx
from .weights import NF4_DQ as _NF4_DQ, QBLOCK as _QBLOCK

NF4_DQ = gl.constexpr(_NF4_DQ)
# names that changed after Triton 3.6 (the GPU image's), so the kernels also compile with later ones
barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # the CTA barrier
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
PAIRS = gl.constexpr(smem_pairs_ptx(scaled=False))
SCALED_PAIRS = gl.constexpr(smem_pairs_ptx(scaled=True))
QBLOCK = gl.constexpr(_QBLOCK)
STEP_WEIGHTS = 2 * _QBLOCK
STEP_K = gl.constexpr(STEP_WEIGHTS)  # weights of a row per loop step: two 64-weight blocks
TABLE_ROWS = gl.constexpr(256)  # the byte table: a row of 64 words per byte value, its first 32 one copy per lane


def k_order(kl: int) -> int:
    """Where weight kl of a 64-wide block's wgmma order sits in the block: the pair of K step s (kl // 16),
    column t ((kl // 2) % 4) and half h ((kl // 8) % 2) is packed byte 8 t + 2 s + h, the pair's second
    weight that byte's second nibble."""
    s, h, t, e = kl // 16, (kl // 8) % 2, (kl // 2) % 4, kl % 2
    return 2 * (8 * t + 2 * s + h) + e


@gluon.constexpr_function
def mma_layout(BM, W):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, BM, 16])


@gluon.constexpr_function
def word_layout(BN, W):
    """A step's packed words as [rows, 2, 4, 2 blocks]: [r, w, t, b] is word 2 t + w of block b of row r (its
    bytes 8 t + 4 w .. + 3), held by the lane wgmma gives column t of row r. Registers run along w (8
    contiguous bytes, one load) and b; the rows are spread as in wgmma's fragments (lanes and a register
    within 16 rows, warps across them)."""
    regs = [[0, 1, 0, 0], [0, 0, 0, 1], [8, 0, 0, 0]]
    r = 16 * W
    while r < BN:
        regs.append([r, 0, 0, 0])
        r *= 2
    lanes = [[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
    warps = [[16 << i, 0, 0, 0] for i in range(W.bit_length() - 1)]
    return gl.DistributedLinearLayout(regs, lanes, warps, [], [BN, 2, 4, 2])


@gluon.constexpr_function
def x_layout(W):
    """x's step tile as [tokens, 2 blocks, 4 (t), 4 (s), 2 (h), 2 (e)], element 16 t + 4 s + 2 h + e of a block:
    a thread holds the 8 of one (token, s, h) in both blocks, the ones wgmma's K order (k_order) puts side by
    side, so the loads are 32-bit and the stores to shared memory 128-bit."""
    return gl.BlockedLayout([1, 2, 4, 1, 1, 2], [4, 1, 1, 4, 2, 1], [W, 1, 1, 1, 1, 1], [5, 2, 1, 4, 3, 0])


@gluon.constexpr_function
def x_smem_layout(BM):
    """A block's x tile [64, BM] in shared memory, K contiguous (wgmma's K-major right operand)."""
    return gl.NVMMASharedLayout.get_default_for([QBLOCK, BM], gl.bfloat16, transposed=True)


@gluon.jit
def _lane_select(L: gl.constexpr):
    """4 x the lane id, the byte table column of this lane (lut.smem_pairs_program)."""
    one = gl.full([1, 1, 1, 1], 0, gl.int32, layout=L)
    return gl.inline_asm_elementwise("mov.u32 $0, %laneid;\nshl.b32 $0, $0, 2; // $1", "=r,r", [one],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def shared_buffers(pairs_ptr, BM: gl.constexpr, W: gl.constexpr):
    """The byte table (entry b copied into the 32 lanes' columns of row b; the largest allocation, so Triton
    puts it at the start of shared memory, where the lookup's PTX reads it) and four x tiles (two steps of two
    blocks, double-buffered)."""
    FL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [W, 1], [1, 0])
    table = gl.allocate_shared_memory(gl.int32, [TABLE_ROWS, 64], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    v = gl.load(pairs_ptr + gl.arange(0, TABLE_ROWS, layout=gl.SliceLayout(1, FL)))
    table.slice(0, 32, dim=1).store(gl.expand_dims(v, 1) + gl.zeros([TABLE_ROWS, 32], gl.int32, layout=FL))
    xs = gl.allocate_shared_memory(gl.bfloat16, [4, QBLOCK, BM], x_smem_layout(BM))
    return table, xs


@gluon.jit
def _absmax(a_ptr, s_ptr, offset, code2_ptr, idx, KIND: gl.constexpr):
    if KIND == NF4_DQ:
        a = gl.load(code2_ptr + gl.load(a_ptr + idx).to(gl.int32)) * gl.load(s_ptr + (idx >> 8)) + offset
    else:
        a = gl.load(a_ptr + idx)
    return a


@gluon.constexpr_function
def _along(L, rank, d):
    """The layout of a vector that expand_dims over every axis but d turns into L (rank `rank`)."""
    for axis in reversed(range(rank)):
        if axis != d:
            L = gl.SliceLayout(axis, L)
    return L


@gluon.constexpr_function
def _others(rank, d):
    return tuple(a for a in range(rank) if a != d)


@gluon.jit
def _iota(n: gl.constexpr, d: gl.constexpr, L: gl.constexpr):
    """arange(n) along dim d of a rank-6 layout L, as a broadcastable rank-6 tensor."""
    v = gl.arange(0, n, layout=_along(L, 6, d))
    return gl.expand_dims(v, _others(6, d))


@gluon.jit
def _x_offsets(x_stride, M, BM: gl.constexpr, W: gl.constexpr):
    """Offsets and mask of x's step tile in x_layout (zeros past M), built once."""
    XL: gl.constexpr = x_layout(W)
    m = _iota(BM, 0, XL)
    offs = (m * x_stride + _iota(2, 1, XL) * QBLOCK + _iota(4, 2, XL) * 16 + _iota(4, 3, XL) * 4
            + _iota(2, 4, XL) * 2 + _iota(2, 5, XL))
    return offs, m < M


@gluon.jit
def _x_step(x_ptr, offs, keep, k0, BM: gl.constexpr):
    """x[:M, k0:k0 + 128] in wgmma's K order, as the two blocks' [64, BM] tiles."""
    x = gl.load(x_ptr + k0 + offs, mask=keep, other=0.0)
    # [m, b, t, s, h, e] -> [m, b, s, h, t, e]: element 16 s + 8 h + 2 t + e of block b (k_order)
    x = gl.reshape(gl.permute(x, (0, 1, 3, 4, 2, 5)), [BM, 2, QBLOCK])
    return gl.split(gl.permute(x, (2, 0, 1)))


@gluon.jit
def _halves(p):
    """A bf16 pair's halves as [..., 2]: the byte's first weight, then its second."""
    return gl.join(p.to(gl.int16).to(gl.bfloat16, bitcast=True), (p >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True))


@gluon.jit
def _operands(q, lane, scale, POST: gl.constexpr, BN: gl.constexpr, D: gl.constexpr):
    """wgmma's left operands [BN, 64], one per block, of a step's packed words: each byte's bf16 pair from the
    table (times its row's bf16 scale pair unless POST), the pair's halves as consecutive weights, byte j of
    lane t's eight standing at 8 j + 2 t (k_order)."""
    if POST:
        p0, p1, p2, p3 = gl.inline_asm_elementwise(PAIRS, "=r,=r,=r,=r,r,r", [q, lane],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                   pack=1)
    else:
        p0, p1, p2, p3 = gl.inline_asm_elementwise(SCALED_PAIRS, "=r,=r,=r,=r,r,r,r", [q, lane, scale],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                   pack=1)
    v = gl.join(gl.join(_halves(p0), _halves(p1)), gl.join(_halves(p2), _halves(p3)))  # [r, w, t, b, e, j0, j1]
    v = gl.reshape(gl.permute(v, (0, 3, 1, 6, 5, 2, 4)), [BN, 2, QBLOCK])  # [r, b, 32 w + 16 j1 + 8 j0 + 2 t + e]
    v0, v1 = gl.split(gl.permute(v, (0, 2, 1)))
    return gl.convert_layout(v0, D, assert_trivial=True), gl.convert_layout(v1, D, assert_trivial=True)


@gluon.jit
def _bf16_pairs(a):
    """float32 scales as bf16 pairs (both halves the scale), the operand of the scaled lookup."""
    return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,r", [a], dtype=gl.int32, is_pure=True,
                                     pack=1)


@gluon.jit
def _block_scales(a_ptr, s_ptr, offset, code2_ptr, idx, KIND: gl.constexpr, POST: gl.constexpr):
    """A step's two blocks' absmax (idx: _row_offsets' indices of its first block): with POST float32 in the
    accumulator's rows, one tensor per block; else bf16 pairs [BN, 1, 1, 2 blocks] in the words' rows (twice,
    so both forms are two values)."""
    if POST:
        a0 = _absmax(a_ptr, s_ptr, offset, code2_ptr, idx, KIND)
        a1 = _absmax(a_ptr, s_ptr, offset, code2_ptr, idx + 1, KIND)
    else:
        a0 = _bf16_pairs(_absmax(a_ptr, s_ptr, offset, code2_ptr, idx, KIND))
        a1 = a0
    return a0, a1


@gluon.jit
def _mma_step(acc, q, a0, a1, xs0, xs1, lane, POST: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr,
              W: gl.constexpr):
    """acc plus one step of one weight: its two blocks against x's two tiles in shared memory. a0, a1: the
    blocks' absmax per row, float32 in the accumulator's rows (POST) or bf16 pairs in the words' rows."""
    mma: gl.constexpr = mma_layout(BM, W)
    D: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    if POST:
        w0, w1 = _operands(q, lane, 0, POST, BN, D)
        zero = gl.zeros([BN, BM], gl.float32, layout=mma)
        t0 = warpgroup_mma(w0, xs0, zero, use_acc=False, is_async=True)
        t1 = warpgroup_mma(w1, xs1, zero, use_acc=False, is_async=True)
        p0, p1 = warpgroup_mma_wait(0, deps=[t0, t1])
        acc = acc + p0 * a0[:, None] + p1 * a1[:, None]
    else:
        w0, w1 = _operands(q, lane, a0, POST, BN, D)
        acc = warpgroup_mma(w0, xs0, acc, is_async=True)
        acc = warpgroup_mma(w1, xs1, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
    return acc


@gluon.jit
def _steps(K, SPLIT):
    """This program's loop steps [lo, hi): slice program_id(1) of SPLIT (empty where K has fewer steps)."""
    steps = K // STEP_K
    per = gl.cdiv(steps, SPLIT)
    lo = gl.program_id(1) * per
    return lo, gl.minimum(lo + per, steps)


@gluon.jit
def _row_offsets(n, tile, K, BN: gl.constexpr, W: gl.constexpr, POST: gl.constexpr, BM: gl.constexpr):
    """The tile's rows (the last clamped into the weight: it recomputes row n - 1 rather than masking every
    load) as word offsets (word_layout) and absmax indices: of the accumulator's rows with POST, else
    [BN, 1, 1, 2 blocks] in the words' layout (_block_scales)."""
    L4: gl.constexpr = word_layout(BN, W)
    r = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    w = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
    b = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    rows = gl.minimum(tile * BN + r, n - 1).to(gl.int64)
    woffs = ((rows * (K // 8))[:, None, None, None] + w[None, :, None, None] + (t * 2)[None, None, :, None]
             + (b * (QBLOCK // 8))[None, None, None, :])
    if POST:
        ra = gl.arange(0, BN, layout=gl.SliceLayout(1, mma_layout(BM, W)))
        idx = gl.minimum(tile * BN + ra, n - 1) * (K // QBLOCK)
    else:
        idx = (gl.minimum(tile * BN + r, n - 1) * (K // QBLOCK))[:, None, None, None] + b[None, None, None, :]
    return woffs, idx


@gluon.jit
def _mma_both(acc0, acc1, q0, q1, c0, d0, c1, d1, xa, xb, xs, buf, lane, TWO: gl.constexpr, POST: gl.constexpr,
              BN: gl.constexpr, BM: gl.constexpr, W: gl.constexpr):
    """One step of one weight (or two): x's tiles into shared buffers buf and buf + 1, then the blocks' wgmmas.
    x is double-buffered: the barrier after this store is also the one every wgmma of two steps ago has
    finished behind (each program waits for its own before the next step)."""
    xs.index(buf).store(xa)
    xs.index(buf + 1).store(xb)
    fence_async_shared()
    barrier()
    acc0 = _mma_step(acc0, q0, c0, d0, xs.index(buf), xs.index(buf + 1), lane, POST, BN, BM, W)
    if TWO:
        acc1 = _mma_step(acc1, q1, c1, d1, xs.index(buf), xs.index(buf + 1), lane, POST, BN, BM, W)
    return acc0, acc1


@gluon.jit
def _ring(TWO: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
    """STAGES steps of packed words per weight in shared memory, each thread's 16 bytes of a row contiguous. Each
    ring (at most 64 KB, so the byte table stays the largest allocation, at the start) is its own allocation."""
    RL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 3, 2, 0])
    ring0 = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 2, 4, 2], RL)
    ring1 = ring0
    if TWO:
        ring1 = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 2, 4, 2], RL)
    return ring0, ring1


@gluon.jit
def _issue(ring0, ring1, wp0, wp1, step, slot, TWO: gl.constexpr):
    """Copy step `step`'s words of the weight(s) into ring slot `slot` (cp.async, one commit group)."""
    _cp_async(ring0.index(slot), wp0 + step * (STEP_K // 8))
    if TWO:
        _cp_async(ring1.index(slot), wp1 + step * (STEP_K // 8))
    async_copy.commit_group()


@gluon.jit
def rows_times_x(x_ptr, x_stride, M, K, SPLIT, w0, a0, s0, o0, g0, w1, a1, s1, o1, g1, n, tile, code2_ptr,
                  xs, KIND: gl.constexpr, TWO: gl.constexpr, POST: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, W: gl.constexpr, STAGES: gl.constexpr):
    """float32 [BN, BM] in wgmma's layout: rows of one weight (or, with TWO, of two: the GLU's gate and up)
    times x[:M] over this program's K slice. Scales and x are loaded one step ahead into registers; the packed
    words too (STAGES 0), or STAGES - 1 steps ahead into shared memory by cp.async, each thread copying and
    later reading only its own bytes."""
    L4: gl.constexpr = word_layout(BN, W)
    mma: gl.constexpr = mma_layout(BM, W)
    lane = _lane_select(L4)
    woffs, idx = _row_offsets(n, tile, K, BN, W, POST, BM)
    wp0 = w0.to(gl.pointer_type(gl.int32), bitcast=True) + woffs
    wp1 = w1.to(gl.pointer_type(gl.int32), bitcast=True) + woffs
    lo, hi = _steps(K, SPLIT)
    acc0 = gl.zeros([BN, BM], gl.float32, layout=mma)
    acc1 = gl.zeros([BN, BM], gl.float32, layout=mma)
    first = gl.minimum(lo, hi - 1)  # an empty slice loads step hi - 1 and never uses it
    c0, d0 = _block_scales(a0, s0, o0, code2_ptr, g0 + idx + first * 2, KIND, POST)
    c1 = c0
    d1 = d0
    if TWO:
        c1, d1 = _block_scales(a1, s1, o1, code2_ptr, g1 + idx + first * 2, KIND, POST)
    xo, xk = _x_offsets(x_stride, M, BM, W)
    xa, xb = _x_step(x_ptr, xo, xk, first * STEP_K, BM)
    if STAGES == 0:
        q0 = gl.load(wp0 + first * (STEP_K // 8))
        q1 = q0
        if TWO:
            q1 = gl.load(wp1 + first * (STEP_K // 8))
    else:
        ring0, ring1 = _ring(TWO, BN, STAGES)
        for i in gl.static_range(STAGES - 1):
            _issue(ring0, ring1, wp0, wp1, gl.minimum(lo + i, hi - 1), i, TWO)
    for step in range(lo, hi):
        nxt = gl.minimum(step + 1, hi - 1)  # the last step reloads itself rather than reading past the slice
        if STAGES == 0:
            q0n = gl.load(wp0 + nxt * (STEP_K // 8))
            q1n = q0n
            if TWO:
                q1n = gl.load(wp1 + nxt * (STEP_K // 8))
        else:
            it = step - lo
            _issue(ring0, ring1, wp0, wp1, gl.minimum(step + STAGES - 1, hi - 1), (it + STAGES - 1) % STAGES, TWO)
            async_copy.wait_group(STAGES - 1)
            q0 = ring0.index(it % STAGES).load(L4)
            q1 = q0
            if TWO:
                q1 = ring1.index(it % STAGES).load(L4)
        c0n, d0n = _block_scales(a0, s0, o0, code2_ptr, g0 + idx + nxt * 2, KIND, POST)
        c1n = c0n
        d1n = d0n
        if TWO:
            c1n, d1n = _block_scales(a1, s1, o1, code2_ptr, g1 + idx + nxt * 2, KIND, POST)
        xan, xbn = _x_step(x_ptr, xo, xk, nxt * STEP_K, BM)
        acc0, acc1 = _mma_both(acc0, acc1, q0, q1, c0, d0, c1, d1, xa, xb, xs, 2 * ((step - lo) % 2), lane, TWO,
                               POST, BN, BM, W)
        if STAGES == 0:
            q0 = q0n
            q1 = q1n
        c0 = c0n
        d0 = d0n
        c1 = c1n
        d1 = d1n
        xa = xan
        xb = xbn
    if STAGES > 0:
        async_copy.wait_group(0)  # no copy may land in shared memory after the program moves on
    return acc0, acc1
