"""The OpenAI wire format of requests: pydantic models of the two bodies, and their checks into a
scheduler Request.

Types are strict (a string where a number belongs is refused, not converted) and unknown fields are
ignored, as OpenAI-compatible clients send fields of newer API versions. Every refusal is an
InvalidRequest: the message for the client and the field it concerns, answered with HTTP 400.
"""

from __future__ import annotations

from typing import Any, Sequence

from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ConfigDict, ValidationError

from heavylift.defaults import (SERVE_COMPLETIONS_MAX_TOKENS, SERVE_MAX_LOGPROBS, SERVE_MAX_STOP,
                                SERVE_MAX_TEMPERATURE, SERVE_TEMPERATURE, SERVE_TOP_P)
from heavylift.errors import HeavyliftError
from .events import Request

ROLES = ("system", "developer", "user", "assistant", "tool")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# Fields of the OpenAI API that heavylift does not implement, with the value that means "not used": any other
# value is refused rather than silently ignored.
UNSUPPORTED = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "tools": (None, []), "functions": (None, []), "best_of": (None, 1), "suffix": (None, ""),
               "response_format": (None, {"type": "text"})}


class InvalidRequest(HeavyliftError):
    """A request the server refuses with HTTP 400: `param` names the field (None: the body as a whole)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class Message(_Body):
    role: str
    content: Any = None  # a string or a list of {"type": "text", "text": ...} parts


class _Generation(_Body):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not in OpenAI's API; vLLM's extra field, -1 or 0 meaning off
    seed: int | None = None
    stop: Any = None  # a string or a list of strings
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = 1

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    @property
    def alternatives(self) -> int | None:
        """Alternatives asked for per token; None: no logprobs at all."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: Any  # a string, a list of one string, a list of token ids, or a list of one such list
    echo: bool = False
    logprobs: int | None = None

    @property
    def alternatives(self) -> int | None:
        return self.logprobs


def parse(body: bytes, kind: type[_Generation]) -> _Generation:
    """The body as `kind`, or InvalidRequest naming the first field in error."""
    try:
        request = kind.model_validate_json(body)
    except ValidationError as e:
        raise _first_error(e) from None
    _check_unsupported(request)
    return request


def _first_error(error: ValidationError) -> InvalidRequest:
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return InvalidRequest(f"the request body is not valid JSON ({first['ctx']['error']})")
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequest("the request body must be a JSON object")
    param = ".".join(str(part) for part in first["loc"])
    return InvalidRequest(f"{param}: {first['msg']}", param)


def _check_unsupported(request: _Generation) -> None:
    extra = request.model_extra or {}
    for name, unused in UNSUPPORTED.items():
        if name in extra and extra[name] not in unused:
            raise InvalidRequest(f"{name} is not supported by heavylift serve; leave it out", name)
    if request.n not in (None, 1):
        raise InvalidRequest(f"n must be 1 (one choice per request), not {request.n}", "n")


# --- prompts ------------------------------------------------------------------------------------

def chat_prompt(request: ChatRequest, tokenizer) -> list[int]:
    """The conversation in the tokenizer's chat template, as token ids."""
    from heavylift.runtime.session import encode

    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model's tokenizer has no chat template; send the text to /v1/completions", "messages")
    if not request.messages:
        raise InvalidRequest("messages is empty; give at least one message", "messages")
    messages = [_message(i, m) for i, m in enumerate(request.messages)]
    try:
        return encode(tokenizer, messages)
    except TemplateError as e:  # the template's own refusal, e.g. roles that do not alternate
        raise InvalidRequest(f"the chat template refuses these messages: {e}", "messages") from None


def _message(index: int, message: Message) -> dict:
    where = f"messages.{index}"
    if message.role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, not {message.role!r}", f"{where}.role")
    return {"role": "system" if message.role == "developer" else message.role,
            "content": _content(message.content, f"{where}.content")}


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidRequest(f"{where} must be a string or a list of text parts ({{\"type\": \"text\", \"text\": ...}})",
                         where)


