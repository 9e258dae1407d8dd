"""torchao FP8 quantization on load, a block of rows at a time.

torchao's Float8Tensor.from_hp scales a weight per row through three float32 copies of the whole weight;
for Llama-3.1-405B's 53248 x 16384 MLP weights that is 10 GB of temporaries for a 0.9 GB result, reserved by
the allocator long after (the plan carried ~15 GB of it per GPU on 8xH100). Rows scale independently, so
heavylift hands torchao's own transform LOAD_ROW_CHUNK_ELEMENTS weights at a time and assembles the pieces:
the same bits, scales and tensor attributes as one whole-tensor call (tests/runtime/test_run.py holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor
from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER, register_quantize_module_handler

from heavylift.defaults import FP8_ROW_MULTIPLE, LOAD_ROW_CHUNK_ELEMENTS


@dataclass
class RowChunkedFloat8WeightConfig(AOBaseConfig):
    """`base` (torchao's Float8DynamicActivationFloat8WeightConfig per row, or Float8WeightOnlyConfig)
    applied LOAD_ROW_CHUNK_ELEMENTS weights at a time. Its name keeps transformers' size match ("8weight")."""

    base: AOBaseConfig


@register_quantize_module_handler(RowChunkedFloat8WeightConfig)
def _transform(module: torch.nn.Module, config: RowChunkedFloat8WeightConfig, *,
               parameter_name: str = "weight") -> torch.nn.Module:
    transform = _QUANTIZE_CONFIG_HANDLER[type(config.base)]
    weight = getattr(module, parameter_name)
    rows, k = weight.shape
    step = max(1, LOAD_ROW_CHUNK_ELEMENTS // k // FP8_ROW_MULTIPLE) * FP8_ROW_MULTIPLE
    if step >= rows or rows % FP8_ROW_MULTIPLE:
        return transform(module, config.base, parameter_name=parameter_name)
    qdata = scale = None
    for start in range(0, rows, step):
        piece = torch.nn.Linear(k, min(step, rows - start), bias=False, device="meta")
        piece.weight = torch.nn.Parameter(weight.detach()[start:start + step], requires_grad=False)
        part = transform(piece, config.base).weight
        if not isinstance(part, Float8Tensor):  # a shape torchao keeps in bf16: as it would the whole weight
            return transform(module, config.base, parameter_name=parameter_name)
        if qdata is None:  # the whole weight's storage and attributes, after the first piece's
            qdata = torch.empty(rows, k, dtype=part.qdata.dtype, device=weight.device)
            scale = torch.empty(rows, *part.scale.shape[1:], dtype=part.scale.dtype, device=weight.device)
            attributes = {name: getattr(part, name) for name in Float8Tensor.optional_tensor_attribute_names}
        qdata[start:start + step].copy_(part.qdata)
        scale[start:start + step].copy_(part.scale)
        del piece, part  # the piece's storage goes before the next is made
    whole = Float8Tensor(qdata, scale, **attributes)
    setattr(module, parameter_name, torch.nn.Parameter(whole, requires_grad=False))
    return module
