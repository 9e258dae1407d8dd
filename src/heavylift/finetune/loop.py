"""The training loop: micro-batches in a seeded order, gradient accumulation, the learning-rate schedule,
held-out loss, checkpoints, and Ctrl-C, as a stream of events (Step, Evaluated, Saved) for whoever shows them.

The data's order is a function of the seed and the micro-batch's index alone, and a checkpoint holds the
LoRA weights, the optimizer, the schedule and torch's RNG: a run resumed from step N computes step N + 1
exactly as the uninterrupted run did. Ctrl-C lets the step in flight finish, saves a checkpoint and raises
KeyboardInterrupt; a second Ctrl-C stops at once, leaving the last checkpoint as it was.
"""

from __future__ import annotations

import math
import random
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from heavylift.defaults import FINETUNE_EPOCHS, LORA_WEIGHT_DECAY, WARMUP_FRACTION
from heavylift.planner.training import ADAMW
from .data import IGNORE, Example
from .settings import Settings


@dataclass(frozen=True)
class Step:
    """One optimizer step done."""

    step: int
    total_steps: int
    loss: float  # mean cross-entropy per learned token of the step's micro-batches
    lr: float  # the learning rate the step used
    tokens: int  # tokens the step read (padding excluded)
    tokens_per_s: float  # over the steps this process ran
    seconds_per_step: float  # likewise
    memory_bytes: int  # the largest GPU's allocator peak, or the process's resident memory on the CPU


@dataclass(frozen=True)
class Evaluated:
    step: int
    loss: float  # mean cross-entropy per learned token of the held-out examples


@dataclass(frozen=True)
class Saved:
    step: int
    folder: Path


class Order:
    """The training examples' order, epoch after epoch, each epoch shuffled by the seed: micro-batch `i` of
    the endless stream is always the same examples."""

    def __init__(self, count: int, micro_batch: int, seed: int) -> None:
        self.count, self.micro_batch, self.seed = count, micro_batch, seed
        self.per_epoch = math.ceil(count / micro_batch)
        self._epoch, self._order = -1, []

    def batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, random.Random(f"{self.seed}/{epoch}").sample(range(self.count),
                                                                                           self.count)
        return self._order[position * self.micro_batch:(position + 1) * self.micro_batch]


def total_steps(settings: Settings, batches_per_epoch: int) -> int:
    """--steps, else the steps that take --epochs (default one) passes over the training examples."""
    if settings.steps is not None:
        return settings.steps
    epochs = FINETUNE_EPOCHS if settings.epochs is None else settings.epochs
    return max(1, math.ceil(epochs * batches_per_epoch / settings.grad_accum))


def schedule(total: int) -> Callable[[int], float]:
    """The learning rate's factor for the step after `done` steps: a linear rise over the first
    WARMUP_FRACTION of the steps (from 1/warmup, so no step is wasted at 0), then a cosine towards 0."""
    warmup = max(1, math.ceil(total * WARMUP_FRACTION))

    def factor(done: int) -> float:
        if done < warmup:
            return (done + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (done - warmup) / max(1, total - warmup)))

    return factor


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    if name == ADAMW:
        return torch.optim.AdamW(params, lr=lr, weight_decay=LORA_WEIGHT_DECAY)
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=LORA_WEIGHT_DECAY)


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict:
    """Examples padded on the right to the longest: tokens, labels (IGNORE on padding), the attention mask
    where there is padding (None: full sequences, as the training plan counts them), and the tokens read."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
        mask[row, :len(e.input_ids)] = 1
    tokens = int(mask.sum())
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": None if tokens == mask.numel() else mask.to(device), "tokens": tokens}


def memory_bytes() -> int:
    """The largest GPU allocator peak, or on the CPU the process's resident set."""
    if torch.cuda.is_available():
        return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    import psutil  # accelerate's dependency

    return psutil.Process().memory_info().rss


class Interrupt:
    """Ctrl-C deferred to the next step's end while set up (main thread only); a second one stops at once."""

    def __init__(self, notice: Callable[[], None] | None) -> None:
        self.requested = False
        self.notice = notice

    @contextmanager
    def deferred(self) -> Iterator["Interrupt"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            if self.notice is not None:
                self.notice()

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
