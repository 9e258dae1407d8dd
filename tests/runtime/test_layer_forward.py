"""transformers' Llama-style decoder layers with their residual adds in place (runtime/layer_forward.py), on the CPU:
each family's layer gives transformers' output bit for bit in its own input tensor, a tiled 4-bit or LLM.int8 down
projection writes over the normed input, generation is unchanged, a caller's inputs_embeds are left as they were,
collecting hidden states and gradients keep transformers' forward, accelerate's hooks call the new forward, and
only the pattern classes change."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from transformers import AutoModelForCausalLM

import heavylift
import heavylift.runtime.mlp_forward as mlp_forward
from heavylift.planner.forward_program import LEAN_LAYER_FAMILIES, lean_layer
from heavylift.runtime.layer_forward import LAYER_CLASSES, InPlaceResidualLayer, add_residuals_in_place, \
    adds_in_place
from heavylift.runtime.mlp_forward import InPlaceGatedMLP, compute_mlps_in_place

from conftest import save_runnable_checkpoint

LEAN = ("llama", "mistral", "qwen2", "qwen3")
AS_TRANSFORMERS = ("gemma2", "gemma3_text", "phi3", "qwen3_moe")  # other layer code; MoE layers
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    return {f: save_runnable_checkpoint(root / f, f) for f in LEAN + AS_TRANSFORMERS}


@pytest.fixture
def writes_over(monkeypatch):
    """The down projections written over their normed input: rows of each."""
    calls = []
    real = mlp_forward._over

    def spy(down, act, x):
        out = real(down, act, x)
        if out is not None:
            assert out is x
            calls.append(x.numel() // x.shape[-1])
        return out

    monkeypatch.setattr(mlp_forward, "_over", spy)
    return calls


def _transformers_class(layer: torch.nn.Module) -> type:
    return next(c for c in type(layer).__mro__[1:] if c is not InPlaceResidualLayer)


def _rope(model: torch.nn.Module, x: torch.Tensor):
    return model.model.rotary_emb(x, position_ids=torch.arange(x.shape[1])[None])


@pytest.mark.parametrize("family", LEAN)
@pytest.mark.parametrize("quant", ["bf16", "nf4", "int8"])
def test_each_familys_layer_is_transformers_bit_for_bit_in_its_input(checkpoints, writes_over, family, quant):
    session = heavylift.load(str(checkpoints[family]), quant=quant, context=64, engine="transformers")
    layers = list(session.model.model.layers)
    assert len(layers) == 2 and all(isinstance(m, InPlaceResidualLayer) for m in layers)
    assert lean_layer(session.plan.architecture)
    x = torch.randn(2, 7, session.model.config.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.inference_mode():
        for rows in (x, x[:1, :1]):  # a prefill chunk, a decode step
            rope = _rope(session.model, rows)
            for layer in layers:
                theirs = _transformers_class(layer).forward(layer, rows.clone(), position_embeddings=rope)
                given = rows.clone()
                ours = layer(given, position_embeddings=rope)
                assert ours is given and torch.equal(ours, theirs)
    # 4-bit down projections take the tiles beyond 4 rows; LLM.int8 ones at any rows.
    assert writes_over == {"bf16": [], "nf4": [14, 14], "int8": [14, 14, 1, 1]}[quant]


@pytest.mark.parametrize("quant", ["bf16", "nf4-dq", "int8"])
def test_generation_is_the_same_with_transformers_layers(checkpoints, quant):
    session = heavylift.load(str(checkpoints["llama"]), quant=quant, context=64, engine="transformers")
    ours = session.generate(PROMPT, max_new_tokens=6, temperature=0)
    for layer in session.model.model.layers:
        layer.__class__ = _transformers_class(layer)
    theirs = session.generate(PROMPT, max_new_tokens=6, temperature=0)
    assert ours.token_ids == theirs.token_ids


def test_collecting_hidden_states_keeps_transformers_forward(checkpoints, writes_over):
    # transformers keeps each layer's output as a hidden state, which the next layer's in-place adds would change.
    folder = checkpoints["llama"]
    session = heavylift.load(str(folder), quant="int8", context=64, engine="transformers")
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.inference_mode():
        ours = session.model(input_ids=ids, output_hidden_states=True).hidden_states
        assert writes_over == []
        for layer in session.model.model.layers:
            layer.__class__ = _transformers_class(layer)
        theirs = session.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_callers_inputs_embeds_are_left_as_they_were(checkpoints):
    # The first layer's input is the caller's tensor; it adds into a copy, with transformers' values.
    session = heavylift.load(str(checkpoints["llama"]), quant="bf16", context=64, engine="transformers")
    embeds = session.model.get_input_embeddings()(torch.tensor([[3, 5, 7, 11, 13]]))
    kept = embeds.clone()
    with torch.inference_mode():
        ours = session.model(inputs_embeds=embeds).logits
        assert torch.equal(embeds, kept)
        for layer in session.model.model.layers:
            layer.__class__ = _transformers_class(layer)
        theirs = session.model(inputs_embeds=embeds).logits
    assert torch.equal(ours, theirs)


def test_gradients_keep_transformers_forward(checkpoints):
    session = heavylift.load(str(checkpoints["llama"]), quant="bf16", context=64, engine="transformers")
    layer = session.model.model.layers[0]
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_()
    out = layer(x, position_embeddings=_rope(session.model, x))
    out.float().sum().backward()  # in-place adds into x would have broken autograd
    assert out is not x and x.grad is not None


def test_accelerates_hook_calls_the_new_forward(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.bfloat16)
    compute_mlps_in_place(model)
    layer = model.model.layers[0]
    add_hook_to_module(layer, ModelHook())  # as dispatch_model does: the forward wrapped, the old one kept
    add_residuals_in_place(model)
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.inference_mode():
        assert layer(x, position_embeddings=_rope(model, x)) is x


@pytest.mark.parametrize("family", AS_TRANSFORMERS)
def test_other_families_keep_transformers_layers(checkpoints, family):
    session = heavylift.load(str(checkpoints[family]), quant="bf16", context=64, engine="transformers")
    assert not any(isinstance(m, InPlaceResidualLayer) for m in session.model.modules())
    assert not lean_layer(session.plan.architecture)


def test_only_the_pattern_classes_with_in_place_mlps_change(checkpoints):
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaDecoderLayer

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    layer = LlamaDecoderLayer(config, 0)
    assert not adds_in_place(layer)  # its MLP is transformers'
    compute_mlps_in_place(layer)
    assert isinstance(layer.mlp, InPlaceGatedMLP) and adds_in_place(layer)

    class Subclass(LlamaDecoderLayer):  # another class, though its forward is the same
        pass

    def other(self, hidden_states, **kwargs):
        return hidden_states

    # A class of the listed name whose forward differs: the code is compared, not only the name.
    Lookalike = type("LlamaDecoderLayer", (LlamaDecoderLayer,), {"forward": other,
                                                                  "__module__": LlamaDecoderLayer.__module__})
    for cls in (Subclass, Lookalike):
        module = cls(config, 0)
        compute_mlps_in_place(module)
        assert not adds_in_place(module)


def test_the_planner_and_the_runtime_name_the_same_families():
    assert set(LAYER_CLASSES) == set(LEAN_LAYER_FAMILIES) == set(LEAN)
