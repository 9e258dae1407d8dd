"""Sampling settings, checked once, and the next-token choice they make."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heavylift.defaults import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P
from heavylift.errors import InvalidArgumentError


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0 means greedy
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K  # 0 keeps every token
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidArgumentError(f"--max-new-tokens must be a positive whole number, not {self.max_new_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise InvalidArgumentError(f"--temperature must be between 0 (greedy) and 100, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"--top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"--top-k must be 0 (off) or a positive number, not {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Next token ids [batch, 1] from last-position logits [batch, vocab]."""
        logits = logits.float()
        if self.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            ordered, order = torch.sort(logits, descending=True, dim=-1)
            probs = ordered.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > self.top_p  # keep the smallest set reaching top_p
            ordered = ordered.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator)
