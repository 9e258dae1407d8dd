"""transformers' Llama-style decoder layers at inference with their residual adds in place, so that a layer holds
one hidden state beside its normed input where transformers' forward holds three.

Why: LlamaDecoderLayer and its kin (LAYER_CLASSES) compute `residual + attention` and `residual + mlp` into new
tensors while the caller still holds the layer's input, and the MLP's output beside its normed input: at the MLP's
down projection, the input, the residual, the normed input and the output, 4 x 67 MB for a 2048-token chunk of
Llama 3.1 405B, beside the MLP's 0.22 GB intermediate, at the peak of its forward beyond weights and KV cache.
`add_residuals_in_place` gives each such layer of a loaded model, whose MLP computes in place (mlp_forward.py), a
forward that adds the attention's output into the layer's input and the MLP's output into that, and has the MLP
write its down projection over its normed input where the projection is a tiled bitsandbytes layer
(InPlaceGatedMLP.forward_over): two fewer of those tensors at the peak. The layer's output is its input tensor,
updated: transformers' decoder loop passes each layer's output to the next and keeps none of them, and bf16
addition is commutative, so the values are transformers' bit for bit. Where a caller may keep a layer's input
or output (transformers collecting hidden states, any other forward hook on the layer) or gradients are recorded,
transformers' forward runs. A caller's own `inputs_embeds` are copied before the first layer adds into them.
The planner counts the same (planner/forward_program.py LEAN_LAYER_FAMILIES).
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from .bnb_forward import records_gradients
from .mlp_forward import InPlaceGatedMLP, plain, same_code

# transformers 5.24's decoder layer classes whose forward is exactly _transformers_forward, by family
# (planner/forward_program.LEAN_LAYER_FAMILIES).
LAYER_CLASSES = {
    "llama": "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "mistral": "transformers.models.mistral.modeling_mistral.MistralDecoderLayer",
    "qwen2": "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
    "qwen3": "transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer",
}
# transformers' output-capturing hook (utils/output_capturing.py), which every decoder layer carries and which
# records a layer's input and output only while a forward collects hidden states.
_CAPTURING_HOOK = "install_output_capuring_hook.<locals>.output_capturing_hook"


def _transformers_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                          use_cache=False, position_embeddings=None, **kwargs):
    # The forward of LAYER_CLASSES, as their modeling files write it (under their deprecate_kwarg wrapper).
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    # Self Attention
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + hidden_states

    # Fully Connected
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states


class InPlaceResidualLayer:
    """Put before one of LAYER_CLASSES whose mlp is an InPlaceGatedMLP: the residual adds in the layer's input."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        if not self._in_place(hidden_states):
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        residual.add_(hidden_states)
        del hidden_states
        hidden_states = self.post_attention_layernorm(residual)
        hidden_states = self.mlp.forward_over(hidden_states)
        return residual.add_(hidden_states)

    def _in_place(self, x: torch.Tensor) -> bool:
        """Whether no caller can see x change: no gradients recorded, no hook on the layer but transformers'
        output capturing, which collects nothing now, and the MLP called with no hooks."""
        if records_gradients(x, self) or self._forward_pre_hooks or not isinstance(self.mlp, InPlaceGatedMLP):
            return False
        if any(getattr(hook, "__qualname__", "") != _CAPTURING_HOOK for hook in self._forward_hooks.values()):
            return False
        return plain(self.mlp) and not _collecting_hidden_states()


def _collecting_hidden_states() -> bool:
    """Whether this forward collects the layers' hidden states (output_hidden_states), which would keep them."""
    from transformers.utils.output_capturing import _active_collector

    collected = _active_collector.get()
    return collected is not None and "hidden_states" in collected


@functools.cache
def _in_place_class(cls: type) -> type:
    return type(f"InPlace{cls.__name__}", (InPlaceResidualLayer, cls), {})


def adds_in_place(module: torch.nn.Module) -> bool:
    """Whether `module` is one of LAYER_CLASSES whose forward is still transformers' and whose MLP computes in
    place."""
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" not in LAYER_CLASSES.values():
        return False
    forward = inspect.unwrap(cls.forward)  # under transformers' deprecate_kwarg wrappers
    return same_code(forward, _transformers_forward) and isinstance(getattr(module, "mlp", None), InPlaceGatedMLP)


def add_residuals_in_place(model: torch.nn.Module) -> None:
    """Give every decoder layer of a loaded `model` that adds_in_place the in-place forward, in place, after
    compute_mlps_in_place and before its first forward; the modules keep their parameters, state dict and class
    ancestry. A layer dispatched by accelerate (its forward wrapped by a hook) has the hook call the new one."""
    changed = set()
    for module in model.modules():
        if not adds_in_place(module):
            continue
        old = type(module)
        module.__class__ = _in_place_class(old)
        wrapped = vars(module).get("_old_forward")
        if wrapped is not None and getattr(wrapped, "__func__", None) is old.forward:
            module._old_forward = types.MethodType(module.__class__.forward, module)
        changed.add(module)
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and any(layer in changed for layer in layers):
            module.register_forward_pre_hook(_own_inputs_embeds, with_kwargs=True)


def _own_inputs_embeds(module: torch.nn.Module, args: tuple, kwargs: dict):
    """A forward pre-hook on the decoder stack (LlamaModel and its kin): the first layer's input is the
    `inputs_embeds` a caller passed, which the in-place adds would change under the caller; a copy goes
    instead. Embeddings the model computes from input ids are its own, and are not copied."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None or (torch.is_grad_enabled() and embeds.requires_grad):  # transformers' layers run then
        return None
    return args, {**kwargs, "inputs_embeds": embeds.clone()}
