"""The OpenAI API of `heavylift serve`, through OpenAI's client: both endpoints, streamed and not, usage,
stop strings, seeds, logprobs, and greedy answers equal to `heavylift run`'s."""

from __future__ import annotations

import pytest

from conftest import run_cli

from .conftest import CONTEXT, MAX_SEQS

PROMPT = "the quick brown fox"
TOKENS = 12
# The server's logprobs equal transformers' to the last bit on the engine's CPU path today; the tolerance
# allows the engine to compute its bfloat16 logits in another order: the tiny model's logits are below 0.6
# in size, where one bf16 rounding (2^-8 relative) is under 0.003, and a logprob moves by at most twice that.
LOGPROB_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def _run_greedy(capsys, checkpoint, prompt: str, *flags: str) -> str:
    """What `heavylift run --temperature 0` prints for `prompt`: the text, without the line's end."""
    code, out, err = run_cli(capsys, "run", str(checkpoint), "--prompt", prompt, "--temperature", "0",
                             "--max-new-tokens", str(TOKENS), "--context", str(CONTEXT), "--engine", "fast", *flags)
    assert code == 0, err
    return out[:-1]


def test_models_and_health(server, client, checkpoint):
    assert [m.id for m in client.models.list().data] == [str(checkpoint)]
    assert server.get("/health") == (200, {"status": "ok", "model": str(checkpoint)})
    status, body = server.get(f"/v1/models/{checkpoint}")
    assert status == 200 and body["max_model_len"] == CONTEXT


def test_health_answered_503_while_the_model_loaded(server):
    loading = [body for status, body in server.health_seen if status == 503]
    assert loading, "the port opens before the weights load"
    assert loading[0]["status"] == "loading"
    assert set(loading[0]["error"]) == {"message", "type", "param", "code"}
    assert loading[0]["error"]["code"] == "model_loading"


def test_greedy_completion_equals_heavylift_run(client, checkpoint, tokenizer, capsys):
    expected = _run_greedy(capsys, checkpoint, PROMPT, "--raw")
    done = client.completions.create(model=str(checkpoint), prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == \
        (prompt_tokens, TOKENS, prompt_tokens + TOKENS)
    assert done.object == "text_completion" and done.id.startswith("cmpl-") and done.model == str(checkpoint)

    chunks = list(client.completions.create(model=str(checkpoint), prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    assert all(c.usage is None for c in chunks[:-1])


def test_greedy_chat_equals_heavylift_run_in_the_chat_template(client, checkpoint, tokenizer, capsys):
    expected = _run_greedy(capsys, checkpoint, PROMPT)  # run wraps a prompt in the chat template
    messages = [{"role": "user", "content": PROMPT}]
    done = client.chat.completions.create(model=str(checkpoint), messages=messages, max_tokens=TOKENS, temperature=0)
    assert done.choices[0].message.content == expected and done.choices[0].message.role == "assistant"
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert done.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])

    chunks = list(client.chat.completions.create(model=str(checkpoint), messages=messages, max_completion_tokens=TOKENS,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)


def _first_stop(text: str) -> str:
    """Two printable characters from the middle of `text`, for a stop string."""
    for i in range(2, len(text) - 2):
        piece = text[i:i + 2]
        if piece.isprintable() and piece.isascii():
            return piece
    raise AssertionError(f"no printable pair in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_before_them(client, checkpoint, stream):
    whole = client.completions.create(model=str(checkpoint), prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    stop = _first_stop(whole.choices[0].text)
    expected = whole.choices[0].text[:whole.choices[0].text.index(stop)]
    answer = client.completions.create(model=str(checkpoint), prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                       stop=["never-there", stop], stream=stream)
    if stream:
        chunks = [c.choices[0] for c in answer]
        text, finish = "".join(c.text for c in chunks), chunks[-1].finish_reason
    else:
        text, finish = answer.choices[0].text, answer.choices[0].finish_reason
    assert (text, finish) == (expected, "stop")


def test_a_seed_repeats_a_sampled_answer(client, checkpoint):
    def sample(seed: int) -> str:
        return client.completions.create(model=str(checkpoint), prompt=PROMPT, max_tokens=TOKENS, temperature=1.0,
                                         seed=seed, extra_body={"top_k": 50}).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first  # 12 draws from about 50 tokens each: two seeds agreeing is vanishingly rare


def _transformers_logprobs(checkpoint, ids: list[int]) -> list[float]:
    """log_softmax of the model's logits, computed with transformers alone: each token's logprob given the
    tokens before it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    scores = torch.log_softmax(logits, dim=-1)
    return [scores[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_logprobs_score_the_prompt_as_the_model_does(client, checkpoint, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    expected = _transformers_logprobs(checkpoint, ids)
    for prompt in (PROMPT, ids):  # text, and token ids as lm-evaluation-harness sends them
        done = client.completions.create(model=str(checkpoint), prompt=prompt, echo=True, logprobs=1, max_tokens=0)
        choice = done.choices[0]
        assert choice.text == PROMPT
        assert choice.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
        assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
        offsets = [0]
        for token in choice.logprobs.tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        assert choice.logprobs.text_offset == offsets
        for token, logprob, top in zip(choice.logprobs.tokens[1:], choice.logprobs.token_logprobs[1:],
                                       choice.logprobs.top_logprobs[1:]):
            assert len(top) in (1, 2) and top[token] == logprob  # the best alternative, and the token itself
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), 0)


def test_chat_logprobs_in_openai_shape(client, checkpoint):
    done = client.chat.completions.create(model=str(checkpoint), messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=TOKENS, temperature=0, logprobs=True, top_logprobs=3)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens == TOKENS
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token  # greedy takes the best
        assert entry.logprob == entry.top_logprobs[0].logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.bytes == list(entry.token.encode())


def test_metrics_count_requests_and_slots(server):
    samples = server.metrics()
    assert samples["heavylift_kv_slots_total"] == MAX_SEQS
    assert samples["heavylift_requests_running"] == 0 and samples["heavylift_requests_waiting"] == 0
    assert samples["heavylift_prompt_tokens_total"] > 0 and samples["heavylift_generated_tokens_total"] > 0
    _, text = server.get("/metrics")
    assert 'heavylift_http_requests_total{route="/v1/completions",status="200"}' in text
    assert "heavylift_time_to_first_token_seconds_bucket" in text
    assert "heavylift_inter_token_latency_seconds_count" in text
