"""A LoRA adapter applied for inference (`run`/`serve --adapter`) as a planner input: its weights, kept on the
device of the layer each adapts, and what peft's LoRA forward adds to a projection's transients.

peft (0.21) loads an adapter with autocast_adapter_dtype=True: bf16 and fp16 LoRA weights are upcast to
float32 (tuners_utils.cast_adapter_dtype), so every LoRA weight is planned in float32 whatever the file holds.
Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from .allocator import Program, Tensor, segment_size
from .matmul_programs import BF16, FP32

LORA_WEIGHT_BYTES = FP32  # bytes of a LoRA weight element once peft has loaded it (upcast to float32)


@dataclass(frozen=True)
class LoraModule:
    """One adapted projection: lora_A [rank, in_features] and lora_B [out_features, rank]."""

    layer: int  # decoder layer index
    name: str  # the projection's module path, as transformers names it
    in_features: int
    rank: int
    out_features: int

    @property
    def weight_bytes(self) -> int:
        return LORA_WEIGHT_BYTES * self.rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class Adapter:
    """The LoRA modules an adapter puts over the model (finetune.adapter.planned_adapter reads them)."""

    modules: tuple[LoraModule, ...]

    @cached_property
    def _by_layer(self) -> dict[int, tuple[LoraModule, ...]]:
        groups: dict[int, list[LoraModule]] = {}
        for m in self.modules:
            groups.setdefault(m.layer, []).append(m)
        return {layer: tuple(ms) for layer, ms in groups.items()}

    def layer_bytes(self, layer: int) -> int:
        """The LoRA weights of one decoder layer, kept on the device that holds the layer."""
        return sum(m.weight_bytes for m in self._by_layer.get(layer, ()))

    @property
    def weight_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.modules)

    def transient_bytes(self, layers: range, rows: int) -> int:
        """What the LoRA forwards of `layers` add to a device's reserve at most, for a forward of `rows` tokens.

        Conservative, not replayed in the forward programs: the programs name projections by shape, not by
        module, so a LoRA step cannot be placed at the projections the adapter targets. A LoRA forward frees
        everything it allocates before its projection returns, so at most one runs at a time; the bound is
        the most it holds live at once, each tensor counted as a segment of its own (allocator.segment_size),
        which is what the allocator reserves for it where no cached block fits. peft's LoRA forward over an
        unquantized projection (lora.Linear: no clone, the sum in float32, then cast) holds no more at once."""
        shapes = {(m.in_features, m.rank, m.out_features) for layer in layers for m in self._by_layer.get(layer, ())}
        return max((_segments_peak(rows, *shape) for shape in shapes), default=0)


def lora_forward(p: Program, rows: int, in_features: int, rank: int, out_features: int, base: Tensor) -> Tensor:
    """peft's lora.bnb.Linear4bit.forward in eval, one adapter, after its base layer returned `base` (bf16
    [rows, out_features]): the result cloned (the base output freed), x cast to the adapter's float32,
    dropout (the input itself in eval), lora_A, lora_B, times the scaling, cast back to bf16, added to the
    clone (which then goes); the float32 x and the cast output go as the function returns."""
    out = BF16 * rows * out_features
    result = p.alloc("lora_clone", out)
    p.free(base)
    x = p.alloc("lora_x", FP32 * rows * in_features)
    a = p.alloc("lora_a", FP32 * rows * rank)
    b = p.alloc("lora_b", FP32 * rows * out_features)
    p.free(a)
    scaled = p.alloc("lora_scaled", FP32 * rows * out_features)
    p.free(b)
    cast = p.alloc("lora_out", out)
    p.free(scaled)
    total = p.alloc("lora_sum", out)
    p.free(result)
    p.free(x, cast)
    return total


@lru_cache(maxsize=256)
def _segments_peak(rows: int, in_features: int, rank: int, out_features: int) -> int:
    """The most segment-rounded bytes lora_forward holds live at once, its base output included: the forward
    programs give the down projection of a Llama-style layer no output of its own where it writes over its input
    (forward_program.lean_layer), and peft's wrapper around it has the base layer make one."""
    p = Program()
    base = p.alloc("base", BF16 * rows * out_features)
    lora_forward(p, rows, in_features, rank, out_features, base)
    live: dict[Tensor, int] = {}
    peak = 0
    for event in p.events:
        if event[0] == "alloc":
            live[event[1]] = segment_size(event[2])
            peak = max(peak, sum(live.values()))
        elif event[0] == "free":
            live.pop(event[1], None)
    return peak
