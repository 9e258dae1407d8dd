"""The decode step's operations, twice: Triton kernels (`TritonOps`) and their pure-torch twins (`TorchOps`).

Both take the same arguments and write into the `out` buffers they are given, so a captured CUDA
graph replays them in place. `TorchOps` is the reference path: it runs anywhere (CPU included),
and the tests hold `TritonOps` to it. `dense_linear` is the prefill path for both: weights dequantized a tile
of rows at a time into bf16 (or FP8 tensor-core) matmuls, which beat any GEMV once a chunk has many tokens.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from heavylift.defaults import DECODE_SPLITS_MAX, DECODE_SPLITS_TARGET
from heavylift.planner.matmul_programs import dequant_tile_rows
from heavylift.schemes import ENGINE_BATCHED_MAX_ROWS, ENGINE_GEMV_MAX_ROWS

from .weights import DENSE, FP8, FP8_MAX, INT8, QBLOCK, X16_SCALE, QWeight

ATTENTION_BLOCK = 64  # cache positions per attention tile


@functools.cache
def _fp8_matmul_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def dense_linear(x: torch.Tensor, w: QWeight, out: torch.Tensor | None = None,
                 tile_bytes: int | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for many tokens: FP8 on the FP8 tensor cores where the GPU has them; bf16 weights as
    they are; other stored weights a tile of at most `tile_bytes` of rows at a time (`_tiled_linear`; None: the
    engine's DEQUANT_TILE_BYTES). `out`, where given, is a contiguous tensor of x's dtype and x's rows times n
    that the tiles write the product into (it is returned); only a weight that tiles takes one (`tiles`)."""
    if out is not None:
        if not tiles(x, w):
            raise ValueError("only a tiled weight writes its product into a given tensor")
        return _tiled_linear(x, w, out=out, tile_bytes=tile_bytes)
    if _fp8_matmul(x, w):
        # Row-wise dynamic activation scaling, as torchao's Float8DynamicActivation does.
        xs = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        xq = (x.float() / xs).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, w.data.t(), scale_a=xs, scale_b=w.scale.view(1, -1), bias=w.bias,
                                out_dtype=torch.bfloat16)
    if w.kind == DENSE:
        return F.linear(x, w.dequantize(x.dtype), w.bias)
    return _tiled_linear(x, w, tile_bytes=tile_bytes)


def dense_linear_mul(x: torch.Tensor, w: QWeight, into: torch.Tensor,
                     tile_bytes: int | None = None) -> torch.Tensor:
    """into *= x @ W^T (+ bias), `into` [tokens, n]: where dense_linear tiles the weight, each tile's product goes
    to one reused buffer and is multiplied into its columns of `into`, so no product the size of `into` is
    made; the same values as into * dense_linear(x, w)."""
    if _fp8_matmul(x, w) or w.kind == DENSE:
        return into.mul_(dense_linear(x, w))
    return _tiled_linear(x, w, into, tile_bytes=tile_bytes)


def tiles(x: torch.Tensor, w: QWeight) -> bool:
    """Whether dense_linear multiplies x by w a tile of w's rows at a time."""
    return not _fp8_matmul(x, w) and w.kind != DENSE


def _fp8_matmul(x: torch.Tensor, w: QWeight) -> bool:
    """Whether dense_linear runs w on the FP8 tensor cores (torchao needs both sides divisible by 16)."""
    return w.kind == FP8 and _fp8_matmul_ok(x.device) and w.k % 16 == 0 and w.n % 16 == 0


