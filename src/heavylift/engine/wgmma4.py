"""Decode steps of 2 to 64 tokens through 4-bit weights on Hopper: a Gluon wgmma GEMM whose weight operand goes
from global memory to the tensor cores without leaving registers.

batched.py's Triton kernel widens a weight tile in registers with about seven operations a packed byte, then
Triton moves the tile through shared memory into the layout wgmma reads (a store, a barrier and ldmatrix per
tile). Here each lane loads the very bytes its wgmma fragment holds (K reordered within each 64-weight block,
x's tile stored in the same order), looks each byte's two weights up as one bf16 pair in a 256-entry table in
shared memory (gemv4's: one copy per lane, one prmt for the address, one ld.shared a byte,
lut.smem_pairs_program) and hands the pairs to wgmma as they are (the loop: wgmma4_tiles.py). The block's
absmax multiplies the block's partial product in float32 (POST), or, as batched.py does, each looked-up pair
in bf16. Split-K, its tickets and the epilogues round and synchronise as batched.py's do.

Gluon has no CPU interpreter: the tests check the lookup program (lut.emulate_smem_pairs), the K order and that
the kernels compile for sm_90; bench/batched_variants.py checks them on a GPU against a float64 reference.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .lut import pair_words
from .weights import QWeight
from .wgmma4_tiles import STEP_WEIGHTS, barrier, k_order, mma_layout, rows_times_x, shared_buffers

__all__ = ["TILES", "GLU_TILES", "glu", "k_order", "linear", "runs"]


# -- split-K and epilogues, as batched.py's --------------------------------------------------------


@gluon.jit
def _cols_rows(tile, BN: gl.constexpr, BM: gl.constexpr, W: gl.constexpr):
    mma: gl.constexpr = mma_layout(BM, W)
    m = gl.arange(0, BM, layout=gl.SliceLayout(0, mma))
    rows = tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    return m, rows


@gluon.jit
def _publish(acc, ws_ptr, M, cols, col_mask, n_total, m, BM: gl.constexpr):
    """This program's partial into its split slice of the workspace: [SPLIT, BM, n_total] float32."""
    offs = (gl.program_id(1) * BM + m[None, :]) * n_total + cols[:, None]
    gl.store(ws_ptr + offs, acc, mask=(m < M)[None, :] & col_mask[:, None])


@gluon.jit
def _last_to_arrive(tickets_ptr, ticket, SPLIT):
    barrier()
    arrived = gl.atomic_add(tickets_ptr + ticket, 1, sem="acq_rel", scope="gpu")
    return arrived == SPLIT - 1


@gluon.jit
def _collect(ws_ptr, M, cols, col_mask, n_total, SPLIT, m, BN: gl.constexpr, BM: gl.constexpr, W: gl.constexpr):
    """The tile's partials summed in split order (read past L1, where another multiprocessor wrote them)."""
    mask = (m < M)[None, :] & col_mask[:, None]
    total = gl.zeros([BN, BM], gl.float32, layout=mma_layout(BM, W))
    for s in range(0, SPLIT):
        total += gl.load(ws_ptr + (s * BM + m[None, :]) * n_total + cols[:, None], mask=mask, other=0.0,
                         cache_modifier=".cg")
    return total


@gluon.jit
def _linear_out(acc, out_ptr, out_stride, res_ptr, M, bias_ptr, rows, m, n, col0, HAS_BIAS: gl.constexpr,
                HAS_RES: gl.constexpr):
    """acc [rows, tokens] to out[:M, col0 + rows] in bf16: bias in float32, the residual added to the rounded
    projection (kernels.store_part)."""
    keep = rows < n
    if HAS_BIAS:
        acc += gl.load(bias_ptr + rows, mask=keep, other=0.0).to(gl.float32)[:, None]
    mask = (m < M)[None, :] & keep[:, None]
    offs = m[None, :] * out_stride + col0 + rows[:, None]
    y = acc.to(gl.bfloat16)
    if HAS_RES:
        y = (y.to(gl.float32) + gl.load(res_ptr + offs, mask=mask, other=0.0).to(gl.float32)).to(gl.bfloat16)
    gl.store(out_ptr + offs, y, mask=mask)


@gluon.jit
def _glu_out(g, u, out_ptr, out_stride, rows, m, M, n):
    """silu(gate) * up, rounded as the reference (kernels.glu_store)."""
    g = g.to(gl.bfloat16).to(gl.float32)
    u = u.to(gl.bfloat16).to(gl.float32)
    act = (g / (1.0 + gl.exp(-g))).to(gl.bfloat16).to(gl.float32) * u
    mask = (m < M)[None, :] & (rows < n)[:, None]
    gl.store(out_ptr + m[None, :] * out_stride + rows[:, None], act.to(gl.bfloat16), mask=mask)


