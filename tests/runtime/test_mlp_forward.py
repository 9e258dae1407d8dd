"""transformers' gated MLPs computed in place at inference (runtime/mlp_forward.py), on the CPU in bf16: each family's
MLP gives transformers' output bit for bit, its greedy generation through `heavylift run` is transformers' own,
bitsandbytes 4-bit up projections multiply into the gate's output a weight tile at a time, gradients keep
transformers' forward, and only the classes whose forward is the pattern (with an exact in-place activation) change."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2CLS, ACT2FN

import heavylift
import heavylift.runtime.mlp_forward as mlp_forward
from heavylift.api import prepare
from heavylift.planner.forward_program import IN_PLACE_ACTIVATIONS, IN_PLACE_MLP_FAMILIES, in_place_mlp
from heavylift.runtime.mlp_forward import MLP_CLASSES, InPlaceGatedMLP, computes_in_place, in_place_activation
from heavylift.runtime.session import encode

from conftest import run_cli, save_runnable_checkpoint

IN_PLACE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
AS_TRANSFORMERS = ("phi3", "qwen3_moe", "llama4_text", "deepseek_v3")  # fused gate_up; MoE models' dense MLPs
PROMPT = "the quick brown fox"
TILE_ROWS = 48  # the tiny models' 128-row gate and up weights in tiles of 48, 48 and 32 rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlp")
    return {f: save_runnable_checkpoint(root / f, f) for f in IN_PLACE + AS_TRANSFORMERS}


@pytest.fixture
def tiled_mul_calls(monkeypatch):
    """The up projections multiplied in tiles: rows of x per call."""
    calls = []
    real = mlp_forward.dense_linear_mul

    def spy(x, w, into, tile_bytes=None):
        calls.append(x.numel() // x.shape[-1])
        return real(x, w, into, tile_bytes)

    monkeypatch.setattr(mlp_forward, "dense_linear_mul", spy)
    return calls


def _mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith(".mlp")]


def _transformers_class(module: torch.nn.Module) -> type:
    """The transformers class an in-place MLP was made from."""
    return next(c for c in type(module).__mro__[1:] if c is not InPlaceGatedMLP)


@pytest.mark.parametrize("family", IN_PLACE)
def test_each_familys_mlp_is_transformers_bit_for_bit(checkpoints, family):
    session = heavylift.load(str(checkpoints[family]), quant="bf16", context=64, engine="transformers")
    mlps = _mlps(session.model)
    assert len(mlps) == 2 and all(isinstance(m, InPlaceGatedMLP) for m in mlps)
    assert in_place_mlp(session.plan.architecture)
    x = torch.randn(2, 7, session.model.config.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    kept = x.clone()
    with torch.inference_mode():
        for rows in (x, x[:1, :1]):  # a prefill chunk, a decode step
            for m in mlps:
                ours, theirs = m(rows), _transformers_class(m).forward(m, rows)
                assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    assert torch.equal(x, kept)  # the input is read, never written


@pytest.mark.parametrize("family", IN_PLACE)
def test_cli_greedy_generation_is_transformers_own(checkpoints, capsys, family):
    folder = checkpoints[family]
    code, out, _ = run_cli(capsys, "run", str(folder), "--prompt", PROMPT, "--quant", "bf16", "--engine",
                           "transformers", "--max-new-tokens", "8", "--temperature", "0", "--context", "128", "--json")
    assert code == 0
    result = json.loads(out)

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)  # transformers' own MLPs
    assert not any(isinstance(m, InPlaceGatedMLP) for m in reference.modules())
    tokenizer = heavylift.load(str(folder), quant="bf16", context=128, engine="transformers").tokenizer
    ids = encode(tokenizer, PROMPT)
    with torch.inference_mode():
        out_ids = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in out_ids:  # heavylift stops at the end-of-sequence token, including it
        out_ids = out_ids[:out_ids.index(tokenizer.eos_token_id) + 1]
    assert result["generated_tokens"] == len(out_ids)
    assert result["text"] == tokenizer.decode(out_ids, skip_special_tokens=True)


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq"])
def test_4bit_up_projections_multiply_in_tiles_as_transformers_mlp_computes(checkpoints, monkeypatch,
                                                                            tiled_mul_calls, quant):
    monkeypatch.setattr("heavylift.planner.matmul_programs.TRANSFORMERS_TILE_BYTES", TILE_ROWS * 64 * 2)
    session = heavylift.load(str(checkpoints["llama"]), quant=quant, context=64, engine="transformers")
    mlps = _mlps(session.model)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.inference_mode():
        for rows in (x, x[:1, :1]):  # 14 rows through the tiles; 1 row through bitsandbytes' own forward
            for m in mlps:
                assert torch.equal(m(rows), _transformers_class(m).forward(m, rows))
    assert tiled_mul_calls == [14, 14]

    tiled_mul_calls.clear()
    ours = session.generate(PROMPT, max_new_tokens=6, temperature=0)
    assert tiled_mul_calls == [ours.prompt_tokens] * 2  # the prefill's two MLPs
    for m in mlps:
        m.__class__ = _transformers_class(m)
    theirs = session.generate(PROMPT, max_new_tokens=6, temperature=0)
    assert ours.token_ids == theirs.token_ids


def test_gradients_keep_transformers_forward(checkpoints, tiled_mul_calls):
    session = heavylift.load(str(checkpoints["llama"]), quant="nf4", context=64, engine="transformers")
    mlp = _mlps(session.model)[0]
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_()
    ours = mlp(x)
    ours.float().sum().backward()  # in-place steps would have broken autograd's saved tensors
    assert tiled_mul_calls == [] and x.grad is not None
    assert torch.equal(ours, _transformers_class(mlp).forward(mlp, x))


@pytest.mark.parametrize("family", AS_TRANSFORMERS)
def test_other_families_keep_transformers_mlps(checkpoints, family):
    session = heavylift.load(str(checkpoints[family]), quant="bf16", context=64, engine="transformers")
    assert not any(isinstance(m, InPlaceGatedMLP) for m in session.model.modules())
    assert not in_place_mlp(session.plan.architecture)


def test_an_activation_without_an_exact_in_place_form_keeps_transformers_mlp(tmp_path):
    folder = save_runnable_checkpoint(tmp_path / "llama", "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    session = heavylift.load(str(folder), quant="bf16", context=64, engine="transformers")
    assert session.plan.architecture.mlp_activation == "gelu" and not in_place_mlp(session.plan.architecture)
    assert not any(isinstance(m, InPlaceGatedMLP) for m in session.model.modules())


def test_only_the_pattern_classes_change():
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    config = LlamaConfig(hidden_size=64, intermediate_size=128)
    assert computes_in_place(LlamaMLP(config)) is not None

    class Subclass(LlamaMLP):  # another class, though its forward is the same
        pass

    def other(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    # A class of the listed name whose forward differs: the code is compared, not only the name.
    Lookalike = type("LlamaMLP", (LlamaMLP,), {"forward": other, "__module__": LlamaMLP.__module__})
    mine = LlamaMLP(config)
    mine.forward = lambda x: x  # an instance whose forward was replaced
    for module in (Subclass(config), Lookalike(config), mine):
        assert computes_in_place(module) is None


def test_the_planner_and_the_runtime_name_the_same_families_and_activations():
    assert set(MLP_CLASSES) == set(IN_PLACE_MLP_FAMILIES) == set(IN_PLACE)
    exact = {name for name in ACT2CLS if in_place_activation(ACT2FN[name]) is not None}
    assert exact == set(IN_PLACE_ACTIVATIONS) == {"silu", "swish", "gelu_pytorch_tanh"}


@pytest.mark.parametrize("name", sorted(IN_PLACE_ACTIVATIONS))
def test_in_place_activations_are_the_out_of_place_values(name):
    t = torch.randn(3, 1000, generator=torch.Generator().manual_seed(4)).bfloat16() * 4
    act, done = ACT2FN[name], t.clone()
    in_place_activation(act)(done)
    assert torch.equal(done, act(t))


def test_the_engine_the_load_alone_and_training_keep_transformers_mlps(checkpoints):
    fast = heavylift.load(str(checkpoints["llama"]), quant="bf16", context=64, engine="fast")
    assert fast.engine is not None
    weights = prepare(str(checkpoints["llama"]), quant="bf16", context=64, engine="transformers").load_weights()
    for model in (fast.model, weights.model):  # finetune and merge load through load_weights
        assert not any(isinstance(m, InPlaceGatedMLP) for m in model.modules())
