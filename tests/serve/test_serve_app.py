"""The HTTP layer alone, in this process, over a scheduler that replays set events: what the real model
cannot be made to do on cue (fail mid-generation, stay loading)."""

from __future__ import annotations

import threading

from starlette.testclient import TestClient

from heavylift.serve.app import ModelCard, create_app
from heavylift.serve.events import Delta, Done, Failed, Stats, TokenScore

NAME = "tiny"
CONTEXT = 64


class Tokenizer:
    """Token i is the letter chr(97 + i); no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 97 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i) for i in ids)


class ReplayStream:
    def __init__(self, events):
        self.events = list(events)
        self.cancelled = False

    def __aiter__(self):
        return self._replay()

    async def _replay(self):
        for event in self.events:
            yield event

    def cancel(self):
        self.cancelled = True


class ReplayScheduler:
    context = CONTEXT

    def __init__(self, events):
        self.events = events
        self.submitted = []
        self.ready = threading.Event()
        self.ready.set()
        self.failure = None

    def start(self):
        pass

    def submit(self, request):
        self.submitted.append(request)
        return ReplayStream(self.events)

    def stats(self):
        return Stats(0, 0, 0, 1, 0, 0)

    def shutdown(self, drain_seconds):
        pass


def _client(load, **options) -> TestClient:
    return TestClient(create_app(ModelCard(NAME, Tokenizer(), CONTEXT, 26), load, **options))


GOT_AB = [Delta("a", (TokenScore(0, -0.5, ()),)), Delta("b", (TokenScore(1, -0.25, ()),))]
OOM = Failed("out of GPU memory at 3 prompt tokens; lower --max-seqs", 503)


def test_a_failure_is_its_status_or_an_error_event_mid_stream():
    with _client(lambda: ReplayScheduler(GOT_AB + [OOM])) as client:
        answer = client.post("/v1/completions", json={"model": NAME, "prompt": "abc", "max_tokens": 5})
        assert answer.status_code == 503
        assert answer.json() == {"error": {"message": OOM.message, "type": "service_unavailable_error",
                                           "param": None, "code": None}}
        streamed = client.post("/v1/completions", json={"model": NAME, "prompt": "abc", "max_tokens": 5,
                                                         "stream": True})
        events = [line for line in streamed.text.split("\n\n") if line]
        assert streamed.status_code == 200 and len(events) == 4
        assert events[2] == 'data: {"error":{"message":"%s","type":"service_unavailable_error","param":null,' \
                            '"code":null}}' % OOM.message
        assert events[3] == "data: [DONE]"


def test_completions_logprobs_offsets_and_the_chosen_token():
    events = [Delta("ab", (TokenScore(0, -0.5, ((1, -0.1),)), TokenScore(1, -0.25, ((1, -0.25),)))),
              Done("length", 3, 2)]
    with _client(lambda: ReplayScheduler(events)) as client:
        body = client.post("/v1/completions", json={"model": NAME, "prompt": "xyz", "max_tokens": 2,
                                                    "logprobs": 1, "echo": True}).json()
    assert body["choices"][0]["text"] == "xyzab"
    assert body["choices"][0]["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-0.5, -0.25],
                                              "top_logprobs": [{"b": -0.1, "a": -0.5}, {"b": -0.25}],
                                              "text_offset": [0, 1]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_while_loading_health_and_generation_answer_503():
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return ReplayScheduler([Done("length", 1, 0)])

    with _client(slow_load) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        answer = client.post("/v1/chat/completions", json={"model": NAME, "messages": []})
        assert answer.status_code == 503
        assert answer.json()["error"] == {"message": f"{NAME} is still loading; retry when GET /health answers 200",
                                          "type": "service_unavailable_error", "param": None, "code": "model_loading"}
        release.set()


def test_a_streamed_body_over_the_limit_is_413():
    def chunks():
        for _ in range(10):
            yield b"x" * 50

    with _client(lambda: ReplayScheduler([]), max_body_bytes=200) as client:
        answer = client.post("/v1/completions", content=chunks())
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"


def test_chat_needs_a_chat_template():
    with _client(lambda: ReplayScheduler([])) as client:
        answer = client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user",
                                                                                        "content": "hi"}]})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == ("this model's tokenizer has no chat template; send the text to "
                                                 "/v1/completions")
