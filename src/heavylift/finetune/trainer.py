"""A LoRA model trained step by step (loop.py's pieces put together): `Trainer.run()` yields the events,
saves the checkpoints, and ends with the final adapter in --out."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from heavylift.defaults import MAX_GRAD_NORM
from .checkpoints import TRAINING_STATE, State, publish_final, save_checkpoint, write_state
from .data import Example
from .loop import (Evaluated, Interrupt, Order, Saved, Step, collate, make_optimizer, memory_bytes, rng_state,
                   schedule, set_rng_state, total_steps)
from .settings import Settings


@dataclass(frozen=True)
class Cadence:
    eval_every: int  # optimizer steps between held-out scores
    save_every: int  # optimizer steps between checkpoints


@dataclass(frozen=True)
class Summary:
    steps: int
    first_loss: float | None
    last_loss: float | None
    first_eval: float | None
    last_eval: float | None
    tokens_per_s: float
    memory_bytes: int
    seconds: float


class Trainer:
    def __init__(self, model, settings: Settings, train: Sequence[Example], held_out: Sequence[Example], pad_id: int,
                 out: Path, state: State, cadence: Cadence, compute_dtype: torch.dtype = torch.bfloat16,
                 resume: Path | None = None) -> None:
        self.model, self.settings, self.train, self.held_out = model, settings, tuple(train), tuple(held_out)
        self.pad_id, self.out, self.cadence, self.compute_dtype = pad_id, out, cadence, compute_dtype
        self.device = model.get_input_embeddings().weight.device
        self.order = Order(len(self.train), settings.micro_batch, settings.seed)
        self.total = total_steps(settings, self.order.per_epoch)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(settings.optimizer, self.trainable, settings.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(self.total))
        self.state = replace(state, total_steps=self.total)
        self.tokens, self.seconds, self.steps_here, self.peak = 0, 0.0, 0, 0
        if resume is not None:
            self._restore(resume)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def tokens_per_s(self) -> float:
        """Tokens read per second over the steps this process ran (0 before the first)."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def _restore(self, folder: Path) -> None:
        """The LoRA weights, optimizer, schedule and RNG of the checkpoint in `folder`."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from .adapter import ADAPTER_WEIGHTS

        set_peft_model_state_dict(self.model, load_file(str(folder / ADAPTER_WEIGHTS)))
        saved = torch.load(folder / TRAINING_STATE, weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])

    def _save(self) -> Saved:
        def write(folder: Path) -> None:
            self.model.save_pretrained(folder)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": rng_state()}, folder / TRAINING_STATE)
            write_state(folder, self.state)

        return Saved(self.step, save_checkpoint(self.out, self.step, write))

    def _log(self, entry: dict) -> None:
        self.state = replace(self.state, log=self.state.log + (entry,))

    def run(self, notice: Callable[[], None] | None = None) -> Iterator[Step | Evaluated | Saved]:
        """Train to the last step: a Step per optimizer step, Evaluated before the first step and every
        eval_every steps and after the last, Saved every save_every steps and after the last. On Ctrl-C (when
        running in the main thread): `notice()`, then the step in flight finishes, a checkpoint is saved,
        and KeyboardInterrupt is raised."""
        interrupt = Interrupt(notice)
        with interrupt.deferred():
            if self.step == 0:
                yield from self._evaluate(interrupt)
            last_saved = self.step
            while self.step < self.total and not interrupt.requested:
                yield self._one_step()
                if self.step % self.cadence.eval_every == 0 or self.step == self.total:
                    yield from self._evaluate(interrupt)
                if self.step % self.cadence.save_every == 0 or self.step == self.total or interrupt.requested:
                    saved = self._save()
                    last_saved = self.step
                    yield saved
            if interrupt.requested:
                if last_saved != self.step:
                    yield self._save()
                raise KeyboardInterrupt
            publish_final(self.out / f"checkpoint-{self.step}", self.out)

    def _one_step(self) -> Step:
        started = time.perf_counter()
        self.model.train()
        s = self.settings
        batches = [[self.train[i] for i in self.order.batch(self.state.micro_batches + k)] for k in range(s.grad_accum)]
        learned = sum(e.learned for batch in batches for e in batch)
        loss, tokens = 0.0, 0
        for batch in batches:
            inputs = collate(batch, self.pad_id, self.device)
            part = self._loss(inputs, learned)  # the model's output object is dropped here, its logits with it
            part.backward()
            loss += part.item()
            tokens += inputs["tokens"]
        torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state = replace(self.state, step=self.step + 1, micro_batches=self.state.micro_batches + s.grad_accum)
        self._log({"step": self.step, "loss": loss, "lr": lr, "tokens": tokens})
        self.tokens, self.steps_here = self.tokens + tokens, self.steps_here + 1
        self.seconds += time.perf_counter() - started
        self.peak = max(self.peak, memory_bytes())
        return Step(self.step, self.total, loss, lr, tokens, self.tokens_per_s,
                    self.seconds / self.steps_here, self.peak)

    def _loss(self, inputs: dict, learned: int) -> torch.Tensor:
        """The batch's share of a mean cross-entropy: its tokens' summed loss over `learned` (the tokens learned
        in the whole optimizer step), under autocast in the compute dtype, as the training plan's recipe runs it."""
        with torch.autocast(self.device.type, dtype=self.compute_dtype):
            return self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              labels=inputs["labels"], use_cache=False, num_items_in_batch=max(1, learned)).loss

    @torch.no_grad()
    def _evaluate(self, interrupt: Interrupt) -> Iterator[Evaluated]:
        """The held-out loss (none without held-out examples, or when Ctrl-C comes during it)."""
        if not self.held_out:
            return
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.held_out), self.settings.micro_batch):
            if interrupt.requested:
                return
            batch = self.held_out[start:start + self.settings.micro_batch]
            learned = sum(e.learned for e in batch)
            total += self._loss(collate(batch, self.pad_id, self.device), learned).item() * learned
            count += learned
        loss = total / max(count, 1)
        self._log({"step": self.step, "eval_loss": loss})
        yield Evaluated(self.step, loss)

    def summary(self) -> Summary:
        losses = [e["loss"] for e in self.state.log if "loss" in e]
        evals = [e["eval_loss"] for e in self.state.log if "eval_loss" in e]
        return Summary(self.step, losses[0] if losses else None, losses[-1] if losses else None,
                       evals[0] if evals else None, evals[-1] if evals else None,
                       self.tokens_per_s, self.peak, self.seconds)
