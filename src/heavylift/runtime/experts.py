"""Quantize the fused MoE expert tensors that transformers 5 leaves in bf16 under bitsandbytes.

transformers 5 stores each layer's experts as two 3-D parameters (`gate_up_proj`, `down_proj`), which
`BitsAndBytesConfig` and torchao skip because they are not `nn.Linear`. 4-bit schemes use
bitsandbytes' own parametrization (the same packed NF4/FP4 storage as Linear4bit); 8-bit schemes use
a row-wise parametrization written here (bitsandbytes has no 8-bit one), one float32 scale per
output row of each expert, as LLM.int8 and torchao's per-row FP8 store a Linear.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from heavylift.defaults import EXPERT_ROW_CHUNK_ELEMENTS
from heavylift.schemes import BNB_4BIT_BLOCKSIZE, SCHEMES

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
    """8-bit rows and their float32 scales, EXPERT_ROW_CHUNK_ELEMENTS at a time: a float32 copy of a whole
    fused tensor (Mixtral's gate_up_proj: 3.8 GB) would be the largest allocation of the load."""
    flat = w.detach().reshape(-1, w.shape[-1])
    top = INT8_MAX if storage == torch.int8 else FP8_E4M3_MAX
    q = torch.empty(flat.shape, dtype=storage, device=w.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, EXPERT_ROW_CHUNK_ELEMENTS // flat.shape[1])
    for start in range(0, flat.shape[0], step):
        rows = flat[start:start + step].to(torch.float32)
        s = rows.abs().amax(dim=1).clamp(min=1e-12) / top
        rows /= s[:, None]
        if storage == torch.int8:
            rows.round_().clamp_(-INT8_MAX, INT8_MAX)
        q[start:start + step] = rows.to(storage)
        scale[start:start + step] = s
    return q.reshape(w.shape), scale


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


def _expert_names(module: nn.Module) -> list[str]:
    """The fused expert parameters of `module` still stored as they were loaded (3-D, not yet quantized)."""
    return [n for n in EXPERT_PARAMS if isinstance(module.__dict__.get("_parameters", {}).get(n), nn.Parameter)
            and module._parameters[n].dim() == 3 and module._parameters[n].element_size() > 1]


def _quantize_one(module: nn.Module, name: str, quant: str) -> bool:
    """Rewrite one fused expert parameter for `quant`; False where the scheme keeps it as it is."""
    scheme = SCHEMES[quant]
    if scheme.four_bit:
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        replace_parameter_4bit(module, name, compress_statistics=scheme.double_quant, quant_type=scheme.code,
                               blocksize=BNB_4BIT_BLOCKSIZE)
    elif scheme.rowwise8:
        w = module._parameters[name]
        dtype = w.dtype
        q, scale = _quantize_rows(w, torch.int8 if scheme.code == "int8" else torch.float8_e4m3fn)
        del w
        setattr(module, name, nn.Parameter(q, requires_grad=False))
        parametrize.register_parametrization(module, name, RowwiseDequant(scale, dtype), unsafe=True)
        if not getattr(module, "_heavylift_cached", False):
            _cache_during_forward(module)
            module._heavylift_cached = True
    else:
        return False
    # Loaded, not to be initialized: transformers' _initialize_missing_keys would otherwise take the new storage
    # for missing weights and run _init_weights on the experts, dequantizing each fused tensor to overwrite a copy.
    for sub in module.modules():
        sub._is_hf_initialized = True
        for t in list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False)):
            t._is_hf_initialized = True
    return True


def quantize_experts(model: nn.Module, quant: str) -> int:
    """Rewrite every fused expert parameter still unquantized for `quant`; return how many were quantized."""
    done = 0
    for module in model.modules():
        for name in _expert_names(module):
            done += _quantize_one(module, name, quant)
    return done


@contextmanager
def quantized_on_arrival(quant: str):
    """While transformers loads a checkpoint, quantize each fused expert tensor as soon as it is in place.

    from_pretrained sets parameters one at a time (setattr, so torch's parameter-registration hooks see
    each); a fused expert tensor is rewritten when the next parameter arrives, once it is in its module.
    Without this every layer's experts sat on the GPU in bf16 until loading ended - a real Mixtral 8x7B
    needs 90 GB of them - however small the plan's quantized model. quantize_experts takes the last one.
    """
    pending: list[tuple[nn.Module, str]] = []
    busy = False

    def arrived(module: nn.Module, name: str, param):
        nonlocal busy
        if busy:  # the parametrizations' own registrations
            return None
        busy = True
        try:
            while pending:
                m, n = pending.pop()
                if n in _expert_names(m):
                    _quantize_one(m, n, quant)
        finally:
            busy = False
        if name in EXPERT_PARAMS and param is not None and param.dim() == 3 and param.element_size() > 1 \
                and param.device.type != "meta":
            pending.append((module, name))
        return None

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(arrived)
    try:
        yield
    finally:
        handle.remove()


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
