"""transformers' attention with the cache's key and value heads read in place (runtime/attention_forward.py), on the
CPU in bf16 with 8-token prefill chunks: each family of LEAN_ATTENTION_FAMILIES attends without repeat_kv on every
prefill chunk of its full-attention layers, its logits are transformers' sdpa path's up to SDPA's rounding, its
greedy generation through `heavylift run` is the one transformers' sdpa path gives, and other families, the
engine and the load alone keep transformers' attention."""

from __future__ import annotations

import json

import pytest
import torch

import heavylift
import heavylift.runtime.attention_forward as attention_forward
import heavylift.runtime.session as session_module
import transformers.integrations.sdpa_attention as sdpa_attention
from heavylift.planner.forward_program import LEAN_ATTENTION_FAMILIES
from heavylift.runtime.attention_forward import HEAVYLIFT_SDPA, FilledCausal, lean_mask

from conftest import run_cli, save_runnable_checkpoint

FAMILIES = {  # each family's tiny checkpoint; the windowed ones keep transformers' path on their sliding layers
    "llama": {}, "mistral": {}, "mixtral": {}, "qwen2": {}, "qwen3": {}, "qwen3_moe": {}, "phi3": {},
    "gemma3_text": {},
}
AS_TRANSFORMERS = ("gemma2", "gpt_oss", "deepseek_v3", "llama4_text")
CHUNK, PROMPT_TOKENS, CONTEXT = 8, 29, 64  # chunks of 8, 8, 8 and 5 tokens
PROMPT = "the quick brown fox jumps over the lazy dog and then the quick brown fox jumps once more over it all"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    return {f: save_runnable_checkpoint(root / f, f) for f in (*FAMILIES, *AS_TRANSFORMERS)}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(session_module, "PREFILL_CHUNK", CHUNK)


@pytest.fixture
def repeats(monkeypatch):
    """The key lengths repeat_kv copied, per call."""
    lengths = []
    real = sdpa_attention.repeat_kv

    def spy(states, n_rep):
        if n_rep > 1:
            lengths.append(states.shape[2])
        return real(states, n_rep)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", spy)
    return lengths


def _prefill_and_step(session) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 300, (2, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, advance, _ = session.steps(ids)
        after = advance(logits.argmax(dim=-1, keepdim=True))
    return logits.float(), after.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_are_transformers_sdpa_without_repeated_heads(checkpoints, small_chunks, repeats, family):
    session = heavylift.load(str(checkpoints[family]), quant="bf16", context=CONTEXT, batch=2, engine="transformers")
    config = session.model.config
    assert config._attn_implementation == HEAVYLIFT_SDPA
    grouped = config.num_attention_heads != config.num_key_value_heads
    ours = _prefill_and_step(session)
    windowed = any(session.plan.architecture.layer_windows)
    if not windowed:
        assert repeats == []  # no layer repeats its key and value heads, at any chunk
    session.model.set_attn_implementation("sdpa")
    repeats.clear()
    theirs = _prefill_and_step(session)
    if grouped and not windowed:
        assert repeats and set(repeats) == {CONTEXT}  # transformers repeats at the cache's length after chunk 1
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=8e-3, rtol=0), (a - b).abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_greedy_generation_is_transformers_sdpa_own(checkpoints, capsys, monkeypatch, small_chunks, family):
    args = ("run", str(checkpoints[family]), "--prompt", PROMPT, "--quant", "bf16", "--engine", "transformers",
            "--max-new-tokens", "8", "--temperature", "0", "--context", "128", "--json", "--raw")
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    monkeypatch.setattr(attention_forward, "attend_in_place", lambda model: False)
    code, reference, _ = run_cli(capsys, *args)
    assert code == 0
    assert json.loads(out)["text"] == json.loads(reference)["text"]
    assert json.loads(out)["prompt_tokens"] > 2 * CHUNK


@pytest.mark.parametrize("family", AS_TRANSFORMERS)
def test_other_families_keep_transformers_attention(checkpoints, family):
    session = heavylift.load(str(checkpoints[family]), quant="bf16", context=CONTEXT, engine="transformers")
    assert session.model.config._attn_implementation != HEAVYLIFT_SDPA


def test_the_engine_and_the_load_alone_keep_transformers_attention(checkpoints):
    from heavylift.api import prepare

    folder = str(checkpoints["llama"])
    assert heavylift.load(folder, quant="bf16", context=CONTEXT, engine="fast").model.config._attn_implementation \
        == "sdpa"
    weights = prepare(folder, quant="bf16", context=CONTEXT, engine="transformers").load_weights()
    assert weights.model.config._attn_implementation == "sdpa"


def test_only_plain_causal_masks_after_cached_tokens_become_spans():
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    assert lean_mask(1, 8, 64, q_offset=torch.tensor(16), mask_function=causal_mask_function) == FilledCausal(8, 24)
    assert lean_mask(1, 8, 64, q_offset=0, mask_function=causal_mask_function) is None  # SDPA's is_causal
    decode = lean_mask(1, 1, 64, q_offset=16, mask_function=causal_mask_function, allow_is_causal_skip=False)
    assert decode.shape == (1, 1, 1, 64) and decode[0, 0, 0, :17].all() and not decode[0, 0, 0, 17:].any()
    window = lean_mask(1, 8, 64, q_offset=16, mask_function=sliding_window_causal_mask_function(4))
    assert window.shape == (1, 1, 8, 64)
    padded = lean_mask(1, 8, 64, q_offset=16, mask_function=causal_mask_function,
                       attention_mask=torch.ones(1, 64, dtype=torch.bool))
    assert padded.shape == (1, 1, 8, 64)


def test_the_planner_and_the_runtime_name_the_same_families():
    assert set(LEAN_ATTENTION_FAMILIES) == set(FAMILIES)