@gluon.jit
def _linear_part(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K, w, a, s, o, g, bias_ptr, n, col0, n_total,
                 code2_ptr, ws_ptr, tickets_ptr, SPLIT, tile, xs, KIND: gl.constexpr, HAS_BIAS: gl.constexpr,
                 HAS_RES: gl.constexpr, POST: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, W: gl.constexpr,
                 STAGES: gl.constexpr):
    acc, _ = rows_times_x(x_ptr, x_stride, M, K, SPLIT, w, a, s, o, g, w, a, s, o, g, n, tile, code2_ptr, xs, KIND,
                           False, POST, BM, BN, W, STAGES)
    m, rows = _cols_rows(tile, BN, BM, W)
    if SPLIT == 1:
        _linear_out(acc, out_ptr, out_stride, res_ptr, M, bias_ptr, rows, m, n, col0, HAS_BIAS, HAS_RES)
    else:
        ticket = gl.program_id(0)
        _publish(acc, ws_ptr, M, col0 + rows, rows < n, n_total, m, BM)
        if _last_to_arrive(tickets_ptr, ticket, SPLIT):
            acc = _collect(ws_ptr, M, col0 + rows, rows < n, n_total, SPLIT, m, BN, BM, W)
            _linear_out(acc, out_ptr, out_stride, res_ptr, M, bias_ptr, rows, m, n, col0, HAS_BIAS, HAS_RES)
            gl.store(tickets_ptr + ticket, 0)


@gluon.jit(do_not_specialize=["M"])  # one compile for every step size of a tile height
def linear_kernel(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K,
                  w0, a0, s0, o0, g0, b0, n0,
                  w1, a1, s1, o1, g1, b1, n1,
                  w2, a2, s2, o2, g2, b2, n2,
                  pairs_ptr, code2_ptr, ws_ptr, tickets_ptr, SPLIT,
                  KIND: gl.constexpr, PARTS: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr,
                  POST: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, W: gl.constexpr, STAGES: gl.constexpr):
    """y[:, parts] = x @ W_p^T (+ bias) (+ residual) for up to three weights side by side (q, k, v); grid
    (row tiles of all parts, SPLIT)."""
    buf, xs = shared_buffers(pairs_ptr, BM, W)
    barrier()
    pid = gl.program_id(0)
    p0 = gl.cdiv(n0, BN)
    p1 = gl.cdiv(n1, BN)
    n_total = n0 + n1 + n2
    if pid < p0:
        _linear_part(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K, w0, a0, s0, o0, g0, b0, n0, 0, n_total,
                     code2_ptr, ws_ptr, tickets_ptr, SPLIT, pid, xs, KIND, HAS_BIAS, HAS_RES, POST, BM, BN, W, STAGES)
    elif PARTS > 1 and pid < p0 + p1:
        _linear_part(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K, w1, a1, s1, o1, g1, b1, n1, n0, n_total,
                     code2_ptr, ws_ptr, tickets_ptr, SPLIT, pid - p0, xs, KIND, HAS_BIAS, HAS_RES, POST, BM, BN, W,
                     STAGES)
    elif PARTS > 2:
        _linear_part(x_ptr, x_stride, out_ptr, out_stride, res_ptr, M, K, w2, a2, s2, o2, g2, b2, n2, n0 + n1,
                     n_total, code2_ptr, ws_ptr, tickets_ptr, SPLIT, pid - p0 - p1, xs, KIND, HAS_BIAS, HAS_RES,
                     POST, BM, BN, W, STAGES)
    buf._keep_alive()


@gluon.jit(do_not_specialize=["M"])
def glu_kernel(x_ptr, x_stride, out_ptr, out_stride, M, K, w0, a0, s0, o0, g0, w1, a1, s1, o1, g1, n,
               pairs_ptr, code2_ptr, ws_ptr, tickets_ptr, SPLIT, KIND: gl.constexpr, POST: gl.constexpr,
               BM: gl.constexpr, BN: gl.constexpr, W: gl.constexpr, STAGES: gl.constexpr):
    """act = silu(x @ gate^T) * (x @ up^T): both projections of the same rows in one pass over x; grid
    (row tiles, SPLIT), the workspace's columns [0, n) the gate's and [n, 2n) the up projection's."""
    buf, xs = shared_buffers(pairs_ptr, BM, W)
    barrier()
    pid = gl.program_id(0)
    g, u = rows_times_x(x_ptr, x_stride, M, K, SPLIT, w0, a0, s0, o0, g0, w1, a1, s1, o1, g1, n, pid, code2_ptr,
                         xs, KIND, True, POST, BM, BN, W, STAGES)
    buf._keep_alive()
    m, rows = _cols_rows(pid, BN, BM, W)
    if SPLIT == 1:
        _glu_out(g, u, out_ptr, out_stride, rows, m, M, n)
    else:
        _publish(g, ws_ptr, M, rows, rows < n, 2 * n, m, BM)
        _publish(u, ws_ptr, M, n + rows, rows < n, 2 * n, m, BM)
        if _last_to_arrive(tickets_ptr, pid, SPLIT):
            g = _collect(ws_ptr, M, rows, rows < n, 2 * n, SPLIT, m, BN, BM, W)
            u = _collect(ws_ptr, M, n + rows, rows < n, 2 * n, SPLIT, m, BN, BM, W)
            _glu_out(g, u, out_ptr, out_stride, rows, m, M, n)
            gl.store(tickets_ptr + pid, 0)


