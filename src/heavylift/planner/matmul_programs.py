"""What one matmul allocates, by weight storage and runtime: a piece of the allocation programs.

`linear` is a decoder layer's nn.Linear as transformers runs it after heavylift's loader (bitsandbytes'
Linear4bit, on more rows than its fused kernel takes through the engine's tiled matmul, and Linear8bitLt a tile
of weight rows at a time through bitsandbytes' int8 ops: runtime/bnb_forward.py; torchao's Float8Tensor, plain
bf16, or a block-FP8 checkpoint's FP8Linear kept as stored: KeptBlockFp8), and `linear_mul` one multiplied into a
tensor in place (runtime/mlp_forward.py); `dense_linear` and `dense_linear_mul` are the engine's prefill matmuls
(engine/ops.py); `expert_weights` is a fused MoE expert parameter read through heavylift's parametrizations
(experts.py). Each appends to a `Program` what the code allocates and frees, in order; the output stays for the
caller. Written from the libraries' source (transformers 5.24, bitsandbytes 0.50, torchao 0.18); replayed over the
8B shape's forward they give the allocated peaks measured on an H100 for FP8 and LLM.int8 to 0.1%
(bench/results/plan_validation_h100_2026-11-26.json, whose NF4-DQ and LLM.int8 cases ran bitsandbytes'
whole-weight paths, which transformers' forward no longer takes; LLM.int8's quantization of x, which the tiles
keep, is the one measured there). Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, gcd

from .allocator import Program, Tensor
from heavylift.defaults import DEQUANT_TILE_BYTES, LLM_INT8_OUTLIER_COLUMN_FRACTION, LLM_INT8_QUANT_BYTES, \
    TRANSFORMERS_TILE_BYTES
from heavylift.model.prequantized import fallback_tile_rows
from heavylift.schemes import BNB_4BIT_BLOCKSIZE, BNB_NESTED_BLOCKSIZE, FLOAT32_BYTES, SCHEMES, UNQUANTIZED_BYTES

INT8_TILE_ROW_MULTIPLE = 16  # rows of an LLM.int8 tile: 64 bytes of its int32 product, past cuBLASLt's alignment
# rows of a dequantized tile (dequant_tile_rows): each tile's GEMM writes its columns of the output from column
# `start`, which cuBLAS' fast kernels want 16-byte aligned; 128 is also its kernels' tile width, and a multiple of
# every 4-bit block's rows (BNB_4BIT_BLOCKSIZE // gcd(k, 64) is at most 64).
TILE_ROW_ALIGN = 128

BF16 = UNQUANTIZED_BYTES  # a bf16 / fp16 element: activations, KV cache, dequantized weights
FP32 = FLOAT32_BYTES
INT64 = 8
INT32 = 4
# bitsandbytes 4-bit matmuls (0.50, backends/cuda/ops.py gemm_4bit, _GEMM_4BIT_CUSTOM_FLOOR_M): up to 4 rows
# always run its fused kernel, where the inner dimension holds whole blocks; beyond, its dispatch may dequantize
# the whole weight to bf16 and multiply it (always past 1536 rows; between, a per-GPU heuristic decides).
# heavylift's transformers forward sends every such matmul through the engine's tiled one (bnb_4bit_fused).
BNB_4BIT_FUSED_MAX_ROWS = 4
FP8_ACTIVATION_GROUP = 128  # DeepGEMM's per_token_cast_to_fp8: one fp32 scale per 128 activations of a row


@dataclass(frozen=True)
class KeptBlockFp8:
    """The weights of a block-FP8 checkpoint kept as stored (prequantized.keeps_stored), in place of a scheme's
    name: transformers' FP8Linear and FP8Experts run them (integrations/finegrained_fp8.py) in blocks of `block`,
    through the `kernels` package's kernels or, where those do not load, heavylift's torch matmuls
    (runtime/block_fp8_matmul.py: `fallback`). Which one a machine has, the plan cannot know: it holds both."""

    block: tuple[int, int]  # weight_block_size: (rows, columns)
    fallback: bool  # heavylift's torch matmuls, not the kernels


def linear(p: Program, quant: str | KeptBlockFp8, rows: int, k: int, n: int, native_fp8: bool = True) -> Tensor:
    """y = x W^T for `rows` rows through the loaded layer of scheme `quant` (nn.Linear, bitsandbytes'
    Linear4bit / Linear8bitLt, torchao's Float8Tensor, FP8Linear); returns y, leaving x untouched."""
    if isinstance(quant, KeptBlockFp8):
        return block_fp8_fallback(p, rows, k, n, quant.block) if quant.fallback else _block_fp8(p, rows, k, n)
    if _bnb_tiles(quant, rows, k):
        return _tiled(p, quant, rows, k, n, BF16 * rows * n, transformers_tile_bytes())
    if quant == "int8":
        return _llm_int8(p, rows, k, n)
    if quant == "fp8":
        return _float8(p, rows, k, n) if native_fp8 else _dequantized_matmul(p, rows, k, n)
    return p.alloc("linear", BF16 * rows * n)


def linear_mul(p: Program, quant: str | KeptBlockFp8, rows: int, k: int, n: int, native_fp8: bool = True) -> None:
    """into *= x W^T through transformers' loaded layer, as runtime/mlp_forward.py multiplies the up projection
    into the gate's output: a bitsandbytes 4-bit layer beyond its fused kernel through ops.dense_linear_mul's tiles
    (_tiled_product), any other layer's whole product (linear) multiplied in and freed."""
    if _bnb_tiles(quant, rows, k):
        _tiled_product(p, quant, rows, k, n, transformers_tile_bytes())
    else:
        p.free(linear(p, quant, rows, k, n, native_fp8))


def linear_over(p: Program, quant: str | KeptBlockFp8, rows: int, k: int, n: int, native_fp8: bool = True
                ) -> Tensor | None:
    """y = x W^T where the caller offers a tensor of y's shape to write it over (runtime/mlp_forward.py _over):
    a bitsandbytes 4-bit layer through the tiles and LLM.int8 write into it (None returned); any other layer
    returns its own output (linear)."""
    if _bnb_tiles(quant, rows, k):
        _tiled(p, quant, rows, k, n, 0, transformers_tile_bytes())
        return None
    if quant == "int8":
        _llm_int8(p, rows, k, n, over=True)
        return None
    return linear(p, quant, rows, k, n, native_fp8)


def _bnb_tiles(quant: str | KeptBlockFp8, rows: int, k: int) -> bool:
    """Whether transformers' forward multiplies x [rows, k] by a layer of `quant` through the engine's tiles: a
    bitsandbytes 4-bit layer beyond its fused kernel (runtime/bnb_forward.py)."""
    return isinstance(quant, str) and SCHEMES[quant].four_bit and not bnb_4bit_fused(rows, k)


def bnb_4bit_fused(rows: int, k: int) -> bool:
    """Whether bitsandbytes' Linear4bit multiplies x [rows, k] in its fused kernel on a GPU, reading the weight
    in 4 bits; runtime/bnb_forward.py sends every other 4-bit matmul of transformers' forward through the engine's
    tiled one (ops.dense_linear: _tiled here), which never holds the whole weight in bf16."""
    return rows <= BNB_4BIT_FUSED_MAX_ROWS and k % BNB_4BIT_BLOCKSIZE == 0


def _llm_int8(p: Program, rows: int, k: int, n: int, over: bool = False) -> Tensor | None:
    """LLM.int8 on transformers' forward at inference (runtime/bnb_forward.py TiledLinear8bitLt): x quantized
    (_int8_rows), x's outlier columns taken once (A[:, cols], bf16), then the output allocated whole and per tile
    of int8_tile_rows weight rows (_int8_tile) its product written into its columns of the output; a weight of one
    tile gives its product as the output. With `over`, the caller's tensor is the output (None returned): the
    tiles write into it, and one tile's product is copied in and freed last. Every input column counts as an
    outlier column (LLM_INT8_OUTLIER_COLUMN_FRACTION): which hold an entry past the threshold depends on the data."""
    cols = int(k * LLM_INT8_OUTLIER_COLUMN_FRACTION)
    ca, stats, idx = _int8_rows(p, rows, k, cols)
    sub_a = p.alloc("sub_a", BF16 * rows * cols) if cols else None
    step = int8_tile_rows(n, k)
    if step >= n:  # one tile: its product is the output
        y = _int8_tile(p, rows, n, cols)
        if over:
            p.free(ca, stats, idx, sub_a, y)
            return None
    else:
        y = None if over else p.alloc("linear", BF16 * rows * n)
        for start in range(0, n, step):
            p.free(_int8_tile(p, rows, min(step, n - start), cols))  # copied into y's columns
    p.free(ca, stats, idx, sub_a)
    return y


def transformers_tile_bytes() -> int:
    """The bytes of a dequantized weight tile on transformers' forward (TRANSFORMERS_TILE_BYTES), read when
    called."""
    return TRANSFORMERS_TILE_BYTES


def int8_tile_rows(n: int, k: int) -> int:
    """Rows of an LLM.int8 weight [n, k] that transformers' forward multiplies at a time (runtime/bnb_forward.py):
    as many as keep the fp32 dequantize of their outlier columns, every one of the k counted, within
    TRANSFORMERS_TILE_BYTES, in whole multiples of INT8_TILE_ROW_MULTIPLE; at least one multiple, at most the whole
    weight. cuBLASLt's int8 GEMM writes the tile's int32 product with its rows 16-byte aligned: bitsandbytes
    raises "cublasLt ran into an error" on a tile of 9362 rows (Gemma 2 9B's 14336 x 3584 gate)."""
    return min(n, max(1, transformers_tile_bytes() // (FP32 * k) // INT8_TILE_ROW_MULTIPLE) * INT8_TILE_ROW_MULTIPLE)


def int8_quant_rows(rows: int, k: int) -> int:
    """Rows of x [rows, k] that LLM.int8 on transformers' forward quantizes at a time (runtime/bnb_forward.py
    _int8_rows): as many as keep their fp16 copy within LLM_INT8_QUANT_BYTES, at least one."""
    return max(1, LLM_INT8_QUANT_BYTES // (BF16 * k))


def _int8_rows(p: Program, rows: int, k: int, cols: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """x quantized as runtime/bnb_forward.py _int8_rows does: in one call of bitsandbytes' int8_vectorwise_quant
    (_int8_quant) where its rows fit int8_quant_rows; else the int8 rows and row scales allocated whole and the
    map of outlier columns (with `cols`), then per block of rows its call, its outputs copied in and freed,
    then the columns' indices, the map freed. Returns (int8 rows, row scales, outlier column indices or None)."""
    step = int8_quant_rows(rows, k)
    if step >= rows:
        return _int8_quant(p, rows, k, cols)
    ca = p.alloc("x_int8", rows * k)
    stats = p.alloc("row_stats", FP32 * rows)
    held = p.alloc("outlier_map", k) if cols else None
    for start in range(0, rows, step):
        p.free(*_int8_quant(p, min(step, rows - start), k, cols))
    idx = None
    if cols:
        idx = p.alloc("outlier_cols", INT64 * cols)
        p.free(held)
    return ca, stats, idx


def _int8_quant(p: Program, rows: int, k: int, cols: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """bitsandbytes 0.50's int8_vectorwise_quant on an fp16 copy of x, as MatMul8bitLt calls it
    (backends/cuda/ops.py): the copy, its row scales and int8 rows, then |x| and the map of entries past the
    threshold, the columns that hold any and their indices; the fp16 copy and the map freed as it returns.
    Returns (int8 rows, row scales, outlier column indices or None)."""
    a16 = p.alloc("x_fp16", BF16 * rows * k)
    stats = p.alloc("row_stats", FP32 * rows)
    ca = p.alloc("x_int8", rows * k)
    absx = p.alloc("abs", BF16 * rows * k)
    over = p.alloc("outliers", rows * k)
    p.free(absx)
    idx = None
    if cols:
        any_cols = p.alloc("any_cols", k)
        idx = p.alloc("outlier_cols", INT64 * cols)
        p.free(any_cols)
    p.free(over, a16)
    return ca, stats, idx


def _int8_tile(p: Program, rows: int, t: int, cols: int) -> Tensor:
    """One tile of t weight rows (runtime/bnb_forward.py _int8_tile), in int8_mixed_scaled_mm's order: with
    outlier columns, the tile's CB[:, cols], dequantized in fp32 (A * stats, then * 1/127: int8_vectorwise_dequant)
    and cast to bf16; int8_linear_matmul's int32 product, int8_mm_dequant's fp16 and its cast to bf16; then
    addmm's new bf16 product. Returns the tile's product (the caller's output, or copied into it and freed)."""
    sub_b = None
    if cols:
        cb = p.alloc("cb_cols", t * cols)
        d = p.alloc("dequant", FP32 * t * cols)
        p.free(cb)
        sub_b = p.alloc("sub_b", BF16 * t * cols)
        p.free(d)
    i32 = p.alloc("int32", INT32 * rows * t)
    f16 = p.alloc("fp16", BF16 * rows * t)
    y = p.alloc("linear", BF16 * rows * t)
    p.free(f16, i32)
    if not cols:
        return y
    y2 = p.alloc("linear", BF16 * rows * t)  # y.addmm(sub_a, sub_b)
    p.free(sub_b, y)
    return y2


def float8_rows(p: Program, rows: int, k: int) -> tuple[Tensor, Tensor]:
    """torchao's Float8Tensor.from_hp, per row (_choose_scale_float8 and _quantize_affine_float8): |x| and
    its row maxima in the input's bf16, the fp32 scale, then x in fp32, scaled and clamped before the cast
    to float8. Returns (the float8 rows, their fp32 scales); the temporaries are freed."""
    absx = p.alloc("abs", BF16 * rows * k)
    amax = p.alloc("amax", BF16 * rows)
    p.free(absx)
    div = p.alloc("scale", BF16 * rows)
    scale = p.alloc("scale_fp32", FP32 * rows)
    p.free(amax, div)
    x32 = p.alloc("x_fp32", FP32 * rows * k)
    xs = p.alloc("x_scaled", FP32 * rows * k)
    xc = p.alloc("x_clamped", FP32 * rows * k)
    q8 = p.alloc("x_fp8", rows * k)
    p.free(x32, xs, xc)
    return q8, scale


def _float8(p: Program, rows: int, k: int, n: int) -> Tensor:
    """torchao Float8Tensor linear: a per-row dynamic activation scale (float8_rows), then torch._scaled_mm
    to bf16."""
    q8, scale = float8_rows(p, rows, k)
    y = p.alloc("linear", BF16 * rows * n)
    p.free(q8, scale)
    return y


def _block_fp8(p: Program, rows: int, k: int, n: int) -> Tensor:
    """FP8Linear.forward (fp8_linear) on block-FP8 weights through the `kernels` package: DeepGEMM (Hopper or
    Blackwell with a CUDA toolkit) casts x to FP8 per token with one fp32 scale per 128 columns, then multiplies
    into y; the Triton kernel that runs elsewhere quantizes x inline and allocates y alone. The plan counts
    DeepGEMM's, the larger."""
    q8 = p.alloc("x_fp8", rows * k)
    scale = p.alloc("x_scales", FP32 * rows * -(-k // FP8_ACTIVATION_GROUP))
    y = p.alloc("linear", BF16 * rows * n)
    p.free(q8, scale)
    return y


def block_fp8_fallback(p: Program, rows: int, k: int, n: int, block: tuple[int, int]) -> Tensor:
    """FP8Linear.forward through heavylift's torch matmuls (block_fp8_matmul.matmul): y, then the weight's
    tiles in turn (block_fp8_tiles); returns y."""
    y = p.alloc("linear", BF16 * rows * n)
    block_fp8_tiles(p, k, n, block)
    return y


def block_fp8_tiles(p: Program, k: int, n: int, block: tuple[int, int]) -> None:
    """block_fp8_matmul._project on a [n, k] block-FP8 weight: per tile of output rows (fallback_tile_rows; the
    last may be shorter), the float32 staging padded to whole blocks, the bf16 tile cast from it, the staging
    freed as the cast returns, the tile freed once multiplied into y's columns (torch.mm writes them in place)."""
    step = fallback_tile_rows(n, k, block)
    for start in range(0, n, step):
        rows = min(step, n - start)
        staged = p.alloc("w_fp32", FP32 * ceil(rows / block[0]) * block[0] * ceil(k / block[1]) * block[1])
        w = p.alloc("w_tile", BF16 * rows * k)
        p.free(staged)
        p.free(w)


def _dequantized_matmul(p: Program, rows: int, k: int, n: int) -> Tensor:
    """A weight dequantized in fp32 (cast, scaled) to bf16, then one bf16 matmul: torchao FP8 storage without
    FP8 tensor cores, and the engine's INT8 (and FP8 without them) prefill."""
    w32 = p.alloc("w_fp32", FP32 * n * k)
    ws = p.alloc("w_scaled", FP32 * n * k)
    p.free(w32)
    w = p.alloc("w_bf16", BF16 * n * k)
    p.free(ws)
    y = p.alloc("linear", BF16 * rows * n)
    p.free(w)
    return y


def dequant_tile_rows(n: int, k: int, tile_bytes: int | None = None) -> int:
    """Rows of a weight [n, k] that ops.dense_linear dequantizes at a time: `tile_bytes` of bf16 (the engine's
    DEQUANT_TILE_BYTES where None, transformers' transformers_tile_bytes()), in a multiple of TILE_ROW_ALIGN rows
    where the budget holds that many (every weight of a real model), else of the rows that hold whole 4-bit
    blocks (so a tile's codes and absmax are contiguous slices); at least one multiple, at most the whole
    weight."""
    rows = (DEQUANT_TILE_BYTES if tile_bytes is None else tile_bytes) // (BF16 * k)
    multiple = TILE_ROW_ALIGN if rows >= TILE_ROW_ALIGN else BNB_4BIT_BLOCKSIZE // gcd(k, BNB_4BIT_BLOCKSIZE)
    return min(n, max(1, rows // multiple) * multiple)


def _fp8_matmul(quant: str, k: int, n: int, native_fp8: bool) -> bool:
    """Whether ops.dense_linear runs the weight on the FP8 tensor cores."""
    return quant == "fp8" and native_fp8 and k % 16 == 0 and n % 16 == 0


def dense_linear(p: Program, quant: str, rows: int, k: int, n: int, native_fp8: bool) -> Tensor:
    """ops.dense_linear: bf16 weights used as they are; FP8 rows scaled per token to FP8 in fp32 and multiplied
    on the FP8 tensor cores (torch._scaled_mm); 4-bit, INT8, and FP8 without FP8 tensor cores dequantized a
    tile of rows at a time (dequant_tile_rows) into one bf16 buffer that each tile's matmul reads, writing its
    columns of the output in place (_tiled)."""
    scheme = SCHEMES[quant]
    if not scheme.quantized:
        return p.alloc("linear", BF16 * rows * n)
    if _fp8_matmul(quant, k, n, native_fp8):
        xf = p.alloc("x_fp32", FP32 * rows * k)
        ab = p.alloc("abs", FP32 * rows * k)
        p.free(xf)
        amax = p.alloc("amax", FP32 * rows)
        p.free(ab)
        div = p.alloc("scale", FP32 * rows)
        p.free(amax)
        xs = p.alloc("scale", FP32 * rows)
        p.free(div)
        xf = p.alloc("x_fp32", FP32 * rows * k)
        xd = p.alloc("x_scaled", FP32 * rows * k)
        p.free(xf)
        xq = p.alloc("x_fp8", rows * k)
        p.free(xd)
        y = p.alloc("linear", BF16 * rows * n)
        p.free(xq, xs)
        return y
    return _tiled(p, quant, rows, k, n, BF16 * rows * n, None)


def dense_linear_mul(p: Program, quant: str, rows: int, k: int, n: int, native_fp8: bool) -> None:
    """ops.dense_linear_mul, into *= x W^T: dense_linear's product multiplied in and freed; where it tiles the
    weight, a buffer of one tile's columns instead of the whole product."""
    if not SCHEMES[quant].quantized or _fp8_matmul(quant, k, n, native_fp8):
        p.free(dense_linear(p, quant, rows, k, n, native_fp8))
        return
    _tiled_product(p, quant, rows, k, n, None)


def _tiled_product(p: Program, quant: str, rows: int, k: int, n: int, tile_bytes: int | None) -> None:
    """ops._tiled_linear with `into`: the tiled matmul whose output is one tile's columns, each multiplied into its
    columns of `into` and the buffer freed as it returns."""
    p.free(_tiled(p, quant, rows, k, n, BF16 * rows * dequant_tile_rows(n, k, tile_bytes), tile_bytes))


def _tiled(p: Program, quant: str, rows: int, k: int, n: int, out_bytes: int, tile_bytes: int | None
           ) -> Tensor | None:
    """ops._tiled_linear, the engine's prefill matmul and transformers' 4-bit one beyond bnb_4bit_fused: the tile
    buffer of dequant_tile_rows(n, k, tile_bytes) rows, then the output (`out_bytes`: the product, one tile's
    columns of it, or 0 for a tensor given to write into); per tile, double quant's fp32 absmax of its blocks
    (_tile_absmax), freed once the tile is written; the scaled rows are cast and scaled in place in the tile (no
    fp32 copy on a GPU); the tile freed as it returns."""
    scheme = SCHEMES[quant]
    step = dequant_tile_rows(n, k, tile_bytes)
    tile = p.alloc("weight_tile", BF16 * step * k)
    y = p.alloc("linear", out_bytes) if out_bytes else None
    if scheme.four_bit and scheme.double_quant:
        _tile_absmax(p, n, k, step)
    p.free(tile)
    return y


def _tile_absmax(p: Program, n: int, k: int, step: int) -> None:
    """ops.block_absmax for each tile of `step` rows of a weight [n, k]: the fp32 absmax of the nested blocks
    (BNB_NESTED_BLOCKSIZE 4-bit blocks each) that hold the tile's 4-bit blocks, allocated and freed. A size
    allocated and freed again with nothing between leaves the allocator as the first time did, so each size is
    counted once (a 405B weight has up to 19 tiles, in each of 126 layers)."""
    seen = set()
    for start in range(0, n, step):
        first, last = start * k // BNB_4BIT_BLOCKSIZE, -(-min(n, start + step) * k // BNB_4BIT_BLOCKSIZE)
        lo = first // BNB_NESTED_BLOCKSIZE * BNB_NESTED_BLOCKSIZE
        hi = min(-(-n * k // BNB_4BIT_BLOCKSIZE), -(-last // BNB_NESTED_BLOCKSIZE) * BNB_NESTED_BLOCKSIZE)
        if hi - lo not in seen:
            seen.add(hi - lo)
            p.free(p.alloc("absmax", FP32 * (hi - lo)))


def expert_weights(p: Program, quant: str | KeptBlockFp8, numel: int) -> list[Tensor]:
    """One fused expert parameter read through heavylift's parametrization (experts.py): bitsandbytes'
    4-bit dequantize (double quant's absmax first), or the 8-bit rows in fp32 times their scales, cast to
    bf16. Cached until the experts' forward returns; bf16 experts, and block-FP8 ones kept as stored (which
    the grouped matmul reads as they are, or dequantizes a tile at a time: block_fp8_tiles), are read in place."""
    if isinstance(quant, KeptBlockFp8):
        return []
    scheme = SCHEMES[quant]
    if scheme.four_bit:
        tmp = [p.alloc("absmax", FP32 * (numel // BNB_4BIT_BLOCKSIZE))] if scheme.double_quant else []
        w = p.alloc("experts_bf16", BF16 * numel)
        p.free(*tmp)
        return [w]
    if scheme.rowwise8:
        f = p.alloc("experts_fp32", FP32 * numel)
        s = p.alloc("experts_scaled", FP32 * numel)
        p.free(f)
        w = p.alloc("experts_bf16", BF16 * numel)
        p.free(s)
        return [w]
    return []
