"""heavylift.evaluate on a model trained on real text: the numbers mean what they say."""

from __future__ import annotations

import math

import pytest

import heavylift

from .conftest import TOKENS, WINDOW


def _evaluate(model, **kw):
    return heavylift.evaluate(str(model), **{"window": WINDOW, "tokens": TOKENS, **kw})


def test_reference_perplexity_equals_cross_entropy_over_transformers_logits(small_model):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heavylift.evaluation import corpus

    result = _evaluate(small_model, quant=["bf16"], engine="transformers")
    model = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.bfloat16)
    ids = AutoTokenizer.from_pretrained(small_model)(corpus.held_out_text())["input_ids"][:TOKENS]
    windows = torch.tensor(ids).view(-1, WINDOW)
    half = WINDOW // 2
    with torch.inference_mode():
        logits = model(input_ids=windows).logits.float()
    loss = F.cross_entropy(logits[:, half:-1].reshape(-1, logits.shape[-1]), windows[:, half + 1:].reshape(-1))
    reference = result.results[0]
    assert reference.reference and reference.quant == "bf16" and reference.runtime == "transformers"
    assert reference.positions == (TOKENS // WINDOW) * (half - 1) == 1008
    assert reference.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)


@pytest.mark.parametrize("engine", ["transformers", "fast"])
def test_a_model_against_itself_differs_by_nothing(small_model, engine):
    result = _evaluate(small_model, quant=["bf16"], engine=engine)
    same = result.results[1]
    assert (same.runtime, same.kld_mean, same.kld_max, same.kld_p99, same.same_top, same.rms_dp) == \
        ("fast" if engine == "fast" else "transformers", 0.0, 0.0, 0.0, 1.0, 0.0)
    assert same.perplexity == result.results[0].perplexity


def test_nf4_dq_loses_more_than_int8_and_both_lose_something(small_model):
    result = _evaluate(small_model, quant=["nf4-dq", "int8"], engine="transformers")
    nf4, int8 = result.results[1], result.results[2]
    assert int8.kld_mean > 0
    assert nf4.kld_mean > int8.kld_mean + 3 * (nf4.kld_error + int8.kld_error)
    assert nf4.same_top < int8.same_top <= 1.0
    assert nf4.memory_bytes < int8.memory_bytes < result.results[0].memory_bytes


def test_a_saved_reference_reused_gives_identical_numbers(small_model):
    first = _evaluate(small_model, quant=["nf4-dq"], engine="transformers")
    again = _evaluate(small_model, quant=["nf4-dq"], engine="transformers", reference=first.reference_file)
    assert again.results[1] == first.results[1]
    assert again.results[0].perplexity == first.results[0].perplexity
    assert (again.reference_quant, again.reference_file) == ("bf16", first.reference_file)


def test_the_engine_agrees_with_transformers_on_the_same_weights(small_model):
    """Engine-BF16 scored against transformers-BF16: rounding, not a different model."""
    result = _evaluate(small_model, quant=["bf16"], engine="fast", reference_engine="transformers")
    engine = result.results[1]
    assert engine.runtime == "fast" and result.reference_runtime == "transformers"
    assert engine.kld_mean < 1e-3 and engine.same_top > 0.97
