"""A plan covers every prompt length up to its context: each device's figures are those of the worst of the
lengths planner/prompt_lengths.py names, which the caching allocator's reserve is not monotone over."""

from __future__ import annotations

import heavylift
from heavylift.hardware.gpus import parse_gpu_spec
from heavylift.model.architecture import architecture_from_config
from heavylift.model.catalog import find_model
from heavylift.planner.forward_program import Part
from heavylift.planner.memory import FAST, TRANSFORMERS, bytes_at_prompt, runtime_terms
from heavylift.planner.prompt_lengths import prompt_lengths

(H100,) = parse_gpu_spec("1xH100")


def arch_of(model: str):
    return architecture_from_config(find_model(model).config_dict())


def held(plan, quant: str, prompt: int) -> int:
    """What the plan's only device holds beyond its weights when the prompts are `prompt` tokens long."""
    scheme, arch = plan.scheme(quant), plan.architecture
    d = scheme.per_device[0]
    return bytes_at_prompt(arch, quant, scheme.engine, plan.context, plan.batch, 2, d.device,
                           Part(d.layers, True, True), prompt, every_layer=True)


def test_gpt_oss_plan_is_the_most_that_any_prompt_up_to_its_context_holds():
    # At 1k x 8 the sliding layers' eager attention scores span the prompt (P x P) and the full layers' the
    # whole cache (P x 1024): four tensors of ~1 GB a layer that come within a segment's 2 MiB rounding of
    # each other only at P = 1024. A 1,020-token prompt leaves each full layer's too large for the blocks
    # the sliding layer freed: four new segments, 3.19 GB above a 1,024-token prompt.
    plan = heavylift.plan("gpt-oss-20b", gpus="1xH100", context=1024, batch=8, quant="bf16")
    d = plan.scheme("bf16").per_device[0]
    every = {p: held(plan, "bf16", p) for p in range(1, 1025)}
    worst = max(every, key=lambda p: (every[p], p))
    assert (worst, every[worst]) == (d.worst_prompt_tokens, d.total_bytes - d.weights_bytes) == (1020, 10_281_322_496)
    assert every[1024] == 7_095_748_608


def test_the_engine_replays_a_prompt_one_short_of_the_context_and_holds_no_mask_copy_there():
    # The last chunk of a 131,071-token prompt is 2,047 queries over 131,071 keys. The engine's attention after
    # a first chunk is aligned to the last key (causal_lower_right, flash attention) with no mask for SDPA to
    # pad a copy of (2,047 x 131,072 x 2 bytes, 512 MiB), so that prompt holds what the context's does.
    plan = heavylift.plan("llama3.1-8b", gpus="1xH100", context=131072, quant="bf16")
    d = plan.scheme("bf16").per_device[0]
    assert plan.scheme("bf16").engine == FAST and d.worst_prompt_tokens == 131072
    assert d.total_bytes - d.weights_bytes == held(plan, "bf16", 131071) == held(plan, "bf16", 131072) \
        == 18_323_136_512


def test_prompt_lengths_name_the_longest_of_each_shape():
    llama, gemma = arch_of("llama3.1-8b"), arch_of("gemma2-9b")  # gemma2: every other layer slides over 4,096
    # The engine: the longest prompt, and the longest whose mask SDPA pads or does not (multiples of 16).
    assert prompt_lengths(llama, fast=True, context=8192, batch=1, serve=False) == (8192, 8191)
    # A server leaves room for one token out.
    assert prompt_lengths(llama, fast=True, context=8192, batch=4, serve=True) == (8191, 8190, 8176)
    # transformers: the 16 longest, and every length whose last chunk is a multiple of 128 rows (16 tokens x 8).
    assert prompt_lengths(llama, fast=False, context=1024, batch=8, serve=False) == tuple(
        sorted(set(range(1009, 1025)) | set(range(16, 1025, 16)), reverse=True))
    # Over 8,192 tokens in chunks of 2,048 (a row grid of 128 tokens at batch 1, over the first chunk and the
    # last): the longest of one chunk (2,048) and of two, which is also the longest within the window (4,096).
    assert prompt_lengths(gemma, fast=False, context=8192, batch=1, serve=False) == tuple(
        sorted({2048, 4096} | set(range(8177, 8193)) | set(range(128, 2049, 128)) | set(range(6272, 8193, 128)),
               reverse=True))


def test_the_searches_for_a_split_replay_the_longest_prompt_alone():
    arch = arch_of("gpt-oss-20b")
    part = Part(range(arch.num_layers), True, True)
    search = runtime_terms(arch, "bf16", TRANSFORMERS, 1024, 8, 2, H100, part)
    final = runtime_terms(arch, "bf16", TRANSFORMERS, 1024, 8, 2, H100, part, every_layer=True)
    assert (search.prompt_tokens, final.prompt_tokens) == (1024, 1020)
    # The same buffers (the prompt ids of 1,020 and of 1,024 tokens x 8 take one 64 KiB block): the 3.19 GB
    # is all transient.
    assert final.buffer_bytes == search.buffer_bytes
    assert final.transient_bytes - search.transient_bytes == 10_281_322_496 - 7_095_748_608