def _tiled_linear(x: torch.Tensor, w: QWeight, into: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, tile_bytes: int | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) with W dequantized dequant_tile_rows(n, k, tile_bytes) rows at a time into one reused
    buffer of x's dtype (bf16; fp16 where transformers computes in it: runtime/bnb_forward.py), each tile
    multiplied into its columns of the output: the memory beyond the weights is one tile, never a copy of the
    whole weight. cuBLAS may pick another kernel for a tile than for the whole product, so the result can differ
    from F.linear on the whole weight in the last bf16 bit; the tiles themselves are exactly the whole weight's
    rows. With `into`, each tile's product goes to a buffer of one tile's columns and is multiplied into its
    columns of `into` (dense_linear_mul), which is returned; with `out`, the product is written into `out`, which
    is returned."""
    write = _tile_writer(w)
    step = dequant_tile_rows(w.n, w.k, tile_bytes)
    tile = torch.empty(step, w.k, dtype=x.dtype, device=w.device)
    x2 = x.reshape(-1, w.k)
    if out is not None:
        y = out.view(x2.shape[0], w.n)
    else:
        y = torch.empty(x2.shape[0], w.n if into is None else step, dtype=x.dtype, device=x.device)
    for start in range(0, w.n, step):
        stop = min(w.n, start + step)
        part = tile[:stop - start]
        write(start, stop, part)
        product = y[:, start:stop] if into is None else y[:, :stop - start]
        if w.bias is None:
            torch.mm(x2, part.t(), out=product)
        else:
            torch.addmm(w.bias[start:stop], x2, part.t(), out=product)
        if into is not None:
            into[:, start:stop].mul_(product)
    del part, tile
    if into is not None:
        return into
    if out is not None:
        return out
    return y.view(*x.shape[:-1], w.n)


def _tile_writer(w: QWeight):
    """A function (start, stop, out) writing rows [start, stop) of W, dequantized to bf16, into `out`: bitsandbytes'
    own dequantize for a loaded 4-bit weight (double quant's absmax a tile's blocks at a time), the rows cast
    and scaled in place for INT8 and FP8, the reference `QWeight.dequantize` for views of fused 4-bit weights."""
    if w.kind in (FP8, INT8):
        def scaled(start: int, stop: int, out: torch.Tensor) -> None:
            out.copy_(w.data[start:stop])  # exact: int8 and e4m3 values are bf16 values
            out.mul_(w.scale[start:stop, None])  # in fp32, rounded to bf16 once, as QWeight.dequantize
        return scaled
    if w.packed and w.block_base == 0 and w.state is not None:
        return _bnb_writer(w)

    def reference(start: int, stop: int, out: torch.Tensor) -> None:
        out.copy_(w.rows(start, stop).dequantize(out.dtype))
    return reference


def _bnb_writer(w: QWeight):
    """Rows of a bitsandbytes 4-bit weight through its dequantize_4bit kernel: its blocks are QBLOCK consecutive
    weights of the flattened [n, k] weight, so whole rows whose count times k is a multiple of QBLOCK
    (dequant_tile_rows) are a contiguous slice of the packed codes and of the absmax. Double quantization's
    absmax is dequantized for each tile's blocks alone (block_absmax), never for the whole weight."""
    state = w.state
    op = torch.ops.bitsandbytes.dequantize_4bit

    def write(start: int, stop: int, out: torch.Tensor) -> None:
        codes = w.data[start * w.k // 2:-(-stop * w.k // 2)]
        first, last = start * w.k // QBLOCK, -(-stop * w.k // QBLOCK)
        scales = block_absmax(state, first, last) if state.nested else state.absmax[first:last]
        if out.is_cuda:
            op.out(codes, scales, QBLOCK, state.quant_type, out.shape, out.dtype, out=out)
        else:  # bitsandbytes' CPU backend has no out= variant, and starts blocks afresh on each row of a 2-d shape
            out.copy_(op.default(codes, scales, QBLOCK, state.quant_type, (out.numel(),), out.dtype).view(out.shape))
    return write


def block_absmax(state, first: int, last: int) -> torch.Tensor:
    """fp32 absmax of blocks [first, last) of a double-quantized bitsandbytes 4-bit weight (QuantState `state`),
    the values bitsandbytes' dequantize_4bit computes for the whole weight (its 8-bit absmax through
    dequantize_blockwise, plus the offset), from the nested blocks that hold them alone: for a 405B down
    projection's tile 3 MB instead of the whole weight's 55 MB (matmul_programs._tile_absmax counts it)."""
    nested = state.state2.blocksize
    lo = first // nested * nested
    hi = min(state.absmax.numel(), -(-last // nested) * nested)
    code = state.state2.code.to(state.absmax.device)
    scales = torch.ops.bitsandbytes.dequantize_blockwise.default(
        state.absmax[lo:hi], state.state2.absmax[lo // nested:-(-hi // nested)], code, nested,
        torch.float32)[first - lo:last - lo]
    scales += state.offset
    return scales


def planes(y: torch.Tensor, out16: torch.Tensor | None = None) -> torch.Tensor:
    """One token's bf16 vector as the fp16 planes gemv4 reads (kernels.plane_index): int32 [K / 2], plane j
    holding per group of eight elements the pair 2j, 2j + 1, each value times X16_SCALE."""
    k = y.numel()
    words = (y.reshape(-1).float() * X16_SCALE).half().view(torch.int32).view(k // 8, 4).t().reshape(-1)
    return words if out16 is None else out16.copy_(words)


def dense_parts(x: torch.Tensor, parts: Sequence[QWeight]) -> torch.Tensor:
    return torch.cat([dense_linear(x, p) for p in parts], dim=-1) if len(parts) > 1 else dense_linear(x, parts[0])


def decode_splits(device: torch.device, batch: int, kv_heads: int) -> int:
    """Sequence slices per (sequence, kv head) so the attention pass fills the GPU."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(DECODE_SPLITS_MAX, -(-DECODE_SPLITS_TARGET * sms // (batch * kv_heads))))


class TorchOps:
    """Reference implementations: plain torch, rounding where transformers rounds."""

    name = "torch"

    @staticmethod
    def wants_planes(w: QWeight) -> bool:
        """Whether one-token steps through w should be handed x's fp16 planes (`planes`) as well."""
        return False

    @staticmethod
    def rmsnorm(x, weight, eps, out, out16=None):
        """out16, where given (one row): out's fp16 planes (`planes`) for the 4-bit GEMVs that read it."""
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        out.copy_(weight * y)
        if out16 is not None:
            planes(out, out16)
        return out

    @staticmethod
    def linear(x, parts: Sequence[QWeight], out, residual=None, x16=None):
        """x16: x's planes where the producer wrote them (only the fast 4-bit path reads them)."""
        y = dense_parts(x, parts)
        out.copy_(y if residual is None else residual + y)
        return out

    @staticmethod
    def glu(x, gate: QWeight, up: QWeight, out, x16=None, out16=None):
        out.copy_(F.silu(dense_linear(x, gate)) * dense_linear(x, up))
        if out16 is not None:
            planes(out, out16)
        return out

    @staticmethod
    def rope_cache(qkv, positions, slots, cos, sin, k_cache, v_cache, heads, kv_heads, q_out, qk_norm=None, eps=0.0):
        """RoPE on q and k of `positions`, k and v into `slots` of the cache, q into `q_out`; `qk_norm`
        (Qwen 3's q_norm and k_norm weights): each q and k head RMS-normed first, as Qwen3RMSNorm does."""
        tokens, d = qkv.shape[0], k_cache.shape[-1]
        x = qkv.view(tokens, heads + 2 * kv_heads, d)
        if qk_norm is not None:
            x = x.clone()
            for part, weight in zip((slice(0, heads), slice(heads, heads + kv_heads)), qk_norm):
                h = x[:, part].float()
                x[:, part] = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        pos, slots = positions[:tokens].long(), slots[:tokens].long()
        c = torch.cat([cos[pos], cos[pos]], dim=-1)[:, None]
        s = torch.cat([sin[pos], sin[pos]], dim=-1)[:, None]
        qk = x[:, :heads + kv_heads]
        rotated = torch.cat([-qk[..., d // 2:], qk[..., :d // 2]], dim=-1)
        qk = qk * c + rotated * s  # in bf16, each product and the sum rounded, as transformers' apply_rotary_pos_emb
        q_out.copy_(qk[:, :heads])
        k_cache[slots, :, pos] = qk[:, heads:]
        v_cache[slots, :, pos] = x[:, heads + kv_heads:]
        return q_out

    @staticmethod
    def decode_attention(q, k_cache, v_cache, lengths, scale, window, out, scratch=None, out16=None, slots=None):
        """One new token per row (its k and v already cached) against its sequence's cache: without `slots`,
        row i is sequence i and sees its first lengths[i] + 1 positions (`lengths` is the cache length, a
        decode step's seq_len); with `slots`, row i reads sequence slots[i] and sees its first lengths[i]
        positions (a mixed step's rows). A window keeps only the last `window` of them."""
        b = q.shape[0]
        if slots is None:
            length, keys, values = lengths[:b].long() + 1, k_cache[:b], v_cache[:b]
        else:
            rows = slots[:b].long()
            length, keys, values = lengths[:b].long(), k_cache[rows], v_cache[rows]
        positions = torch.arange(k_cache.shape[2], device=q.device)
        allowed = positions[None] < length[:, None]
        if window:
            allowed &= positions[None] >= (length - window)[:, None]
        y = F.scaled_dot_product_attention(q[:, :, None].float(), keys.float(), values.float(),
                                           attn_mask=allowed[:, None, None], scale=scale, enable_gqa=True)
        out.copy_(y.reshape(b, -1))
        if out16 is not None:
            planes(out, out16)
        return out


class TritonOps:
    """The fast path: each call one kernel launch (attention: two)."""

    name = "triton"

    @staticmethod
    def wants_planes(w: QWeight) -> bool:
        from . import kernels as K

        return _register_lut(K, w) and w.data.is_cuda and _fp16_dot(w.data)

    @staticmethod
    def rmsnorm(x, weight, eps, out, out16=None):
        from . import kernels as K
        import triton

        rows, h = x.shape
        K.rmsnorm_kernel[(rows,)](x, weight, out, _halves(out16, out), h, eps,
                                  BLOCK=triton.next_power_of_2(h), OUT16=out16 is not None, num_warps=4,
                                  **_pdl(K, rows))
        return out

    @staticmethod
    def linear(x, parts: Sequence[QWeight], out, residual=None, x16=None):
        m = x.shape[0]
        if m > _gemv_rows(parts[0]):
            return TorchOps.linear(x, parts, out, residual)
        if m > 1 and _batched(parts[0]):
            return _batched_linear(x, parts, out, residual)
        from . import kernels as K

        p = list(parts) + [parts[0]] * (3 - len(parts))
        sizes = [q.n for q in parts] + [0] * (3 - len(parts))
        lut = _register_lut(K, parts[0])
        code, code2 = _codes(parts[0], lut)
        args = []
        for q, n in zip(p, sizes):
            args += _weight_args(q) + [q.bias if q.bias is not None else _kernel_rows(q), n]
        if lut and m == 1 and _fp16_dot(x):
            from . import gemv4 as G

            grid = lambda meta: (sum(-(-n // (meta["RPT"] * meta["WARPS"])) for n in sizes),)  # noqa: E731
            G.linear4[grid](x if x16 is None else x16, out, residual if residual is not None else out, parts[0].k,
                            code, _nf4_lookup("pair_words", x.device), code2, 0, *args, KIND=parts[0].kind,
                            PARTS=len(parts), HAS_BIAS=parts[0].bias is not None, HAS_RES=residual is not None,
                            X16=x16 is not None, **_pdl(K, m))
            return out
        kernel, block_m, fixed = _pick(K, K.linear_gemv, K.linear_gemm, m)
        grid = lambda meta: (sum(-(-n // meta["BLOCK_N"]) for n in sizes),)  # noqa: E731
        kernel[grid](x, x.stride(0), out, out.stride(0), residual if residual is not None else out, m, parts[0].k,
                     *args, code, code2, KIND=parts[0].kind, PARTS=len(parts), HAS_BIAS=parts[0].bias is not None,
                     HAS_RES=residual is not None, LUT=lut, BLOCK_M=block_m, **fixed, **_pdl(K, m))
        return out

    @staticmethod
    def glu(x, gate: QWeight, up: QWeight, out, x16=None, out16=None):
        m = x.shape[0]
        if m > _gemv_rows(gate):
            return TorchOps.glu(x, gate, up, out, out16=out16)
        if m > 1 and _batched(gate):
            return _batched_glu(x, gate, up, out)
        from . import kernels as K

        lut = _register_lut(K, gate)
        code, code2 = _codes(gate, lut)
        if lut and m == 1 and _fp16_dot(x):
            from . import gemv4 as G

            grid = lambda meta: (-(-gate.n // (meta["RPT"] * meta["WARPS"])),)  # noqa: E731
            G.glu4[grid](x if x16 is None else x16, out, _halves(out16, out),
                         gate.k, code, _nf4_lookup("pair_words", x.device), code2, 0, *_weight_args(gate),
                         *_weight_args(up), gate.n, KIND=gate.kind, X16=x16 is not None, OUT16=out16 is not None,
                         **_pdl(K, m))
            return out
        kernel, block_m, fixed = _pick(K, K.glu_gemv, K.glu_gemm, m)
        grid = lambda meta: (-(-gate.n // meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](x, x.stride(0), out, out.stride(0), m, gate.k, *_weight_args(gate), *_weight_args(up), gate.n,
                     code, code2, KIND=gate.kind, LUT=lut, BLOCK_M=block_m, **fixed, **_pdl(K, m))
        if out16 is not None:
            planes(out, out16)
        return out

    @staticmethod
    def rope_cache(qkv, positions, slots, cos, sin, k_cache, v_cache, heads, kv_heads, q_out, qk_norm=None, eps=0.0):
        from . import kernels as K

        tokens = qkv.shape[0]
        qn, kn = qk_norm if qk_norm is not None else (cos, cos)  # unread without QK_NORM
        K.rope_cache_kernel[(tokens, heads + 2 * kv_heads)](
            qkv, q_out, k_cache, v_cache, positions, slots, cos, sin, qn, kn, eps, heads, kv_heads, k_cache.shape[2],
            0, D=k_cache.shape[-1], QK_NORM=qk_norm is not None, num_warps=1, **_pdl(K, tokens))
        return q_out

    @staticmethod
    def decode_attention(q, k_cache, v_cache, lengths, scale, window, out, scratch, out16=None, slots=None):
        """TorchOps.decode_attention: `slots` (a mixed step's row -> sequence) makes `lengths` per row."""
        from . import kernels as K
        import triton

        b, heads, d = q.shape
        kv_heads, s_max = k_cache.shape[1], k_cache.shape[2]
        o_part, m_part, l_part = scratch
        splits = m_part.shape[-1]
        group = heads // kv_heads
        K.decode_attention_kernel[(b * kv_heads, splits)](
            q, k_cache, v_cache, lengths, slots if slots is not None else lengths, o_part, m_part, l_part, scale,
            heads, kv_heads, s_max, window or s_max + 1, splits, GROUP=group,
            BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_S=ATTENTION_BLOCK, D=d,
            ROW_SLOTS=slots is not None, num_warps=4, **_pdl(K, b))
        K.attention_combine_kernel[(b * heads,)](o_part, m_part, l_part, out, _halves(out16, out),
                                                 splits, heads * d, BLOCK_SPLITS=triton.next_power_of_2(splits), D=d,
                                                 OUT16=out16 is not None, num_warps=4, **_pdl(K, b))
        return out


def attention_scratch(batch: int, heads: int, head_dim: int, splits: int, device) -> tuple[torch.Tensor, ...]:
    """Partial outputs, maxima and sums of the split-K attention pass."""
    return (torch.empty(batch, heads, splits, head_dim, device=device, dtype=torch.float32),
            torch.empty(batch, heads, splits, device=device, dtype=torch.float32),
            torch.empty(batch, heads, splits, device=device, dtype=torch.float32))


def _halves(out16: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A planes buffer as the fp16 pointer its writers store through (stand_in where there is none)."""
    return stand_in if out16 is None else out16.view(torch.float16)


PDL_MAX_ROWS = 1  # steps of at most this many tokens launch their kernels with PDL (_pdl)


def _pdl(K, rows: int) -> dict:
    """Launch options: programmatic dependent launch (kernels.PDL) for one-token steps only (PDL_MAX_ROWS). It
    lets a short GEMV start while the previous kernel drains, which one-token steps gain from; at batch 16 the
    16-row tensor-core tiles lost more to the next kernel's early, waiting programs than they gained (docs/
    engine.md; bench/decode_gpu.py measures both with HEAVYLIFT_PDL=0 turning it off, bench/batched_gpu.py
    batched steps with PDL_MAX_ROWS raised)."""
    return {"launch_pdl": True} if K.PDL.value and rows <= PDL_MAX_ROWS else {}


def _fp16_dot(x: torch.Tensor) -> bool:
    """Whether one token's 4-bit GEMVs take gemv4's fp16x2 kernels (Gluon, compiled for Hopper), which beat
    kernels._nf4_rows on every 8B and 70B decode shape (bench/gemv4_probe.py). HEAVYLIFT_GEMV4=0 keeps the
    Triton kernels, to compare."""
    return (os.environ.get("HEAVYLIFT_GEMV4") != "0" and x.is_cuda and x.is_contiguous()
            and _capability(x.device) >= (9, 0))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _pick(K, gemv, gemm, rows: int):
    """The kernel for `rows` tokens of bf16 or FP8 weights: one row streams through FMAs, up to 16 through
    the tensor cores."""
    kind = "gemv" if rows == 1 else "gemm"
    return (gemv if rows == 1 else gemm), (1 if rows == 1 else ENGINE_GEMV_MAX_ROWS), (K.FIXED[kind] if K.INTERPRET else {})


def _batched(w: QWeight) -> bool:
    """Whether steps of several tokens through w take batched.py's mixed-input GEMM (4-bit, LLM.int8 and FP8
    weights: FP8 rows widen to bf16 as INT8 rows do, one byte a weight read once a step, where kernels.linear_gemm
    took 1.5x INT8's time at 16 rows and torch._scaled_mm 2.1x at 64); bf16 keeps kernels.linear_gemm up to 16
    rows and cuBLAS beyond."""
    return w.packed or w.kind in (INT8, FP8)


def _gemv_rows(w: QWeight) -> int:
    """Most tokens a step streams through the weight kernels (the scheme's engine_gemv_max_rows); beyond,
    TorchOps' dequantized matmuls take the step."""
    return ENGINE_BATCHED_MAX_ROWS if _batched(w) else ENGINE_GEMV_MAX_ROWS


def _batched_linear(x, parts: Sequence[QWeight], out, residual, variant=None, config=None):
    """TritonOps.linear for 2 to 64 tokens through batched.linear_kernel, or for 4-bit weights on Hopper
    wgmma4.linear where the variant (batched.variant(m)) is "wgmma". `config`: a tile to run instead of the
    autotuned one (bench/batched_variants.py), batched.CONFIGS' kwargs and num_warps / num_stages, or wgmma4's
    (POST, BN, W)."""
    from . import batched as B
    from . import kernels as K

    m, w = x.shape[0], parts[0]
    variant = variant or B.variant(m)
    if variant == "wgmma":
        if _wgmma(w, x):
            from . import wgmma4

            return wgmma4.linear(x, parts, out, residual, tile=config)
        config = None  # a wgmma4 tile means nothing to the Triton kernel that runs instead
    sizes = [q.n for q in parts] + [0] * (3 - len(parts))
    args = []
    for q, n in zip(list(parts) + [w] * (3 - len(parts)), sizes):
        args += _weight_args(q) + [q.bias if q.bias is not None else _kernel_rows(q), n]
    ws, tickets = B.scratch(x.device, *B.scratch_sizes(sizes, sum(sizes), w.k, m, x.device))
    grid = lambda meta: (B.tiles(sizes, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    kernel, tile = _batched_kernel(B.linear_kernel, config)
    kernel[grid](x, x.stride(0), out, out.stride(0), residual if residual is not None else out, m, w.k,
                 *args, *_batched_codes(w), _row_stride(w), ws, tickets, KIND=w.kind, PARTS=len(parts),
                 HAS_BIAS=w.bias is not None, HAS_RES=residual is not None, LUT=_batched_lut(w),
                 BLOCK_M=B.block_m(m), POST=_post(w, variant), **tile, **_pdl(K, m))
    return out


def _batched_glu(x, gate: QWeight, up: QWeight, out, variant=None, config=None):
    """TritonOps.glu for 2 to 64 tokens through batched.glu_kernel, or wgmma4.glu (as _batched_linear)."""
    from . import batched as B
    from . import kernels as K

    m = x.shape[0]
    variant = variant or B.variant(m)
    if variant == "wgmma":
        if _wgmma(gate, x):
            from . import wgmma4

            return wgmma4.glu(x, gate, up, out, tile=config)
        config = None
    ws, tickets = B.scratch(x.device, *B.scratch_sizes([gate.n], 2 * gate.n, gate.k, m, x.device))
    grid = lambda meta: (B.tiles([gate.n], meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    kernel, tile = _batched_kernel(B.glu_kernel, config)
    kernel[grid](x, x.stride(0), out, out.stride(0), m, gate.k, *_weight_args(gate), *_weight_args(up),
                 gate.n, *_batched_codes(gate), _row_stride(gate), ws, tickets, KIND=gate.kind,
                 LUT=_batched_lut(gate), BLOCK_M=B.block_m(m), POST=_post(gate, variant), **tile, **_pdl(K, m))
    return out


def _batched_kernel(kernel, config):
    """The autotuned kernel with the interpreter's fixed tile, or with `config` the kernel under the autotuner
    (its SPLIT and EVEN heuristics kept) and that tile."""
    from . import batched as B

    return (kernel, B.fixed()) if config is None else (kernel.fn if not B.INTERPRET else kernel, dict(config))


def _post(w: QWeight, variant: str) -> bool:
    """Whether a 4-bit weight's block absmax multiplies the block's partial product (batched_tiles.POST)."""
    return w.packed and variant == "post"


def _wgmma(w: QWeight, x) -> bool:
    from . import wgmma4

    return wgmma4.runs(w, x)


def _row_stride(w: QWeight) -> int:
    """Elements of w's storage per row: packed bytes (two weights each) or one element per weight."""
    return w.k // 2 if w.packed else w.data.stride(0)


def _batched_lut(w: QWeight) -> bool:
    """Whether the batched kernel looks 4-bit codes up in registers: whenever it runs compiled, whatever
    the table (lut.scaled_pairs_ptx takes the table as operands)."""
    from . import kernels as K

    return w.packed and not K.INTERPRET


_LUT_WORDS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}  # code ptr -> (code, words)


def _batched_codes(w: QWeight):
    """The batched kernel's code_ptr and code2_ptr: the 4-bit table as lut.words in bf16 where it looks codes
    up in registers (built once per table tensor, which is kept so its address is never another table's),
    else its 16 floats; the double quantization's table; stand-in pointers where the weight has none."""
    if not _batched_lut(w):
        return _codes(w, False)
    key = (w.code.data_ptr(), w.code.device)
    if key not in _LUT_WORDS:
        from . import lut

        words = lut.words(w.code.tolist(), "bf16")
        _LUT_WORDS[key] = (w.code, torch.tensor(words, dtype=torch.int32, device=w.code.device))
    return _LUT_WORDS[key][1], (w.code2 if w.code2 is not None else w.code)


_NF4_TABLES: dict[tuple[int, torch.device], bool] = {}  # code tensor -> whether it holds the NF4 table


def _register_lut(K, w: QWeight) -> bool:
    """Whether the kernel may look the 4-bit code up in registers: compiled (not the interpreter) and
    the weight's table is the NF4 one the PTX holds (FP4 reads its table from memory). Read back once
    per table tensor, so captured decode steps never touch it."""
    if not w.packed or K.INTERPRET:
        return False
    key = (w.code.data_ptr(), w.code.device)
    if key not in _NF4_TABLES:
        _NF4_TABLES[key] = w.code.tolist() == K.nf4_code()
    return _NF4_TABLES[key]


_NF4_LOOKUPS: dict[tuple[str, torch.device], torch.Tensor] = {}  # (lut builder, device) -> int32 table


def _nf4_lookup(builder: str, device: torch.device) -> torch.Tensor:
    """The NF4 code as one of the 4-bit kernels' lookup tables, built once per device by lut.`builder`:
    `words` (the register lookup's eight words) or `pair_words` (gemv4's shared-memory byte table)."""
    key = (builder, device)
    if key not in _NF4_LOOKUPS:
        from . import kernels as K
        from . import lut

        _NF4_LOOKUPS[key] = torch.tensor(getattr(lut, builder)(K.nf4_code()), dtype=torch.int32, device=device)
    return _NF4_LOOKUPS[key]


def _codes(w: QWeight, lut: bool):
    """The kernels' code_ptr and code2_ptr: the 4-bit table (as the register lookup's eight words where
    `lut`) and the double quantization's table, or stand-in pointers where the weight has none."""
    if lut:
        code = _nf4_lookup("words", w.data.device)
    else:
        code = w.code if w.code is not None else _kernel_rows(w)
    return code, (w.code2 if w.code2 is not None else code)


def _weight_args(w: QWeight) -> list:
    """data, scale/absmax, absmax2, offset, block_base, in the kernels' order."""
    rows = _kernel_rows(w)
    scale = w.scale if w.scale is not None else rows
    absmax2 = w.absmax2 if w.absmax2 is not None else scale
    return [rows, scale, absmax2, w.offset, w.block_base]


def _kernel_rows(w: QWeight) -> torch.Tensor:
    """w's storage as the kernels are handed it: FP8 rows as bytes where Triton cannot read e4m3 (`e4m3_loads`;
    kernels.widened turns the bytes into values); a pointer to FP8 anywhere among a kernel's arguments would
    fail its compile there."""
    if w.kind == FP8 and not e4m3_loads(w.data.device):
        return w.data.view(torch.uint8)
    return w.data


@functools.cache
def e4m3_loads(device: torch.device) -> bool:
    """Whether Triton reads FP8 (e4m3) on this device: CUDA GPUs of sm_89 and later (the RTX 4090, L40S, H100),
    not the A100 or RTX 3090 before them; and its CPU interpreter."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


OPS = {"torch": TorchOps, "triton": TritonOps}
__all__ = ["OPS", "TorchOps", "TritonOps", "dense_linear", "dense_linear_mul", "dense_parts", "attention_scratch",
           "decode_splits", "planes"]