def completion_prompt(request: CompletionRequest, tokenizer, vocab_size: int) -> tuple[list[int], str]:
    """The prompt's token ids (a string is tokenized as `heavylift run --raw` does, token ids are taken as
    they are), and its text (token ids decoded, without special tokens such as a BOS)."""
    from heavylift.runtime.session import encode

    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt is empty; give the text to continue", "prompt")
        return encode(tokenizer, prompt, raw=True), prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt holds token id {bad}, outside this model's vocabulary of {vocab_size}",
                                 "prompt")
        return list(prompt), tokenizer.decode(prompt, skip_special_tokens=True)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidRequest(f"prompt holds {len(prompt)} prompts; send one per request", "prompt")
    raise InvalidRequest("prompt must be a string, a list of token ids, or a list of one of those", "prompt")


# --- into a scheduler Request -------------------------------------------------------------------------

def to_request(request: ChatRequest | CompletionRequest, prompt: Sequence[int], context: int) -> Request:
    """Check every sampling value against its range and the prompt against the context; the Request."""
    echo = isinstance(request, CompletionRequest) and request.echo
    max_tokens = _max_tokens(request, len(prompt), context, echo)
    stop = _stop(request.stop)
    temperature = SERVE_TEMPERATURE if request.temperature is None else request.temperature
    top_p = SERVE_TOP_P if request.top_p is None else request.top_p
    top_k = request.top_k or 0
    _check_range("temperature", temperature, 0 <= temperature <= SERVE_MAX_TEMPERATURE,
                 f"between 0 (greedy) and {SERVE_MAX_TEMPERATURE:g}")
    _check_range("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")
    _check_range("top_k", top_k, top_k >= -1, "0 or -1 (off), or a positive number")
    if request.seed is not None:
        _check_range("seed", request.seed, SEED_RANGE[0] <= request.seed <= SEED_RANGE[1], "a 64-bit integer")
    alternatives = _alternatives(request)
    return Request(prompt=tuple(prompt), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                   top_k=max(top_k, 0), seed=request.seed, stop=stop, logprobs=alternatives,
                   echo_logprobs=echo and alternatives is not None)


def _check_range(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise InvalidRequest(f"{name} must be {expected}, not {value}", name)


def _max_tokens(request, prompt_tokens: int, context: int, echo: bool) -> int:
    """The tokens to generate: as asked, else OpenAI's default (the rest of the context for chat)."""
    name, asked = "max_tokens", request.max_tokens
    if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
        name, asked = "max_completion_tokens", request.max_completion_tokens
    if asked is None:
        if prompt_tokens >= context:
            raise InvalidRequest(f"the prompt is {prompt_tokens} tokens, and the context is {context}: no room "
                                 "for a reply; shorten the prompt",
                                 "messages" if isinstance(request, ChatRequest) else "prompt")
        return context - prompt_tokens if isinstance(request, ChatRequest) else \
            min(SERVE_COMPLETIONS_MAX_TOKENS, context - prompt_tokens)
    if asked < 0:
        raise InvalidRequest(f"{name} must be 0 or more, not {asked}", name)
    if asked == 0 and not (echo and request.alternatives is not None):
        raise InvalidRequest(f"{name} 0 generates nothing; it scores the prompt on /v1/completions with echo "
                             "true and logprobs set", name)
    if prompt_tokens + asked > context:
        raise InvalidRequest(f"the prompt is {prompt_tokens} tokens and {name} {asked} would reach "
                             f"{prompt_tokens + asked}, beyond the server's context of {context} tokens; "
                             f"lower {name} or shorten the prompt", name)
    return asked


def _stop(stop: Any) -> tuple[str, ...]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > SERVE_MAX_STOP:
        raise InvalidRequest(f"stop holds {len(stops)} sequences; at most {SERVE_MAX_STOP}", "stop")
    return tuple(stops)


def _alternatives(request) -> int | None:
    if isinstance(request, ChatRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs true", "top_logprobs")
        name = "top_logprobs"
    else:
        name = "logprobs"
    alternatives = request.alternatives
    if alternatives is not None:
        _check_range(name, alternatives, 0 <= alternatives <= SERVE_MAX_LOGPROBS, f"0 to {SERVE_MAX_LOGPROBS}")
    return alternatives
