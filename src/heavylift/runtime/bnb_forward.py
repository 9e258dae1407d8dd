"""bitsandbytes' 4-bit linear layers in transformers' forward: on more rows than its fused kernel takes, the
engine's tiled matmul, so that no matmul holds a bf16 copy of its whole weight.

Why: bitsandbytes' Linear4bit multiplies up to BNB_4BIT_FUSED_MAX_ROWS rows in its fused kernel, reading the
weight in 4 bits; on more rows (a prefill chunk) its dispatch dequantizes the whole weight to bf16 and multiplies
that (0.50, backends/cuda/ops.py _dequant_linear_fallback): 1.75 GB for each of Llama 3.1 405B's MLP weights,
most of what a 2048-token chunk held beyond weights and KV cache. `tile_4bit_matmuls` makes every Linear4bit of a
loaded model send those matmuls through ops.dense_linear instead: bitsandbytes' own dequantize kernel writes a tile
of the weight's rows at a time (DEQUANT_TILE_BYTES) into one reused buffer, and each tile is multiplied into its
columns of the output. The planner counts the same (planner/matmul_programs.py linear and bnb_4bit_fused). The
tiles are exactly the rows bitsandbytes dequantizes, so the product is its product to within one bf16 rounding
(a GEMM on a tile may sum in another order than one on the whole weight).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from heavylift.engine.ops import dense_linear
from heavylift.engine.weights import QWeight, from_linear
from heavylift.planner.matmul_programs import bnb_4bit_fused


class TiledLinear4bit(bnb.nn.Linear4bit):
    """A Linear4bit whose matmuls beyond bitsandbytes' fused kernel (bnb_4bit_fused) run a tile of weight rows at a
    time. The same module otherwise: its parameters, state dict and class ancestry are the Linear4bit's (peft's
    LoRA layers still wrap it), and `stored` views the weight's storage, never a copy of it."""

    stored: QWeight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._tiles(x):
            return super().forward(x)
        return dense_linear(x, self.stored)

    def _tiles(self, x: torch.Tensor) -> bool:
        """Whether x goes through the tiles: more rows than bitsandbytes fuses, in the layer's compute dtype (bf16
        or fp16, as heavylift loads it), without gradients; the rest keeps bitsandbytes' forward (a training
        step's backward needs its MatMul4Bit)."""
        k = x.shape[-1]
        if bnb_4bit_fused(x.numel() // max(k, 1), k) or x.dtype != self.compute_dtype:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)))


def tile_4bit_matmuls(model: torch.nn.Module) -> None:
    """Make every bitsandbytes Linear4bit of a loaded `model` a TiledLinear4bit, in place, before its first forward.

    On a CPU with AVX512-BF16, bitsandbytes would repack each 4-bit weight for its CPU kernel at its first forward
    (Linear4bit.forward), a layout the tiles cannot read: the layers keep the layout they loaded with, and
    bitsandbytes' own forward on few rows then dequantizes as on any other CPU."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not isinstance(module, TiledLinear4bit):
            module.support_avx512bf16_for_cpu = False
            module.stored = from_linear(module)
            module.__class__ = TiledLinear4bit
