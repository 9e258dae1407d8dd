"""bitsandbytes' linear layers in transformers' forward at inference, a tile of weight rows at a time, so that no
matmul holds a copy of its whole weight: 4-bit ones on more rows than its fused kernel takes through the engine's
tiled matmul, LLM.int8 ones through bitsandbytes' own int8 ops.

Why: bitsandbytes' Linear4bit multiplies up to BNB_4BIT_FUSED_MAX_ROWS rows in its fused kernel, reading the
weight in 4 bits; on more rows (a prefill chunk) its dispatch dequantizes the whole weight to bf16 and multiplies
that (0.50, backends/cuda/ops.py _dequant_linear_fallback): 1.75 GB for each of Llama 3.1 405B's MLP weights,
most of what a 2048-token chunk held beyond weights and KV cache. `tile_4bit_matmuls` makes every Linear4bit of a
loaded model send those matmuls through ops.dense_linear instead: bitsandbytes' own dequantize kernel writes a tile
of the weight's rows at a time (TRANSFORMERS_TILE_BYTES) into one reused buffer, and each tile is multiplied into its
columns of the output. The planner counts the same (planner/matmul_programs.py linear and bnb_4bit_fused). The
tiles are exactly the rows bitsandbytes dequantizes, so the product is its product to within one bf16 rounding
(a GEMM on a tile may sum in another order than one on the whole weight).

LLM.int8 (Linear8bitLt, threshold 6.0): bitsandbytes 0.50's MatMul8bitLt multiplies the input columns that hold an
entry of 6 or more in bf16 against those weight columns dequantized (int8_mixed_scaled_mm, plain PyTorch on every
device): two fp32 [out_features, columns] copies at once, 2 x 3.5 GB for Llama 3.1 405B's MLP weights when every
column holds one, as the plan must count (the columns depend on the data), at prefill and decode alike, beside an
int32 and an fp16 copy of the whole output. `tile_int8_matmuls` makes every Linear8bitLt in the state heavylift
loads (int8 rows CB [out, in] with fp32 row scales SCB, no fp16 weights) compute as bitsandbytes does with its own
ops: x quantized a block of rows at a time and its outlier columns gathered over all its rows
(int8_vectorwise_quant per block, _int8_rows), then per tile of int8_tile_rows weight rows the int8 product
dequantized (int8_linear_matmul, int8_mm_dequant) and the outlier columns' part added (their weights dequantized
as int8_vectorwise_dequant does with one fp32 copy, _dequantized; addmm), written into the tile's columns of the
output. Each output column is the same arithmetic on the same numbers as bitsandbytes' (bit for bit on the CPU:
integer products are exact, quantize and dequantize are per row and elementwise); on a GPU only the outlier part's
bf16/fp16 addmm may sum its columns in another order on a tile than on the whole weight (cuBLAS picks its kernel
by shape), one rounding of that part.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch

from heavylift.engine.ops import dense_linear
from heavylift.engine.weights import QWeight, from_linear
from heavylift.planner.matmul_programs import bnb_4bit_fused, int8_quant_rows, int8_tile_rows, \
    transformers_tile_bytes


class TiledLinear4bit(bnb.nn.Linear4bit):
    """A Linear4bit whose matmuls beyond bitsandbytes' fused kernel (bnb_4bit_fused) run a tile of weight rows at a
    time. The same module otherwise: its parameters, state dict and class ancestry are the Linear4bit's (peft's
    LoRA layers still wrap it), and `stored` views the weight's storage, never a copy of it."""

    @property
    def stored(self) -> QWeight:
        """The weight's storage as the tiles read it, made again whenever the layer's weight, quantization state
        or bias has been replaced (peft's merge_and_unload, Params4bit.to): a view kept from before would have
        the tiles multiply by the old weight while bitsandbytes' few-row path uses the new one."""
        cached = self.__dict__.get("_stored")
        if cached is None or not _views(cached, self):
            cached = self.__dict__["_stored"] = from_linear(self)
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._tiles(x):
            return super().forward(x)
        return dense_linear(x, self.stored, tile_bytes=transformers_tile_bytes())

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """forward(x) written into `out` (contiguous, x's rows times out_features, x's dtype), which is returned,
        where x takes the tiles; else None, nothing computed."""
        if not self._tiles(x):
            return None
        return dense_linear(x, self.stored, out=out, tile_bytes=transformers_tile_bytes())

    def _tiles(self, x: torch.Tensor) -> bool:
        """Whether x goes through the tiles: more rows than bitsandbytes fuses, in the layer's compute dtype (bf16
        or fp16, as heavylift loads it), without gradients; the rest keeps bitsandbytes' forward (a training
        step's backward needs its MatMul4Bit)."""
        k = x.shape[-1]
        if bnb_4bit_fused(x.numel() // max(k, 1), k) or x.dtype != self.compute_dtype:
            return False
        return not records_gradients(x, self)


def _views(stored: QWeight, module: torch.nn.Module) -> bool:
    """Whether `stored` still views the module's weight, quantization state and bias."""
    bias = module.bias
    return (stored.state is module.weight.quant_state and stored.data.data_ptr() == module.weight.data_ptr()
            and (stored.bias is None) == (bias is None) and (bias is None or stored.bias.data_ptr() == bias.data_ptr()))


def records_gradients(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether a call of `module` on `x` records gradients (a training step's backward needs the library's own
    forward then)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def tile_4bit_matmuls(model: torch.nn.Module) -> None:
    """Make every bitsandbytes Linear4bit of a loaded `model` a TiledLinear4bit, in place, before its first forward.

    On a CPU with AVX512-BF16, bitsandbytes would repack each 4-bit weight for its CPU kernel at its first forward
    (Linear4bit.forward), a layout the tiles cannot read: the layers keep the layout they loaded with, and
    bitsandbytes' own forward on few rows then dequantizes as on any other CPU."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not isinstance(module, TiledLinear4bit):
            module.support_avx512bf16_for_cpu = False
            module.__class__ = TiledLinear4bit


class TiledLinear8bitLt(bnb.nn.Linear8bitLt):
    """A Linear8bitLt whose forward at inference runs a tile of weight rows at a time (module docstring), on the
    int8 rows and row scales the layer holds; parameters, state and class ancestry are the Linear8bitLt's. In
    training mode, with gradients, with fp16 weights or without quantized rows, bitsandbytes' forward runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._tiles(x):
            return super().forward(x)
        return self._tiled(x)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """forward(x) written into `out` (contiguous, x's rows times out_features, x's dtype), which is returned,
        where x takes the tiles; else None, nothing computed."""
        return self._tiled(x, out) if self._tiles(x) else None

    def _tiled(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight.CB is not None:  # as Linear8bitLt.forward: the rows move to the state at the first call
            self.init_8bit_state()
        if self.bias is not None and self.bias.dtype != x.dtype:  # as Linear8bitLt.forward casts it
            self.bias.data = self.bias.data.to(x.dtype)
        state = self.state
        return int8_linear(x, state.CB, state.SCB, state.threshold, self.bias, out)

    def _tiles(self, x: torch.Tensor) -> bool:
        """Whether x goes through the tiles: the layer in eval mode (in training mode bitsandbytes runs another
        matmul on the CPU, MatMul8bitFp) with int8 rows [out, in] and their fp32 scales, no fp16 weights to
        quantize, a 2-d or 3-d input that is not empty, and no gradient to record."""
        cb = self.weight.CB if self.weight.CB is not None else self.state.CB
        scb = self.weight.SCB if self.weight.CB is not None else self.state.SCB
        if self.training or self.state.has_fp16_weights or cb is None or scb is None:
            return False
        if cb.dtype != torch.int8 or cb.shape != (self.out_features, self.in_features) or not cb.is_contiguous():
            return False
        if scb.dtype != torch.float32 or scb.shape != (self.out_features,) or x.dim() not in (2, 3) or not x.numel():
            return False
        return not records_gradients(x, self)


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float,
                bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + bias for LLM.int8 rows `cb` [n, k] with row scales `scb`, as MatMul8bitLt.forward computes it
    (bitsandbytes 0.50, autograd/_functions.py; int8_mixed_scaled_mm and int8_scaled_mm in backends/default/ops.py),
    a tile of int8_tile_rows weight rows at a time into the output's columns (matmul_programs._llm_int8 counts it).
    `out`, where given, is a contiguous tensor of x's dtype and x's rows times n that takes the product (returned):
    each tile's columns, or a weight of one tile its product copied in."""
    a = x.reshape(-1, x.shape[-1])
    ca, sca, cols = _int8_rows(a, threshold)
    n = cb.shape[0]
    sub_a = a[:, cols].contiguous() if cols is not None and cols.numel() else None
    step = int8_tile_rows(n, cb.shape[1])
    if step >= n:  # one tile: its product is the output
        product = _int8_tile(a.dtype, ca, sca, cb, scb, bias, sub_a, cols)
        if out is None:
            return product.reshape(*x.shape[:-1], n)
        return out.copy_(product.view(out.shape))
    y = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device) if out is None else out.view(a.shape[0], n)
    for start in range(0, n, step):
        tile = slice(start, start + step)
        y[:, tile] = _int8_tile(a.dtype, ca, sca, cb[tile], scb[tile], None if bias is None else bias[tile], sub_a,
                                cols)
    return y.reshape(*x.shape[:-1], n) if out is None else out


def _int8_rows(a: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """bitsandbytes' int8_vectorwise_quant of a [rows, k] in fp16, as MatMul8bitLt calls it, int8_quant_rows rows
    at a time: (int8 rows, fp32 row scales, the outlier columns or None without a threshold). Each row's scale
    and int8 values depend on that row alone (the kernel's absmax skips entries past the threshold and zeroes
    them); the outlier columns are those holding such an entry in any row, and the int8 rows are zeroed in them
    all, as the whole call zeroes them: the same three tensors, bit for bit."""
    rows, k = a.shape
    step = int8_quant_rows(rows, k)
    if step >= rows:
        return bnbf.int8_vectorwise_quant(a.to(torch.float16), threshold=threshold)
    ca = torch.empty(rows, k, dtype=torch.int8, device=a.device)
    scales = torch.empty(rows, dtype=torch.float32, device=a.device)
    held = torch.zeros(k, dtype=torch.bool, device=a.device) if threshold > 0.0 else None
    for start in range(0, rows, step):
        part = slice(start, start + step)
        block, block_scales, cols = bnbf.int8_vectorwise_quant(a[part].to(torch.float16), threshold=threshold)
        ca[part], scales[part] = block, block_scales
        if cols is not None and cols.numel():
            held.index_fill_(0, cols, True)
        del block, block_scales, cols
    if held is None:
        return ca, scales, None
    cols = torch.argwhere(held).view(-1)
    del held
    if cols.numel():
        ca.index_fill_(1, cols, 0)
    return ca, scales, cols


def _int8_tile(dtype: torch.dtype, ca: torch.Tensor, sca: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
               bias: torch.Tensor | None, sub_a: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """One tile's columns of the output in x's dtype, in int8_mixed_scaled_mm's order: where x has outlier
    columns, the tile's weights in them dequantized (_dequantized); int8_scaled_mm's product (int8_linear_matmul,
    int8_mm_dequant with the bias); the outlier columns' part added to it."""
    sub_b = None if sub_a is None else _dequantized(cb, cols, scb, dtype).t()
    product = torch.ops.bitsandbytes.int8_mm_dequant.default(
        torch.ops.bitsandbytes.int8_linear_matmul.default(ca, cb), sca, scb, dtype=dtype, bias=bias)
    return product if sub_b is None else product.addmm(sub_a, sub_b)


def _dequantized(rows: torch.Tensor, cols: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Columns `cols` of int8 rows times the rows' scales, in `dtype`: what int8_mixed_scaled_mm computes with
    bitsandbytes' int8_vectorwise_dequant (A * stats * 1/127 in fp32, _ops.py), then cast; here the second
    product in place and the int8 columns freed before it, so one fp32 copy is held where the op holds two
    (2 x 133 MB for a 624-row tile of a 53248-wide weight). The same products in the same order: bit for bit."""
    picked = rows[:, cols]
    out = picked * scales.view(-1, 1)
    del picked
    out.mul_(7.874015718698502e-3)
    return out.to(dtype)


def tile_int8_matmuls(model: torch.nn.Module) -> None:
    """Make every bitsandbytes Linear8bitLt of a loaded `model` a TiledLinear8bitLt, in place."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt) and not isinstance(module, TiledLinear8bitLt):
            module.__class__ = TiledLinear8bitLt
