"""The OpenAI wire format of answers: whole responses and streamed chunks of both endpoints, built from
the scheduler's events.

Token strings in logprobs are each token decoded alone (a piece of a multi-byte character decodes to
U+FFFD, as in OpenAI's answers); completions' text_offset counts those strings' characters from the start
of the choice's text.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from .events import Done, TokenScore

TOKEN_STRING_CACHE = 1 << 16  # decoded token strings kept: the whole vocabulary of most models
# The logprob reported for a token of probability zero: JSON has no -Infinity (vLLM reports the same floor).
LOGPROB_FLOOR = -9999.0


def _logprob(value: float | None) -> float | None:
    return None if value is None else max(value, LOGPROB_FLOOR)


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


@dataclass
class Outcome:
    """A whole generation: the events of one stream gathered."""

    prompt: tuple[TokenScore, ...] = ()  # the prompt's scores, with echo and logprobs
    pieces: list[str] = field(default_factory=list)
    tokens: list[TokenScore] = field(default_factory=list)
    done: Done | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class Render:
    """What one request's answers share: its id, time, model name, and the token strings."""

    object_whole = object_chunk = ""
    id_prefix = ""

    def __init__(self, model: str, tokenizer, alternatives: int | None):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.alternatives = alternatives  # None: no logprobs asked
        self.token_text = _token_strings(tokenizer)

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, outcome: Outcome) -> dict:
        body = self._envelope(self.object_whole, [self._choice(outcome)])
        body["usage"] = usage(outcome.done)
        return body

    def chunk(self, choice: dict, include_usage: bool) -> dict:
        body = self._envelope(self.object_chunk, [{"index": 0, **choice}])
        if include_usage:
            body["usage"] = None  # every chunk but the last, which carries the usage and no choice
        return body

    def usage_chunk(self, done: Done) -> dict:
        return {**self._envelope(self.object_chunk, []), "usage": usage(done)}

    def _choice(self, outcome: Outcome) -> dict:
        raise NotImplementedError

    # A stream's choices: `opening` before any event, `prompt` for the prompt's scores, `delta` for new text,
    # `closing` at the end; None sends nothing.
    def opening(self) -> dict | None:
        return None

    def prompt(self, scores: Sequence[TokenScore]) -> dict | None:
        return None


def _token_strings(tokenizer):
    @lru_cache(maxsize=TOKEN_STRING_CACHE)
    def text(token: int) -> str:
        return tokenizer.decode([token])

    return text


class ChatRender(Render):
    object_whole, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def _choice(self, outcome: Outcome) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": outcome.text},
                "logprobs": self.logprobs(outcome.tokens), "finish_reason": outcome.done.finish_reason}

    def logprobs(self, tokens: Sequence[TokenScore]) -> dict | None:
        if self.alternatives is None:
            return None
        return {"content": [self._entry(t.id, t.logprob, t.top) for t in tokens], "refusal": None}

    def _entry(self, token: int, logprob: float, top) -> dict:
        text = self.token_text(token)
        entry = {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode())}
        if top is not None:
            entry["top_logprobs"] = [self._entry(i, lp, None) for i, lp in top]
        return entry

    def opening(self) -> dict:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, text: str, tokens: Sequence[TokenScore]) -> dict:
        return {"delta": {"content": text}, "logprobs": self.logprobs(tokens), "finish_reason": None}

    def closing(self, done: Done) -> dict:
        return {"delta": {}, "logprobs": None, "finish_reason": done.finish_reason}


class CompletionRender(Render):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model: str, tokenizer, alternatives: int | None, echo: str | None):
        super().__init__(model, tokenizer, alternatives)
        self.echo = echo  # the prompt's text, sent back before the completion; None: not asked
        self.offset = 0  # characters of token strings sent so far in this choice

    def _choice(self, outcome: Outcome) -> dict:
        text = (self.echo or "") + outcome.text
        return {"index": 0, "text": text, "logprobs": self.logprobs(outcome.prompt + tuple(outcome.tokens)),
                "finish_reason": outcome.done.finish_reason}

    def logprobs(self, tokens: Sequence[TokenScore]) -> dict | None:
        if self.alternatives is None:
            return None
        strings = [self.token_text(t.id) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": strings, "token_logprobs": [_logprob(t.logprob) for t in tokens],
                "top_logprobs": [self._top(t) for t in tokens], "text_offset": offsets}

    def _top(self, score: TokenScore) -> dict[str, float] | None:
        """The alternatives and, as OpenAI's API does, the chosen token: up to logprobs + 1 entries."""
        if score.logprob is None:  # the prompt's first token: nothing predicts it
            return None
        top = {self.token_text(i): _logprob(lp) for i, lp in score.top}
        top.setdefault(self.token_text(score.id), _logprob(score.logprob))
        return top

    def opening(self) -> dict | None:
        """The echoed prompt, when no scores of it are coming to go with it."""
        if self.echo is None or self.alternatives is not None:
            return None
        return {"text": self.echo, "logprobs": None, "finish_reason": None}

    def prompt(self, scores: Sequence[TokenScore]) -> dict:
        return {"text": self.echo or "", "logprobs": self.logprobs(scores), "finish_reason": None}

    def delta(self, text: str, tokens: Sequence[TokenScore]) -> dict:
        return {"text": text, "logprobs": self.logprobs(tokens), "finish_reason": None}

    def closing(self, done: Done) -> dict:
        return {"text": "", "logprobs": None, "finish_reason": done.finish_reason}
