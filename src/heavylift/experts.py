"""Quantize the fused MoE expert tensors that transformers 5 leaves in bf16 under bitsandbytes.

transformers 5 stores each layer's experts as two 3-D parameters (`gate_up_proj`, `down_proj`), which
`BitsAndBytesConfig` and torchao skip because they are not `nn.Linear`. 4-bit schemes use
bitsandbytes' own parametrization (the same packed NF4/FP4 storage as Linear4bit); 8-bit schemes use
a row-wise parametrization written here (bitsandbytes has no 8-bit one), one float32 scale per
output row of each expert, as LLM.int8 and torchao's per-row FP8 store a Linear.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


class RowwiseDequant(nn.Module):
    """Turns stored 8-bit expert weights back into the compute dtype, row by row."""

    def __init__(self, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("SCB", scale)
        self.dtype = dtype

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        rows = self.SCB.numel()
        flat = q.reshape(rows, -1).to(torch.float32) * self.SCB[:, None]
        return flat.to(self.dtype).reshape(q.shape)


def _quantize_rows(w: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    flat = w.detach().reshape(-1, w.shape[-1]).to(torch.float32)
    top = INT8_MAX if storage == torch.int8 else FP8_E4M3_MAX
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / top
    q = flat / scale[:, None]
    q = q.round().clamp(-INT8_MAX, INT8_MAX) if storage == torch.int8 else q
    return q.to(storage).reshape(w.shape), scale


def _cache_during_forward(module: nn.Module) -> None:
    """Dequantize once per forward, not once per access (as bitsandbytes' 4-bit parametrization does)."""
    def enter(_m, _args):
        parametrize._cache_enabled += 1

    def leave(_m, _args, _out):
        parametrize._cache_enabled = max(0, parametrize._cache_enabled - 1)
        if not parametrize._cache_enabled:
            parametrize._cache = {}

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def quantize_experts(model: nn.Module, quant: str) -> int:
    """Rewrite every fused expert parameter for `quant`; return how many were quantized."""
    done = 0
    for module in model.modules():
        names = [n for n in EXPERT_PARAMS if isinstance(getattr(module, n, None), nn.Parameter)
                 and getattr(module, n).dim() == 3]
        if not names:
            continue
        for name in names:
            if quant in ("nf4", "nf4-dq", "fp4"):
                from bitsandbytes.nn.parametrize import replace_parameter_4bit

                replace_parameter_4bit(module, name, compress_statistics=quant == "nf4-dq",
                                       quant_type="fp4" if quant == "fp4" else "nf4", blocksize=64)
            elif quant in ("int8", "fp8"):
                w = getattr(module, name)
                q, scale = _quantize_rows(w, torch.int8 if quant == "int8" else torch.float8_e4m3fn)
                setattr(module, name, nn.Parameter(q, requires_grad=False))
                parametrize.register_parametrization(module, name, RowwiseDequant(scale, w.dtype), unsafe=True)
            else:
                continue
            done += 1
        if quant in ("int8", "fp8"):
            _cache_during_forward(module)
    return done


def stored_expert_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The storage dtypes of all expert parameters (for tests and the loader's own check)."""
    found = set()
    for module in model.modules():
        store = getattr(module, "parametrizations", None)
        for name in EXPERT_PARAMS:
            if store is not None and name in store:
                found.add(store[name].original.dtype)
            elif isinstance(getattr(module, name, None), nn.Parameter):
                found.add(getattr(module, name).dtype)
    return found