# -- launches ---------------------------------------------------------------------------------------------

# (POST, BN, W, STAGES) per x tile height: the largest tiles whose registers fit (sm_90, offline compiles: about
# 210 a thread at 16 rows, 190-245 at 32 and 64) without spilling. At 64 rows the block partials of POST need 64
# more registers than fit, so the scale goes into the lookup; eight warps share x's tile, which at 64 rows weighs
# as much as the weight tile it meets. STAGES 0: the packed words prefetched one step ahead in registers.
TILES = {16: (True, 128, 4, 0), 32: (True, 128, 8, 0), 64: (False, 128, 8, 0)}
GLU_TILES = {16: (True, 64, 4, 0), 32: (True, 128, 8, 0), 64: (False, 128, 8, 0)}


def runs(w: QWeight, x: torch.Tensor) -> bool:
    """Whether these kernels take steps through w: a 4-bit weight whose rows are whole loop steps, on Hopper
    (wgmma is sm_90 only), x contiguous on the same GPU."""
    return (w.packed and w.k % STEP_WEIGHTS == 0 and x.is_cuda and x.stride(-1) == 1
            and _capability(x.device) == (9, 0))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


_PAIRS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}  # code ptr -> (code, pair words)


def _pairs(w: QWeight) -> torch.Tensor:
    """The bf16 byte table of w's code (lut.pair_words), built once per code tensor (kept, so its address is
    never another table's)."""
    key = (w.code.data_ptr(), w.code.device)
    if key not in _PAIRS:
        words = pair_words(w.code.tolist(), "bf16")
        _PAIRS[key] = (w.code, torch.tensor(words, dtype=torch.int32, device=w.code.device))
    return _PAIRS[key][1]


def _weight(w: QWeight) -> list:
    """data, absmax, absmax2, offset, block_base, in the kernels' order (stand-ins where the weight has none)."""
    return [w.data, w.scale, w.absmax2 if w.absmax2 is not None else w.scale, w.offset, w.block_base]


def _code2(w: QWeight) -> torch.Tensor:
    return w.code2 if w.code2 is not None else w.scale


def _launch_shape(sizes, columns: int, k: int, rows: int, device, bn: int):
    """Row tiles, split-K slices and the scratch they need (batched.py's heuristic, over loop steps)."""
    from . import batched as B

    n_tiles = B.tiles(sizes, bn)
    bm = B.block_m(rows)
    split = B.split_k(n_tiles, k, STEP_WEIGHTS, bm, device)
    ws, tickets = B.scratch(device, split * bm * columns if split > 1 else 0, n_tiles if split > 1 else 0)
    return n_tiles, split, bm, ws, tickets


def linear(x: torch.Tensor, parts, out: torch.Tensor, residual=None, tile=None) -> torch.Tensor:
    """out[:, parts] = x @ W_p^T (+ bias) (+ residual), 2 to 64 rows of x; `tile` (POST, BN, W, STAGES)
    overrides TILES."""
    from . import batched as B

    m, w = x.shape[0], parts[0]
    post, bn, warps, stages = tile or TILES[B.block_m(m)]
    sizes = [q.n for q in parts] + [0] * (3 - len(parts))
    n_tiles, split, bm, ws, tickets = _launch_shape(sizes, sum(sizes), w.k, m, x.device, bn)
    args = []
    for q, n in zip(list(parts) + [w] * (3 - len(parts)), sizes):
        args += _weight(q) + [q.bias if q.bias is not None else q.data, n]
    linear_kernel[(n_tiles, split)](
        x, x.stride(0), out, out.stride(0), residual if residual is not None else out, m, w.k, *args, _pairs(w),
        _code2(w), ws, tickets, split, KIND=w.kind, PARTS=len(parts), HAS_BIAS=w.bias is not None,
        HAS_RES=residual is not None, POST=post, BM=bm, BN=bn, W=warps, STAGES=stages, num_warps=warps)
    return out


def glu(x: torch.Tensor, gate, up, out: torch.Tensor, tile=None) -> torch.Tensor:
    """out = silu(x @ gate^T) * (x @ up^T), 2 to 64 rows of x; `tile` (POST, BN, W, STAGES) overrides GLU_TILES."""
    from . import batched as B

    m = x.shape[0]
    post, bn, warps, stages = tile or GLU_TILES[B.block_m(m)]
    n_tiles, split, bm, ws, tickets = _launch_shape([gate.n], 2 * gate.n, gate.k, m, x.device, bn)
    glu_kernel[(n_tiles, split)](
        x, x.stride(0), out, out.stride(0), m, gate.k, *_weight(gate), *_weight(up), gate.n, _pairs(gate),
        _code2(gate), ws, tickets, split, KIND=gate.kind, POST=post, BM=bm, BN=bn, W=warps, STAGES=stages,
        num_warps=warps)
    return out
