"""Quantization schemes and the exact bytes each one stores for a tensor.

The storage rules are those of the libraries the loader uses, component by component, so the
plan's weight bytes equal what the GPU allocator hands out:
- bitsandbytes 4-bit (NF4, FP4): two weights per byte; one absmax per block of 64 weights
  (float32), plus the 16-entry float32 code book each quantized tensor carries. With double
  quantization the absmax values are themselves quantized to one byte each, in blocks of 256 with
  a float32 absmax per block, a float32 offset and a 256-entry float32 code book.
  (bitsandbytes.functional.quantize_4bit / QuantState, 0.50.)
- LLM.int8: one int8 per weight and one float32 scale per output row (`SCB`).
- FP8 (torchao, per-row scaling): one float8 per weight and one float32 scale per output row.
Embeddings, lm_head, norms, biases and MoE routers stay in bf16 under every scheme: this is what
transformers' bitsandbytes and torchao integrations leave unconverted.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Callable, Iterable

from .model.architecture import QUANTIZABLE_ROLES, TensorSpec
from .model.prequantized import stored_bytes
from .model.tensors import FP8_ONLY_ROLES, FP32_ALWAYS, FP32_UNDER_FP16
from .defaults import ALLOCATION_GRANULE_BYTES

BNB_4BIT_BLOCKSIZE = 64  # weights per absmax (bitsandbytes' default for 4-bit)
BNB_NESTED_BLOCKSIZE = 256  # absmax values per nested float32 absmax (double quantization)
BNB_4BIT_CODE_ENTRIES = 16  # float32 code book of NF4 / FP4
BNB_NESTED_CODE_ENTRIES = 256  # float32 dynamic-map code book of the nested 8-bit absmax
FP8_E4M3_MAX = 448.0  # largest float8_e4m3fn: FP8 rows are scaled to [-448, 448]
INT8_ROW_MAX = 127.0  # LLM.int8 scales rows to [-127, 127]
FLOAT32_BYTES = 4
UNQUANTIZED_BYTES = 2  # bf16 / fp16

# How a scheme stores a quantized weight (Scheme.storage).
DENSE = "dense"  # bf16 / fp16 as loaded
ROWWISE8 = "rowwise8"  # one byte per weight and one float32 scale per output row (LLM.int8, torchao FP8)
BNB_4BIT = "bnb-4bit"  # bitsandbytes' packed 4-bit codes and blockwise absmax
# The heavylift engine streams weights through its Triton kernels for up to this many tokens a step: bf16
# and FP8 through its GEMV and 16-row tensor-core tile, 4-bit and LLM.int8 weights through its mixed-input
# GEMM (engine/batched.py, x's rows in one tile of up to 64); beyond, a step runs dequantized matmuls.
ENGINE_GEMV_MAX_ROWS = 16
ENGINE_BATCHED_MAX_ROWS = 64


def allocated_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a tensor of `nbytes`."""
    return max(ALLOCATION_GRANULE_BYTES, ceil(nbytes / ALLOCATION_GRANULE_BYTES) * ALLOCATION_GRANULE_BYTES)


def _components_bf16(numel: int, rows: int) -> tuple[int, ...]:
    return (numel * UNQUANTIZED_BYTES,)


def _components_rowwise8(numel: int, rows: int) -> tuple[int, ...]:
    return (numel, rows * FLOAT32_BYTES)


def _components_4bit(numel: int, rows: int) -> tuple[int, ...]:
    blocks = ceil(numel / BNB_4BIT_BLOCKSIZE)
    return (ceil(numel / 2), blocks * FLOAT32_BYTES, BNB_4BIT_CODE_ENTRIES * FLOAT32_BYTES)


def _components_4bit_dq(numel: int, rows: int) -> tuple[int, ...]:
    blocks = ceil(numel / BNB_4BIT_BLOCKSIZE)
    return (ceil(numel / 2), blocks, ceil(blocks / BNB_NESTED_BLOCKSIZE) * FLOAT32_BYTES,
            FLOAT32_BYTES, BNB_4BIT_CODE_ENTRIES * FLOAT32_BYTES, BNB_NESTED_CODE_ENTRIES * FLOAT32_BYTES)


