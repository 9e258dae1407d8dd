"""transformers' gated MLPs at inference: the activation applied in place on the gate's output and the up
projection multiplied into it, as the engine's prefill computes them, so that one [tokens, intermediate] tensor
is alive where transformers' forward holds three.

Why: LlamaMLP and its kin (MLP_CLASSES) compute down_proj(act_fn(gate_proj(x)) * up_proj(x)), which holds
act(gate(x)), up(x) and their product at once: 3 x 0.22 GB for a 2048-token chunk of Llama 3.1 405B, whose
intermediate is 53,248 wide, and the peak of its forward beyond weights and KV cache. `compute_mlps_in_place`
gives each such MLP of a loaded model a forward with two fewer of those tensors at the peak: the activation in
place (F.silu(inplace=True), aten.gelu_ with the tanh approximation: the kernels of the out-of-place calls,
writing where they read), the up projection multiplied into the gate's output (a TiledLinear4bit beyond
bitsandbytes' fused kernel a weight tile at a time through ops.dense_linear_mul, any other layer its whole
product), then down. The same multiplications in the same order: transformers' output bit for bit. The planner
counts the same (planner/forward_program.py _mlp, IN_PLACE_MLP_FAMILIES and IN_PLACE_ACTIVATIONS).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from heavylift.engine.ops import dense_linear_mul
from heavylift.planner.matmul_programs import transformers_tile_bytes
from .bnb_forward import TiledLinear4bit, TiledLinear8bitLt, records_gradients

# transformers 5.24's dense MLP classes whose forward is exactly _transformers_forward, by the family that builds
# them (planner/forward_program.IN_PLACE_MLP_FAMILIES). Qwen3MoeMLP and DeepseekV3MLP share that forward but are
# left as they are: the planner counts those families' MLPs as transformers runs them.
MLP_CLASSES = {
    "llama": "transformers.models.llama.modeling_llama.LlamaMLP",
    "mistral": "transformers.models.mistral.modeling_mistral.MistralMLP",
    "qwen2": "transformers.models.qwen2.modeling_qwen2.Qwen2MLP",
    "qwen3": "transformers.models.qwen3.modeling_qwen3.Qwen3MLP",
    "gemma2": "transformers.models.gemma2.modeling_gemma2.Gemma2MLP",
    "gemma3_text": "transformers.models.gemma3.modeling_gemma3.Gemma3MLP",
}


def _transformers_forward(self, x):  # the forward of MLP_CLASSES, as their modeling files write it
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def same_code(forward, pattern) -> bool:
    """Whether two functions compile to the same instructions over the same names and constants."""
    a, b = forward.__code__, pattern.__code__
    return (a.co_code, a.co_names, a.co_consts, a.co_varnames) == (b.co_code, b.co_names, b.co_consts, b.co_varnames)


def _silu_(t: torch.Tensor) -> None:
    F.silu(t, inplace=True)


def _gelu_tanh_(t: torch.Tensor) -> None:
    torch.ops.aten.gelu_(t, approximate="tanh")


def in_place_activation(act: torch.nn.Module) -> Callable[[torch.Tensor], None] | None:
    """The in-place form of an ACT2FN activation where one computes its values exactly: SiLU (transformers'
    SiLUActivation, torch's nn.SiLU) and GELU's tanh approximation through F.gelu (GELUTanh); None for any other,
    and for one whose forward a kernel replaced."""
    from transformers.activations import GELUTanh, SiLUActivation

    if "forward" in vars(act):
        return None
    if type(act) in (SiLUActivation, torch.nn.SiLU):
        return _silu_
    gelu = getattr(act, "act", None)
    if type(act) is GELUTanh and isinstance(gelu, functools.partial) and gelu.func is F.gelu \
            and not gelu.args and gelu.keywords == {"approximate": "tanh"}:
        return _gelu_tanh_
    return None


class InPlaceGatedMLP:
    """Put before one of MLP_CLASSES: down(act(gate(x)) * up(x)) in the gate's output, without gradients; with
    them, the class's own forward (a training step's backward needs its saved tensors)."""

    in_place_act: Callable[[torch.Tensor], None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if records_gradients(x, self):
            return super().forward(x)
        return self.down_proj(self._gated(x))

    def forward_over(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) for a caller that has no further use of x (layer_forward.py's normed input): the down
        projection's output written over x where down_proj writes into a given tensor (_over), else its own."""
        if records_gradients(x, self):
            return super().forward(x)
        act = self._gated(x)
        over = _over(self.down_proj, act, x)
        return self.down_proj(act) if over is None else over

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        """act(gate(x)) * up(x), in the gate's output."""
        act = self.gate_proj(x)
        self.in_place_act(act)
        _multiply_into(self.up_proj, x, act)
        return act


def plain(module: torch.nn.Module) -> bool:
    """Whether a module is called with no hooks around its forward."""
    return not (module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _over(down: torch.nn.Module, act: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """down(act) written into x (contiguous, act's rows times down's out_features) by a tiled bitsandbytes layer
    with no hooks whose tiles act takes (TiledLinear4bit, TiledLinear8bitLt `into`); else None."""
    if isinstance(down, (TiledLinear4bit, TiledLinear8bitLt)) and plain(down) and x.is_contiguous() \
            and x.dtype == act.dtype and x.shape[:-1] == act.shape[:-1] and x.shape[-1] == down.out_features:
        return down.into(act, x)
    return None


def _multiply_into(up: torch.nn.Module, x: torch.Tensor, into: torch.Tensor) -> None:
    """into *= up(x): a TiledLinear4bit that tiles x (and has no hooks around its call) a weight tile at a time,
    each tile's product multiplied into its columns; any other layer's whole product."""
    if isinstance(up, TiledLinear4bit) and plain(up) and up._tiles(x):
        dense_linear_mul(x, up.stored, into.view(-1, into.shape[-1]), transformers_tile_bytes())
    else:
        into.mul_(up(x))


@functools.cache
def _in_place_class(cls: type) -> type:
    return type(f"InPlace{cls.__name__}", (InPlaceGatedMLP, cls), {})


def computes_in_place(module: torch.nn.Module) -> Callable[[torch.Tensor], None] | None:
    """The in-place activation `module` would compute with: one of MLP_CLASSES whose forward is still
    transformers' and whose activation has an exact in-place form; else None."""
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" not in MLP_CLASSES.values() or "forward" in vars(module):
        return None
    if not same_code(cls.forward, _transformers_forward):
        return None
    return in_place_activation(module.act_fn)


def compute_mlps_in_place(model: torch.nn.Module) -> None:
    """Give every MLP of a loaded `model` that computes_in_place the in-place forward, in place, before its
    first forward; the modules keep their parameters, state dict and class ancestry."""
    for module in model.modules():
        act = computes_in_place(module)
        if act is not None:
            module.in_place_act = act
            module.__class__ = _in_place_class(type(module))
