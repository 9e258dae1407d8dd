"""What a request and its answer are on the asyncio side of serving: the request, the events its stream
yields (Delta, Done, Failed; PromptScores for a scored prompt), the stream itself, and the text of a growing
list of tokens with what a stop string holds back. The worker thread (scheduler.py) makes the events and
hands them over through Stream._put.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from heavylift.errors import HeavyliftError

STOP = "stop"
LENGTH = "length"


class QueueFullError(HeavyliftError):
    """max_queue requests already wait."""


class StoppingError(HeavyliftError):
    """The server is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_tokens: int  # 0: score the prompt only (with echo_logprobs)
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text returned ends before the first of these
    logprobs: int | None = None  # None: no log-probabilities; N: the chosen token's and the N best
    echo_logprobs: bool = False  # also the prompt's tokens' log-probabilities


@dataclass(frozen=True)
class TokenScore:
    id: int
    logprob: float | None  # None for a prompt's first token: nothing before it predicts it
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class PromptScores:
    tokens: tuple[TokenScore, ...]


@dataclass(frozen=True)
class Delta:
    text: str  # "" while a partial character or a possible start of a stop string is held back
    tokens: tuple[TokenScore, ...]


@dataclass(frozen=True)
class Done:
    finish_reason: str  # STOP (end of sequence or a stop string) or LENGTH
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int  # the HTTP status it deserves


@dataclass(frozen=True)
class Stats:
    running: int
    waiting: int
    slots_used: int
    slots_total: int
    prompt_tokens_total: int
    generated_tokens_total: int


class Stream:
    """One request's events, in order, as an async iterator; ends after Done or Failed."""

    def __init__(self, on_cancel: Callable[["Stream"], None], request: Request,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._on_cancel, self.request, self._loop = on_cancel, request, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False
        self.cancelled = False

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self):
        if self._ended:
            raise StopAsyncIteration
        event = await self._queue.get()
        self._ended = isinstance(event, (Done, Failed))
        return event

    def cancel(self) -> None:
        """Stop generating for this request (a client gone): its slot is free before the next step."""
        self._on_cancel(self)

    def _put(self, event) -> None:  # from the worker thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


class Detokenizer:
    """Text of a growing list of tokens, a piece at a time: each step decodes only the last few tokens
    (from `prefix`), and holds a piece back while it ends in a partial UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins one of `stops` (sent only once it cannot)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest
