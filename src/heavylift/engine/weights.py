"""The engine's view of one linear weight: the loaded storage itself, never a copy.

A `QWeight` points at the tensors bitsandbytes, torchao or torch already hold after loading
(packed NF4 nibbles and their absmax, FP8 or INT8 rows and their scales, bf16), so the bytes the
planner counted are the bytes the kernels read. `rows()` views part of a fused weight (Phi-3's
qkv_proj and gate_up_proj); `dequantize()` is the reference the kernels are tested against and the
path prefill takes into dense matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from heavylift.schemes import BNB_4BIT_BLOCKSIZE, BNB_NESTED_BLOCKSIZE, FP8_E4M3_MAX, INT8_ROW_MAX

DENSE, FP8, NF4, NF4_DQ, INT8 = 0, 1, 2, 3, 4  # storage layouts; FP8 and INT8 share the row-scaled path
QBLOCK = BNB_4BIT_BLOCKSIZE  # bitsandbytes' 4-bit block: 64 weights share one absmax
DQ_GROUP = BNB_NESTED_BLOCKSIZE  # its double quantization: 256 absmax share one fp32 scale and the offset
FP8_MAX = FP8_E4M3_MAX
INT8_MAX = INT8_ROW_MAX
# One-token 4-bit GEMVs (gemv4.py) read x as fp16 "planes" (ops.planes), scaled by this power of two so that
# fp16 partial sums cannot overflow; the kernels producing their inputs (rmsnorm, attention, the GLU) write them.
X16_SCALE = 2.0 ** -6
KIND_NAMES = {DENSE: "bf16", FP8: "fp8", NF4: "nf4", NF4_DQ: "nf4-dq", INT8: "int8"}


@dataclass(frozen=True)
class QWeight:
    """Rows [0, n) x columns [0, k) of a weight, in one of the storage layouts above."""

    kind: int
    n: int
    k: int
    data: torch.Tensor  # bf16 / fp8 / int8 [n, k], or uint8 [n * k / 2] packed nibbles
    scale: torch.Tensor | None = None  # FP8 / INT8: fp32 [n]; NF4: fp32 absmax; NF4_DQ: uint8 absmax
    absmax2: torch.Tensor | None = None  # NF4_DQ: fp32 scale of each 256 absmax
    offset: float = 0.0  # NF4_DQ: added back to every dequantized absmax
    block_base: int = 0  # index of this view's first absmax in `scale` (views of fused NF4 weights)
    code: torch.Tensor | None = None  # NF4: the 16 fp32 values a nibble stands for
    code2: torch.Tensor | None = None  # NF4_DQ: the 256 fp32 values an absmax byte stands for
    bias: torch.Tensor | None = None
    state: object | None = field(default=None, compare=False)  # bitsandbytes' QuantState, for its fast dequantize

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def packed(self) -> bool:
        return self.kind in (NF4, NF4_DQ)

    def rows(self, start: int, stop: int) -> "QWeight":
        """Rows [start, stop) as a view sharing this weight's storage."""
        bias = None if self.bias is None else self.bias[start:stop]
        if self.packed:
            half = self.k // 2
            return replace(self, n=stop - start, data=self.data[start * half:stop * half], bias=bias,
                           block_base=self.block_base + start * self.k // QBLOCK, state=None)
        scale = None if self.scale is None else self.scale[start:stop]
        return replace(self, n=stop - start, data=self.data[start:stop], scale=scale, bias=bias)

    def absmax(self) -> torch.Tensor:
        """The fp32 absmax of this view's blocks."""
        blocks = torch.arange(self.n * self.k // QBLOCK, device=self.device) + self.block_base
        if self.kind == NF4:
            return self.scale[blocks]
        return self.code2[self.scale[blocks].long()] * self.absmax2[blocks // DQ_GROUP] + self.offset

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The [n, k] weight the storage stands for, each element rounded to `dtype` once."""
        if self.kind == DENSE:
            return self.data.to(dtype)
        if self.kind in (FP8, INT8):
            return (self.data.float() * self.scale[:, None]).to(dtype)
        nibbles = torch.stack([self.data >> 4, self.data & 15], dim=-1).reshape(-1).long()
        values = self.code[nibbles].view(-1, QBLOCK) * self.absmax()[:, None]
        return values.view(self.n, self.k).to(dtype)

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.scale, self.absmax2) if t is not None)
        return self.data.numel() * self.data.element_size() + (0 if self.block_base else extra)


def from_linear(module: torch.nn.Module) -> QWeight:
    """The storage of a loaded linear layer: bitsandbytes 4- or 8-bit, torchao FP8, or plain."""
    weight = module.weight
    bias = None if module.bias is None else module.bias.data
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' CPU backend repacks 4-bit weights on their first forward (absmax dequantized,
        # nibbles reordered); its inverse re-quantizes, so it would not be the same model any more.
        raise ValueError("bitsandbytes repacked this 4-bit weight for its CPU kernel; build the engine before "
                         "the model's first forward on the CPU")
    if state is not None:  # bitsandbytes Params4bit: NF4 or FP4 nibbles
        n, k = state.shape
        data = weight.data.view(-1)
        if state.nested:
            return QWeight(NF4_DQ, n, k, data, state.absmax, state.state2.absmax, float(state.offset), 0,
                           state.code.float(), state.state2.code.float(), bias, state)
        return QWeight(NF4, n, k, data, state.absmax.float(), code=state.code.float(), bias=bias, state=state)
    if getattr(weight, "SCB", None) is not None:  # bitsandbytes Int8Params: int8 rows and their absmax
        return QWeight(INT8, *weight.shape, weight.data, weight.SCB.float() / INT8_MAX, bias=bias)
    qdata = getattr(weight, "qdata", None)
    if qdata is not None and qdata.dtype == torch.float8_e4m3fn:  # torchao Float8Tensor
        n, k = qdata.shape
        scale = weight.scale.float().reshape(-1)
        scale = scale.expand(n).contiguous() if scale.numel() == 1 else scale
        if scale.numel() != n:
            raise ValueError(f"FP8 weight scaled in blocks {tuple(weight.scale.shape)}; the engine reads per-row scales")
        return QWeight(FP8, n, k, qdata, scale, bias=bias)
    if weight.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return QWeight(DENSE, *weight.shape, weight.data, bias=bias)
    raise ValueError(f"{type(module).__name__} with a {type(weight).__name__} weight is not a layout the engine reads")


def quantize(weight: torch.Tensor, kind: int, bias: torch.Tensor | None = None, code: str = "nf4") -> QWeight:
    """Quantize a bf16 [n, k] weight into `kind` storage, as loading would (benchmarks build models this way);
    4-bit kinds with bitsandbytes' `code` table, "nf4" or "fp4"."""
    n, k = weight.shape
    if kind == DENSE:
        return QWeight(DENSE, n, k, weight.to(torch.bfloat16), bias=bias)
    if kind in (FP8, INT8):
        top = FP8_MAX if kind == FP8 else INT8_MAX
        scale = (weight.float().abs().amax(dim=1) / top).clamp(min=1e-12)
        q = weight.float() / scale[:, None]
        q = q.to(torch.float8_e4m3fn) if kind == FP8 else q.round().clamp(-top, top).to(torch.int8)
        return QWeight(kind, n, k, q, scale, bias=bias)
    import bitsandbytes.functional as bnbf

    data, state = bnbf.quantize_4bit(weight.to(torch.bfloat16), blocksize=QBLOCK, quant_type=code,
                                     compress_statistics=kind == NF4_DQ)
    if kind == NF4_DQ:
        return QWeight(NF4_DQ, n, k, data.view(-1), state.absmax, state.state2.absmax, float(state.offset), 0,
                       state.code.float(), state.state2.code.float(), bias, state)
    return QWeight(NF4, n, k, data.view(-1), state.absmax.float(), code=state.code.float(), bias=bias, state=state)
