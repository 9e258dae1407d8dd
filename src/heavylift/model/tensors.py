"""One tensor of a model's inventory: its name as checkpoints on the hub spell it, its shape, what it does.

Kept apart from architecture.py so that the per-family layouts (families.py) and the derivations from
config.json (architecture.py) both build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from math import prod


class Role(str, Enum):
    """What a tensor does, which decides whether a quantization scheme rewrites it."""

    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    NORM = "norm"
    LINEAR = "linear"  # a dense projection weight: quantized by every scheme below bf16
    BIAS = "bias"
    ROUTER = "router"  # an MoE gate: kept in bf16, as the loaders leave it
    EXPERT = "expert"  # an MoE expert projection: quantized like LINEAR
    # A router that is a subclass of nn.Linear (Llama 4's): torchao's FP8 rewrites it like any linear layer,
    # bitsandbytes (which replaces exact nn.Linear modules) leaves it in bf16.
    LINEAR_ROUTER = "linear_router"


QUANTIZABLE_ROLES = frozenset({Role.LINEAR, Role.EXPERT})
FP8_ONLY_ROLES = frozenset({Role.LINEAR_ROUTER})  # quantized by torchao's FP8 alone

# TensorSpec.keep_fp32: transformers keeps some parameters in float32 whatever the compute dtype
# (a model class's _keep_in_fp32_modules_strict: DeepSeek-V3's router and its score bias), or only when the
# compute dtype is fp16 (_keep_in_fp32_modules: gpt-oss's norms); modeling_utils._get_dtype_plan.
FP32_ALWAYS = "always"
FP32_UNDER_FP16 = "fp16"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: Role
    layer: int | None  # decoder layer index; None for embeddings, final norm and lm_head
    # The runtime parameter this tensor is stacked into when loaded, if any: transformers 5 fuses
    # each layer's MoE experts into `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`, and a
    # quantizer stores the stacked parameter as one tensor (one set of block statistics).
    fused_into: str | None = None
    keep_fp32: str | None = None  # FP32_ALWAYS or FP32_UNDER_FP16: held in float32 (4 bytes an element)
    # The checkpoint tensors that hold this weight when a pre-quantized checkpoint stores it otherwise than
    # (name, shape) in bf16: block FP8's weight and `weight_scale_inv`, MXFP4's `_blocks` and `_scales`.
    stored: tuple[tuple[str, tuple[int, ...]], ...] = ()
    buffer: bool = False  # a buffer the checkpoint stores and the model loads, not a parameter (not in `params`)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def rows(self) -> int:
        """Output rows as quantizers count them: every dimension but the last."""
        return self.numel // self.shape[-1]

    def checkpoint_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The tensors a checkpoint holds for this one, by name and shape."""
        return self.stored or ((self.name, self.shape),)
