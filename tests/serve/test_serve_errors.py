"""Every refusal of `heavylift serve` in OpenAI's error shape, with the right status, and no traceback in the
server's log."""

from __future__ import annotations

import time

import pytest

from heavylift.defaults import SERVE_MAX_BODY_BYTES

from .conftest import API_KEY, CONTEXT, SMALL_CONTEXT, openai_client

SHAPE = {"message", "type", "param", "code"}


def _refused(answer, status: int, param: str | None = None) -> str:
    """The message of an error answer, checked for its status, shape and field."""
    got, body = answer
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == SHAPE
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param
    return body["error"]["message"]


@pytest.fixture(scope="module")
def name(checkpoint) -> str:
    return str(checkpoint)


def _chat(name: str, **fields) -> dict:
    return {"model": name, "messages": [{"role": "user", "content": "hello"}], **fields}


@pytest.mark.parametrize("fields, param, words", [
    (dict(temperature="hot"), "temperature", "valid number"),
    (dict(max_tokens=1.5), "max_tokens", "valid integer"),
    (dict(stream="yes"), "stream", "valid boolean"),
    (dict(temperature=2.5), "temperature", "between 0 (greedy) and 2"),
    (dict(top_p=0), "top_p", "in (0, 1]"),
    (dict(top_k=-2), "top_k", "-1 (off)"),
    (dict(n=2), "n", "n must be 1"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (dict(stop=[""]), "stop", "non-empty"),
    (dict(logprobs=True, top_logprobs=6), "top_logprobs", "0 to 5"),
    (dict(top_logprobs=2), "top_logprobs", "needs logprobs true"),
    (dict(max_tokens=-1), "max_tokens", "0 or more"),
    (dict(max_tokens=0), "max_tokens", "scores the prompt"),
    (dict(presence_penalty=0.5), "presence_penalty", "not supported"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role", "must be one of"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages.0.content", "text parts"),
    (dict(messages=[]), "messages", "at least one message"),
    (dict(messages="hello"), "messages", "valid array"),
])
def test_invalid_chat_values_are_400(server, name, fields, param, words):
    assert words in _refused(server.post("/v1/chat/completions", _chat(name, **fields)), 400, param)


@pytest.mark.parametrize("fields, param, words", [
    (dict(prompt=""), "prompt", "empty"),
    (dict(prompt=["a", "b"]), "prompt", "2 prompts"),
    (dict(prompt=[1, 99999]), "prompt", "token id 99999, outside this model's vocabulary of 320"),
    (dict(prompt={"text": "a"}), "prompt", "a string, a list of token ids"),
    (dict(prompt="hi", logprobs=6), "logprobs", "0 to 5"),
    (dict(prompt="hi", echo=True, max_tokens=0), "max_tokens", "echo true and logprobs set"),
])
def test_invalid_completion_values_are_400(server, name, fields, param, words):
    assert words in _refused(server.post("/v1/completions", {"model": name, **fields}), 400, param)


def test_a_prompt_and_max_tokens_beyond_the_context_is_400_with_both_numbers(server, name):
    message = _refused(server.post("/v1/completions", {"model": name, "prompt": [5] * 200, "max_tokens": 100}),
                       400, "max_tokens")
    assert message == (f"the prompt is 200 tokens and max_tokens 100 would reach 300, beyond the server's "
                       f"context of {CONTEXT} tokens; lower max_tokens or shorten the prompt")
    message = _refused(server.post("/v1/completions", {"model": name, "prompt": [5] * CONTEXT}), 400, "prompt")
    assert f"the prompt is {CONTEXT} tokens, and the context is {CONTEXT}" in message


def test_a_body_that_is_not_json_or_not_an_object_is_400(server):
    assert "not valid JSON" in _refused(server.post("/v1/completions", b"{not json"), 400)
    assert "JSON object" in _refused(server.post("/v1/completions", b"[1, 2]"), 400)
    assert "model: Field required" in _refused(server.post("/v1/completions", {"prompt": "hi"}), 400, "model")


def test_unknown_model_route_and_method(server, name):
    message = _refused(server.post("/v1/chat/completions", _chat("gpt-4")), 404, "model")
    assert message == f"model 'gpt-4' is not served here; this server serves {name!r}"
    assert "no route POST /v1/embeddings" in _refused(server.post("/v1/embeddings", {"input": "x"}), 404)
    assert _refused(server.get("/v1/models/gpt-4"), 404).startswith("model 'gpt-4' is not served here")
    status, body, headers = server.request("GET", "/v1/chat/completions")
    assert "GET is not allowed on /v1/chat/completions; use POST" == _refused((status, body), 405)
    assert headers["allow"] == "POST"


def test_a_body_over_the_limit_is_413_before_it_is_read(server, name):
    """The declared length alone refuses it: the 16 MiB are never sent."""
    status, body, _ = server.request("POST", "/v1/completions", None,
                                     {"Content-Type": "application/json",
                                      "Content-Length": str(SERVE_MAX_BODY_BYTES + 1)})
    assert _refused((status, body), 413) == f"the request body is over the server's limit of {SERVE_MAX_BODY_BYTES:,} bytes"


def test_openai_client_raises_its_own_errors(client, name):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], temperature=9)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi")


def test_key_is_required_when_set(small_server, name):
    import openai

    message = _refused(small_server.get("/v1/models"), 401)
    assert message == "missing or wrong API key; send it as the header 'Authorization: Bearer KEY'"
    with pytest.raises(openai.AuthenticationError):
        openai_client(small_server, "sk-wrong").models.list()
    assert [m.id for m in openai_client(small_server, API_KEY).models.list()] == [name]
    assert small_server.get("/health")[0] == 200  # monitoring needs no key


def test_a_full_queue_is_429(small_server, name):
    """One slot, one waiting request: a third is refused at once; the first two are cancelled by leaving."""
    import openai

    client = openai_client(small_server, API_KEY)
    long = dict(model=name, prompt="hello world", max_tokens=SMALL_CONTEXT - 16, temperature=0, stream=True)
    running = client.completions.create(**long)
    next(iter(running))  # the first token: it holds the slot
    waiting = client.completions.create(**long)  # the answer starts once it is queued
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=name, prompt="hi", max_tokens=1)
    assert e.value.status_code == 429 and set(e.value.body) == SHAPE and e.value.body["code"] == "queue_full"
    running.close()
    waiting.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and small_server.metrics()["heavylift_kv_slots_used"] != 0:
        time.sleep(0.05)
    assert small_server.metrics()["heavylift_requests_waiting"] == 0
    assert small_server.metrics()["heavylift_kv_slots_used"] == 0


def test_no_traceback_reaches_the_log(server, small_server):
    """Runs after the refusals above (pytest keeps a file's order): none of them logged a traceback."""
    for s in (server, small_server):
        assert "Traceback" not in s.stderr() and "Exception in ASGI" not in s.stderr()