@dataclass(frozen=True)
class Scheme:
    """One precision: how it stores a weight, which library loads it, which runtimes run it.

    Every module asks its scheme instead of testing names: `SCHEMES[quant].four_bit`, not a tuple of names."""

    name: str
    label: str
    bits_per_weight: float  # nominal, for display
    storage: str  # DENSE, ROWWISE8 or BNB_4BIT
    components: Callable[[int, int], tuple[int, ...]]  # (numel, rows) -> bytes of each tensor stored
    code: str | None = None  # BNB_4BIT: bitsandbytes' quant_type ("nf4" or "fp4"); ROWWISE8: "int8" or "fp8"
    double_quant: bool = False  # BNB_4BIT: the absmax values are quantized to 8 bits in blocks of 256
    row_max: float | None = None  # ROWWISE8: the value a row's largest magnitude is scaled to
    engine_runs: bool = True  # heavylift's engine computes in bf16; fp16 runs on transformers

    @property
    def four_bit(self) -> bool:
        return self.storage == BNB_4BIT

    @property
    def rowwise8(self) -> bool:
        return self.storage == ROWWISE8

    @property
    def quantized(self) -> bool:
        return self.storage != DENSE

    @property
    def engine_gemv_max_rows(self) -> int:
        """Tokens per step the engine streams these weights through its own kernels."""
        return ENGINE_BATCHED_MAX_ROWS if self.four_bit or self.code in ("int8", "fp8") else ENGINE_GEMV_MAX_ROWS

    def stored_bytes(self, numel: int, rows: int, quantized: bool = True) -> int:
        """Allocated bytes of one stored parameter of `numel` weights in `rows` output rows."""
        parts = self.components(numel, rows) if quantized else _components_bf16(numel, rows)
        return sum(allocated_bytes(b) for b in parts)

    def quantizes(self, role) -> bool:
        """Whether this scheme rewrites tensors of `role` (a model.tensors.Role)."""
        return role in QUANTIZABLE_ROLES or (role in FP8_ONLY_ROLES and self.code == "fp8")

    def float32(self, t: TensorSpec) -> bool:
        """Whether transformers keeps `t` in float32 under this scheme's compute dtype (TensorSpec.keep_fp32)."""
        return t.keep_fp32 == FP32_ALWAYS or (t.keep_fp32 == FP32_UNDER_FP16 and self.name == "fp16")

    def weights_bytes(self, tensors: Iterable[TensorSpec], as_stored: bool = False) -> int:
        """Allocated bytes of these tensors once loaded, fused MoE experts stored as one parameter;
        `as_stored`: the weights of a pre-quantized checkpoint kept as it stores them (TensorSpec.stored)."""
        total, fused = 0, {}
        for t in tensors:
            if as_stored and t.stored:
                # One allocation per stored tensor; fused experts: their stacks of weights and of scales.
                key = t.fused_into or t.name
                weight, scale = fused.get(("stored", key), (0, 0))
                numel = t.numel
                fused[("stored", key)] = (weight + numel, scale + stored_bytes(t) - numel)
                continue
            if self.float32(t):
                total += allocated_bytes(t.numel * FLOAT32_BYTES)
                continue
            quantized = self.quantizes(t.role)
            if t.fused_into is not None:
                numel, r, q = fused.get(t.fused_into, (0, 0, quantized))
                fused[t.fused_into] = (numel + t.numel, r + t.rows, q)
            else:
                total += self.stored_bytes(t.numel, t.rows, quantized)
        for key, value in fused.items():
            if isinstance(key, tuple):
                total += sum(allocated_bytes(b) for b in value)
            else:
                total += self.stored_bytes(*value)
        return total


SCHEMES = {s.name: s for s in (
    Scheme("bf16", "BF16", 16, DENSE, _components_bf16),
    Scheme("fp16", "FP16", 16, DENSE, _components_bf16, engine_runs=False),
    Scheme("fp8", "FP8 (torchao, per-row scales)", 8, ROWWISE8, _components_rowwise8, code="fp8",
           row_max=FP8_E4M3_MAX),
    Scheme("int8", "INT8 (LLM.int8, bitsandbytes)", 8, ROWWISE8, _components_rowwise8, code="int8",
           row_max=INT8_ROW_MAX),
    Scheme("nf4", "NF4 (bitsandbytes)", 4, BNB_4BIT, _components_4bit, code="nf4"),
    Scheme("nf4-dq", "NF4 + double quant (bitsandbytes)", 4, BNB_4BIT, _components_4bit_dq, code="nf4",
           double_quant=True),
    Scheme("fp4", "FP4 (bitsandbytes)", 4, BNB_4BIT, _components_4bit, code="fp4"),
)}
QUANT_CHOICES = tuple(SCHEMES)
ALL = "all"

# KV-cache element sizes for --kv-dtype, in bytes.
KV_DTYPES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


def scheme(name: str) -> Scheme:
    return SCHEMES[name]


def fidelity_order(native_fp8: bool, bf16_supported: bool) -> tuple[str, ...]:
    """Schemes from most to least faithful to the BF16 weights, for the recommendation.

    FP8 ranks above LLM.int8 on GPUs with native FP8 (the seed article's advice: same fidelity,
    real FP8 matmuls); elsewhere FP8 runs weight-only and LLM.int8 keeps its outliers exactly.
    FP16 replaces BF16 where the GPU has no BF16 (before compute capability 8.0).
    """
    full = "bf16" if bf16_supported else "fp16"
    eight = ("fp8", "int8") if native_fp8 else ("int8", "fp8")
    return (full, *eight, *(name for name, s in SCHEMES.items() if s.four_bit))
